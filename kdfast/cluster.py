"""What a job of several processes meets on a cluster: restarts, and a process or node that is lost or stuck.

A restart is a job started again by its launcher: torchrun --max-restarts (TORCHELASTIC_RESTART_COUNT > 0) or Slurm's
requeue (SLURM_RESTART_COUNT > 0). `--auto-resume` resumes on a restart only, so a first start never continues a
state by surprise.

A lost process shows up on the others as a failed collective: gloo raises "Connection closed by peer" at once when
the peer's sockets close (a killed process or node), or "Timed out waiting" after --dist-timeout when a peer neither
answers nor dies (a stuck rank, a node that vanished from the network). Which one is gone is found by a roll call in
the job's rendezvous store (MASTER_ADDR:MASTER_PORT, torchrun's agent store): every surviving process writes its rank
and waits a few seconds; the ranks missing are the lost ones. If the store itself is gone, so is the main node.
"""
from __future__ import annotations

import os
import re
import sys
import time
from datetime import timedelta

ROLL_CALL_S = 3.0  # how long the survivors wait for each other's answer
_FAILED_COLLECTIVE = re.compile(r"gloo|NCCL|Connection (?:closed|reset) by peer|timed out|timeout|pair closure|"
                                r"DistBackendError|ProcessGroup", re.IGNORECASE)


class JobLost(RuntimeError):
    """A process or node of the job was lost or is stuck; `report`: whether this process prints the line."""

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report


def restart_count() -> int:
    """How many times the launcher has started this job again (0: a first start)."""
    counts = []
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        try:
            counts.append(int(os.environ.get(name, "0") or 0))
        except ValueError:
            counts.append(0)
    return max(counts)


def process_group_store(timeout: timedelta) -> dict:
    """init_process_group's store under torchrun: the agent's store with a prefix per restart. torchrun keeps one
    store for every restart of its workers and (torch 2.14, static or shared c10d rendezvous) the workers' keys are
    not kept apart, so a restarted gloo or NCCL group reads the addresses of the dead one ("connectFullMesh failed:
    Connection refused"; pytorch issue 135712). Elsewhere (srun, mpirun): {} (the launcher's env:// defaults)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    import torch.distributed as dist

    rank, world, _ = place()
    if world < 2:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"kdfast/attempt_{restart_count()}", store), "rank": rank, "world_size": world}


def _ints(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def place() -> tuple[int, int, int]:
    """(rank, world size, processes per node) of this process, from the launcher's environment."""
    return (_ints("RANK", default=0), _ints("WORLD_SIZE", default=1),
            max(1, _ints("LOCAL_WORLD_SIZE", default=1)))


def is_collective_failure(e: BaseException) -> bool:
    """A collective that failed because another process is gone or stuck (not a bug of this process)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and bool(_FAILED_COLLECTIVE.search(str(e)))


def roll_call(rank: int, world: int, window_s: float = ROLL_CALL_S) -> list[int] | None:
    """The ranks that answer within window_s (this one included); None when the job's store cannot be reached."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not host or not port.isdigit():
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    keys = [f"kdfast/roll_call/{attempt}/{r}" for r in range(world)]
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5),
                              wait_for_workers=False)
        store.set(keys[rank], "here")
        deadline = time.monotonic() + window_s
        while True:
            present = [r for r in range(world) if store.check([keys[r]])]
            if len(present) == world or time.monotonic() > deadline:
                return present
            time.sleep(0.2)
    except Exception:  # the store's host is gone (or never answered)
        return None


def describe_ranks(ranks: list[int], per_node: int) -> str:
    """ "node 1 (ranks 2, 3)" for a whole node, "rank 1 (node 0)" for one process of a node that has others."""
    parts = []
    for node in sorted({r // per_node for r in ranks}):
        mine = [r for r in ranks if r // per_node == node]
        if len(mine) == per_node:
            parts.append(f"node {node} (rank{'s' * (len(mine) > 1)} {', '.join(map(str, mine))})")
        else:
            parts.extend(f"rank {r} (node {node})" for r in mine)
    return ", ".join(parts)


def lost_job(e: BaseException, state_line: str = "", advice: str = "") -> JobLost:
    """The one line for a failed collective: who was lost (by roll call), what failed, the state kept, how to resume.
    Only the lowest surviving rank reports it (every surviving node's first process when the main node is gone)."""
    rank, world, per_node = place()
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", cause)  # gloo's "[.../pair.cc:534] " source location
    cause = re.split(r"\.\s+(?=[A-Z])", cause)[0][:200]  # its first sentence (gloo adds advice and an emoji)
    here = f"rank {rank} (node {rank // per_node}, host {os.uname().nodename})"
    present = roll_call(rank, world)
    if present is None:
        who, report = "lost the main node (node 0, the job's store at " \
                      f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})", rank % per_node == 0
    else:
        missing = [r for r in range(world) if r not in present]
        who = (f"lost {describe_ranks(missing, per_node)}: it stopped answering" if missing else
               "a collective failed on every process")
        report = rank == min(present)
    advice = advice or "Run the same command again to continue from the state saved last."
    return JobLost(f"{who} ({cause}); seen from {here}. {state_line + ' ' if state_line else ''}{advice}", report)


def exit_lost(e: JobLost) -> None:
    """Print the line (on the reporting process), then leave at once: the process group is broken, and its
    destructors can wait on the lost peers."""
    if e.report:
        print(f"kdfast: error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
