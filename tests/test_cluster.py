"""What a cluster does to a job (#18), with real processes on 127.0.0.1: two nodes, a node lost, a rank stuck, a job
restarted by torchrun, resumes on another number of processes. A ViT without BatchNorm or drop-path (timm's
test_vit), so one process with the whole global batch computes what two compute, within float tolerance."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from kdfast import cluster, train
from kdfast.config import TrainConfig
from kdfast.errors import KdfastError
from kdfast.runstate import ResumableState

from .conftest import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
STEPS = 20  # steps an epoch: 120 training images in batches of 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vit_flags(data: str, out, epochs: int = 2) -> list[str]:
    return ["--model", "timm:test_vit", "--data", data, "--cache-dir", os.path.join(os.path.dirname(data), "cache"),
            "--epochs", str(epochs), "--batch-size", "6", "--eval-batch-size", "30", "--precision", "fp32",
            "--no-progress", "--name", "run", "--out-dir", str(out), "--checkpoint-every", "5"]


def helper(step: int, *args) -> list[str]:
    """tests.stop_at: the entry point with a fault before global step `step` (-1: none)."""
    return ["-m", "tests.stop_at", str(step), "kdfast.train", *args]


def torchrun(nproc: int, port: int, *args, nnodes: int = 1, node_rank: int = 0, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
            "--max-restarts", str(restarts), *args]


def run(cmd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)


def weights(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_close_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), (k, (wa[k] - wb[k]).abs().max())


def steps_seen(record) -> dict[int, list[int]]:
    """global step -> the sorted sample indices of its global batch; a step run again (after a restart) counts its
    last run only."""
    seen: dict[tuple[int, str], list[int]] = {}
    for line in open(record):
        step, rank, *indices = line.split()
        seen[int(step), rank] = [int(i) for i in indices]
    steps: dict[int, list[int]] = {}
    for (step, _), indices in seen.items():
        steps.setdefault(step, []).extend(indices)
    return {s: sorted(v) for s, v in steps.items()}


def resumed_steps(before, after, resume_step: int) -> dict[int, list[int]]:
    """The steps of a run stopped and resumed at resume_step: those before from the first record, the rest from the
    second, which starts there."""
    first, second = steps_seen(before), steps_seen(after)
    assert min(second) == resume_step
    return {s: v for s, v in first.items() if s < resume_step} | second


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_node(proc: subprocess.Popen) -> None:
    """A node lost: its torchrun agent and every worker it started (in sessions of their own), with SIGKILL."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(path: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t0 < seconds, f"{path} never appeared"
        time.sleep(0.05)


def last_kdfast_line(output: str) -> str:
    return [line for line in output.splitlines() if line.startswith("kdfast:")][-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("cluster") / "tiny"), n_train=40)


# ---------------------------------------------------------------- a node lost, then 2 -> 1

def test_a_lost_node_ends_the_job_naming_it_and_the_run_resumes_on_one_process_as_if_never_stopped(tiny, tmp_path):
    """Two nodes x one process; node 1 (agent and worker) is killed with SIGKILL while its rank hangs at step 8: node
    0's process names the node, the state saved at step 5, how to resume, and its agent ends the job within seconds.
    Resumed on one process, the steps after the resume draw the very samples, and the final weights are, within float
    tolerance, those of an uninterrupted one-process run."""
    port, out = free_port(), tmp_path / "b"
    record = {"KDFAST_TEST_RECORD": str(tmp_path / "b1.steps")}
    nodes = [subprocess.Popen(torchrun(1, port, *helper(8, *vit_flags(tiny, out), "--dist-timeout", "120"), nnodes=2,
                                       node_rank=rank), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**ENV, **record, "KDFAST_TEST_FAULT": "stuck:1"}, cwd=ROOT, start_new_session=True)
             for rank in (0, 1)]
    wait_for(str(out / ".state" / "run" / "state.json"), nodes[0])
    time.sleep(1.0)  # rank 1 is now stuck before step 8, rank 0 waits for it in step 8
    kill_node(nodes[1])
    killed = time.time()
    output = nodes[0].communicate(timeout=120)[0]
    ended = time.time() - killed
    assert nodes[0].returncode != 0 and ended < 30, (ended, output[-3000:])
    line = last_kdfast_line(output)
    assert line.startswith("kdfast: error: lost node 1 (rank 1): it stopped answering"), line
    assert "seen from rank 0 (node 0" in line and "after epoch 0, step 5 of epoch 1" in line and "--resume" in line
    saved = ResumableState(str(out / ".state" / "run"), lambda p: None).saved()  # whole: it loads
    assert saved["progress"]["step"] == 5

    resumed = run([sys.executable, *helper(-1, *vit_flags(tiny, out), "--resume")],
                  {"KDFAST_TEST_RECORD": str(tmp_path / "b2.steps")})
    assert resumed.returncode == 0 and "resuming after epoch 0, step 5 of epoch 1" in resumed.stdout, \
        resumed.stderr[-3000:]
    whole = run([sys.executable, *helper(-1, *vit_flags(tiny, tmp_path / "a"))],
                {"KDFAST_TEST_RECORD": str(tmp_path / "a.steps")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = steps_seen(tmp_path / "a.steps"), resumed_steps(tmp_path / "b1.steps", tmp_path / "b2.steps", 5)
    assert sorted(a) == list(range(2 * STEPS)) and b == a  # before the stop (two ranks' halves) and after
    assert_close_weights(tmp_path / "a" / "run.pth", out / "run.pth")
    ma, mb = (json.loads(open(d / "run.metrics.jsonl").readline()) for d in (tmp_path / "a", out))
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-4) and ma["train_accuracy"] == mb["train_accuracy"]


# ---------------------------------------------------------------- a stuck rank, torchrun's restart, 1 -> 2

def test_a_stuck_rank_ends_the_job_after_the_timeout_and_torchrun_restarts_it_from_the_state(tiny, tmp_path):
    """A run stopped on one process (SIGTERM during step 8) is resumed on two; there rank 1 hangs at step 13 (first start
    only). With --dist-timeout 8 rank 0 names it and exits; torchrun --max-restarts 1 starts both again and the run
    continues from the state of step 10 to the end. The samples of every step after the resume, and the final weights,
    are those of an uninterrupted two-process run."""
    out = tmp_path / "b"
    stopped = run([sys.executable, *helper(7, *vit_flags(tiny, out))], {"KDFAST_TEST_RECORD": str(tmp_path / "b1.steps")})
    assert stopped.returncode == 128 + signal.SIGTERM and "stopped after step 8 of epoch 1" in stopped.stderr, \
        stopped.stderr[-3000:]
    t0 = time.time()
    resumed = run(torchrun(2, free_port(), *helper(13, *vit_flags(tiny, out), "--resume", "--dist-timeout", "8"),
                           restarts=1), {"KDFAST_TEST_RECORD": str(tmp_path / "b2.steps"), "KDFAST_TEST_FAULT": "stuck:1"})
    took = time.time() - t0
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = last_kdfast_line(resumed.stderr)
    assert line.startswith("kdfast: error: lost rank 1 (node 0): it stopped answering") and "step 10 of epoch 1" in line
    assert resumed.stdout.count("resuming after epoch 0, step 8 of epoch 1") == 1, resumed.stdout
    assert resumed.stdout.count("resuming after epoch 0, step 10 of epoch 1") == 1, resumed.stdout
    assert took < 240, took

    whole = run(torchrun(2, free_port(), *helper(-1, *vit_flags(tiny, tmp_path / "a"))),
                {"KDFAST_TEST_RECORD": str(tmp_path / "a.steps")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = steps_seen(tmp_path / "a.steps"), resumed_steps(tmp_path / "b1.steps", tmp_path / "b2.steps", 8)
    assert sorted(a) == list(range(2 * STEPS)) and b == a
    assert_close_weights(tmp_path / "a" / "run.pth", out / "run.pth")


# ---------------------------------------------------------------- without processes

def test_auto_resume_continues_only_a_restarted_job_and_keeps_a_finished_run(tiny, tmp_path, monkeypatch, capsys):
    from kdfast import engine

    cfg = TrainConfig(model="timm:test_vit", data=tiny, cache_dir=os.path.join(os.path.dirname(tiny), "cache"),
                      out_dir=str(tmp_path), name="run", epochs=2, batch_size=6, eval_batch_size=30, precision="fp32",
                      progress=False, auto_resume=True)
    original = engine.loop.train_step

    def stop_at_3(tr, micro, global_step):
        if global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(tr, micro, global_step)

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setattr(engine.loop, "train_step", stop_at_3)
    with pytest.raises(Exception, match="continues it by itself"):
        train.run(cfg)
    monkeypatch.setattr(engine.loop, "train_step", original)
    with pytest.raises(KdfastError, match="Pass --resume to continue it"):  # a first start: never by surprise
        train.run(cfg)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(KdfastError, match="started with another config"):  # never over another config
        train.run(TrainConfig(**{**cfg.__dict__, "lr": 0.01}))
    meta = train.run(cfg)
    assert "restart 1 of this job: continuing its saved state" in capsys.readouterr().out
    again = train.run(cfg)  # requeued after it finished: kept, not trained again
    assert "its finished run is kept" in capsys.readouterr().out and again["test_accuracy"] == meta["test_accuracy"]
    with pytest.raises(ValueError, match="--auto-resume and --fresh exclude each other"):
        TrainConfig(auto_resume=True, fresh=True).validate()


def test_sync_bn_is_refused_on_cpu_before_any_work(tmp_path):
    cfg = TrainConfig(data=str(tmp_path / "nothing"), out_dir=str(tmp_path / "o"), sync_bn=True, progress=False)
    with pytest.raises(ValueError, match="--sync-bn: SyncBatchNorm needs GPUs with NCCL; torch has none on cpu"):
        train.run(cfg)
    assert not (tmp_path / "o").exists()


def test_restart_counts_and_lost_ranks_are_named(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert cluster.restart_count() == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "x")
    assert cluster.restart_count() == 0
    assert cluster.describe_ranks([1], 1) == "node 1 (rank 1)"
    assert cluster.describe_ranks([2, 3], 2) == "node 1 (ranks 2, 3)"
    assert cluster.describe_ranks([1, 4, 5], 2) == "rank 1 (node 0), node 2 (ranks 4, 5)"
    assert not cluster.is_collective_failure(RuntimeError("Connection closed by peer"))  # no process group here


# ---------------------------------------------------------------- two nodes

def sequence(data: str, out) -> list[str]:
    """train a teacher, build its logit cache, distil a student from it, then a smoke lab of the CNN pair."""
    common = ["--data", data, "--cache-dir", f"{out}/cache", "--precision", "fp32", "--no-progress"]
    fit = ["--model", "resnet8", "--batch-size", "12", "--eval-batch-size", "30", "--out-dir", f"{out}/m"]
    return ["-m", "tests.stop_at", "-1",
            "kdfast.train", *fit, *common, "--name", "teacher", "--epochs", "1", "--then",
            "kdfast.cache", "build", "--teacher", f"{out}/m/teacher.pth", "--out", f"{out}/t.h5", "--slots", "2",
            "--batch-size", "50", *common, "--then",
            "kdfast.distill", *fit, *common, "--name", "kd", "--teacher-cache", f"{out}/t.h5", "--epochs", "2",
            "--then",
            "kdfast.lab", "--pairs", "cnn", "--cnn-teacher", "resnet8", "--cnn-teacher-epochs", "1",
            "--cnn-student-epochs", "1", "--cnn-batch-size", "12", "--eval-batch-size", "30", "--out-dir",
            f"{out}/lab", "--report", f"{out}/report.json", *common]


def test_two_nodes_train_cache_distill_and_a_lab_as_two_processes_on_one_node_do(tiny, tmp_path):
    """Two torchrun agents on 127.0.0.1 (one process each, static rendezvous) against one agent with two processes:
    every file is put in place by rank 0 only, the checkpoints and logits are equal, each line is printed once."""
    import h5py

    outputs = {}
    for layout in ("nodes", "local"):
        out, env = tmp_path / layout, {"KDFAST_TEST_SEQUENCE": "1", "KDFAST_TEST_WRITES": str(tmp_path / f"{layout}.w")}
        port, cmd = free_port(), sequence(tiny, tmp_path / layout)
        if layout == "local":
            done = [run(torchrun(2, port, *cmd), env)]
        else:
            nodes = [subprocess.Popen(torchrun(1, port, *cmd, nnodes=2, node_rank=r), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**ENV, **env}, cwd=ROOT) for r in (0, 1)]
            done = [subprocess.CompletedProcess(n.args, n.wait(timeout=600), *n.communicate()) for n in nodes]
        for d in done:
            assert d.returncode == 0, d.stderr[-3000:]
        outputs[layout] = done[0].stdout
        if len(done) > 1:  # only the job's main process prints: node 1 says nothing
            assert done[1].stdout.strip() == "", done[1].stdout[-3000:]
        writers: dict[str, set] = {}
        for line in open(tmp_path / f"{layout}.w"):
            rank, path = line.split(" ", 1)
            writers.setdefault(path.strip(), set()).add(rank)
        assert writers and all(ranks == {"0"} for ranks in writers.values()), writers
        assert {str(out / p) for p in ("m/teacher.pth", "m/kd.pth", "t.h5", "report.json")} <= set(writers)
    for text in outputs.values():
        assert text.count("[kd] test accuracy") == 1 and text.count("[kd] epoch 1/2") == 1, text
    a, b = tmp_path / "nodes", tmp_path / "local"
    for name in ("m/teacher.pth", "m/kd.pth", "lab/cnn_teacher.pth", "lab/cnn_student_no_kd.pth",
                 "lab/cnn_student_with_kd.pth"):
        wa, wb = weights(a / name), weights(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    with h5py.File(a / "t.h5") as fa, h5py.File(b / "t.h5") as fb:
        assert (fa["train/logits"][:] == fb["train/logits"][:]).all()
    meta = json.load(open(a / "m" / "kd.json"))
    assert (meta["num_processes"], meta["distributed_type"], meta["test_samples"]) == (2, "MULTI_CPU", 12)
    ra, rb = (json.load(open(d / "report.json"))["cnn"] for d in (a, b))
    keys = ("teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd")
    assert [ra[k] for k in keys] == [rb[k] for k in keys]


def test_sigusr1_the_time_limit_warning_saves_the_state_as_sigterm_does(tiny, tmp_path, monkeypatch):
    from kdfast import engine
    from kdfast.errors import Interrupted

    cfg = TrainConfig(model="timm:test_vit", data=tiny, cache_dir=os.path.join(os.path.dirname(tiny), "cache"),
                      out_dir=str(tmp_path), name="run", epochs=1, batch_size=6, eval_batch_size=30, precision="fp32",
                      progress=False)
    original = engine.loop.train_step

    def warned_at_2(tr, micro, global_step):
        if global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(tr, micro, global_step)

    monkeypatch.setattr(engine.loop, "train_step", warned_at_2)
    with pytest.raises(Interrupted, match="SIGUSR1: stopped after step 3 of epoch 1") as stopped:
        train.run(cfg)
    assert stopped.value.signum == signal.SIGUSR1 and (tmp_path / ".state" / "run" / "state.json").exists()
