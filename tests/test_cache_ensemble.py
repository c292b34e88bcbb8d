"""Several teacher-logit caches as one teacher (cache/ensemble.py): equal to the online ensemble, refused when they
disagree, used by distill and sweep, compared by cache info."""
import json

import pytest
import torch

from kdfast import cache as cache_mod
from kdfast import distill, sweep, train
from kdfast.augment import AugmentSpec
from kdfast.cache import BuildConfig, CacheError, LogitCache, build
from kdfast.cache.ensemble import EnsembleTeacher, check_agreement, normalized_weights
from kdfast.checkpoint import load_teacher
from kdfast.config import DistillConfig, SweepConfig, TrainConfig
from kdfast.data import TrainLoader, load_dataset
from kdfast.losses import ensemble_logits, kd_loss

from .conftest import write_image_folder


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Tiny data, two tiny teachers (ResNet-8, other seeds and epochs) and a cache of each on the same views."""
    root = tmp_path_factory.mktemp("ensemble")
    data = write_image_folder(str(root / "data"))
    common = dict(data=data, cache_dir=str(root / "c"), out_dir=str(root / "m"), batch_size=6, eval_batch_size=5,
                  precision="fp32", progress=False)
    caches = []
    for name, seed, epochs in (("a", 0, 2), ("b", 1, 3)):
        train.run(TrainConfig(model="resnet8", name=name, epochs=epochs, seed=seed, **common))
        caches.append(build(build_cfg(root, data, name, str(root / f"{name}.h5"))))
    return {"root": root, "data": data, "caches": caches, "teachers": [str(root / "m" / f"{n}.pth") for n in "ab"]}


def build_cfg(root, data, teacher: str, out: str, **kw) -> BuildConfig:
    base = dict(teacher=str(root / "m" / f"{teacher}.pth"), out=out, slots=3, data=data, cache_dir=str(root / "c"),
                batch_size=7, precision="fp32", progress=False)
    return BuildConfig(**{**base, **kw})


def test_the_cached_ensemble_equals_the_ensemble_of_the_online_teachers(two):
    data = load_dataset(two["data"], str(two["root"] / "c"))
    teachers = [load_teacher(t, data.classes, "cpu")[0].eval() for t in two["teachers"]]
    caches = [LogitCache(p) for p in two["caches"]]
    weights = normalized_weights((3.0, 1.0), 2)
    loader = TrainLoader(data.train, 6, seed=0, spec=AugmentSpec(), device="cpu", channels_last=True)
    for mode in ("probs", "logits"):
        served = EnsembleTeacher(caches, 3, "cpu", weights, 4.0, mode)
        for epoch in (0, 1, 4):  # epoch 4 reuses slot 1
            batch = next(loader.epoch(epoch, served.aug_seed(epoch)))
            with torch.no_grad():  # each online teacher's logits as the cache stores them: float16
                online = [t(batch.images).half().float() for t in teachers]
            expected = ensemble_logits(online, weights, 4.0, mode)
            assert torch.equal(served(batch), expected)
            student = torch.randn(len(batch.indices), 3)
            assert torch.equal(kd_loss(student, served(batch), batch.labels, 0.3, 4.0),
                               kd_loss(student, expected, batch.labels, 0.3, 4.0))
    assert weights == [0.75, 0.25]


def test_caches_built_otherwise_are_refused_naming_what_differs(two, tmp_path):
    other = build(build_cfg(two["root"], two["data"], "b", str(tmp_path / "more.h5"), slots=4))
    smaller = build(build_cfg(two["root"], two["data"], "b", str(tmp_path / "smaller.h5"), train_per_class=5))
    with pytest.raises(CacheError, match=r"seeds: .*a.h5 has \[.*\], .*more.h5 has"):
        check_agreement([LogitCache(two["caches"][0]), LogitCache(other)])
    with pytest.raises(CacheError, match="dataset_fingerprint|train_size"):
        check_agreement([LogitCache(two["caches"][0]), LogitCache(smaller)])
    with pytest.raises(ValueError, match="--cache-weights"):
        DistillConfig(model="resnet8", teacher_cache=tuple(two["caches"]), cache_weights=(1.0,)).validate()


def test_distill_and_sweep_read_an_ensemble_and_cache_info_compares_the_caches(two, tmp_path, capsys):
    common = dict(data=two["data"], cache_dir=str(two["root"] / "c"), batch_size=6, eval_batch_size=5,
                  precision="fp32", progress=False, epochs=2)
    meta = distill.run(DistillConfig(model="resnet8", teacher_cache=tuple(two["caches"]), out_dir=str(tmp_path),
                                     name="ens", **common))
    assert meta["kd"]["ensemble"]["mode"] == "probs" and len(meta["kd"]["ensemble"]["teacher_accuracies"]) == 2
    assert "teacher: the ensemble of resnet8 + resnet8" in capsys.readouterr().out
    result = sweep.run(SweepConfig(model="resnet8", teacher_cache=tuple(two["caches"]), alphas=(0.5,), taus=(4.0,),
                                   seeds=1, out_dir=str(tmp_path / "sweep"), ensemble="logits", cache_weights=(2.0, 1.0),
                                   **common))
    assert [r["kind"] for r in result["runs"]] == ["no_kd", "kd"]
    point = json.loads((tmp_path / "sweep" / f"{result['runs'][1]['name']}.json").read_text())["kd"]["ensemble"]
    assert point["mode"] == "logits" and point["weights"] == pytest.approx([2 / 3, 1 / 3])  # the sweep's, passed on
    summary = cache_mod.info(cache_mod.InfoConfig(file=tuple(two["caches"])))
    said = capsys.readouterr().out
    assert summary["agreement"]["usable"] and "usable together as --teacher-cache" in said
    assert set(summary["agreement"]["ensemble_test_accuracy"]) == {"probs", "logits"}
    assert 0.0 <= summary["agreement"]["test_prediction_agreement"]["0-1"] <= 1.0
