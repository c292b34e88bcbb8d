"""Every JSON file kdfast reads is validated (#17): a fuzz over every field of each kind of saved file (removed, of
another type) through the commands that read it. Each either works or exits 2 with one line; never a traceback."""
import copy
import json
import os
import shutil

import pytest
import tyro

from kdfast import evaluate, labreport, sweep, train
from kdfast.config import TrainConfig
from kdfast.errors import KdfastError
from kdfast.schemas import REPORT, Schema, problems

from .conftest import tiny_teacher


def fields(obj, prefix=()):
    """Every field path of a JSON object, nested objects included (and the first object of a list of objects)."""
    for key, value in obj.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from fields(value, prefix + (key,))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            yield from fields(value[0], prefix + (key, 0))


def another_type(value):
    if isinstance(value, str):
        return 7
    if isinstance(value, dict):
        return ["x"]
    if isinstance(value, list):
        return {"x": 1}
    return "x"  # numbers, booleans, null


READ_BACK = {"augment", "test_per_class", "store_size", "dataset", "tta", "data", "model"}  # config fields evaluate reads


def variants(obj, compared_only=()):
    """(description, damaged copy) for each field: removed, and of another type. Fields under a key of compared_only
    are only compared with a run's own (configs): of another type only (a missing one reads as its default)."""
    for path in fields(obj):
        hows = ("another type",) if path[0] in compared_only and len(path) > 1 else ("missing", "another type")
        for how in hows:
            damaged = copy.deepcopy(obj)
            parent = damaged
            for key in path[:-1]:
                parent = parent[key]
            if how == "missing":
                del parent[path[-1]]
            else:
                parent[path[-1]] = another_type(parent[path[-1]])
            yield f"{'.'.join(map(str, path))} {how}", damaged


def outcome(capsys, main, argv, named: str | None = None) -> str | None:
    """None when the command worked or refused with a kdfast error (exit 2) that names the damaged field (`named`,
    when given); else what went wrong."""
    try:
        main(argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        if e.code != 2 or not err.startswith("kdfast: error:") or "Traceback" in err:
            return f"exit {e.code}: {err[-300:]}"
        if named and named not in err:
            return f"the refusal does not name {named!r}: {err[-300:]}"
    except Exception as e:  # a traceback in a real run
        return f"{type(e).__name__}: {e}"
    capsys.readouterr()
    return None


@pytest.fixture(autouse=True)
def default_data_is_the_tiny_folder(lab_dir, monkeypatch):
    """A damaged file that loses its data source falls back to $KDFAST_DATA: the tiny folder here, not CI's CIFAR-10
    (decoding it in every case of the fuzz took a minute)."""
    monkeypatch.setenv("KDFAST_DATA", str(lab_dir["root"] / "tiny"))


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("json")
    flags, _ = tiny_teacher(root, "cnn_teacher", eval_batch_size=12)
    flags += ["--model", "resnet8", "--epochs", "1", "--out-dir", str(root / "m")]
    return {"root": root, "flags": flags, "json": root / "m" / "cnn_teacher.json",
            "metrics": root / "m" / "cnn_teacher.metrics.jsonl"}


def test_a_finished_runs_json_damaged_in_any_field(lab_dir, capsys, tmp_path):
    path, original = lab_dir["json"], lab_dir["json"].read_text()
    meta = json.loads(original)
    readers = {
        "report": (labreport.main, [str(path.parent), "--report", str(tmp_path / "report.json")]),
        "evaluate": (evaluate.main, ["--checkpoint", str(path.with_suffix(".pth")), "--cache-dir",
                                     str(lab_dir["root"] / "cache"), "--no-progress"]),
        "train over it": (train.main, lab_dir["flags"] + ["--name", "cnn_teacher", "--epochs", "2"]),
    }
    failures, tried = [], 0
    try:
        for what, damaged in variants(meta, compared_only=("config",)):
            path.write_text(json.dumps(damaged))
            for reader, (main, argv) in readers.items():
                if what.startswith("config.") and (reader == "report" or reader == "evaluate" and
                                                   what.split(".")[1].split(" ")[0] not in READ_BACK):
                    continue  # the report reads nothing of the config, evaluate only READ_BACK
                tried += 1
                problem = outcome(capsys, main, argv)
                if problem:
                    failures.append(f"{what} -> {reader}: {problem}")
    finally:
        path.write_text(original)
    assert tried > 120 and not failures, "\n".join(failures[:20])


def test_a_resumable_state_damaged_in_any_field(lab_dir, capsys, tmp_path, monkeypatch):
    from .test_runs import Die, interrupt_at

    out = tmp_path / "r"
    flags = [f if f != str(lab_dir["root"] / "m") else str(out) for f in lab_dir["flags"]] + ["--epochs", "2"]
    restore = interrupt_at(monkeypatch, epoch=1, step=1)
    with pytest.raises(Die):
        train.run(tyro.cli(TrainConfig, args=flags))
    restore()
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    state_json = saved / ".state" / "resnet8" / "state.json"
    record = json.loads(state_json.read_text())
    failures, tried = [], 0
    for what, damaged in variants(record, compared_only=("config",)):
        shutil.rmtree(out)
        shutil.copytree(saved, out)
        (out / ".state" / "resnet8" / "state.json").write_text(json.dumps(damaged))
        tried += 1
        problem = outcome(capsys, train.main, flags + ["--resume"])
        if problem:
            failures.append(f"{what}: {problem}")
    assert tried > 60 and not failures, "\n".join(failures[:20])


def test_metrics_lines_and_a_report_damaged_in_any_field(lab_dir, capsys, tmp_path):
    metrics, original = lab_dir["metrics"], lab_dir["metrics"].read_text()
    record = json.loads(original.splitlines()[0])
    report_path = tmp_path / "report.json"
    labreport.main([str(metrics.parent), "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    run_cfg = TrainConfig(name="cnn_teacher", out_dir=str(metrics.parent))
    failures = []
    try:
        for what, damaged in variants(record):
            metrics.write_text(json.dumps(damaged) + "\n")
            problem = outcome(capsys, labreport.main, [str(metrics.parent), "--report", str(tmp_path / "r2.json")])
            try:
                sweep.last_epoch_accuracy(run_cfg)
            except KdfastError:
                pass
            except Exception as e:
                problem = problem or f"sweep: {type(e).__name__}: {e}"
            if problem:
                failures.append(f"metrics {what}: {problem}")
    finally:
        metrics.write_text(original)
    for what, damaged in variants(report):
        report_path.write_text(json.dumps(damaged))
        problem = outcome(capsys, labreport.main, [str(metrics.parent), "--report", str(report_path)])
        if problem:
            failures.append(f"report {what}: {problem}")
    assert not failures, "\n".join(failures[:20])


def test_the_schema_names_the_field_and_the_type():
    schema = Schema({"a": "int", "b": Schema({"c": "str"}, required=("c",))}, required=("a",))
    assert problems({"b": {"c": 1}}, schema) == ["field 'a' is missing", "field 'b.c' is a int ('1'), expected str"]
    assert problems({"a": True, "b": {"c": "x"}}, schema) == ["field 'a' is a bool ('True'), expected int"]
    assert problems({"cnn": {"teacher_accuracy": "high"}}, REPORT) == \
        ["field 'cnn.teacher_accuracy' is a str ('high'), expected number or null"]
    assert os.path.basename(__file__) == "test_saved_json.py"


def test_a_logit_caches_attributes_damaged_in_any_field(lab_dir, capsys, tmp_path):
    """The cache's HDF5 attributes (classes and augment are JSON text there) through `cache info` and a distillation
    from it."""
    import h5py

    from kdfast import cache, distill

    good = str(tmp_path / "good.h5")
    cache.main(["build", "--teacher", str(lab_dir["json"].with_suffix(".pth")), "--out", good, "--slots", "1",
                "--cache-dir", str(lab_dir["root"] / "cache"), "--precision", "fp32", "--no-progress"])
    with h5py.File(good, "r") as f:
        attrs = cache.read_attrs(f)
    damaged_path = str(tmp_path / "damaged.h5")
    flags = [f if f != str(lab_dir["root"] / "m") else str(tmp_path / "d") for f in lab_dir["flags"]]
    failures = []
    for what, damaged in variants(attrs):
        shutil.copyfile(good, damaged_path)
        with h5py.File(damaged_path, "r+") as f:
            for key in list(f.attrs):
                del f.attrs[key]
            for key, value in damaged.items():  # as the build writes them; what it could not hold, as text
                text = key in ("classes", "augment") or not isinstance(value, (str, int, float, list))
                f.attrs[key] = json.dumps(value) if text else value
        for reader, (main, argv) in {"info": (cache.main, ["info", damaged_path]),
                                     "distill": (distill.main, ["--teacher-cache", damaged_path, "--fresh",
                                                                *flags])}.items():
            if reader == "distill" and what.startswith("augment."):
                continue  # the same reading as info's
            problem = outcome(capsys, main, argv, named=what.split(" ")[0].split(".")[0])
            if problem:
                failures.append(f"{what} -> {reader}: {problem}")
    assert not failures, "\n".join(failures[:20])


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
