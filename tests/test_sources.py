"""kdfast.data.sources: one listing for every source kind (folders, archives, Hugging Face data), the key of the
decoded copy, and sources checked before they are trusted."""
import os
import shutil
import tarfile

import pytest
import torch

from kdfast.data import DataError, load_dataset
from kdfast.data.sources import list_archive, source_key

from .conftest import CLASSES, write_mixed_folder


def awkward_folder(root: str) -> str:
    """A mixed folder with what a user's folder has besides its images: a hidden folder inside train/ (a notebook's
    checkpoints), hidden files, a text file, a nested folder, a link to an image of another class folder, and a
    class folder that is a link to a folder outside train/."""
    write_mixed_folder(root)
    dog = os.path.join(root, "train", "dog")
    first = sorted(os.listdir(dog))[0]
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    shutil.copy(os.path.join(dog, first), os.path.join(root, "train", ".ipynb_checkpoints", "x.jpg"))
    shutil.copy(os.path.join(dog, first), os.path.join(dog, ".hidden.jpg"))
    shutil.copy(os.path.join(dog, first), os.path.join(dog, "._mac.jpg"))
    with open(os.path.join(dog, "notes.txt"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(dog, "nested"))
    shutil.copy(os.path.join(dog, first), os.path.join(dog, "nested", "deeper.jpg"))
    cat = os.path.join(root, "train", "cat")
    os.symlink(os.path.join("..", "cat", sorted(os.listdir(cat))[0]), os.path.join(dog, "linked.jpg"))
    os.rename(os.path.join(root, "val", "frog"), os.path.join(root, "frogs"))  # the class folder elsewhere, linked
    os.symlink(os.path.join("..", "frogs"), os.path.join(root, "val", "frog"))
    return root


def tar_of(folder: str, path: str, top: str = "data") -> str:
    """The folder as a .tar.gz, links kept as links (tar's default), under a top-level folder."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return path


def test_a_folder_and_its_archive_are_the_same_dataset(tmp_path):
    folder = awkward_folder(str(tmp_path / "d"))
    archive = tar_of(folder, str(tmp_path / "d.tar.gz"))
    a = load_dataset(folder, str(tmp_path / "c"), store_size=48)
    b = load_dataset(archive, str(tmp_path / "c"), store_size=48)
    assert a.fingerprint == b.fingerprint and a.classes == b.classes == sorted(CLASSES)
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert len(a.train) == 18 + 1 and len(a.test) == 9  # the link to a cat image is a dog image too; nothing hidden
    streamed = load_dataset(archive, str(tmp_path / "c"), store_size=48, tier="stream")
    assert streamed.fingerprint == a.fingerprint


def test_the_decoded_copy_follows_what_would_be_read(tmp_path):
    folder = awkward_folder(str(tmp_path / "d"))
    key = lambda: source_key(folder, "folder", "cifar10")  # noqa: E731
    first = key()
    with open(os.path.join(folder, "train", "dog", ".another-hidden.jpg"), "wb") as f:
        f.write(b"not read")
    assert key() == first  # nothing that is read changed
    frog = os.path.join(folder, "frogs")  # reached only through the link val/frog
    shutil.copy(os.path.join(frog, sorted(os.listdir(frog))[0]), os.path.join(frog, "added.jpg"))
    assert key() != first
    second = key()
    link = os.path.join(folder, "train", "dog", "linked.jpg")
    os.remove(link)
    os.symlink(os.path.join("..", "cat", sorted(os.listdir(os.path.join(folder, "train", "cat")))[1]), link)
    assert key() != second  # the same name, another file
    third = key()
    target = os.path.join(folder, "train", "cat", sorted(os.listdir(os.path.join(folder, "train", "cat")))[2])
    st = os.stat(target)
    with open(target, "r+b") as f:  # rewritten in place, its size and modification time put back
        data = f.read()
        f.seek(0)
        f.write(data[::-1][:1] + data[1:])
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() != third


def test_links_that_lead_nowhere_are_named(tmp_path):
    folder = write_mixed_folder(str(tmp_path / "d"))
    os.symlink("/nonexistent/image.jpg", os.path.join(folder, "train", "cat", "gone.jpg"))
    with pytest.raises(DataError, match=r"train/cat/gone.jpg: a link to /nonexistent/image.jpg, which does not exist"):
        load_dataset(folder, str(tmp_path / "c"))
    os.remove(os.path.join(folder, "train", "cat", "gone.jpg"))
    outside = str(tmp_path / "outside.jpg")
    shutil.copy(os.path.join(folder, "train", "cat", sorted(os.listdir(os.path.join(folder, "train", "cat")))[0]),
                outside)
    os.symlink(outside, os.path.join(folder, "train", "cat", "outside.jpg"))
    load_dataset(folder, str(tmp_path / "c"))  # a folder follows it
    with pytest.raises(DataError, match=r"the link data/train/cat/outside.jpg points to .*outside the archive.*tar -h"):
        list_archive(tar_of(folder, str(tmp_path / "d.tar.gz")))


def test_archives_with_absurd_members_or_several_datasets_are_refused(tmp_path):
    path = str(tmp_path / "huge.tar")
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("data/train/cat/0.jpg")
        info.size = 10 ** 13  # a header declaring 10 TB; no data follows
        tar.fileobj.write(info.tobuf(tar.format, tar.encoding, tar.errors))
    with pytest.raises(DataError, match=r"huge.tar: the member data/train/cat/0.jpg declares 10,000,000,000,000 bytes"):
        list_archive(path)
    folder = write_mixed_folder(str(tmp_path / "d"))
    two = str(tmp_path / "two.tar.gz")
    with tarfile.open(two, "w:gz") as tar:
        tar.add(folder, arcname="a")
        tar.add(folder, arcname="b")
    with pytest.raises(DataError, match=r"two.tar.gz: the archive has images in several places \(a, b\)"):
        list_archive(two)
    with pytest.raises(DataError, match=r"more than 0 MB, a quarter of the available memory.*Extract it"):
        list_archive(tar_of(folder, str(tmp_path / "d.tar.gz")), budget=1000)


# ---------------------------------------------------------------- Hugging Face data

def hf_splits(folder: str, names: dict):
    """A DatasetDict of the folder's images with each split's own ClassLabel names (names[split])."""
    datasets = pytest.importorskip("datasets")
    splits = {}
    for split, name in (("train", "train"), ("test", "val")):
        own = names[split]
        rows = {"image": [], "label": []}
        for cls in sorted(CLASSES):
            for file in sorted(os.listdir(os.path.join(folder, name, cls))):
                with open(os.path.join(folder, name, cls, file), "rb") as f:
                    rows["image"].append({"bytes": f.read(), "path": None})
                rows["label"].append(own.index(cls) if cls in own else 0)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=own)})
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def test_hugging_face_splits_are_matched_by_class_name_never_by_index(tmp_path):
    folder = write_mixed_folder(str(tmp_path / "d"))
    reference = load_dataset(folder, str(tmp_path / "c"), store_size=48)
    reordered = str(tmp_path / "reordered")
    hf_splits(folder, {"train": sorted(CLASSES), "test": sorted(CLASSES, reverse=True)}).save_to_disk(reordered)
    said = []
    ds = load_dataset(reordered, str(tmp_path / "c"), store_size=48, log=said.append)
    assert any("lists the classes in another order than train; its labels are mapped" in s for s in said)
    assert ds.classes == reference.classes and torch.equal(ds.test.labels, reference.test.labels)
    assert ds.fingerprint == reference.fingerprint
    other = str(tmp_path / "other")
    hf_splits(folder, {"train": sorted(CLASSES), "test": ["bird", "cat", "dog"]}).save_to_disk(other)
    with pytest.raises(DataError, match=r"train and test have different class lists \(only in train: \['frog'\], "
                                        r"only in test: \['bird'\]\)"):
        load_dataset(other, str(tmp_path / "c"))


def test_hugging_face_conversions_stay_under_the_cache_dir(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = write_mixed_folder(str(tmp_path / "d"))
    parquet = tmp_path / "parquet"
    os.makedirs(parquet)
    for split, ds in hf_splits(folder, {"train": sorted(CLASSES), "test": sorted(CLASSES)}).items():
        ds.to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    home = tmp_path / "hf_home"  # where datasets writes by default: a file in the way, so nothing can be made there
    home.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home / "datasets"))
    ds = load_dataset(str(parquet), str(tmp_path / "c"), store_size=48)
    assert len(ds.train) == 18 and home.is_file()
    assert os.listdir(tmp_path / "c" / "huggingface")

