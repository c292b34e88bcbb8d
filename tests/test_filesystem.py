"""The operating system's file errors (#17): a read-only or a full file system gives one line that names the path and
the fix; a failure before a run's first save leaves the finished run's files as they were (metrics included), and no
lock, temporary or state is left behind. Real tmpfs mounts (skipped where mount is not permitted)."""
import contextlib
import os
import subprocess
import sys

import pytest

from kdfast import cache, import_weights, lab, train
from kdfast.cache import BuildConfig
from kdfast.config import TrainConfig

from .conftest import common, tiny_teacher
from .test_runs import ROOT, one_line_error


@contextlib.contextmanager
def tmpfs(path, options: str):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"mount -t tmpfs is not permitted here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder, leave: int) -> None:
    """Fill a file system, then give back `leave` bytes."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 12))
        except OSError:
            pass
    os.truncate(path, max(0, os.path.getsize(path) - leave))


def files_in(folder) -> dict:
    """Every file under a folder with its bytes (the filler aside)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name != "filler":
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    flags, teacher = tiny_teacher(root)
    return {"flags": flags, "teacher": teacher, "cache_dir": str(root / "cache")}


def test_read_only_places_are_refused_in_one_line(tiny, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro") as ro:
        runs = {
            "train --out-dir": (train.main, ["--model", "resnet8", "--epochs", "1", "--out-dir", str(ro / "m"),
                                             *tiny["flags"]]),
            "cache build --out": (cache.main, ["build", "--teacher", tiny["teacher"], "--out", str(ro / "t.h5"),
                                               "--slots", "1", "--cache-dir", tiny["cache_dir"], "--precision", "fp32",
                                               "--no-progress"]),
            "lab --report": (lab.main, ["--preset", "smoke", "--report", str(ro / "report.json"), "--out-dir",
                                        str(tmp_path / "lab"), *tiny["flags"][:4]]),
            "import --out-dir": (import_weights.main, [tiny["teacher"].replace(".pth", ".safetensors"), "--model",
                                                       "resnet8", "--classes", "cat", "dog", "frog", "--out-dir",
                                                       str(ro / "imported")]),
        }
        for what, (main, argv) in runs.items():
            err = one_line_error(capsys, main, argv)
            assert "Read-only file system" in err and str(ro) in err and "choose a writable place" in err, (what, err)
        assert not os.path.exists(tmp_path / "lab" / "report.json")  # the lab refused before training anything
        real = subprocess.run([sys.executable, "-m", "kdfast.cache", *runs["cache build --out"][1]],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert real.returncode == 2 and real.stderr.count("\n") == 1 and "Read-only" in real.stderr, real.stderr
        said = train.main(["--model", "resnet8", "--epochs", "1", "--out-dir", str(tmp_path / "m"),
                           *tiny["flags"][:2], "--cache-dir", str(ro / "cache"), *tiny["flags"][4:]])
        assert said["test_accuracy"] >= 0  # a read-only data cache only costs decoding again
        assert "could not write the data cache" in capsys.readouterr().out


@pytest.mark.parametrize("leave", [0, 96 * 1024], ids=["no-room-for-the-lock", "room-for-an-epoch-not-its-state"])
def test_a_full_disk_leaves_the_finished_run_whole_and_nothing_behind(tiny, tmp_path, capsys, leave):
    with tmpfs(tmp_path / "small", "size=4m") as out:
        argv = ["--model", "resnet8", "--name", "run", "--epochs", "1", "--out-dir", str(out), *tiny["flags"]]
        train.main(argv)
        before = files_in(out)
        assert set(before) == {"run.pth", "run.safetensors", "run.json", "run.metrics.jsonl"}
        fill(out, leave)
        err = one_line_error(capsys, train.main, argv[:5] + ["2", "--fresh"] + argv[6:])  # another config, replacing
        assert "No space left on device" in err and "The disk is full" in err, err
        assert str(out) in err
        after = files_in(out)
        assert {k: v for k, v in after.items() if not k.startswith(".state")} == before  # metrics included
        assert all(".tmp" not in k and not k.endswith(".lock") for k in after), sorted(after)
        assert not any(k.startswith(".state/run/") or k.startswith(".state/run.tmp") for k in after), sorted(after)
        os.remove(os.path.join(out, "filler"))
        meta = train.main(argv[:5] + ["2", "--fresh"] + argv[6:])  # with room again, the replacement goes through
        assert meta["epochs"] == 2 and not os.path.exists(os.path.join(out, ".state"))
        assert [line.count('"epoch"') for line in open(os.path.join(out, "run.metrics.jsonl"))] == [1, 1]


def test_a_cache_the_disk_cannot_hold_is_refused_before_the_teacher_runs(tiny, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=64k") as out:
        err = one_line_error(capsys, cache.main, ["build", "--teacher", tiny["teacher"], "--out", str(out / "t.h5"),
                                                  "--slots", "400", "--cache-dir", tiny["cache_dir"],
                                                  "--precision", "fp32", "--no-progress"])
        assert "the cache needs about" in err and "free" in err and "--slots" in err, err
        assert os.listdir(out) == []  # no lock, no partial file


def test_a_writer_that_names_no_cause_is_explained(tiny, tmp_path, capsys):
    """torch.save on a full disk raises "unexpected pos 64 vs 0": the file error is still named, nothing left."""
    with tmpfs(tmp_path / "small", "size=256k") as out:
        fill(out, 0)
        err = one_line_error(capsys, import_weights.main, [tiny["teacher"].replace(".pth", ".safetensors"),
                                                           "--model", "resnet8", "--classes", "cat", "dog", "frog",
                                                           "--out-dir", str(out / "imported")])
        assert "No space left on device" in err and "imported" in err, err
        assert files_in(out) == {}


@pytest.mark.parametrize("code,fix", [(13, "Permission denied: fix the permissions"), (21, "A folder is in the way"),
                                      (20, "A file is in the way"), (122, "quota"), (5, "I/O error")])
def test_each_file_error_says_its_cause_and_fix(tiny, tmp_path, capsys, monkeypatch, code, fix):
    """Errors this machine cannot make for real (root ignores permissions): raised where kdfast creates its output
    folder, they read as the others do."""
    import errno

    real = os.makedirs

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "out")):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
    err = one_line_error(capsys, train.main, ["--model", "resnet8", "--epochs", "1", "--out-dir", str(tmp_path / "out"),
                                              *tiny["flags"]])
    assert fix in err and str(tmp_path / "out") in err and os.strerror(code) in err, err
    assert errno.errorcode[code]  # a real errno


def test_checkpoint_files_are_written_with_one_mode(tiny_data, tmp_path):
    train.run(TrainConfig(model="resnet8", name="m", epochs=1, **common(tiny_data, tmp_path)))
    modes = {ext: os.stat(tmp_path / f"m.{ext}").st_mode & 0o777 for ext in ("pth", "safetensors", "json")}
    assert len(set(modes.values())) == 1, modes


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
