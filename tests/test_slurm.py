"""launch/slurm.sbatch under a real Slurm: the local two-node cluster of launch/slurm_local.sh (kd1, kd2 on 127.0.0.1).
Runs where sbatch exists (skipped otherwise): on a machine with a cluster of its own, SLURM_CONF set and
KDFAST_SLURM_TESTS=1 use it; else the test starts the local cluster (root, Debian's slurm-wlm and munge) and stops it."""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from .conftest import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm (sbatch)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.environ.get("KDFAST_SLURM_TESTS") == "1" and os.environ.get("SLURM_CONF"):
        yield dict(os.environ)
        return
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("no cluster to use: the local one needs root and slurmctld (launch/slurm_local.sh)")
    folder = str(tmp_path_factory.mktemp("slurm") / "cluster")
    env = {**os.environ, "KDFAST_SLURM_PORT": "16917"}
    up = subprocess.run(["bash", "launch/slurm_local.sh", "up", folder], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    yield {**env, "SLURM_CONF": os.path.join(folder, "slurm.conf")}
    subprocess.run(["bash", "launch/slurm_local.sh", "down", folder], cwd=ROOT, env=env, timeout=120)


def job_field(env, job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    found = re.search(rf"\b{name}=(\S+)", shown)
    return found.group(1) if found else ""


def wait_until(test, what: str, seconds: float = 180, env=None, job: str = ""):
    t0 = time.time()
    while not test():
        assert time.time() - t0 < seconds, f"timed out waiting for {what}" + (_slurm_says(env, job) if env else "")
        time.sleep(0.2)


def _slurm_says(env, job: str) -> str:
    """The job as Slurm shows it, and the end of the controller's log (where it says why a job waits)."""
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    log = os.path.join(os.path.dirname(env["SLURM_CONF"]), "slurmctld.log")
    tail = open(log).read()[-3000:] if os.path.exists(log) else ""
    return f"\n{shown}\n{tail}"


def saved_progress(out) -> tuple:
    try:
        progress = json.load(open(os.path.join(out, ".state", "run", "state.json")))["progress"]
        return progress["epoch"], progress["step"]
    except (OSError, ValueError, KeyError):
        return None


def requeued(env, job: str, restarts: int) -> None:
    """Wait for the job to be requeued and run again: a requeued job may start once its old credentials expired
    (AuthInfo cred_expire: 120 s by default, 10 s on the local cluster; forcing an earlier start fails it)."""
    wait_until(lambda: job_field(env, job, "Restarts") == str(restarts), f"restart {restarts}", env=env, job=job)
    wait_until(lambda: job_field(env, job, "JobState") in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED"),
               f"restart {restarts} to run", env=env, job=job)


def test_a_two_node_job_preempted_twice_is_requeued_and_resumes_by_itself(slurm, tmp_path):
    """sbatch launch/slurm.sbatch on two nodes: SIGUSR1 to the batch script (what --signal=B:USR1@120 sends before
    the time limit) makes the job save, exit and requeue itself; later `scontrol requeue` (a preemption) sends
    SIGTERM, the job saves and Slurm requeues it. Each requeued job continues the state with --auto-resume."""
    data = write_image_folder(str(tmp_path / "tiny"), n_train=40)
    out, log = str(tmp_path / "out"), str(tmp_path / "job.out")
    env = {**slurm, "PATH": os.path.dirname(shutil.which("python") or "") + os.pathsep + slurm.get("PATH", "")}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--output", log, "launch/slurm.sbatch", "kdfast.train", "--model", "timm:test_vit",
         "--data", data, "--cache-dir", str(tmp_path / "cache"), "--epochs", "40", "--batch-size", "6",
         "--eval-batch-size", "30", "--precision", "fp32", "--no-progress", "--name", "run", "--out-dir", out,
         "--checkpoint-every", "5", "--auto-resume"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: saved_progress(out) is not None, "a first saved state")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        requeued(env, job, 1)
        first = saved_progress(out)
        wait_until(lambda: job_field(env, job, "JobState") == "RUNNING" and (saved_progress(out) or (0,)) > first
                   and saved_progress(out)[0] >= first[0] + 2, "the requeued job to save a later state", env=env, job=job)
        subprocess.run(["scontrol", "requeue", job], env=env, check=True)
        requeued(env, job, 2)
        wait_until(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job's end", 300)
    finally:
        subprocess.run(["scancel", job], env=env)
    text = open(log).read()
    assert job_field(env, job, "JobState") == "COMPLETED" and job_field(env, job, "Restarts") == "2", text[-4000:]
    for restart in (0, 1, 2):
        assert f"kdfast slurm: job {job} (restart {restart}) on kd[1-2]: 2 nodes x 1 processes" in text
    assert "kdfast slurm: USR1 received" in text and f"kdfast slurm: requeueing job {job}" in text
    assert text.count("[run] SIGTERM: stopped after") == 2, text[-4000:]
    for restart in (1, 2):
        assert f"[run] --auto-resume: restart {restart} of this job: continuing its saved state" in text
    assert text.count("[run] test accuracy") == 1
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(out, "run.metrics.jsonl"))]
    assert epochs == list(range(40))
