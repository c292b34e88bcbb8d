"""Shared fixtures: tiny image datasets written by the tests themselves."""
from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest

# the offline CIFAR-10 copy: $KDFAST_DATA where it names that archive (.ci/run sets it), else beside the checkout
_ENV_DATA = os.environ.get("KDFAST_DATA", "")
SHARED_DATA = _ENV_DATA if _ENV_DATA.endswith("cifar10-jpeg.tar.gz") and os.path.isfile(_ENV_DATA) else \
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpeg.tar.gz")
CLASSES = ("cat", "dog", "frog")


def make_images(n_per_class: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class shows in their colour, plus noise: learnable in a few steps. (N, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(CLASSES)):
        base = np.zeros(3)
        base[label % 3] = 200
        for _ in range(n_per_class):
            images.append(np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def write_image_folder(root: str, n_train: int = 8, n_test: int = 4, size: int = 32) -> str:
    from PIL import Image

    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = make_images(n, seed, size)
        counters = {}
        for img, label in zip(images, labels):
            cls = CLASSES[label]
            i = counters.get(cls, 0)
            counters[cls] = i + 1
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            Image.fromarray(img).save(os.path.join(root, split, cls, f"{i:04d}.png"))
    return root


def write_archive(folder: str, path: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(os.path.join(folder, split), arcname=f"tiny/{split}")
    return path


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(str(tmp_path / "tiny"))


@pytest.fixture
def archive(tmp_path, image_folder):
    return write_archive(image_folder, str(tmp_path / "tiny.tar.gz"))


@pytest.fixture(autouse=True)
def no_dataset_downloads(monkeypatch):
    """No test reaches the network: torchvision's CIFAR URLs point at a port on 127.0.0.1 that nobody serves
    (a test that exercises the download points them at its own server)."""
    import torchvision.datasets as tvd

    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "url", "http://127.0.0.1:9/unreachable/" + cls.filename)


def write_mixed_folder(root: str, n_train: int = 6, n_test: int = 3, eval_split: str = "val", seed: int = 0,
                       smallest: int = 40, largest: int = 120) -> str:
    """An ImageNet-style folder of images of random sizes and aspect ratios: the class images upscaled and cut,
    saved as JPEG and PNG, some grayscale, some RGBA, one palette image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n, s in (("train", n_train, seed), (eval_split, n_test, seed + 1)):
        images, labels = make_images(n, s)
        for k, (img, label) in enumerate(zip(images, labels)):
            w, h = (int(v) for v in rng.integers(smallest, largest + 1, size=2))
            pic = Image.fromarray(img).resize((w, h), Image.BICUBIC)
            mode = ("RGB", "RGB", "L", "RGBA", "RGB", "P")[k % 6]
            pic = pic.convert(mode) if mode != "P" else pic.quantize(16)
            ext = ".png" if mode in ("RGBA", "P") or k % 2 else ".jpg"
            folder = os.path.join(root, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            pic.save(os.path.join(folder, f"{k:04d}{ext}"), **({"quality": 90} if ext == ".jpg" else {}))
    return root


@pytest.fixture
def mixed_folder(tmp_path):
    return write_mixed_folder(str(tmp_path / "mixed"))


def tiny_teacher(root, name: str = "teacher", eval_batch_size: int = 5) -> tuple[list[str], str]:
    """A tiny image folder under root and a resnet8 trained on it for one epoch (root/m/NAME.pth): (the common CLI
    flags of the runs on that data, the checkpoint's path)."""
    from kdfast import train

    data = write_image_folder(str(root / "tiny"))
    flags = ["--data", data, "--cache-dir", str(root / "cache"), "--batch-size", "6", "--eval-batch-size",
             str(eval_batch_size), "--precision", "fp32", "--no-progress"]
    train.main(["--model", "resnet8", "--name", name, "--epochs", "1", "--out-dir", str(root / "m"), *flags])
    return flags, str(root / "m" / f"{name}.pth")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny image folder (12 train / 4 test images per class) and its decoded cache, shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny_data")
    return {"data": write_image_folder(str(root / "tiny"), n_train=12, n_test=4), "cache_dir": str(root / "cache")}


def common(data, out, **kw):
    """The flags of a fast run on `data` (tiny_data), writing to `out`."""
    return dict(data=data["data"], cache_dir=data["cache_dir"], out_dir=str(out), batch_size=6, eval_batch_size=5,
                precision="fp32", progress=False, **kw)


def teacher_and_cache(root, teacher_epochs: int = 1, n_train: int = 8, **build) -> tuple[str, dict]:
    """A tiny teacher trained on a tiny folder (ROOT/tiny -> ROOT/m/teacher.pth) and its 2-slot logit cache
    (ROOT/t.h5, built with `build`'s flags); returns the cache and the runs' flags."""
    from kdfast import cache, train
    from kdfast.cache import BuildConfig
    from kdfast.config import TrainConfig

    data = write_image_folder(str(root / "tiny"), n_train=n_train)
    flags = dict(data=data, cache_dir=str(root / "cache"), batch_size=6, eval_batch_size=5, precision="fp32",
                 progress=False)
    train.run(TrainConfig(model="resnet8", name="teacher", epochs=teacher_epochs, out_dir=str(root / "m"), **flags))
    h5 = cache.build(BuildConfig(**{"teacher": str(root / "m" / "teacher.pth"), "out": str(root / "t.h5"), "slots": 2,
                                    "cache_dir": flags["cache_dir"], "precision": "fp32", "progress": False, **build}))
    return h5, flags


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A trained tiny teacher (ROOT/m/teacher.pth), its data (ROOT/tiny) and a 2-slot logit cache (ROOT/t.h5)."""
    h5, flags = teacher_and_cache(tmp_path_factory.mktemp("small_cache"))
    return {"h5": h5, "cache_dir": flags["cache_dir"]}


def sweep_cfg(small_cache, out, **kw):
    """A one-point, one-seed sweep from small_cache's cache into `out`."""
    from kdfast.config import SweepConfig

    return SweepConfig(**{**dict(teacher_cache=small_cache["h5"], model="resnet8", alphas=(0.5,), taus=(2.0,), seeds=1,
                                 epochs=2, batch_size=6, eval_batch_size=5, precision="fp32", progress=False,
                                 out_dir=str(out), cache_dir=small_cache["cache_dir"]), **kw})
