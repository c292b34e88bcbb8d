"""A newcomer's first afternoon (#16): a validation split, an outside teacher, Accelerate's settings, no silent
overwrites, defaults that follow the data, every flag explained."""
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from kdfast import cache, distill, lab, sweep, train
from kdfast.cache import BuildConfig, LogitCache
from kdfast.config import LAB_PRESETS, DistillConfig, LabConfig, SweepConfig, TrainConfig
from kdfast.data import load_dataset
from kdfast.engine import decide_precision, make_runtime
from kdfast.flags import field_doc
from kdfast.machine import launcher_precision
from kdfast.models import create_model
from kdfast.rundir import StateError

from .conftest import write_image_folder
from .test_ecosystem import server  # noqa: F401  (the fixture: a file server on 127.0.0.1)
from .test_runs import one_line_error


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    return {"data": write_image_folder(str(root / "tiny"), n_train=12, n_test=4), "cache_dir": str(root / "cache")}


def common(data, out, **kw):
    return dict(data=data["data"], cache_dir=data["cache_dir"], out_dir=str(out), batch_size=6, eval_batch_size=5,
                precision="fp32", progress=False, **kw)


# ---------------------------------------------------------------- the validation split

def test_validation_split_is_disjoint_class_balanced_and_fixed_by_its_seed(data):
    load = lambda **kw: load_dataset(data["data"], data["cache_dir"], log=lambda *a: None, **kw)  # noqa: E731
    whole = load()
    a, again, other = load(val_per_class=3, val_seed=0), load(val_per_class=3, val_seed=0), load(val_per_class=3, val_seed=1)
    assert set(a.train.digests).isdisjoint(a.val.digests)  # no training image is validated on
    assert sorted(a.train.digests + a.val.digests) == sorted(whole.train.digests)
    assert torch.bincount(a.val.labels).tolist() == [3, 3, 3]
    assert a.val.digests == again.val.digests and a.fingerprint == again.fingerprint
    assert a.val.digests != other.val.digests and a.fingerprint != whole.fingerprint
    subset = load(val_per_class=3, train_per_class=5)  # the subset is taken from what is left: the split holds
    assert subset.val.digests == a.val.digests and torch.bincount(subset.train.labels).tolist() == [5, 5, 5]


def test_per_epoch_metrics_are_validation_and_the_test_set_is_evaluated_at_the_end(data, tmp_path):
    meta = train.run(TrainConfig(model="resnet8", name="m", epochs=2, val_per_class=3, **common(data, tmp_path)))
    records = [json.loads(line) for line in open(tmp_path / "m.metrics.jsonl")]
    assert [("val_accuracy" in r, "test_accuracy" in r) for r in records] == [(True, False), (True, True)]
    assert (meta["val_samples"], meta["test_samples"], meta["data"]["val_size"], meta["data"]["train_size"]) == \
        (9, 12, 9, 27)
    assert meta["val_accuracy"] == records[-1]["val_accuracy"]


def test_the_sweep_chooses_its_best_point_on_validation_and_reports_its_test_accuracy():
    rows = [{"kind": "kd", "alpha": a, "tau": 4.0, "slots": 0, "seed": s, "val_accuracy": v, "test_accuracy": t}
            for a, v, t in ((0.1, 0.6, 0.5), (0.9, 0.5, 0.7)) for s in (0, 1)]
    summary = sweep.summarize(rows, None)
    assert summary["chosen_on"] == "validation" and summary["best"]["alpha"] == 0.1  # not the test set's 0.9
    assert summary["best"]["mean"] == 0.5
    without = sweep.summarize([{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows], None)
    assert without["chosen_on"] == "test" and without["best"]["alpha"] == 0.9


def test_a_sweep_from_a_cache_with_a_validation_split_uses_it(data, tmp_path):
    teacher = train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, val_per_class=3, train_per_class=6,
                                    **common(data, tmp_path / "m")))
    assert teacher["data"]["train_size"] == 18
    h5 = cache.build(BuildConfig(teacher=str(tmp_path / "m" / "teacher.pth"), out=str(tmp_path / "t.h5"), slots=1,
                                 cache_dir=data["cache_dir"], precision="fp32", progress=False))  # no data flags
    attrs = LogitCache(h5).attrs
    assert (attrs["train_size"], attrs["val_per_class"], attrs["train_per_class"]) == (18, 3, 6)
    checked = cache.verify(cache.VerifyConfig(file=h5, teacher=str(tmp_path / "m" / "teacher.pth"), samples=8,
                                              cache_dir=data["cache_dir"]))  # the training split as built
    assert checked["argmax_agreement"] == 1.0
    result = sweep.run(SweepConfig(teacher_cache=h5, model="resnet8", alphas=(0.3, 0.7), taus=(2.0,), seeds=1,
                                   epochs=1, batch_size=6, eval_batch_size=5, precision="fp32", progress=False,
                                   out_dir=str(tmp_path / "sweep"), cache_dir=data["cache_dir"]))
    assert result["summary"]["chosen_on"] == "validation"
    assert all("val_accuracy" in r for r in result["runs"])
    assert "chosen on validation accuracy" in open(tmp_path / "sweep" / "sweep.md").read()


def test_top5_accuracy_where_there_are_more_than_ten_classes():
    from kdfast.engine import accuracy_and_loss

    logits = torch.eye(12)[[0, 1, 2]] * 5 + torch.arange(12.0) / 100
    assert "top5" not in accuracy_and_loss(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))
    result = accuracy_and_loss(logits, torch.tensor([0, 11, 3]))
    assert result["accuracy"] == pytest.approx(1 / 3) and result["top5"] == pytest.approx(2 / 3)  # 3: 6th


# ---------------------------------------------------------------- bring your own teacher

def test_a_timm_teacher_from_a_plain_state_dict_builds_a_cache_and_teaches(data, tmp_path):
    outside = create_model("timm:test_resnet", num_classes=3)
    torch.save({"state_dict": {"module." + k: v for k, v in outside.state_dict().items()}}, tmp_path / "sd.pth")
    h5 = cache.build(BuildConfig(teacher="timm:test_resnet", teacher_weights=str(tmp_path / "sd.pth"),
                                 out=str(tmp_path / "t.h5"), slots=1, data=data["data"], cache_dir=data["cache_dir"],
                                 precision="fp32", progress=False))
    assert LogitCache(h5).attrs["teacher_model"] == "timm:test_resnet"
    student = distill.run(DistillConfig(model="resnet8", name="s", epochs=1, teacher_cache=h5, **common(data, tmp_path)))
    assert student["kd"]["mode"] == "cached"
    # kdfast import: the same weights as a checkpoint, taught from online
    from kdfast import import_weights

    meta = import_weights.run(import_weights.ImportConfig(weights=str(tmp_path / "sd.pth"), model="timm:test_resnet",
                                                           data=data["data"], out_dir=str(tmp_path / "m")))
    assert meta["classes"] == ["cat", "dog", "frog"]
    online = distill.run(DistillConfig(model="resnet8", name="o", epochs=1, teacher=str(tmp_path / "m" / "sd.pth"),
                                       **common(data, tmp_path)))
    assert online["kd"]["teacher_model"] == "timm:test_resnet"


def test_a_pretrained_torchvision_teacher_served_from_localhost_builds_a_cache_and_teaches(server, data, tmp_path,  # noqa: F811
                                                                                           monkeypatch):
    from torchvision.models import MobileNet_V3_Small_Weights

    folder, base = server
    buf = io.BytesIO()
    torch.save(create_model("torchvision:mobilenet_v3_small", num_classes=1000).state_dict(), buf)
    name = f"mobilenet_v3_small-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"  # torch hub checks the prefix
    (folder / name).write_bytes(buf.getvalue())
    monkeypatch.setattr(MobileNet_V3_Small_Weights.IMAGENET1K_V1.value, "url", f"{base}/{name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    h5 = cache.build(BuildConfig(teacher="torchvision:mobilenet_v3_small", teacher_pretrained=True,
                                 out=str(tmp_path / "t.h5"), slots=1, data=data["data"], cache_dir=data["cache_dir"],
                                 precision="fp32", progress=False))
    student = distill.run(DistillConfig(model="resnet8", name="s", epochs=1, teacher_cache=h5, **common(data, tmp_path)))
    assert student["kd"]["teacher_model"] == "torchvision:mobilenet_v3_small"


def test_a_teacher_given_by_name_alone_or_without_its_json_says_what_to_do(data, tmp_path, capsys):
    err = one_line_error(capsys, distill.main, ["--teacher", "timm:resnet18", "--data", data["data"], "--cache-dir",
                                                data["cache_dir"], "--out-dir", str(tmp_path), "--no-progress"])
    assert "a model name, not a checkpoint" in err and "--teacher-weights" in err
    torch.save(create_model("resnet8", num_classes=3).state_dict(), tmp_path / "plain.pth")
    err = one_line_error(capsys, distill.main, ["--teacher", str(tmp_path / "plain.pth"), "--data", data["data"],
                                                "--cache-dir", data["cache_dir"], "--out-dir", str(tmp_path),
                                                "--no-progress"])
    assert "kdfast import" in err


# ---------------------------------------------------------------- Accelerate's settings

def test_accelerate_launch_precision_wins_over_auto_and_says_so(tmp_path):
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    config = tmp_path / "accelerate.yaml"  # what `accelerate config` writes, read by Accelerate's own loader
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n")
    assert launcher_precision(env, ["accelerate", "launch", "--config_file", str(config)])[0] == "fp32"
    assert launcher_precision(env, ["accelerate", "launch", "--mixed_precision", "no", "-m", "kdfast.train"]) == \
        ("fp32", "accelerate launch --mixed_precision no")
    assert launcher_precision({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["accelerate", "launch"])[0] == "bf16"
    assert launcher_precision(env, ["accelerate", "launch", "--config_file", "/nonexistent.yaml"]) is None  # not said
    assert launcher_precision({}, ["python"]) is None


def test_accelerate_launch_mixed_precision_no_trains_in_fp32(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdfast.train", "--model", "resnet8",
           "--data", data["data"], "--cache-dir", data["cache_dir"], "--out-dir", str(tmp_path), "--epochs", "1",
           "--batch-size", "6", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.load(open(tmp_path / "resnet8.json"))
    assert meta["precision"] == "fp32" and "accelerate launch --mixed_precision no" in meta["precision_reason"]
    assert "accelerate launch --mixed_precision no" in out.stdout


def test_gradient_accumulation_on_one_process_equals_two_processes(data, tmp_path):
    """Global batch 12: one process accumulating 2 micro-batches of 6 = two gloo processes with 6 each (a model
    without BatchNorm, whose per-process statistics would differ)."""
    flags = ["--model", "timm:test_vit", "--data", data["data"], "--cache-dir", data["cache_dir"], "--epochs", "2",
             "--batch-size", "12", "--eval-batch-size", "5", "--precision", "fp32", "--no-progress"]
    one = train.run(train.tyro.cli(TrainConfig, args=flags + ["--out-dir", str(tmp_path / "one"), "--grad-accum", "2"]))
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
    plain = train.run(train.tyro.cli(TrainConfig, args=flags + ["--out-dir", str(tmp_path / "plain"), "--batch-size",
                                                                "6"]))
    c = load_file(str(tmp_path / "plain" / "timm-test_vit.safetensors"))
    assert not all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)  # the comparison can fail: batch 6 differs


def test_make_runtime_accumulates_through_accelerate():
    runtime = make_runtime("fp32", accumulate=3)
    assert runtime.accelerator.gradient_accumulation_steps == 3
    assert decide_precision("fp32", "cpu") == ("fp32", "requested")


# ---------------------------------------------------------------- nothing overwritten silently

def test_a_finished_run_under_another_config_is_refused_without_fresh(data, tmp_path, capsys):
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, **common(data, tmp_path)))
    with pytest.raises(StateError, match=r"(?s)trained with another config.*epochs: it has 1, this run 2.*--fresh"):
        train.run(TrainConfig(model="resnet8", name="teacher", epochs=2, **common(data, tmp_path)))
    assert json.load(open(tmp_path / "teacher.json"))["epochs"] == 1  # untouched
    meta = train.run(TrainConfig(model="resnet8", name="teacher", epochs=2, fresh=True, **common(data, tmp_path)))
    assert meta["epochs"] == 2 and "replacing the finished run" in capsys.readouterr().out


def test_the_smoke_lab_leaves_the_repository_deliverables_alone(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.json").write_text('{"cnn": "the measured results"}')
    cfg = dataclasses.replace(LAB_PRESETS["smoke"], data=data["data"], pairs=("cnn",), cnn_teacher_epochs=1,
                              cnn_student_epochs=1, cnn_batch_size=6, eval_batch_size=5, precision="fp32",
                              progress=False)
    lab.run(cfg)
    assert "[lab] cnn_teacher: training (no finished run of it yet)" in capsys.readouterr().out
    with pytest.raises(StateError, match=r"(?s)cnn_teacher.json: a finished run.*epochs: it has 1, this run 2.*--fresh"):
        lab.run(dataclasses.replace(cfg, cnn_teacher_epochs=2))  # a lab over finished runs of another config
    assert "another config (below): refused unless --fresh" in capsys.readouterr().out
    assert (tmp_path / "report.json").read_text() == '{"cnn": "the measured results"}'
    assert not (tmp_path / "models_saved").exists() and not (tmp_path / "report.md").exists()
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "cache").exists()
    assert json.load(open(tmp_path / "runs" / "smoke" / "report.json"))["cnn"]["teacher_accuracy"] >= 0
    from kdfast import labreport  # rebuilt into a folder that does not exist yet, without a lab's header

    md = labreport.run(labreport.ReportConfig(out_dir="runs/smoke/models_saved", report=str(tmp_path / "new" / "r.json")))
    assert "None" not in open(md).read().splitlines()[2]


def test_labs_of_two_pairs_merge_into_one_report(tmp_path):
    lab.write_merged(str(tmp_path / "report.json"), {"cnn": {"teacher_accuracy": 0.9, "details": {}}})
    merged = lab.write_merged(str(tmp_path / "report.json"), {"vit": {"teacher_accuracy": 0.8, "details": {}}})
    assert set(merged) == {"cnn", "vit"} and json.load(open(tmp_path / "report.json")) == merged


# ---------------------------------------------------------------- defaults that follow the data

def test_distill_takes_the_caches_subset_and_a_mismatch_names_the_flags(data, tmp_path, capsys):
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, train_per_class=5, test_per_class=2,
                          **common(data, tmp_path / "m")))
    h5 = cache.build(BuildConfig(teacher=str(tmp_path / "m" / "teacher.pth"), out=str(tmp_path / "t.h5"), slots=1,
                                 cache_dir=data["cache_dir"], precision="fp32", progress=False))
    assert "--train-per-class 5 --test-per-class 2" in capsys.readouterr().out  # taken from the teacher, said
    student = distill.run(DistillConfig(model="resnet8", name="s", epochs=1, teacher_cache=h5,
                                        **{**common(data, tmp_path), "data": None}))
    assert (student["data"]["train_size"], student["data"]["test_size"]) == (15, 6)
    with pytest.raises(Exception, match=r"(?s)does not match this run.*--train-per-class 5"):
        distill.run(DistillConfig(model="resnet8", name="t", epochs=1, teacher_cache=h5, train_per_class=4,
                                  **common(data, tmp_path)))


def test_tiny_epochs_are_warned_about_and_the_dropped_tail_is_said_once(data, tmp_path, capsys):
    train.run(TrainConfig(model="resnet8", name="m", epochs=2, **{**common(data, tmp_path), "batch_size": 8}))
    out = capsys.readouterr().out
    assert out.count("4 of the 36 training images are left out of each epoch") == 1
    assert out.count("warning: only 4 optimizer steps per epoch") == 1


# ---------------------------------------------------------------- every flag explained

def test_every_field_of_every_config_has_help_and_one_default():
    from kdfast.augment import AugmentSpec
    from kdfast.cache import InfoConfig, VerifyConfig
    from kdfast.config import EvaluateConfig
    from kdfast.import_weights import ImportConfig
    from kdfast.labreport import ReportConfig

    for cls in (TrainConfig, DistillConfig, EvaluateConfig, LabConfig, SweepConfig, BuildConfig, InfoConfig,
                VerifyConfig, ImportConfig, ReportConfig, AugmentSpec):
        for f in dataclasses.fields(cls):
            doc = field_doc(cls, f.name)
            assert doc and len(doc) > 10, f"{cls.__name__}.{f.name} has no help text"
            if f.default is None:  # tyro's "(default: None)" is hidden: the text must say the real default
                assert "default" in doc.lower(), f"{cls.__name__}.{f.name}: say its default"


def test_help_shows_one_default_per_flag_and_version(capsys):
    from kdfast import cli

    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "Peak learning rate" in out
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("kdfast ")
    with pytest.raises(SystemExit):
        cache.main(["build", "--help"])
    assert "--slots" in capsys.readouterr().out


# ---------------------------------------------------------------- smaller things

def test_checkpoint_files_are_written_with_one_mode(data, tmp_path):
    train.run(TrainConfig(model="resnet8", name="m", epochs=1, **common(data, tmp_path)))
    modes = {ext: os.stat(tmp_path / f"m.{ext}").st_mode & 0o777 for ext in ("pth", "safetensors", "json")}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_without_its_package_is_refused(data, tmp_path, capsys):
    err = one_line_error(capsys, train.main, ["--log-with", "wandb", "--data", data["data"], "--out-dir", str(tmp_path),
                                              "--no-progress"])
    assert "--log-with wandb: the wandb package is not installed" in err


def test_evaluate_on_another_test_subset_says_so(data, tmp_path, capsys):
    from kdfast import evaluate
    from kdfast.config import EvaluateConfig

    meta = train.run(TrainConfig(model="resnet8", name="m", epochs=1, **common(data, tmp_path)))
    capsys.readouterr()
    evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "m.pth"), cache_dir=data["cache_dir"]))
    assert f"matches the recorded {meta['test_accuracy']:.4f}" in capsys.readouterr().out
    evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "m.pth"), cache_dir=data["cache_dir"], test_per_class=2))
    out = capsys.readouterr().out
    assert "another test subset (not comparable)" in out and "differs" not in out
