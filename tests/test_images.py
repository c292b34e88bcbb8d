"""Images of any size and format, ImageNet-style layouts and Hugging Face datasets, in both storage tiers."""
import os

import pytest
import torch

from kdfast import cache as cache_mod
from kdfast import distill, evaluate, train
from kdfast.augment import AugmentSpec
from kdfast.cache import BuildConfig, build
from kdfast.checkpoint import load_checkpoint
from kdfast.config import DistillConfig, EvaluateConfig, TrainConfig
from kdfast.data import DataError, StreamedSplit, TrainLoader, eval_batches, load_dataset

from .conftest import CLASSES, write_mixed_folder

RRC = AugmentSpec(view="rrc", crop_size=32)


def both_tiers(folder, tmp_path, store_size=48):
    cache_dir = str(tmp_path / "c")
    device = load_dataset(folder, cache_dir, store_size=store_size, tier="device")
    stream = load_dataset(folder, cache_dir, store_size=store_size, tier="stream")
    return device, stream


def test_any_size_and_format_loads_with_the_same_pixels_in_both_tiers(mixed_folder, tmp_path):
    device, stream = both_tiers(mixed_folder, tmp_path)
    assert isinstance(stream.train, StreamedSplit) and device.tier == "device" and stream.tier == "stream"
    assert device.classes == stream.classes == sorted(CLASSES) and len(device.test) == 9  # val/ is the eval split
    assert device.fingerprint == stream.fingerprint  # a cache built on one tier serves the other
    for d, s in ((device.train, stream.train), (device.test, stream.test)):
        assert torch.equal(d.labels, s.labels) and torch.equal(d.sizes, s.sizes)
        assert int(d.sizes.max()) == 48 and int(d.sizes.min()) < 48  # longest side reduced to the store size
        images, sizes = s.decode(torch.arange(len(s)))
        for i, (h, w) in enumerate(sizes.tolist()):
            assert torch.equal(images[i, :, :h, :w], d.images[i, :, :h, :w])
            assert not d.images[i, :, h:, :].any() and not d.images[i, :, :, w:].any()  # the letterbox is zeros
    gray = device.train.images[2, :, :device.train.sizes[2, 0], :device.train.sizes[2, 1]]  # k % 6 == 2: grayscale
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    from kdfast import data as data_mod

    with pytest.MonkeyPatch.context() as mp:  # indexed once: a streamed run neither lists nor reads the source again
        mp.setattr(data_mod, "list_source", lambda *a: pytest.fail("listed the source again"))
        again = load_dataset(mixed_folder, str(tmp_path / "c"), store_size=48, tier="stream")
    assert again.fingerprint == stream.fingerprint and again.classes == stream.classes
    native = load_dataset(mixed_folder, str(tmp_path / "c"))  # store size 0: the images' own sizes
    assert int(native.train.sizes.max()) > 48 and native.fingerprint != device.fingerprint


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_views_equal_device_views_bitwise(mixed_folder, tmp_path, workers):
    device, stream = both_tiers(mixed_folder, tmp_path)
    loaders = [TrainLoader(d.train, 6, seed=1, spec=RRC, device="cpu", workers=workers) for d in (device, stream)]
    for epoch in (0, 3):
        a, b = (list(loader.epoch(epoch, aug_seed=11 + epoch)) for loader in loaders)
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.images, y.images)
    evals = [list(eval_batches(d.test, 4, RRC, "cpu", workers=workers)) for d in (device, stream)]
    for x, y in zip(*evals):
        assert x.images.shape[1:] == (3, 32, 32) and torch.equal(x.images, y.images)
    resumed = list(loaders[1].epoch(3, aug_seed=14, start_step=1))  # mid-epoch, as a resume reads it
    assert all(torch.equal(x.images, y.images) for x, y in zip(resumed, b[1:]))


def test_each_process_decodes_only_its_share(mixed_folder, tmp_path):
    _, stream = both_tiers(mixed_folder, tmp_path)
    n = len(stream.train)
    single = TrainLoader(stream.train.subset(torch.arange(n)), 6, seed=2, spec=RRC, device="cpu", workers=0)
    whole = list(single.epoch(0, 5))
    shards = []
    for rank in range(2):
        split = stream.train.subset(torch.arange(n))  # its own decode counter
        loader = TrainLoader(split, 6, seed=2, spec=RRC, device="cpu", process_index=rank, num_processes=2, workers=0)
        shards.append(list(loader.epoch(0, 5)))
        assert split.decoded == len(loader) * 3  # its half of each global batch, nothing else
    for step, batch in enumerate(whole):
        assert torch.equal(batch.indices, torch.cat([shards[0][step].indices, shards[1][step].indices]))
        assert torch.equal(batch.images, torch.cat([shards[0][step].images, shards[1][step].images]))


def run_cfgs(folder, tmp_path, tier="device"):
    common = dict(data=folder, cache_dir=str(tmp_path / "c"), batch_size=6, eval_batch_size=4, precision="fp32",
                  progress=False, augment=RRC, store_size=48, data_tier=tier, data_workers=0)
    return common


def test_a_folder_of_mixed_sizes_trains_caches_distils_and_evaluates_in_both_tiers(mixed_folder, tmp_path, capsys):
    common = run_cfgs(mixed_folder, tmp_path)
    teacher = train.run(TrainConfig(model="resnet8", name="teacher", epochs=2, out_dir=str(tmp_path / "m"), **common))
    assert teacher["data"]["store_size"] == 48 and teacher["config"]["augment"]["view"] == "rrc"
    path = build(BuildConfig(teacher=str(tmp_path / "m" / "teacher.pth"), out=str(tmp_path / "t.h5"), slots=2,
                             **{k: v for k, v in common.items() if k not in ("eval_batch_size", "data_workers")}))
    metas = {}
    for tier in ("device", "stream"):  # the cache built on the device tier serves the streamed tier
        cfg = DistillConfig(model="resnet8", name=f"kd-{tier}", teacher_cache=path, epochs=2, alpha=0.3,
                            out_dir=str(tmp_path / "m"), **{**common, "data_tier": tier})
        metas[tier] = distill.run(cfg)
        again = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "m" / f"kd-{tier}.pth"), cache_dir=common["cache_dir"],
                                            data_tier=tier))
        assert again["accuracy"] == metas[tier]["test_accuracy"]
    assert metas["stream"]["data"]["tier"] == "stream"
    said = capsys.readouterr().out  # the log says the views, whose normalization, and the tier
    assert "[kd-stream] views: RandomResizedCrop + flip at 32 px, eval 32 px, ImageNet's mean/std | data: stream tier" in said
    a, _ = load_checkpoint(str(tmp_path / "m" / "kd-device.pth"))
    b, _ = load_checkpoint(str(tmp_path / "m" / "kd-stream.pth"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name  # the same views, logits and steps: the same weights
    verified = cache_mod.verify(cache_mod.VerifyConfig(file=path, teacher=str(tmp_path / "m" / "teacher.pth"),
                                                       samples=12, cache_dir=common["cache_dir"]))
    assert verified["max_abs_diff"] < 2e-3  # float16 storage only: the views are the cache's


def hf_dataset(folder):
    """A Hugging Face DatasetDict (image bytes + ClassLabel) of the same files."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=sorted(CLASSES))})
    splits = {}
    for split, name in (("train", "train"), ("test", "val")):
        rows = {"image": [], "label": []}
        for label, cls in enumerate(sorted(CLASSES)):
            for file in sorted(os.listdir(os.path.join(folder, name, cls))):
                with open(os.path.join(folder, name, cls, file), "rb") as f:
                    rows["image"].append({"bytes": f.read(), "path": None})
                rows["label"].append(label)
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def test_hugging_face_datasets_saved_to_disk_or_as_parquet(mixed_folder, tmp_path):
    dd = hf_dataset(mixed_folder)
    dd.save_to_disk(str(tmp_path / "saved"))
    os.makedirs(tmp_path / "parquet" / "data")
    for split, ds in dd.items():
        ds.to_parquet(str(tmp_path / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    folder = load_dataset(mixed_folder, str(tmp_path / "c"), store_size=48)
    for source in ("saved", "parquet"):
        ds = load_dataset(str(tmp_path / source), str(tmp_path / "c"), store_size=48)
        assert ds.classes == folder.classes and ds.fingerprint == folder.fingerprint  # the same files, bytes and labels
        assert torch.equal(ds.train.images, folder.train.images) and torch.equal(ds.test.labels, folder.test.labels)
    common = {**run_cfgs(str(tmp_path / "saved"), tmp_path), "out_dir": str(tmp_path / "m")}
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, **common))
    path = build(BuildConfig(teacher=str(tmp_path / "m" / "teacher.pth"), out=str(tmp_path / "t.h5"), slots=1,
                             **{k: v for k, v in common.items() if k not in ("eval_batch_size", "data_workers", "out_dir")}))
    meta = distill.run(DistillConfig(model="resnet8", name="kd", teacher_cache=path, epochs=1, **common))
    assert evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "m" / "kd.pth"),
                                       cache_dir=common["cache_dir"]))["accuracy"] == meta["test_accuracy"]


def test_bad_images_and_layouts_are_named(tmp_path):
    root = write_mixed_folder(str(tmp_path / "d"))
    jpg = next(f for f in sorted(os.listdir(os.path.join(root, "train", "cat"))) if f.endswith(".jpg"))
    with open(os.path.join(root, "train", "cat", jpg), "rb") as f:
        blob = f.read()
    with open(os.path.join(root, "train", "cat", jpg), "wb") as f:
        f.write(blob[: len(blob) // 3])  # truncated
    with pytest.raises(DataError, match=rf"train/cat/{jpg}: not a readable image"):
        load_dataset(root, str(tmp_path / "c"), store_size=48)
    os.makedirs(os.path.join(root, "val", "zebra"))
    with pytest.raises(DataError, match=r"class folder val/zebra has no images"):
        load_dataset(root, str(tmp_path / "c2"))
    other = write_mixed_folder(str(tmp_path / "e"))
    os.makedirs(os.path.join(other, "train", "dog", "nested.jpg"))  # a folder named like an image: not an image
    os.rename(os.path.join(other, "val", "frog"), os.path.join(other, "val", "toad"))
    with pytest.raises(DataError, match=r"different classes.*only in train: \['frog'\].*only in val: \['toad'\]"):
        load_dataset(other, str(tmp_path / "c3"))
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]}), "test": datasets.Dataset.from_dict({"x": [2]})}
                         ).save_to_disk(str(tmp_path / "nolabels"))
    with pytest.raises(DataError, match=r"nolabels: needs an image column and a label column"):
        load_dataset(str(tmp_path / "nolabels"), str(tmp_path / "c4"))


def test_a_hub_name_is_read_through_datasets_and_a_budget_below_one_batch_is_refused(mixed_folder, tmp_path,
                                                                                     monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    dd = hf_dataset(mixed_folder)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: asked.append(name) or dd)  # no network here
    hub = load_dataset("hf:someone/photos", str(tmp_path / "c"), store_size=48)
    assert asked == ["someone/photos"] and len(hub.train) == 18
    assert os.path.exists(tmp_path / "c" / "datasets") and any("hf-someone-photos" in f for f in os.listdir(tmp_path / "c" / "datasets"))
    from kdfast import train as train_mod
    from kdfast.errors import KdfastError

    cfg = TrainConfig(model="resnet8", data=mixed_folder, cache_dir=str(tmp_path / "c2"), out_dir=str(tmp_path / "m"),
                      batch_size=12, augment=RRC, store_size=48, data_budget_gb=1e-5, progress=False, epochs=1)
    with pytest.raises(KdfastError, match=r"--data-budget-gb 1e-05 is smaller than one batch: 12 images of up to 48x48"):
        train_mod.run(cfg)
    assert "exceeds the budget" in capsys.readouterr().out


def test_the_tier_estimate_reads_the_size_of_more_than_the_first_image(tmp_path):
    """The first image small, later ones large: the memory estimate takes the largest of those sampled."""
    from PIL import Image

    for split, n in (("train", 6), ("test", 2)):
        for i in range(n):
            side = 16 if (split, i) == ("train", 0) else 200
            os.makedirs(tmp_path / "d" / split / "a", exist_ok=True)
            Image.new("RGB", (side, side // 2)).save(tmp_path / "d" / split / "a" / f"{i}.png")
    said = []
    load_dataset(str(tmp_path / "d"), str(tmp_path / "c"), tier="auto", log=said.append)
    assert any("8 images at up to 200x200 px take about 1 MB" in s for s in said), said
