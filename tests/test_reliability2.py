"""Reliability, second round (#17), the parts done so far: interrupt advice that works, sweep bookkeeping."""
import os
import signal

import pytest

from kdfast import cache, engine, labreport, sweep, train
from kdfast.cache import BuildConfig
from kdfast.config import SweepConfig, TrainConfig
from kdfast.errors import Interrupted, KdfastError

from .conftest import write_image_folder


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel2")
    data = write_image_folder(str(root / "tiny"))
    common = dict(data=data, cache_dir=str(root / "cache"), batch_size=6, eval_batch_size=5, precision="fp32",
                  progress=False)
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, out_dir=str(root / "m"), **common))
    h5 = cache.build(BuildConfig(teacher=str(root / "m" / "teacher.pth"), out=str(root / "t.h5"), slots=2,
                                 cache_dir=str(root / "cache"), precision="fp32", progress=False))
    return {"h5": h5, "cache_dir": str(root / "cache")}


def sweep_cfg(small_cache, out, **kw):
    return SweepConfig(**{**dict(teacher_cache=small_cache["h5"], model="resnet8", alphas=(0.5,), taus=(2.0,), seeds=1,
                                 epochs=2, batch_size=6, eval_batch_size=5, precision="fp32", progress=False,
                                 out_dir=str(out), cache_dir=small_cache["cache_dir"]), **kw})


def test_an_interrupted_sweep_is_continued_by_the_advice_it_prints(small_cache, tmp_path, monkeypatch):
    original = engine.train_step

    def step_with_signal(tr, batch, global_step):
        loss = original(tr, batch, global_step)
        if tr.cfg.run_name.startswith("kd") and global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(engine, "train_step", step_with_signal)
    with pytest.raises(Interrupted) as stopped:
        sweep.run(sweep_cfg(small_cache, tmp_path))
    assert "Run the same command again to continue." in str(stopped.value) and "--resume" not in str(stopped.value)
    monkeypatch.setattr(engine, "train_step", original)
    result = sweep.run(sweep_cfg(small_cache, tmp_path))  # the advice: the same command, nothing added
    assert len(result["runs"]) == 2 and not (tmp_path / ".state").exists()


def test_a_single_run_is_told_to_add_resume(small_cache, tmp_path):
    assert engine.resume_advice(TrainConfig()) == "Resume with the same command and --resume."
    assert engine.resume_advice(TrainConfig(resume=True)) == "Run the same command again to continue."


@pytest.mark.parametrize("field,values", [("alphas", (0.1, 0.1)), ("taus", (2.0, 4.0, 2.0)), ("cache_slots", (1, 1))])
def test_repeated_grid_values_are_refused(field, values):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be given without repeats"):
        SweepConfig(**{field: values}).validate()


def test_cache_slots_beyond_the_cache_are_refused(small_cache, tmp_path):
    with pytest.raises(ValueError, match="--cache-slots must be at most the 2 slots"):
        sweep.run(sweep_cfg(small_cache, tmp_path, cache_slots=(1, 3)))
    assert not (tmp_path / "sweep.md").exists()


def test_report_with_a_sweep_folder_that_holds_none_is_refused(tmp_path):
    with pytest.raises(KdfastError, match="--sweep .*: no sweep here"):
        labreport.run(labreport.ReportConfig(out_dir=str(tmp_path), sweep=str(tmp_path / "typo")))


# ---------------------------------------------------------------- a --together pass stopped while saving

def test_a_together_pass_stopped_after_saving_some_students_continues_with_the_rest(small_cache, tmp_path,
                                                                                     monkeypatch):
    """Killed (here: an exception) after the first of three students was saved: the rerun of the same sweep resumes
    the pass, keeps the saved student's files, saves the other two, and they equal an uninterrupted pass's."""
    from kdfast import group

    def cfg(out):
        return sweep_cfg(small_cache, out, alphas=(0.3, 0.7), taus=(1.0, 2.0), together="on")

    original, saved = group.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        if len(saved) == 1:
            raise KeyboardInterrupt  # what a kill while saving the second student leaves
        saved.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(group, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg(tmp_path / "b"))
    monkeypatch.setattr(group, "save_checkpoint", original)
    first = (tmp_path / "b" / f"{saved[0]}.pth").read_bytes()
    assert (tmp_path / "b" / ".state").exists() and len(saved) == 1
    result = sweep.run(cfg(tmp_path / "b"))  # the same command: no refusal as "another config"
    assert len(result["runs"]) == 5 and not (tmp_path / "b" / ".state").exists()
    assert (tmp_path / "b" / f"{saved[0]}.pth").read_bytes() == first  # kept, not trained again
    sweep.run(cfg(tmp_path / "a"))
    for row in result["runs"]:
        a, b = ((tmp_path / d / f"{row['name']}.safetensors").read_bytes() for d in ("a", "b"))
        assert a == b, row["name"]


# ---------------------------------------------------------------- checked before the first step

def _numeric_fields(cls):
    """(path, kind) of every numeric field of a config class, nested dataclasses (augment) included."""
    from kdfast.schemas import Schema, from_dataclass

    for name, kind in from_dataclass(cls).fields.items():
        for path, k in ([(name, kind)] if not isinstance(kind, Schema) else
                        [(f"{name}.{sub}", v) for sub, v in kind.fields.items()]):
            if isinstance(k, str) and ("int" in k or "number" in k):
                yield path, k


def _with(cfg, path, value):
    from dataclasses import replace

    if "." in path:
        outer, inner = path.split(".")
        old = getattr(cfg, outer)
        value = type(getattr(old, inner))(value) if isinstance(getattr(old, inner), tuple) else value
        setattr(cfg, outer, replace(old, **{inner: value}))
    else:
        setattr(cfg, path, value)
    return cfg


def test_every_numeric_field_of_every_config_refuses_what_is_not_a_finite_number():
    """NaN and inf in any numeric field (nested ones included, as the Python API or a saved config can give them) are
    refused by validate() with the flag's name; no field's check crashes on them."""
    from kdfast.cache import BuildConfig
    from kdfast.config import DistillConfig, EvaluateConfig, LabConfig

    makers = {TrainConfig: TrainConfig, DistillConfig: lambda: DistillConfig(teacher_cache="t.h5"),
              SweepConfig: SweepConfig, LabConfig: LabConfig, EvaluateConfig: lambda: EvaluateConfig(checkpoint="c.pth"),
              BuildConfig: lambda: BuildConfig(teacher="t.pth")}
    tried = 0
    for cls, make in makers.items():
        for path, kind in _numeric_fields(cls):
            for bad in (float("nan"), float("inf")):
                value = (bad,) * len(getattr(getattr(make(), path.split(".")[0]), path.split(".")[1])) \
                    if "list" in kind and "." in path else (bad,) if "list" in kind else bad
                cfg = _with(make(), path, value)
                with pytest.raises(ValueError, match=f"--{path.replace('_', '-')}"):
                    cfg.validate()
                tried += 1
    assert tried > 150


@pytest.mark.parametrize("model,flags,said", [
    ("timm:vit_tiny_patch16_224", [], "timm:vit_tiny_patch16_224@224 resizes the views"),
    ("vit_student", ["--augment.crop-size", "28"], "cannot take the training views (28x28 px)"),
    ("torchvision:fcn_resnet50", [], "not a classifier kdfast can train"),
    ("resnet8", ["--augment.crop-size", "64"], "reaches beyond one reflection of the 32 px images"),
    ("resnet8", ["--augment.padding", "40"], "--augment.padding 40"),
])
def test_a_model_or_view_that_cannot_take_the_images_is_refused_before_training(small_cache, tmp_path, capsys,
                                                                                 model, flags, said):
    from .test_runs import one_line_error

    data = os.path.join(os.path.dirname(small_cache["h5"]), "tiny")
    err = one_line_error(capsys, train.main, ["--model", model, "--data", data, "--cache-dir", small_cache["cache_dir"],
                                              "--epochs", "1", "--batch-size", "6", "--precision", "fp32",
                                              "--no-progress", "--out-dir", str(tmp_path), *flags])
    assert said in err, err
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path))


# ---------------------------------------------------------------- damaged or incomplete data shows

def test_an_archive_cut_between_two_members_is_refused_and_counts_per_class_are_printed(tmp_path, capsys):
    """tarfile reads a tar cut exactly at a member boundary as a whole one: kdfast looks for the end-of-archive
    marker. A whole source's images per class are printed, so that one missing image shows."""
    import gzip
    import tarfile

    from .conftest import write_archive
    from .test_runs import one_line_error

    folder = write_image_folder(str(tmp_path / "tiny"))
    whole = write_archive(folder, str(tmp_path / "whole.tar.gz"))
    with tarfile.open(whole) as tar:
        offsets = [m.offset for m in tar]
    raw = gzip.open(whole).read()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gzip.compress(raw[:offsets[-3]]))  # ends right before a member: a valid-looking tar
    with tarfile.open(cut) as tar:
        assert len(tar.getmembers()) == len(offsets) - 3  # what tarfile alone accepts
    flags = ["--model", "resnet8", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "6",
             "--precision", "fp32", "--no-progress", "--out-dir", str(tmp_path / "m")]
    err = one_line_error(capsys, train.main, ["--data", str(cut), *flags])
    assert "without tar's end-of-archive marker: it is incomplete" in err and str(cut) in err, err
    os.remove(os.path.join(folder, "train", "dog", "0003.png"))
    train.main(["--data", folder, *flags])
    out = capsys.readouterr().out
    assert "data: train 23 images in 3 classes, not equally many: fewest dog 7" in out, out
    assert "test 12 images, 4 in each of 3 classes" in out
    train.main(["--data", whole, *flags, "--name", "whole"])
    assert "data: train 24 images, 8 in each of 3 classes" in capsys.readouterr().out


# ---------------------------------------------------------------- noticed beside the probe

def test_sigterm_delivered_twice_still_saves_and_a_second_ctrl_c_stops_at_once(small_cache, tmp_path, monkeypatch):
    original = engine.train_step
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
    monkeypatch.setattr(engine, "train_step", step_with([signal.SIGTERM, signal.SIGTERM]))
    with pytest.raises(Interrupted, match="SIGTERM: stopped after step 2 of epoch 1"):
        train.run(cfg)
    assert (tmp_path / ".state" / "resnet8" / "state.json").exists()
    monkeypatch.setattr(engine, "train_step", step_with([signal.SIGINT, signal.SIGINT]))
    with pytest.raises(KeyboardInterrupt):
        train.run(TrainConfig(**{**cfg.__dict__, "fresh": True}))


def test_lock_refusals_name_the_commands_own_flags_and_a_folder_without_test_is_named(small_cache, tmp_path,
                                                                                    capsys):
    from kdfast.files import FileLock, LockedError

    from .test_runs import one_line_error

    out = str(tmp_path / "t.h5")
    with FileLock(out + ".lock", "x"):
        with pytest.raises(LockedError, match="or choose another --out\\.$"):
            cache.build(BuildConfig(teacher=os.path.join(os.path.dirname(small_cache["h5"]), "m", "teacher.pth"),
                                    out=out, slots=1, cache_dir=small_cache["cache_dir"], progress=False))
    report = str(tmp_path / "report.json")
    with FileLock(report + ".cnn.lock", "x"):
        from kdfast import lab

        err = one_line_error(capsys, lab.main, ["--report", report, "--pairs", "cnn", "--out-dir", str(tmp_path / "m"),
                                                "--data", os.path.join(os.path.dirname(small_cache["h5"]), "tiny")])
        assert "choose another --report and --out-dir" in err and "--name" not in err, err
    only_train = tmp_path / "photos"
    (only_train / "train" / "cat").mkdir(parents=True)
    err = one_line_error(capsys, train.main, ["--data", str(only_train), "--out-dir", str(tmp_path / "m")])
    assert "has train/ but no test/ or val/ folder" in err and "CIFAR" not in err, err


# ---------------------------------------------------------------- each command's interrupt advice, run

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
        original = cache._write_rows

        def write_then_signal(f, slot, *args):
            original(f, slot, *args)
            if slot == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(cache, "_write_rows", write_then_signal)
    else:
        original = engine.train_step

        def step_then_signal(tr, batch, global_step):
            loss = original(tr, batch, global_step)
            if global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        monkeypatch.setattr(engine, "train_step", step_then_signal)
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


# ---------------------------------------------------------------- misuse tried beyond the probe

def test_damaged_and_odd_inputs_are_named_in_one_line(small_cache, tmp_path, capsys, monkeypatch):
    import shutil
    import zipfile

    from PIL import Image

    from kdfast import distill, import_weights, lab

    from .test_runs import one_line_error

    root = os.path.dirname(small_cache["h5"])
    tiny, teacher = os.path.join(root, "tiny"), os.path.join(root, "m", "teacher.pth")
    flags = ["--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "6", "--precision", "fp32",
             "--no-progress", "--out-dir", str(tmp_path / "m")]

    def folder(name, change):
        path = tmp_path / name
        shutil.copytree(tiny, path)
        change(path)
        return str(path)

    empty = folder("empty", lambda p: (p / "train" / "cat" / "0000.png").write_bytes(b""))
    latin = folder("latin", lambda p: [os.rename(p / s / "cat", os.path.join(os.fsencode(p / s), b"caf\xe9"))
                                       for s in ("train", "test")])
    with zipfile.ZipFile(tmp_path / "zip.tar.gz", "w") as z:
        z.writestr("a", "b")
    (tmp_path / "dir.h5").mkdir()
    cases = [
        (train.main, ["--data", empty, *flags], "0000.png: not a readable image (an empty file)"),
        (train.main, ["--data", latin, *flags], "has a name that is not UTF-8 text"),
        (train.main, ["--data", str(tmp_path / "zip.tar.gz"), *flags], "not a readable .tar.gz archive"),
        (distill.main, ["--teacher-cache", str(tmp_path / "dir.h5"), *flags], "a folder, not a logit cache file"),
        (import_weights.main, [teacher.replace(".pth", ".safetensors"), "--model", "resnet20", "--classes", "cat",
                               "dog", "frog", "--out-dir", str(tmp_path / "i")], "Missing key(s) in state_dict"),
        (lab.main, ["--preset", "nope"], "--preset 'nope': not a preset; choose one of smoke"),
    ]
    for main, argv, said in cases:
        err = one_line_error(capsys, main, argv)
        assert said in err and len(err.splitlines()) == 1, err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # a 32x32 image is then a "decompression bomb"
    err = one_line_error(capsys, train.main, ["--data", folder("bomb", lambda p: None), *flags])
    assert "Pillow refuses images this large" in err, err
