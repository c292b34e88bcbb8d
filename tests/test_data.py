import os
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch

from kdfast import data as data_mod
from kdfast import train
from kdfast.data import DataError, eval_batches, load_dataset, subset_per_class

from .conftest import CLASSES, SHARED_DATA, make_images, write_archive, write_image_folder


def write_torchvision_cifar(root: str, n_train: int = 8, n_test: int = 4) -> str:
    """The pickled batches of torchvision's CIFAR-10 format, holding the same images as write_image_folder."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def dump(name, images, labels):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "labels": labels.tolist()}, f)

    images, labels = make_images(n_train, 0)
    for k, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        dump(f"data_batch_{k + 1}", images[part], labels[part])
    dump("test_batch", *make_images(n_test, 1))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    return root


@pytest.fixture
def no_md5_checks(monkeypatch):
    """Our hand-written batches are not the real files, so torchvision's md5 checks must pass them."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


def same(a, b, fingerprint=True):
    assert a.classes == b.classes
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert (a.fingerprint == b.fingerprint) == fingerprint


def test_all_formats_load_to_the_same_tensors(tmp_path, image_folder, archive, no_md5_checks):
    tv_root = write_torchvision_cifar(str(tmp_path / "tv"))
    folder = load_dataset(image_folder, str(tmp_path / "c1"))
    same(folder, load_dataset(archive, str(tmp_path / "c2")))
    # the same pixels; the fingerprint hashes the files (PNG here) or torchvision's arrays, so it differs
    same(folder, load_dataset(tv_root, str(tmp_path / "c3")), fingerprint=False)
    assert folder.train.images.shape == (24, 3, 32, 32) and folder.train.images.dtype == torch.uint8
    assert folder.classes == sorted(CLASSES)
    assert folder.train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_second_load_comes_from_the_cache(tmp_path, archive, monkeypatch):
    first = load_dataset(archive, str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "list_source", lambda *a: pytest.fail("decoded again instead of using the cache"))
    same(first, load_dataset(archive, str(tmp_path / "cache")))


def test_damaged_cache_is_rebuilt(tmp_path, archive):
    first = load_dataset(archive, str(tmp_path / "cache"))
    for split in (first.train, first.test):  # mapped from the file: copied before the file is damaged in place
        split.images, split.labels, split.sizes = split.images.clone(), split.labels.clone(), split.sizes.clone()
    (cache_file,) = (tmp_path / "cache" / "datasets").iterdir()
    cache_file.write_bytes(b"garbage")
    same(first, load_dataset(archive, str(tmp_path / "cache")))


def test_env_variable_picks_the_source(tmp_path, archive, monkeypatch):
    monkeypatch.setenv("KDFAST_DATA", archive)
    assert load_dataset(None, str(tmp_path / "c")).source == os.path.abspath(archive)


def test_class_balanced_subset(image_folder, tmp_path):
    ds = load_dataset(image_folder, str(tmp_path / "c"), train_per_class=3, test_per_class=2)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(ds.test) == 6
    full = load_dataset(image_folder, str(tmp_path / "c"))
    assert ds.fingerprint != full.fingerprint
    assert torch.equal(subset_per_class(full.train, 3).images, ds.train.images)


def test_eval_batches_count_each_sample_once(image_folder, tmp_path):
    test = load_dataset(image_folder, str(tmp_path / "c")).test  # 12 samples
    from kdfast.augment import AugmentSpec

    seen = []
    for rank in range(5):  # 12 samples over 5 processes: padded shares of 3
        batches = list(eval_batches(test, 2, AugmentSpec(), "cpu", rank, 5))
        assert [len(b.indices) for b in batches] == [2, 1]
        seen += [i for b in batches for i in b.indices.tolist() if i >= 0]
    assert sorted(seen) == list(range(12))


# ----------------------------------------------------------------------------- bad data

def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such file or folder.*--data"):
        load_dataset(str(tmp_path / "nope"), str(tmp_path / "c"))


def test_mixed_sizes_load_but_the_cifar_view_refuses_them(tmp_path):
    root = write_image_folder(str(tmp_path / "d"), size=32)
    from PIL import Image

    Image.new("RGB", (64, 48)).save(os.path.join(root, "train", "dog", "big.png"))
    ds = load_dataset(root, str(tmp_path / "c"))
    assert ds.train.images.shape[-2:] == (48, 64)  # the box of the largest image; each image top-left in it
    assert sorted({tuple(s) for s in ds.train.sizes.tolist()}) == [(32, 32), (48, 64)]
    from kdfast.augment import AugmentSpec
    from kdfast.data import check_view

    with pytest.raises(DataError, match=r"2 different sizes.*--augment.view rrc"):
        check_view(ds.train, AugmentSpec())
    check_view(ds.train, AugmentSpec(view="rrc"))


def test_unreadable_image(tmp_path):
    root = write_image_folder(str(tmp_path / "d"))
    with open(os.path.join(root, "test", "cat", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DataError, match=r"test/cat/broken.jpg: not a readable image"):
        load_dataset(root, str(tmp_path / "c"))


def test_empty_class(tmp_path):
    root = write_image_folder(str(tmp_path / "d"))
    os.makedirs(os.path.join(root, "train", "zebra"))
    with pytest.raises(DataError, match=r"class folder train/zebra has no images"):
        load_dataset(root, str(tmp_path / "c"))


def test_empty_class_in_archive(tmp_path):
    root = write_image_folder(str(tmp_path / "d"))
    os.makedirs(os.path.join(root, "test", "zebra"))
    with pytest.raises(DataError, match=r"class folder test/zebra has no images"):
        load_dataset(write_archive(root, str(tmp_path / "d.tar.gz")), str(tmp_path / "c"))


def test_classes_differ_between_splits(tmp_path):
    root = write_image_folder(str(tmp_path / "d"))
    shutil.rmtree(os.path.join(root, "test", "frog"))
    with pytest.raises(DataError, match=r"different classes.*only in train: \['frog'\]"):
        load_dataset(root, str(tmp_path / "c"))


def test_truncated_archive(tmp_path, archive):
    blob = open(archive, "rb").read()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"bad.tar.gz: not a readable .tar.gz archive"):
        load_dataset(str(bad), str(tmp_path / "c"))


def test_not_an_archive(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b")
    with pytest.raises(DataError, match=r"data.csv: a file, but not a .tar.gz"):
        load_dataset(str(f), str(tmp_path / "c"))


def test_no_network_for_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match=r"downloading CIFAR-10 failed.*Without internet"):
        load_dataset(str(tmp_path / "empty"), str(tmp_path / "c"), download=True)


def test_torchvision_folder_without_data(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no CIFAR-10 in torchvision's format.*--download"):
        load_dataset(str(tmp_path / "empty"), str(tmp_path / "c"))


@pytest.mark.skipif(not os.path.exists(SHARED_DATA), reason="offline CIFAR-10 copy not present")
def test_offline_cifar10_copy(tmp_path):
    ds = load_dataset(SHARED_DATA, str(tmp_path / "c"))
    assert (len(ds.train), len(ds.test)) == (50000, 10000)
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert torch.bincount(ds.train.labels).tolist() == [5000] * 10


def test_validation_split_is_disjoint_class_balanced_and_fixed_by_its_seed(tiny_data):
    load = lambda **kw: load_dataset(tiny_data["data"], tiny_data["cache_dir"], log=lambda *a: None, **kw)  # noqa: E731
    whole = load()
    a, again, other = load(val_per_class=3, val_seed=0), load(val_per_class=3, val_seed=0), load(val_per_class=3, val_seed=1)
    assert set(a.train.digests).isdisjoint(a.val.digests)  # no training image is validated on
    assert sorted(a.train.digests + a.val.digests) == sorted(whole.train.digests)
    assert torch.bincount(a.val.labels).tolist() == [3, 3, 3]
    assert a.val.digests == again.val.digests and a.fingerprint == again.fingerprint
    assert a.val.digests != other.val.digests and a.fingerprint != whole.fingerprint
    subset = load(val_per_class=3, train_per_class=5)  # the subset is taken from what is left: the split holds
    assert subset.val.digests == a.val.digests and torch.bincount(subset.train.labels).tolist() == [5, 5, 5]


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


def test_the_processes_of_a_node_share_one_copy_of_the_decoded_data(tmp_path):
    """Two gloo processes training from the device tier map the one decoded file (the main process decodes it, writes
    it and maps it too): each holds every page of the training images (Rss), their proportional shares (Pss) add up
    to one copy, not two."""
    import subprocess
    import sys

    from .conftest import write_image_folder

    data = write_image_folder(str(tmp_path / "tiny"), n_train=150, size=64)
    record = tmp_path / "memory.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "KDFAST_TEST_MEMORY": str(record)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29567", "-m",
           "tests.stop_at", "-1", "kdfast.train", "--model", "resnet8", "--data", data, "--cache-dir",
           str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "32", "--precision", "fp32", "--no-progress",
           "--out-dir", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in record.read_text().splitlines()]
    assert sorted(r[0] for r in rows) == ["0", "1"]
    images_kb = 450 * 3 * 64 * 64 / 1024
    for _, mapped, rss, _ in rows:
        assert mapped.endswith(".safetensors") and "datasets" in mapped, rows  # the cache file, not a private copy
        assert int(rss) >= 0.95 * images_kb, rows
    assert sum(int(r[3]) for r in rows) <= 1.1 * max(int(r[2]) for r in rows), rows  # one copy between them
