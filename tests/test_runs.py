"""Runs that never lose, clobber or execute anything: state without pickle, confined names, one writer per
output, resume that knows what it resumes, preemption, refusals of what cannot train, damaged inputs."""
import glob
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdfast import cache, distill, engine, evaluate, train
from kdfast.config import DistillConfig, TrainConfig
from kdfast.errors import Interrupted, KdfastError
from kdfast.files import FileLock, LockedError
from kdfast.rundir import RunDir, StateError

from .conftest import common, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"data": write_image_folder(str(root / "tiny")), "cache_dir": str(root / "cache")}


def cfg_of(data, out_dir, cls=TrainConfig, **kw):
    base = dict(model="resnet8", name="run", data=data["data"], cache_dir=data["cache_dir"], out_dir=str(out_dir),
                epochs=3, batch_size=6, eval_batch_size=5, precision="fp32", progress=False)
    return cls(**{**base, **kw})


def one_thread_run(cfg):
    """An in-process reference run with the thread count the subprocesses use (results depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.run(cfg)
    finally:
        torch.set_num_threads(threads)


def weights(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"


def cli_args(data, out_dir, *extra, epochs=3, name="run"):
    return ["--model", "resnet8", "--name", name, "--data", data["data"], "--cache-dir", data["cache_dir"],
            "--out-dir", str(out_dir), "--epochs", str(epochs), "--batch-size", "6", "--eval-batch-size", "5",
            "--precision", "fp32", "--no-progress", *extra]


def one_line_error(capsys, main, argv) -> str:
    """Run an entry point's main in-process: it must exit 2 with one `kdfast: error:` line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("kdfast: error:") and "Traceback" not in err, err
    return err


class Die(Exception):
    pass


def interrupt_at(monkeypatch, epoch: int, step: int):
    """Make the next run raise Die before the given step: an interruption with a state saved before it."""
    original = engine.loop.train_step

    def step_that_dies(tr, batch, global_step):
        if global_step == epoch * len(tr.loader) + step:
            raise Die
        return original(tr, batch, global_step)

    monkeypatch.setattr(engine.loop, "train_step", step_that_dies)
    return lambda: monkeypatch.setattr(engine.loop, "train_step", original)


# ---------------------------------------------------------------- no pickle anywhere

def test_no_code_in_kdfast_loads_pickled_code():
    unsafe = re.compile(r"weights_only\s*=\s*False|\bpickle\.|\b(?:accelerator|acc)\.load_state\(|torch\.load\((?![^)]*weights_only=True)")
    found = []
    for path in glob.glob(os.path.join(ROOT, "kdfast", "**", "*.py"), recursive=True):
        for number, line in enumerate(open(path), 1):
            if unsafe.search(line) and "safe-unpickler" not in line:
                found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


class Payload:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_planted_in_each_state_file_never_runs(data, tmp_path, monkeypatch):
    restore = interrupt_at(monkeypatch, epoch=1, step=2)
    with pytest.raises(Die):
        train.run(cfg_of(data, tmp_path, checkpoint_every=1))
    restore()
    state_dir = tmp_path / ".state" / "run"
    files = sorted(os.listdir(state_dir))
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    pristine = {f: (state_dir / f).read_bytes() for f in files}
    marker = tmp_path / "PWNED"
    payloads = {"pickle": pickle.dumps(Payload(str(marker))), "torch": None}
    torch.save({"x": Payload(str(marker))}, tmp_path / "payload.pt")
    payloads["torch"] = (tmp_path / "payload.pt").read_bytes()
    for target in files:
        for kind, blob in payloads.items():
            for f, content in pristine.items():
                (state_dir / f).write_bytes(blob if f == target else content)
            with pytest.raises(KdfastError, match=re.escape(str(state_dir))):
                train.run(cfg_of(data, tmp_path, resume=True, checkpoint_every=1))
            assert not marker.exists(), f"a {kind} payload in {target} ran"
    # a planted Accelerate-style pickle beside a whole state is never opened
    for f, content in pristine.items():
        (state_dir / f).write_bytes(content)
    (state_dir / "custom_checkpoint_0.pkl").write_bytes(payloads["pickle"])
    train.run(cfg_of(data, tmp_path, resume=True, checkpoint_every=1))
    assert not marker.exists()


def test_payload_as_a_teacher_checkpoint_never_runs(data, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(str(marker))}, tmp_path / "teacher.pth")
    (tmp_path / "teacher.json").write_text(json.dumps({"model": "resnet8", "classes": ["cat", "dog", "frog"]}))
    err = one_line_error(capsys, distill.main, cli_args(data, tmp_path / "o", "--teacher", str(tmp_path / "teacher.pth")))
    assert "teacher.pth: not a readable checkpoint" in err and not marker.exists()


# ---------------------------------------------------------------- names stay inside --out-dir

@pytest.mark.parametrize("name", ["../precious", "a/b", "..", ".hidden", "/abs", "x..y", "a b"])
def test_run_names_that_leave_out_dir_are_refused(data, tmp_path, capsys, name):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    out = tmp_path / "a" / "b"
    before = sorted(p for p in glob.glob(str(tmp_path / "**"), recursive=True))
    err = one_line_error(capsys, train.main, cli_args(data, out, name=name))
    assert "--name" in err and "not a valid run name" in err
    assert (precious / "keep.txt").read_text() == "mine"
    assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == before


def test_state_cleanup_never_follows_a_link_outside(data, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    (out / ".state").mkdir(parents=True)
    os.symlink(outside, out / ".state" / "run")
    with pytest.raises(StateError, match="outside --out-dir"):
        RunDir(str(out), "run").state.clear()
    assert (outside / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- one writer per output

def test_a_second_writer_is_refused_naming_the_lock_and_pid(data, tmp_path, capsys):
    lock = RunDir(str(tmp_path), "run").lock.acquire()
    try:
        err = one_line_error(capsys, train.main, cli_args(data, tmp_path))
    finally:
        lock.release()
    assert f"{tmp_path / 'run.lock'}" in err and f"pid {os.getpid()}" in err
    assert not (tmp_path / "run.pth").exists() and not (tmp_path / "run.lock").exists()


def test_a_stale_lock_and_temporaries_of_a_dead_process_are_taken_over(data, tmp_path, capsys):
    (tmp_path / "run.lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    (tmp_path / "run.pth.tmp999999").write_bytes(b"half a checkpoint")
    (tmp_path / "run.x.pth.tmp999999").write_bytes(b"another run's")
    train.run(cfg_of(data, tmp_path, epochs=1))
    out = capsys.readouterr().out
    assert "taking over the lock of pid 999999" in out and "run.pth.tmp999999" in out
    assert (tmp_path / "run.pth").exists() and not (tmp_path / "run.lock").exists()
    assert not (tmp_path / "run.pth.tmp999999").exists() and (tmp_path / "run.x.pth.tmp999999").exists()


def test_lock_is_exclusive_between_two_holders(tmp_path):
    a = FileLock(str(tmp_path / "x.lock"), "x").acquire()
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        FileLock(str(tmp_path / "x.lock"), "x").acquire()
    a.release()
    FileLock(str(tmp_path / "x.lock"), "x").acquire().release()


def _start(data, out, *extra, epochs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdfast.train", *cli_args(data, out, *extra, epochs=epochs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _holds_lock(path, proc) -> bool:
    try:
        return f"pid {proc.pid} " in open(path).read()
    except OSError:
        return False


def _wait_for(path, proc, timeout=120, locked_by_proc=False):
    t0 = time.time()
    while not (_holds_lock(path, proc) if locked_by_proc else os.path.exists(path)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_two_processes_one_output_exactly_one_refuses_then_sigterm_saves(data, tmp_path):
    """A real second process is refused while the first trains; SIGTERM then stops the first with a saved state,
    and --resume ends with the weights of an uninterrupted run."""
    epochs = 30
    first = _start(data, tmp_path / "b", "--checkpoint-every", "1", epochs=epochs)
    _wait_for(tmp_path / "b" / ".state" / "run" / "state.json", first)  # the first has the lock and trains
    first.send_signal(signal.SIGSTOP)  # paused, still holding its lock: no race with the second's start-up
    try:
        second = subprocess.run([sys.executable, "-m", "kdfast.train", *cli_args(data, tmp_path / "b", epochs=epochs)],
                                capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "run.lock" in second.stderr
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "run.pth").exists()
    resumed = subprocess.run([sys.executable, "-m", "kdfast.train", *cli_args(data, tmp_path / "b", "--resume",
                                                                              "--checkpoint-every", "1",
                                                                              epochs=epochs)],
                             capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    one_thread_run(cfg_of(data, tmp_path / "a", epochs=epochs))
    assert_same_weights(tmp_path / "a" / "run.pth", tmp_path / "b" / "run.pth")
    epochs_logged = [json.loads(l)["epoch"] for l in open(tmp_path / "b" / "run.metrics.jsonl")]
    assert epochs_logged == list(range(epochs))


# ---------------------------------------------------------------- kills at any moment

def test_sigint_then_sigkill_at_random_moments_then_resume_gives_the_same_weights(data, tmp_path):
    """Ctrl-C (SIGINT) mid-run, then kill -9 at random moments (mid-epoch and during saves: a state is written
    after every step), then --resume: the weights equal an uninterrupted run's."""
    epochs, rng, out = 12, random.Random(0), tmp_path / "b"
    proc = _start(data, out, "--checkpoint-every", "1", epochs=epochs)
    _wait_for(out / "run.lock", proc, locked_by_proc=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and ("--resume" in err or "interrupted" in err)
    kills = 0
    for attempt in range(3):
        proc = _start(data, out, "--checkpoint-every", "1", "--resume", epochs=epochs)
        _wait_for(out / "run.lock", proc, locked_by_proc=True)
        time.sleep(rng.uniform(0.2, 1.2))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
    one_thread_run(cfg_of(data, out, epochs=epochs, resume=True, checkpoint_every=1))
    one_thread_run(cfg_of(data, tmp_path / "a", epochs=epochs))
    assert kills >= 1
    assert_same_weights(tmp_path / "a" / "run.pth", out / "run.pth")
    assert not glob.glob(str(out / "*.tmp*")) and not (out / ".state").exists()


def test_sigterm_mid_epoch_in_process_resumes_bitwise(data, tmp_path, monkeypatch):
    """The signal lands inside step 3 of epoch 2: that step finishes, the state is saved mid-epoch."""
    original = engine.loop.train_step

    def step_with_signal(tr, batch, global_step):
        loss = original(tr, batch, global_step)
        if global_step == len(tr.loader) + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(engine.loop, "train_step", step_with_signal)
    with pytest.raises(Interrupted) as stopped:
        train.run(cfg_of(data, tmp_path / "b"))
    assert stopped.value.signum == signal.SIGTERM and "after step 3 of epoch 2" in str(stopped.value)
    saved = json.load(open(tmp_path / "b" / ".state" / "run" / "state.json"))["progress"]
    assert (saved["epoch"], saved["step"]) == (1, 3)
    monkeypatch.setattr(engine.loop, "train_step", original)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = train.run(cfg_of(data, tmp_path / "b", resume=True))
    whole = train.run(cfg_of(data, tmp_path / "a"))
    assert_same_weights(tmp_path / "a" / "run.pth", tmp_path / "b" / "run.pth")
    lines = lambda d: [json.loads(l) for l in open(tmp_path / d / "run.metrics.jsonl")]
    key = lambda r: (r["epoch"], r["train_loss"], r["train_accuracy"], r.get("test_accuracy"))
    assert [key(r) for r in lines("a")] == [key(r) for r in lines("b")]  # the resumed epoch's metrics too
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_vit_resumes_mid_epoch_bitwise(data, tmp_path, monkeypatch):
    """Drop-path draws random numbers: they are keyed by (seed, epoch, step), so a resume needs no RNG state."""
    kw = dict(model="vit_student", epochs=2, checkpoint_every=3)
    restore = interrupt_at(monkeypatch, epoch=1, step=1)
    with pytest.raises(Die):
        train.run(cfg_of(data, tmp_path / "b", **kw))
    restore()
    train.run(cfg_of(data, tmp_path / "b", resume=True, **kw))
    train.run(cfg_of(data, tmp_path / "a", **kw))
    assert_same_weights(tmp_path / "a" / "run.pth", tmp_path / "b" / "run.pth")


def test_sigterm_under_two_process_ddp_saves_and_resumes(data, tmp_path):
    """torchrun + gloo: SIGTERM reaches the workers, they agree on the step to stop at, save, and a resumed
    2-process run ends with the weights of an uninterrupted 2-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(out, port, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "kdfast.train", *cli_args(data, out, *extra, epochs=20)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    proc = torchrun(tmp_path / "b", 29541)
    _wait_for(tmp_path / "b" / ".state" / "run" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "SIGTERM: stopped after" in err, err[-3000:]
    assert err.count("SIGTERM: stopped after") == 1  # only the main process says it
    resumed = torchrun(tmp_path / "b", 29542, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming after epoch" in out, err[-3000:]
    whole = torchrun(tmp_path / "a", 29543)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    assert_same_weights(tmp_path / "a" / "run.pth", tmp_path / "b" / "run.pth")


# ---------------------------------------------------------------- resume knows what it resumes

def test_resume_refuses_another_config_and_a_rerun_refuses_without_resume(data, tmp_path, monkeypatch):
    restore = interrupt_at(monkeypatch, epoch=1, step=0)
    with pytest.raises(Die):
        train.run(cfg_of(data, tmp_path))
    restore()
    with pytest.raises(StateError) as e:
        train.run(cfg_of(data, tmp_path, resume=True, epochs=4, lr=0.5, train_per_class=4))
    msg = str(e.value)
    assert "epochs: state has 3, this run 4" in msg and "lr: state has None, this run 0.5" in msg
    assert "train_per_class" in msg and "--fresh" in msg
    with pytest.raises(StateError, match="Pass --resume to continue it, or --fresh"):
        train.run(cfg_of(data, tmp_path))
    assert (tmp_path / ".state" / "run" / "state.json").exists()  # nothing was discarded
    meta = train.run(cfg_of(data, tmp_path, fresh=True, epochs=2))
    assert meta["epochs"] == 2 and not (tmp_path / ".state").exists()


# ---------------------------------------------------------------- refuse what cannot train

@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "inf"),
                                        ("--epochs", "0"), ("--batch-size", "0"), ("--eval-batch-size", "0"),
                                        ("--weight-decay", "-1"), ("--warmup", "1.5"), ("--momentum", "1"),
                                        ("--label-smoothing", "1"), ("--grad-clip", "nan"),
                                        ("--train-per-class", "-1"), ("--checkpoint-every", "-2"),
                                        ("--augment.padding", "-1")])
def test_bad_numbers_are_refused_at_start_up(data, tmp_path, capsys, flag, value):
    err = one_line_error(capsys, train.main, cli_args(data, tmp_path, flag, value))
    assert flag in err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_bad_evaluate_numbers_are_refused(capsys):
    err = one_line_error(capsys, evaluate.main, ["--checkpoint", "x.pth", "--batch-size", "0"])
    assert "--batch-size must be" in err


@pytest.mark.parametrize("flag,value", [("--alpha", "nan"), ("--tau", "0"), ("--cache-slots", "-1")])
def test_bad_kd_numbers_are_refused(data, tmp_path, capsys, flag, value):
    err = one_line_error(capsys, distill.main, cli_args(data, tmp_path, "--teacher", "t.pth", flag, value))
    assert flag in err


def test_nan_loss_stops_keeps_the_last_good_state_and_writes_no_checkpoint(data, tmp_path, monkeypatch):
    from kdfast import losses

    original, calls = losses.cross_entropy, {"n": 0}

    def goes_nan(logits, labels, smoothing=0.0):
        calls["n"] += 1
        loss = original(logits, labels, smoothing)
        return loss * float("nan") if calls["n"] == 6 else loss  # step 2 of epoch 2

    monkeypatch.setattr(train, "cross_entropy", goes_nan)
    with pytest.raises(engine.NonFiniteLoss) as e:
        train.run(cfg_of(data, tmp_path))
    assert "step 2 of epoch 2" in str(e.value) and "after epoch 1" in str(e.value)
    assert not (tmp_path / "run.pth").exists() and not (tmp_path / "run.json").exists()
    saved = json.load(open(tmp_path / ".state" / "run" / "state.json"))["progress"]
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert "NaN" not in (tmp_path / "run.metrics.jsonl").read_text()


def test_a_diverging_lr_is_stopped(data, tmp_path):
    with pytest.raises(engine.NonFiniteLoss, match="NaN or infinite"):
        train.run(cfg_of(data, tmp_path, lr=1e30, epochs=2))
    assert not (tmp_path / "run.pth").exists()


# ---------------------------------------------------------------- damaged inputs: one line, the path, exit 2

@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.run(cfg_of(data, out, name="teacher", epochs=1))
    return out / "teacher.pth"


def copy_teacher(teacher, folder, pth_bytes=None, meta=None):
    folder.mkdir(exist_ok=True)
    (folder / "t.pth").write_bytes(teacher.read_bytes() if pth_bytes is None else pth_bytes)
    (folder / "t.safetensors").write_bytes(teacher.with_suffix(".safetensors").read_bytes())
    (folder / "t.json").write_text(teacher.with_suffix(".json").read_text() if meta is None else meta)
    return folder / "t.pth"


@pytest.mark.parametrize("damage", ["random", "truncated", "json-corrupt", "json-no-model", "json-bad-model",
                                    "json-no-classes", "empty"])
def test_damaged_teacher_files_get_one_line_naming_the_file(data, teacher, tmp_path, capsys, damage):
    good = teacher.read_bytes()
    meta = json.loads(teacher.with_suffix(".json").read_text())
    variants = {
        "random": (os.urandom(5000), None, "t.pth"),
        "truncated": (good[: len(good) // 2], None, "t.pth"),
        "empty": (b"", None, "t.pth"),
        "json-corrupt": (None, '{"model": "resnet8", ', "t.json"),
        "json-no-model": (None, json.dumps({k: v for k, v in meta.items() if k != "model"}), "t.json"),
        "json-bad-model": (None, json.dumps({**meta, "model": "resnet9000"}), "t.json"),
        "json-no-classes": (None, json.dumps({k: v for k, v in meta.items() if k != "classes"}), "t.json"),
    }
    pth, meta_text, named = variants[damage]
    path = copy_teacher(teacher, tmp_path, pth, meta_text)
    err = one_line_error(capsys, distill.main, cli_args(data, tmp_path / "o", "--teacher", str(path)))
    assert str(tmp_path / named) in err
    err = one_line_error(capsys, evaluate.main, ["--checkpoint", str(path), "--cache-dir", data["cache_dir"]])
    assert str(tmp_path / named) in err


def test_damaged_safetensors_checkpoint(data, teacher, tmp_path, capsys):
    copy_teacher(teacher, tmp_path)
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    err = one_line_error(capsys, evaluate.main, ["--checkpoint", str(tmp_path / "t.safetensors"),
                                                 "--cache-dir", data["cache_dir"]])
    assert "t.safetensors: not a readable checkpoint" in err


@pytest.mark.parametrize("target", ["state.json", "weights.safetensors", "optimizer.safetensors", "metrics"])
def test_damaged_state_and_metrics_files(data, tmp_path, capsys, monkeypatch, target):
    restore = interrupt_at(monkeypatch, epoch=1, step=1)
    with pytest.raises(Die):
        train.run(cfg_of(data, tmp_path))
    restore()
    path = tmp_path / "run.metrics.jsonl" if target == "metrics" else tmp_path / ".state" / "run" / target
    data_bytes = path.read_bytes()
    path.write_bytes(b'{"epoch": 0}\n{"epo' if target == "metrics" else data_bytes[: len(data_bytes) // 2])
    err = one_line_error(capsys, train.main, cli_args(data, tmp_path, "--resume"))
    assert str(path) in err


def test_out_dir_that_is_a_file_and_report_that_is_a_folder(data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, train.main, cli_args(data, tmp_path / "file"))
    assert "--out-dir" in err and str(tmp_path / "file") in err
    from kdfast import lab

    (tmp_path / "report.json").mkdir()
    err = one_line_error(capsys, lab.main, ["--data", data["data"], "--report", str(tmp_path / "report.json"),
                                            "--out-dir", str(tmp_path / "m")])
    assert "--report" in err


def test_a_teacher_that_disagrees_with_the_cache_is_refused(data, teacher, tmp_path, capsys):
    from kdfast.cache import BuildConfig, build

    cache = build(BuildConfig(teacher=str(teacher), out=str(tmp_path / "t.h5"), slots=1, data=data["data"],
                              cache_dir=data["cache_dir"], batch_size=7, precision="fp32", progress=False))
    train.run(cfg_of(data, tmp_path, name="other", epochs=1, seed=5))
    err = one_line_error(capsys, distill.main, cli_args(data, tmp_path / "o", "--teacher-cache", cache, "--teacher",
                                                        str(tmp_path / "other.pth")))
    assert "other.pth" in err and "is not the teacher" in err
    # the same teacher beside its cache is fine
    meta = distill.run(cfg_of(data, tmp_path / "o", DistillConfig, epochs=1, teacher=str(teacher), teacher_cache=cache))
    assert meta["kd"]["mode"] == "cached"


def test_distill_without_any_teacher_says_what_to_pass(data, tmp_path, capsys):
    err = one_line_error(capsys, distill.main, cli_args(data, tmp_path))
    assert "--teacher" in err and "--teacher-cache" in err


# ---------------------------------------------------------------- disk full while saving

def test_disk_full_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    train.run(cfg_of(data, tmp_path, epochs=1))
    checkpoint = [str(tmp_path / f"run.{ext}") for ext in ("pth", "safetensors", "json")]
    before = {p: open(p, "rb").read() for p in checkpoint}
    import safetensors.torch

    original = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None, only_checkpoint=True):
        if only_checkpoint and ".state" in filename:
            return original(tensors, filename, metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    for only_checkpoint in (True, False):  # the disk fills while writing the checkpoint, then the state
        monkeypatch.setattr(safetensors.torch, "save_file",
                            lambda t, f, metadata=None: full_disk(t, f, metadata, only_checkpoint))
        err = one_line_error(capsys, train.main, cli_args(data, tmp_path, "--epochs", "1", "--fresh"))
        assert "No space left on device" in err
        assert {p: open(p, "rb").read() for p in checkpoint} == before
    leftovers = [p for p in glob.glob(str(tmp_path / "**"), recursive=True) if ".tmp" in os.path.basename(p)]
    assert not leftovers, leftovers


def test_planted_cifar_batches_are_never_unpickled(tmp_path):
    """torchvision's CIFAR-10 reader unpickles its batch files: kdfast only lets it after their MD5 sums match."""
    from kdfast.data import DataError, load_dataset

    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(DataError, match="cifar"):
        load_dataset(str(tmp_path / "cifar"), str(tmp_path / "cache"))
    assert not marker.exists()


def test_cache_build_and_lab_report_are_one_writer_each(data, teacher, tmp_path):
    from kdfast import lab
    from kdfast.cache import BuildConfig, build
    from kdfast.config import LabConfig

    out = tmp_path / "t.h5"
    held = FileLock(str(out) + ".lock", "x").acquire()
    try:
        with pytest.raises(LockedError, match=re.escape(str(out) + ".lock")):
            build(BuildConfig(teacher=str(teacher), out=str(out), slots=1, data=data["data"],
                              cache_dir=data["cache_dir"], precision="fp32", progress=False))
    finally:
        held.release()
    report = tmp_path / "report.json"
    held = FileLock(str(report) + ".cnn.lock", "x").acquire()  # a lab of the cnn pair is writing this report
    try:
        with pytest.raises(LockedError, match="report.json.cnn.lock"):
            lab.run(LabConfig(data=data["data"], report=str(report), out_dir=str(tmp_path / "m"), progress=False))
    finally:
        held.release()
    assert not (tmp_path / "m").exists() and not out.exists()


def test_a_forked_child_does_not_keep_a_dead_holders_lock(tmp_path):
    """A data worker forked by a trainer that is then killed must not hold the trainer's lock (the rerun right after
    a kill -9 would be refused for as long as the worker lives)."""
    path = str(tmp_path / "run.lock")
    script = ("import os, sys, time; from kdfast.files import FileLock; FileLock(sys.argv[1], 'run').acquire(); "
              "pid = os.fork()\nif pid == 0:\n    time.sleep(60); os._exit(0)\n"
              "open(sys.argv[2], 'w').write(str(pid)); os._exit(0)")
    subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "child")], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, cwd=ROOT, check=True)  # the parent exits holding the lock
    child = int((tmp_path / "child").read_text())
    try:
        os.kill(child, 0)  # the child still runs; its parent died holding the lock
        FileLock(path, "run").acquire(lambda *a: None).release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_finished_run_under_another_config_is_refused_without_fresh(tiny_data, tmp_path, capsys):
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, **common(tiny_data, tmp_path)))
    with pytest.raises(StateError, match=r"(?s)trained with another config.*epochs: it has 1, this run 2.*--fresh"):
        train.run(TrainConfig(model="resnet8", name="teacher", epochs=2, **common(tiny_data, tmp_path)))
    assert json.load(open(tmp_path / "teacher.json"))["epochs"] == 1  # untouched
    meta = train.run(TrainConfig(model="resnet8", name="teacher", epochs=2, fresh=True, **common(tiny_data, tmp_path)))
    assert meta["epochs"] == 2 and "replacing the finished run" in capsys.readouterr().out


def test_evaluate_on_another_test_subset_says_so(tiny_data, tmp_path, capsys):
    from kdfast import evaluate
    from kdfast.config import EvaluateConfig

    meta = train.run(TrainConfig(model="resnet8", name="m", epochs=1, **common(tiny_data, tmp_path)))
    capsys.readouterr()
    evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "m.pth"), cache_dir=tiny_data["cache_dir"]))
    assert f"matches the recorded {meta['test_accuracy']:.4f}" in capsys.readouterr().out
    evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "m.pth"), cache_dir=tiny_data["cache_dir"], test_per_class=2))
    out = capsys.readouterr().out
    assert "another test subset (not comparable)" in out and "differs" not in out


@pytest.mark.parametrize("command", ["train", "distill", "lab", "cache build"])
def test_each_command_stopped_by_sigterm_is_continued_by_the_advice_it_prints(small_cache, tmp_path, monkeypatch,
                                                                               capsys, command):
    from kdfast import distill, lab

    root = os.path.dirname(small_cache["h5"])
    data, teacher = os.path.join(root, "tiny"), os.path.join(root, "m", "teacher.pth")
    common = ["--cache-dir", small_cache["cache_dir"], "--precision", "fp32", "--no-progress"]
    runs = {
        "train": (train.main, ["--model", "resnet8", "--data", data, "--epochs", "2", "--batch-size", "6",
                               "--out-dir", str(tmp_path), *common]),
        "distill": (distill.main, ["--model", "resnet8", "--teacher-cache", small_cache["h5"], "--epochs", "2",
                                   "--batch-size", "6", "--out-dir", str(tmp_path), *common]),
        "lab": (lab.main, ["--data", data, "--pairs", "cnn", "--cnn-teacher-epochs", "1", "--cnn-student-epochs", "1",
                           "--cnn-batch-size", "6", "--eval-batch-size", "5", "--out-dir", str(tmp_path / "m"),
                           "--report", str(tmp_path / "report.json"), *common]),
        "cache build": (cache.main, ["build", "--teacher", teacher, "--out", str(tmp_path / "t.h5"), "--slots", "3",
                                     *common]),
    }
    main, argv = runs[command]
    if command == "cache build":
        original = cache.builder.write_rows

        def write_then_signal(f, slot, *args):
            original(f, slot, *args)
            if slot == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(cache.builder, "write_rows", write_then_signal)
    else:
        original = engine.loop.train_step

        def step_then_signal(tr, batch, global_step):
            loss = original(tr, batch, global_step)
            if global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        monkeypatch.setattr(engine.loop, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 128 + signal.SIGTERM and "Traceback" not in err, err
    monkeypatch.undo()
    advice = err.strip().splitlines()[-1]
    if advice.endswith("Resume with the same command and --resume."):
        argv = argv + ["--resume"]
    else:
        assert advice.endswith("Run the same command again to continue.") or \
            advice.endswith("Run the same command again to continue it."), advice
    main(argv)  # what the advice says
    out = capsys.readouterr().out
    assert "resuming" in out, out[-2000:]
    assert not any(p.name == ".state" for p in tmp_path.rglob(".state")) and not list(tmp_path.rglob("*.partial"))


def test_one_teacher_cache_recorded_as_a_path_or_a_list_is_the_same_config():
    """The lab and runs made before ensembles record one cache as its path; the flag gives a list of one."""
    from kdfast import schemas
    from kdfast.rundir import comparable_config

    as_path = DistillConfig(model="resnet8", teacher_cache="c.h5").to_dict()
    as_list = json.loads(json.dumps(DistillConfig(model="resnet8", teacher_cache=("c.h5",)).to_dict()))
    assert as_path["teacher_cache"] == "c.h5" and as_list["teacher_cache"] == ["c.h5"]
    assert comparable_config(as_path) == comparable_config(as_list)
    assert comparable_config(as_path) != comparable_config({**as_list, "teacher_cache": ["c.h5", "d.h5"]})
    for config in (as_path, as_list):
        assert schemas.problems(json.loads(json.dumps(config)), schemas.RUN_CONFIG) == []
