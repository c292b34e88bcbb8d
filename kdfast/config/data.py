"""Which images a command reads and how they are held: the data source, its subsets, the stored size and the tier."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..flags import explained, setting, unset
from .checks import check, check_float, check_int
from .section import Section

DatasetName = Literal["cifar10", "cifar100"]
Tier = Literal["auto", "device", "stream"]


@explained
@dataclass
class SourceConfig(Section):
    """Where the images come from."""

    data: Optional[str] = unset(None)
    """Data source: a torchvision CIFAR folder, a folder or .tar.gz with train/<class>/* and test/<class>/*, or a
    Hugging Face dataset (hf:NAME). Default: the one recorded by what the command reads (a teacher's run, a cache, a
    checkpoint) where it still exists, else $KDFAST_DATA, else ./data, where the dataset is downloaded when missing."""
    dataset: Optional[DatasetName] = unset("cifar10")
    """Which torchvision dataset a torchvision folder (or the download) holds; also picks the normalization. Default:
    as recorded by what the command reads, else cifar10."""
    download: bool = False
    """Also download into an explicit --data folder when the dataset is missing there (./data always does)."""
    cache_dir: str = setting("cache")
    """Where decoded datasets (and the lab's teacher-logit caches) are kept."""


@explained
@dataclass
class DataConfig(SourceConfig):
    """The source, the subsets and the validation split, the stored size, and the memory tier."""

    train_per_class: Optional[int] = unset(0)
    """Use only the first N training images of each class (0 = all). Default: as recorded by what the command reads
    (a teacher's run, a cache, a checkpoint), else 0."""
    test_per_class: Optional[int] = unset(0)
    """Use only the first N test images of each class (0 = all). Default: as recorded, else 0."""
    val_per_class: Optional[int] = unset(0)
    """Hold out N training images of each class as a validation split (before --train-per-class is taken from the
    rest): the per-epoch metrics and a sweep's choice of its best point use it, the test set is evaluated once, at
    the end (0: no validation split; the per-epoch metrics are then the test set's). Default: as recorded, else 0."""
    val_seed: Optional[int] = unset(0)
    """Which images the validation split holds: a class-balanced draw fixed by this seed (not by --seed, so the runs
    of a sweep share one split). Default: as recorded, else 0."""
    store_size: Optional[int] = unset(0)
    """Longest side, in pixels, of images as stored (larger ones are reduced, keeping their aspect; 0: auto: for
    --augment.view rrc the eval crop's resize size, round(max(crop, eval size) / crop fraction), else their own
    size). Default: as recorded, else 0."""
    data_tier: Tier = setting("auto")
    """device: every image decoded once and held in memory (fastest); stream: kept encoded in a memory-mapped file and
    decoded per batch by --data-workers; auto: device when the decoded images fit --data-budget-gb."""
    data_budget_gb: float = setting(0.0)
    """Memory the device tier may take, in GB (0: half the device's free memory; host memory on a CPU)."""
    data_workers: int = setting(2)
    """Background processes decoding the streamed tier's batches (0: in the training process)."""

    def check(self) -> None:
        for name in ("train_per_class", "test_per_class", "val_per_class", "val_seed", "store_size", "data_workers"):
            check_int(self, name, 0)
        check("data_tier", self.data_tier, self.data_tier in ("auto", "device", "stream"), "auto, device or stream")
        check_float(self, "data_budget_gb", 0.0)


def resolved_store_size(spec, store_size: int) -> int:
    """The longest side images are stored at: the flag, else for the rrc view the resize-then-crop size of the
    larger of the train and eval resolutions (256 for 224, timm's crop_pct 0.875), else their own size (0)."""
    if store_size:
        return store_size
    if spec.view == "rrc":
        return int(round(max(spec.crop_size, spec.eval_resolution) / spec.crop_fraction))
    return 0
