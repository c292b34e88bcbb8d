#!/usr/bin/env bash
# A throw-away Slurm cluster on this one machine, for developing and testing kdfast's Slurm support; not a user need.
# A controller and two node daemons (kd1, kd2; one CPU each) on 127.0.0.1, munge for authentication, all state under
# DIR (default /tmp/kdfast-slurm), ports 16817-16819 (KDFAST_SLURM_PORT moves them). Needs root, and Debian's
# slurm-wlm and munge (apt-get install slurm-wlm munge); Debian's slurmd can run twice on one host (slurmd -N).
#
#   bash launch/slurm_local.sh up [DIR]      start it; prints the SLURM_CONF to export
#   bash launch/slurm_local.sh down [DIR]    stop every daemon and remove DIR
#   SLURM_CONF=DIR/slurm.conf sbatch launch/slurm.sbatch kdfast.train ...
set -euo pipefail
action=${1:?usage: slurm_local.sh up|down [DIR]}
dir=$(realpath -m "${2:-/tmp/kdfast-slurm}")
conf=$dir/slurm.conf
port=${KDFAST_SLURM_PORT:-16817}  # the controller's; the nodes' are the next two

need() { command -v "$1" >/dev/null || { echo "slurm_local.sh: $1 not found: apt-get install slurm-wlm munge" >&2; exit 2; }; }

stop_daemons() {
  for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

write_conf() {
  mkdir -p "$dir"/state "$dir"/spool/kd1 "$dir"/spool/kd2 "$dir"/munge
  cat > "$conf" <<EOF
ClusterName=kdfast-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=15
InactiveLimit=0
MinJobAge=600
NodeName=kd1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=kd2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=kd1,kd2 Default=YES MaxTime=INFINITE State=UP
EOF
}

case $action in
  up)
    need slurmctld; need slurmd; need munged
    [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: needs root (the daemons run as root here)" >&2; exit 2; }
    stop_daemons
    write_conf
    munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
      --seed-file="$dir/munge/seed" --force
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    for node in kd1 kd2; do slurmd -f "$conf" -N "$node"; done
    for _ in $(seq 60); do
      if [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ]; then
        echo "local Slurm cluster up (nodes kd1, kd2 on 127.0.0.1): export SLURM_CONF=$conf"
        exit 0
      fi
      sleep 0.5
    done
    echo "slurm_local.sh: the nodes did not come up; see $dir/*.log" >&2
    sinfo >&2 || true
    exit 1 ;;
  down)
    if [ -e "$conf" ]; then  # end the jobs first: their step daemons outlive slurmd and would haunt the next cluster
      SLURM_CONF=$conf scancel --full --quiet --partition debug 2>/dev/null || true
      for _ in $(seq 40); do
        [ -z "$(SLURM_CONF=$conf squeue -h 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
    stop_daemons
    rm -rf "$dir" ;;
  *)
    echo "usage: slurm_local.sh up|down [DIR]" >&2; exit 2 ;;
esac
