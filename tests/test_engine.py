"""The engine: the one loop (a plain loop over a Trainer, whatever the reporter), the step, evaluation, the runtime
and precision Accelerate is told, and stopping on a signal."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import tyro

from kdfast import engine, train
from kdfast.config import TrainConfig
from kdfast.engine import make_runtime
from kdfast.machine import decide_precision
from kdfast.errors import Interrupted
from kdfast.rundir import RunDir

from .conftest import common, write_image_folder


class Recorder:
    """A reporter that records what the loop asks of it, and what the state held at each call."""

    def __init__(self):
        self.calls = []

    def start(self, tr, data, progress):
        self.calls.append(("start", progress["epoch"]))

    def end_epoch(self, tr, data, epoch, epoch_time, wall):
        saved = tr.run_dir.state.saved()
        self.calls.append(("end_epoch", epoch, saved["progress"]["epoch"] if saved else None))

    def finish(self, tr, data, wall):
        self.calls.append(("finish", tr.run_dir.state.saved()["progress"]["epoch"]))
        return "done"

    def stop_early(self):
        return False


class TwoHeads(nn.Module):
    """Two tiny students side by side: logits (2, B, classes), as K students trained together give them."""

    def __init__(self):
        super().__init__()
        self.k = 2
        self.heads = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 3))
                                   for _ in range(2))

    def forward(self, x):
        return torch.stack([h(x) for h in self.heads])


def tiny_trainer(tiny_data, tmp_path, model, loss_shape=(), clip=None, **kw):
    cfg = TrainConfig(model="timm:test_vit", name="loop", epochs=2, **common(tiny_data, tmp_path), **kw).resolved()
    runtime = make_runtime("fp32")
    data = train.load_run_data(cfg, runtime)

    def loss_step(model, batch):
        logits = model(batch.images)
        losses = nn.functional.cross_entropy(logits.flatten(0, -2), batch.targets.repeat(logits.dim() - 1),
                                             reduction="none")
        return losses.reshape(logits.shape[:-1]).mean(-1), logits

    run_dir = RunDir(cfg.out_dir, cfg.run_name)
    run_dir.prepare()
    extra = {"clip": clip} if clip else {}
    return engine.make_trainer(model, loss_step, data, cfg, runtime, run_dir, loss_shape=loss_shape, **extra), data


def test_fit_is_run_end_save_stop_and_the_reporter_writes(tiny_data, tmp_path):
    tr, data = tiny_trainer(tiny_data, tmp_path, TwoHeads().heads[0])
    rec = Recorder()
    assert engine.fit(tr, data, rec) == "done"
    # each epoch ends before its state is saved; the end comes after the last save
    assert rec.calls == [("start", 0), ("end_epoch", 0, None), ("end_epoch", 1, 1), ("finish", 2)]


def test_one_step_trains_k_students_with_their_own_loss_sums_and_clip(tiny_data, tmp_path):
    clipped = []
    tr, data = tiny_trainer(tiny_data, tmp_path, TwoHeads(), loss_shape=(2,), grad_clip=1.0,
                            clip=lambda acc, model, max_norm: clipped.append(max_norm))
    tr.reset_sums()
    batch = next(iter(tr.loader.epoch(0, 0)))
    before = [p.detach().clone() for p in tr.model.parameters()]
    loss = engine.train_step(tr, [batch], 0)
    assert tr.sums["loss"].shape == (2,) and tr.sums["correct"].shape == (2,) and int(tr.sums["seen"]) == 6
    assert loss.shape == () and clipped == [1.0]  # the trainer's clip, not a branch of the step
    assert all(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))  # both students moved
    sums = tr.global_sums()
    assert len(sums["loss"]) == 2 and len(sums["correct"]) == 2


def test_the_step_waits_on_nothing_it_does_not_need(tiny_data, tmp_path):
    """One model: scalar sums, the default clip (Accelerate's clip_grad_norm_), the loss returned detached."""
    tr, data = tiny_trainer(tiny_data, tmp_path, TwoHeads().heads[0], grad_clip=0.5)
    tr.reset_sums()
    loss = engine.train_step(tr, [next(iter(tr.loader.epoch(0, 0)))], 0)
    assert tr.sums["loss"].shape == () and not loss.requires_grad and tr.clip is engine.clip_whole


def test_per_epoch_metrics_are_validation_and_the_test_set_is_evaluated_at_the_end(tiny_data, tmp_path):
    meta = train.run(TrainConfig(model="resnet8", name="m", epochs=2, val_per_class=3, **common(tiny_data, tmp_path)))
    records = [json.loads(line) for line in open(tmp_path / "m.metrics.jsonl")]
    assert [("val_accuracy" in r, "test_accuracy" in r) for r in records] == [(True, False), (True, True)]
    assert (meta["val_samples"], meta["test_samples"], meta["data"]["val_size"], meta["data"]["train_size"]) == \
        (9, 12, 9, 27)
    assert meta["val_accuracy"] == records[-1]["val_accuracy"]


def test_top5_accuracy_where_there_are_more_than_ten_classes():
    from kdfast.engine import accuracy_and_loss

    logits = torch.eye(12)[[0, 1, 2]] * 5 + torch.arange(12.0) / 100
    assert "top5" not in accuracy_and_loss(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))
    result = accuracy_and_loss(logits, torch.tensor([0, 11, 3]))
    assert result["accuracy"] == pytest.approx(1 / 3) and result["top5"] == pytest.approx(2 / 3)  # 3: 6th


def test_accelerate_launch_mixed_precision_no_trains_in_fp32(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdfast.train", "--model", "resnet8",
           "--data", tiny_data["data"], "--cache-dir", tiny_data["cache_dir"], "--out-dir", str(tmp_path), "--epochs", "1",
           "--batch-size", "6", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.load(open(tmp_path / "resnet8.json"))
    assert meta["precision"] == "fp32" and "accelerate launch --mixed_precision no" in meta["precision_reason"]
    assert "accelerate launch --mixed_precision no" in out.stdout


def test_gradient_accumulation_on_one_process_equals_two_processes(tiny_data, tmp_path):
    """Global batch 12: one process accumulating 2 micro-batches of 6 = two gloo processes with 6 each (a model
    without BatchNorm, whose per-process statistics would differ)."""
    flags = ["--model", "timm:test_vit", "--data", tiny_data["data"], "--cache-dir", tiny_data["cache_dir"], "--epochs", "2",
             "--batch-size", "12", "--eval-batch-size", "5", "--precision", "fp32", "--no-progress"]
    one = train.run(tyro.cli(TrainConfig, args=flags + ["--out-dir", str(tmp_path / "one"), "--grad-accum", "2"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "kdfast.train", *flags, "--out-dir", str(tmp_path / "two")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "timm-test_vit.safetensors")) for d in ("one", "two"))
    assert one["config"]["grad_accum"] == 2 and a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    plain = train.run(tyro.cli(TrainConfig, args=flags + ["--out-dir", str(tmp_path / "plain"), "--batch-size",
                                                                "6"]))
    c = load_file(str(tmp_path / "plain" / "timm-test_vit.safetensors"))
    assert not all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)  # the comparison can fail: batch 6 differs


def test_make_runtime_accumulates_through_accelerate():
    runtime = make_runtime("fp32", accumulate=3)
    assert runtime.accelerator.gradient_accumulation_steps == 3
    assert decide_precision("fp32", "cpu") == ("fp32", "requested")


def test_tiny_epochs_are_warned_about_and_the_dropped_tail_is_said_once(tiny_data, tmp_path, capsys):
    train.run(TrainConfig(model="resnet8", name="m", epochs=2, **{**common(tiny_data, tmp_path), "batch_size": 8}))
    out = capsys.readouterr().out
    assert out.count("4 of the 36 training images are left out of each epoch") == 1
    assert out.count("warning: only 4 optimizer steps per epoch") == 1


def test_a_single_run_is_told_to_add_resume(small_cache, tmp_path):
    assert engine.resume_advice(TrainConfig()) == "Resume with the same command and --resume."
    assert engine.resume_advice(TrainConfig(resume=True)) == "Run the same command again to continue."


def test_sigterm_delivered_twice_still_saves_and_a_second_ctrl_c_stops_at_once(small_cache, tmp_path, monkeypatch):
    original = engine.loop.train_step
    data = os.path.join(os.path.dirname(small_cache["h5"]), "tiny")

    def step_with(signals):
        def step(tr, batch, global_step):
            loss = original(tr, batch, global_step)
            if global_step == 1:
                for s in signals:
                    os.kill(os.getpid(), s)
            return loss
        return step

    cfg = TrainConfig(model="resnet8", data=data, cache_dir=small_cache["cache_dir"], epochs=2, batch_size=6,
                      precision="fp32", progress=False, out_dir=str(tmp_path))
    monkeypatch.setattr(engine.loop, "train_step", step_with([signal.SIGTERM, signal.SIGTERM]))
    with pytest.raises(Interrupted, match="SIGTERM: stopped after step 2 of epoch 1"):
        train.run(cfg)
    assert (tmp_path / ".state" / "resnet8" / "state.json").exists()
    monkeypatch.setattr(engine.loop, "train_step", step_with([signal.SIGINT, signal.SIGINT]))
    with pytest.raises(KeyboardInterrupt):
        train.run(TrainConfig(**{**cfg.__dict__, "fresh": True}))


def test_compile_under_ddp_saves_plain_keys_that_every_loader_reads(tmp_path):
    """--compile --ema with two gloo processes (torch.compile around DDP; the aot_eager backend: no C compiler) stops
    mid-run; its state resumes on one process, and the checkpoints hold plain keys that evaluate and distill --teacher
    load. Before the fix the state and checkpoints carried "_orig_mod." keys and the resume failed."""
    from safetensors.torch import load_file

    from kdfast import distill, evaluate
    from kdfast.config import DistillConfig, EvaluateConfig

    data = write_image_folder(str(tmp_path / "tiny"), n_train=24)
    out = tmp_path / "run"
    flags = ["kdfast.train", "--model", "resnet8", "--data", data, "--cache-dir", str(tmp_path / "cache"), "--epochs",
             "2", "--batch-size", "12", "--eval-batch-size", "40", "--precision", "fp32", "--no-progress", "--name",
             "run", "--out-dir", str(out), "--compile", "--ema", "0.9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "KDFAST_TEST_COMPILE": "aot_eager"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29563", "-m", "tests.stop_at", "3", *flags], capture_output=True, text=True, timeout=600,
                         env=env, cwd=root)
    assert two.returncode != 0 and "SIGTERM: stopped after" in two.stderr, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-m", "tests.stop_at", "-1", *flags, "--resume"], capture_output=True,
                         text=True, timeout=600, env=env, cwd=root)
    assert one.returncode == 0 and "resuming" in one.stdout, one.stdout + one.stderr
    saved = load_file(str(out / "run.safetensors"))
    pth = torch.load(out / "run.pth", weights_only=True)
    for keys in (saved.keys(), pth.keys()):
        assert keys and not [k for k in keys if k.startswith(("_orig_mod.", "module.")) or "._orig_mod." in k]
    assert "conv1.weight" in saved  # the model's own names
    acc = evaluate.run(EvaluateConfig(checkpoint=str(out / "run.pth"), data=data,
                                      cache_dir=str(tmp_path / "cache"), progress=False))
    assert 0.0 <= acc["accuracy"] <= 1.0
    student = distill.run(tyro.cli(DistillConfig, args=[
        "--teacher", str(out / "run.pth"), "--model", "resnet8", "--data", data, "--cache-dir",
        str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "12", "--eval-batch-size", "40", "--precision",
        "fp32", "--no-progress", "--out-dir", str(tmp_path / "student")]))
    assert student["epochs"] == 1


def test_deterministic_sets_every_switch_and_trains(tiny_data, tmp_path, monkeypatch):
    """--deterministic: deterministic algorithms, no cuDNN autotuning, no TF32 (set as on a GPU), a cuBLAS workspace;
    a run with it trains (no op of a CPU step lacks a deterministic kernel); a run without it turns them back."""
    from kdfast.engine.runtime import set_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_determinism(True, "cuda")
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"]
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        set_determinism(False, "cuda")
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        set_determinism(False, "cpu")
        torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    out = train.run(TrainConfig(model="resnet8", epochs=1, deterministic=True, aug_recipe="cct",
                                **common(tiny_data, tmp_path)))
    assert out["config"]["deterministic"] and torch.are_deterministic_algorithms_enabled()
    set_determinism(False, "cpu")
