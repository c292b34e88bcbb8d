"""The teacher-logit cache: exact views, same loss as online KD, crash-safe builds, refusals."""
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from kdfast import cache as cache_mod
from kdfast import cache, distill, train
from kdfast.augment import AugmentSpec, augment, normalize
from kdfast.cache import BuildConfig, CachedTeacher, CacheError, LogitCache, build
from kdfast.checkpoint import load_teacher
from kdfast.config import DistillConfig, TrainConfig
from kdfast.data import DataError, TrainLoader, load_dataset
from kdfast.losses import kd_loss

from .conftest import common, write_image_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny data and a trained tiny teacher (ResNet-8), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cache")
    data = write_image_folder(str(root / "data"))
    common = dict(data=data, cache_dir=str(root / "c"), out_dir=str(root / "m"), batch_size=6, eval_batch_size=5,
                  precision="fp32", progress=False)
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=2, **common))
    return {"root": root, "data": data, "cache_dir": str(root / "c"), "teacher": str(root / "m" / "teacher.pth")}


def build_cfg(setup, out, **kw):
    base = dict(teacher=setup["teacher"], out=str(out), slots=3, data=setup["data"], cache_dir=setup["cache_dir"],
                batch_size=7, precision="fp32", progress=False)
    return BuildConfig(**{**base, **kw})


def test_cached_logits_equal_the_online_teacher_on_the_same_views(setup, tmp_path):
    path = build(build_cfg(setup, tmp_path / "t.h5", slots=4))
    data = load_dataset(setup["data"], setup["cache_dir"])
    teacher, _ = load_teacher(setup["teacher"], data.classes, "cpu")
    cache, spec = LogitCache(path), AugmentSpec()
    g = torch.Generator().manual_seed(0)
    for slot in range(4):
        idx = torch.randperm(len(data.train), generator=g)[:10]
        with torch.no_grad():
            online = teacher(normalize(augment(data.train.images[idx], idx, cache.seeds[slot], spec), spec, True))
        cached = cache.slot_logits(slot)[idx]
        assert torch.allclose(cached, online, rtol=2e-3, atol=2e-3)  # float16 rounding
        assert not torch.allclose(cache.slot_logits((slot + 1) % 4)[idx], online, rtol=2e-3, atol=2e-3)


def test_cached_and_online_kd_steps_give_the_same_loss(setup, tmp_path):
    path = build(build_cfg(setup, tmp_path / "t.h5"))
    data = load_dataset(setup["data"], setup["cache_dir"])
    teacher, _ = load_teacher(setup["teacher"], data.classes, "cpu")
    cache = LogitCache(path)
    served = CachedTeacher(cache, 3, "cpu")
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    loader = TrainLoader(data.train, 6, seed=0, spec=AugmentSpec(), device="cpu", channels_last=True)
    for epoch in (0, 2, 4):  # epoch 4 reuses slot 1
        batch = next(loader.epoch(epoch, served.aug_seed(epoch)))
        with torch.no_grad():
            online = kd_loss(student(batch.images), teacher(batch.images), batch.labels, 0.3, 4.0)
        cached = kd_loss(student(batch.images), served(batch), batch.labels, 0.3, 4.0)
        assert cached.item() == pytest.approx(online.item(), rel=1e-3, abs=1e-4)


def test_topk_cache_holds_the_top_logits_and_the_rest(setup, tmp_path):
    dense = LogitCache(build(build_cfg(setup, tmp_path / "dense.h5")))
    sparse = LogitCache(build(build_cfg(setup, tmp_path / "top2.h5", topk=2)))
    # 3 classes, top 2 kept: the one left out is its own log-mean-exp, so the dense logits come back
    assert torch.allclose(sparse.slot_logits(1), dense.slot_logits(1), atol=1e-2)
    assert "train/logits" not in sparse.file and sparse.file["train/topk_indices"].dtype == np.int16
    # a run holds the k values and indices and the rest logit of a slot, densified per batch: the same logits
    served = CachedTeacher(sparse, 3, "cpu")
    assert len(served.held or []) == 0
    batch = type("B", (), {"aug_seed": sparse.seeds[1], "indices": torch.tensor([5, 0, 17, 5])})()
    assert torch.equal(served(batch), sparse.slot_logits(1)[batch.indices]) and len(served.held) == 3
    imagenet = {"train_size": 1_281_167, "classes": list(range(1000))}
    assert cache_mod.slot_bytes({**imagenet, "topk": 10}) / 2**20 == pytest.approx(51.3, abs=0.1)  # as the help says
    assert cache_mod.slot_bytes({**imagenet, "topk": 0}) / 2**30 == pytest.approx(2.39, abs=0.01)


def test_topk_is_automatic_above_a_hundred_classes_and_slots_are_built_in_chunks(setup, tmp_path, monkeypatch):
    said = []
    assert cache_mod.resolve_topk(-1, 100, said.append) == 0 and not said  # CIFAR-100 stays dense
    assert cache_mod.resolve_topk(-1, 1000, said.append) == cache_mod.AUTO_TOPK and "top 10" in said[0]
    assert cache_mod.resolve_topk(0, 1000, said.append) == 0 and cache_mod.resolve_topk(5, 1000, said.append) == 5
    whole = LogitCache(build(build_cfg(setup, tmp_path / "whole.h5")))
    monkeypatch.setattr(cache_mod.builder, "BUILD_CHUNK", 5)  # 24 samples in chunks of 5: the same file
    chunked = LogitCache(build(build_cfg(setup, tmp_path / "chunked.h5")))
    for slot in range(3):
        assert torch.equal(whole.slot_logits(slot), chunked.slot_logits(slot))


def _build_process(setup, out, seeds):
    cmd = [sys.executable, "-u", "-m", "kdfast.cache", "build", "--teacher", setup["teacher"], "--out", str(out),
           "--slots", str(seeds), "--data", setup["data"], "--cache-dir", setup["cache_dir"], "--batch-size", "7",
           "--precision", "fp32", "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_build_resumes_to_the_uninterrupted_result(setup, tmp_path):
    seeds = 300
    whole = tmp_path / "whole.h5"
    assert _build_process(setup, whole, seeds).wait(timeout=300) == 0

    killed = tmp_path / "killed.h5"
    proc = _build_process(setup, killed, seeds)
    for line in proc.stdout:  # kill -9 once a few slots are on disk
        if "slot 5/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists() and os.path.exists(str(killed) + ".partial")  # never taken for a whole file
    with pytest.raises(CacheError, match="interrupted"):
        LogitCache(str(killed))

    resumed = _build_process(setup, killed, seeds)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resuming an interrupted build" in out
    assert out.count("complete (seed") < seeds  # slots done before the kill were not recomputed
    with h5py.File(whole) as a, h5py.File(killed) as b:
        for name in ("train/logits", "train/complete", "test/logits", "test/labels"):
            assert np.array_equal(a[name][...], b[name][...]), name
        assert a.attrs["teacher_sha256"] == b.attrs["teacher_sha256"]


def test_cached_distillation_trains_without_the_teacher(setup, tmp_path, monkeypatch, capsys):
    path = build(build_cfg(setup, tmp_path / "t.h5", slots=2))
    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    cfg = DistillConfig(model="resnet8", name="s", data=setup["data"], cache_dir=setup["cache_dir"],
                        out_dir=str(tmp_path / "m"), epochs=3, batch_size=6, eval_batch_size=5, precision="fp32",
                        progress=False, teacher_cache=path)
    meta = distill.run(cfg)
    assert meta["kd"]["mode"] == "cached" and meta["kd"]["cache_slots"] == 2
    assert "epochs 3..3 repeat the views" in capsys.readouterr().out


# ----------------------------------------------------------------------------- refusals

def test_mismatched_runs_are_refused(setup, tmp_path):
    cache = LogitCache(build(build_cfg(setup, tmp_path / "t.h5")))
    full = load_dataset(setup["data"], setup["cache_dir"])
    cache.check_matches(full, AugmentSpec())
    with pytest.raises(CacheError, match="dataset_fingerprint"):
        cache.check_matches(load_dataset(setup["data"], setup["cache_dir"], train_per_class=4), AugmentSpec())
    with pytest.raises(CacheError, match="augment"):
        cache.check_matches(full, AugmentSpec(padding=2))
    renamed = type(full)(full.train, full.test, ["a", "b", "c"], full.fingerprint, full.source)
    with pytest.raises(CacheError, match="classes"):
        cache.check_matches(renamed, AugmentSpec())


def test_distill_refuses_a_cache_of_other_data(setup, tmp_path):
    path = build(build_cfg(setup, tmp_path / "t.h5"))
    cfg = DistillConfig(model="resnet8", data=setup["data"], cache_dir=setup["cache_dir"], out_dir=str(tmp_path / "m"),
                        train_per_class=4, epochs=1, batch_size=6, precision="fp32", progress=False, teacher_cache=path)
    with pytest.raises(CacheError, match="does not match this run"):
        distill.run(cfg)


def _damaged(setup, tmp_path, edit):
    path = build(build_cfg(setup, tmp_path / "t.h5"))
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda f: f["train/logits"].__setitem__((1, 3, 0), np.nan), "NaN or inf"),
    (lambda f: f["train/logits"].__setitem__((2, 0, 1), np.inf), "NaN or inf"),
    (lambda f: f["train/complete"].__setitem__(1, False), r"slots \[1\] are not complete"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "format version 99"),
    (lambda f: f.attrs.__setitem__("format", "other"), "not a kdfast logit cache"),
    (lambda f: (f.__delitem__("test/logits"), f.create_dataset("test/logits", (5, 3), "float16")), "has shape"),
    (lambda f: f.__delitem__("train/logits"), "is missing"),
])
def test_damaged_files_are_refused(setup, tmp_path, edit, match):
    path = _damaged(setup, tmp_path, edit)
    with pytest.raises(CacheError, match=match):
        cache = LogitCache(path)
        for slot in range(3):
            cache.slot_logits(slot)


def test_missing_truncated_and_corrupt_files(setup, tmp_path):
    with pytest.raises(CacheError, match="no such logit cache"):
        LogitCache(str(tmp_path / "nope.h5"))
    path = build(build_cfg(setup, tmp_path / "t.h5"))
    blob = open(path, "rb").read()
    (tmp_path / "cut.h5").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CacheError, match="truncated or corrupt"):
        LogitCache(str(tmp_path / "cut.h5"))
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF junk" * 100)
    with pytest.raises(CacheError, match="truncated or corrupt"):
        LogitCache(str(tmp_path / "junk.h5"))


def test_existing_cache_is_kept_or_refused_never_silently_replaced(setup, tmp_path, capsys):
    path = build(build_cfg(setup, tmp_path / "t.h5"))
    before = open(path, "rb").read()
    build(build_cfg(setup, tmp_path / "t.h5"))  # same settings: kept as it is
    assert "already complete" in capsys.readouterr().out and open(path, "rb").read() == before
    with pytest.raises(CacheError, match="(?s)built differently.*seeds.*--overwrite"):
        build(build_cfg(setup, tmp_path / "t.h5", slots=5))
    assert open(path, "rb").read() == before
    build(build_cfg(setup, tmp_path / "t.h5", slots=5, overwrite=True))
    assert len(LogitCache(path).seeds) == 5


def test_teacher_nan_logits_are_not_written(setup, tmp_path, monkeypatch):
    real = cache_mod.builder.predict

    def nan_predict(*args, **kwargs):
        out = real(*args, **kwargs)
        aug_seed = args[6] if len(args) > 6 else kwargs.get("aug_seed")
        return out if aug_seed is None else out * float("nan")  # the test set is fine, the training views are not

    monkeypatch.setattr(cache_mod.builder, "predict", nan_predict)
    with pytest.raises(CacheError, match="NaN or inf logits for slot 0; nothing of it was written"):
        build(build_cfg(setup, tmp_path / "t.h5"))
    with h5py.File(str(tmp_path / "t.h5") + ".partial") as f:
        assert not f["train/complete"][:].any() and f["test/complete"][()]


def test_two_process_build_equals_single_process_build(setup, tmp_path):
    """torchrun + gloo: each process computes its share of a slot, the main one writes."""
    single = LogitCache(build(build_cfg(setup, tmp_path / "one.h5")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           "-m", "kdfast.cache", "build", "--teacher", setup["teacher"], "--out", str(tmp_path / "two.h5"),
           "--slots", "3", "--data", setup["data"], "--cache-dir", setup["cache_dir"], "--batch-size", "7",
           "--precision", "fp32", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("slot 3/3 complete") == 1  # only the main process prints
    two = LogitCache(str(tmp_path / "two.h5"))
    for slot in range(3):
        assert torch.allclose(two.slot_logits(slot), single.slot_logits(slot), rtol=2e-3, atol=2e-3)
    assert torch.allclose(two.test_logits()[0], single.test_logits()[0], rtol=2e-3, atol=2e-3)


def test_info_and_verify_of_a_subset_cache(setup, tmp_path, capsys):
    path = build(build_cfg(setup, tmp_path / "t.h5", train_per_class=4, test_per_class=2, topk=1))
    summary = cache_mod.info(cache_mod.InfoConfig(file=path))
    assert (summary["train_size"], summary["test_size"], summary["slots"], summary["topk"]) == (12, 6, 3, 1)
    assert 0.0 <= summary["teacher_test_accuracy"] <= 1.0
    result = cache_mod.verify(cache_mod.VerifyConfig(file=path, teacher=setup["teacher"], samples=16,
                                                     cache_dir=setup["cache_dir"]))
    assert result["argmax_agreement"] == 1.0  # top-1 logits are kept exactly (to float16)
    train.run(TrainConfig(model="resnet8", name="other", data=setup["data"], cache_dir=setup["cache_dir"],
                          out_dir=str(tmp_path / "m"), epochs=1, batch_size=6, precision="fp32", progress=False))
    with pytest.raises(CacheError, match="not the teacher this cache was built from"):
        cache_mod.verify(cache_mod.VerifyConfig(file=path, teacher=str(tmp_path / "m" / "other.pth"),
                                                cache_dir=setup["cache_dir"]))


def test_distill_takes_the_caches_subset_and_a_mismatch_names_the_flags(tiny_data, tmp_path, capsys):
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, train_per_class=5, test_per_class=2,
                          **common(tiny_data, tmp_path / "m")))
    h5 = cache.build(BuildConfig(teacher=str(tmp_path / "m" / "teacher.pth"), out=str(tmp_path / "t.h5"), slots=1,
                                 cache_dir=tiny_data["cache_dir"], precision="fp32", progress=False))
    assert "--train-per-class 5 --test-per-class 2" in capsys.readouterr().out  # taken from the teacher, said
    student = distill.run(DistillConfig(model="resnet8", name="s", epochs=1, teacher_cache=h5,
                                        **{**common(tiny_data, tmp_path), "data": None}))
    assert (student["data"]["train_size"], student["data"]["test_size"]) == (15, 6)
    with pytest.raises(Exception, match=r"(?s)does not match this run.*--train-per-class 5"):
        distill.run(DistillConfig(model="resnet8", name="t", epochs=1, teacher_cache=h5, train_per_class=4,
                                  **common(tiny_data, tmp_path)))


def test_a_build_follows_the_teachers_views_and_refuses_views_its_data_cannot_take(tmp_path, capsys):
    """The views not given are the teacher's (as its data and subsets are); views that the data cannot take (the cifar
    view on images of several sizes) are refused before the teacher runs, as train and distill refuse them."""
    from .conftest import write_mixed_folder

    data = write_mixed_folder(str(tmp_path / "mixed"))
    flags = dict(data=data, cache_dir=str(tmp_path / "c"), batch_size=6, precision="fp32", progress=False)
    train.run(TrainConfig(model="resnet8", name="t", epochs=1, out_dir=str(tmp_path / "m"), eval_batch_size=5,
                          augment=AugmentSpec.not_given(view="rrc", crop_size=24), **flags))
    teacher = str(tmp_path / "m" / "t.pth")
    capsys.readouterr()
    path = build(BuildConfig(teacher=teacher, out=str(tmp_path / "t.h5"), slots=1, **flags))
    assert "--augment.view rrc --augment.crop-size 24" in capsys.readouterr().out
    spec = AugmentSpec.from_dict(LogitCache(path).attrs["augment"])
    assert (spec.view, spec.crop_size) == ("rrc", 24)
    with pytest.raises(DataError, match=r"different sizes .*the cifar view .*needs one size"):
        build(BuildConfig(teacher=teacher, out=str(tmp_path / "u.h5"), slots=1,
                          augment=AugmentSpec.not_given(view="cifar"), **flags))
    assert not os.path.exists(tmp_path / "u.h5.partial") and not os.path.exists(tmp_path / "u.h5")
