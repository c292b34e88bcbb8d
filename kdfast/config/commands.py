"""The entry points' configs: each embeds the sections it uses (their fields are its flags) and adds its own.

A section field an entry point has no use for is hidden from its flags (`explained(hide=...)`) and refused if set. The
base order is the reverse of the --help order: the last base's flags come first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import tyro

from ..augment.recipes import RECIPES as AUG_RECIPES
from ..flags import explained
from .checks import check, check_grid, check_int
from .data import DataConfig, SourceConfig
from .evaluation import EvalConfig
from .kd import KDConfig, TeacherCacheConfig, TeacherConfig
from .optim import OptimConfig
from .run import OutputConfig, RunConfig, RuntimeConfig
from .section import Section
from .training import ModelConfig, TrainingConfig
from .view import ViewConfig, stored_size

DEFAULT_TEACHER = "models_saved/cnn_teacher.pth"
PAIR_DEFAULTS = {"cnn": ("resnet8", "cache/cnn_teacher.h5"), "vit": ("vit_student", "cache/vit_teacher.h5")}


@explained
@dataclass
class TrainConfig(RunConfig, RuntimeConfig, EvalConfig, TrainingConfig, OptimConfig, ViewConfig, DataConfig,
                  OutputConfig, ModelConfig):
    """Train one model with cross-entropy on CIFAR-style data: a teacher, or a student without KD."""

    def __post_init__(self):
        # settled at once, needing nothing recorded: the recipe's views (a cache may still fill what was not given)
        # and its label smoothing
        self.augment = self.settled_views()
        recipe_smoothing = AUG_RECIPES[self.aug_recipe].label_smoothing
        if self.label_smoothing is None and recipe_smoothing is not None:
            self.label_smoothing = recipe_smoothing

    @property
    def stored_size(self) -> int:
        return stored_size(self)

    @property
    def run_name(self) -> str:
        return self.name or self.value("model").replace(":", "-").replace("@", "-")


@explained
@dataclass
class DistillConfig(KDConfig, TeacherCacheConfig, TeacherConfig, TrainConfig):
    """Train a student with knowledge distillation from a trained teacher: online, or from a teacher-logit cache."""

    def __post_init__(self):
        super().__post_init__()
        for name, value in self.method_defaults().items():
            setattr(self, name, value)

    def check(self) -> None:
        if not self.teacher and not self.teacher_cache:
            raise ValueError("distillation needs a teacher: --teacher CKPT (run online) or --teacher-cache FILE "
                             "(kdfast cache build)")


@explained
@dataclass(kw_only=True)
class CheckpointConfig(Section):
    """A saved model run on images: which checkpoint, in batches of how many."""

    checkpoint: str
    """A .pth or .safetensors checkpoint with its .json beside it."""
    batch_size: Optional[int] = None
    """Images per forward pass. Default: the eval batch size recorded in the checkpoint's .json, else 500."""

    def check(self) -> None:
        check_int(self, "batch_size", 1)


@explained(hide=("eval_every", "eval_batch_size", "train_per_class", "val_per_class", "val_seed", "save_best",
                 "early_stop", "seed", "aug_recipe"))
@dataclass(kw_only=True)
class EvaluateConfig(RuntimeConfig, EvalConfig, ViewConfig, DataConfig, CheckpointConfig):
    """Evaluate a saved checkpoint on the test set, as its run did: every flag not given is the checkpoint's (its
    data, its views: --augment.* given override the recorded ones)."""


@explained(hide=("teacher_cache", "cache_slots", "ensemble", "cache_weights"))
@dataclass
class BuildConfig(RuntimeConfig, ViewConfig, DataConfig, TeacherCacheConfig, TeacherConfig):
    """Precompute a teacher's logits per augmentation seed into HDF5: KD with no teacher pass."""

    out: Optional[str] = None
    """Output file; default: cache/<teacher name>.h5 (in --cache-dir)."""
    slots: int = 16
    """Number of slots, one augmentation seed each: epoch e of a student trains on slot e mod SLOTS. One per student
    epoch makes cached KD equal online KD."""
    batch_size: int = 1000
    """Images per teacher forward pass."""
    topk: int = -1
    """Store only the k largest logits per sample (+ one logit standing for the rest); 0: dense; -1: auto (dense up
    to 100 classes, top-10 above: a 1,000-class slot of 1.28 M images is then 51 MiB, not 2.4 GiB)."""
    overwrite: bool = False
    """Replace an existing cache (or partial build) made with other settings."""

    def __post_init__(self):
        self.augment = self.settled_views()

    def check(self) -> None:
        for name in ("slots", "batch_size"):
            check_int(self, name, 1)
        check_int(self, "topk", -1)


@explained
@dataclass(kw_only=True)
class InfoConfig(Section):
    """Summarise a logit cache: teacher, data, seeds, completeness, teacher test accuracy;
    of several, whether they can be one ensemble teacher (same data, views and slots)
    and how their teachers agree on the test set."""

    file: Annotated[tuple[str, ...], tyro.conf.Positional]
    """The cache (.h5), or several."""


@explained(hide=("teacher_cache", "cache_slots", "ensemble", "cache_weights"))
@dataclass(kw_only=True)
class VerifyConfig(RuntimeConfig, DataConfig, TeacherCacheConfig, TeacherConfig):
    """Recompute random cache entries with the teacher online; report the largest difference."""

    file: Annotated[str, tyro.conf.Positional]
    """The cache (.h5)."""

    samples: int = 64
    """How many random (slot, sample) entries to recompute."""
    seed: int = 0
    """Seed of the random choice of entries."""

    def check(self) -> None:
        check_int(self, "samples", 1)


@explained(hide=("name", "resume", "auto_resume", "alpha", "tau"))
@dataclass
class SweepConfig(RunConfig, RuntimeConfig, EvalConfig, TrainingConfig, OptimConfig, DataConfig, OutputConfig, KDConfig,
                  TeacherCacheConfig, TeacherConfig, ModelConfig):
    """An alpha x tau grid of KD students from one teacher-logit cache, each point with several seeds, plus the no-KD
    baseline per seed. Finished points are kept: run the same command again to continue an interrupted sweep. The data
    flags not given are the cache's; the other flags apply to every run."""

    pair: Literal["cnn", "vit"] = "cnn"
    """Picks the defaults of --model (resnet8 / vit_student) and --teacher-cache (cache/<pair>_teacher.h5, the lab's)."""
    alphas: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Weights of the hard-label CE to try."""
    taus: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Temperatures to try."""
    seeds: int = 2
    """Seeds 0..N-1 at every point (initialisation and batch order; the views and teacher logits come from the cache)."""
    cache_slots: tuple[int, ...] = (0,)
    """Cache slots to train every point with (0: all): several values add sweep_slots.png, accuracy against slots."""
    together: Literal["auto", "on", "off"] = "auto"
    """Train the KD points of one seed together in one pass (kdfast.group; same batches, each its own loss, metrics
    and checkpoint). auto: on a GPU; off on a CPU, where it was measured slower for both students (README)."""
    group_size: int = 0
    """At most this many students per pass (0: all the points of a seed)."""

    def check(self) -> None:
        check_int(self, "group_size", 0)
        check("cache_slots", self.cache_slots, len(self.cache_slots) > 0 and all(
            isinstance(s, int) and s >= 0 for s in self.cache_slots), "one or more whole numbers >= 0 (0: all)")
        check_int(self, "seeds", 1)
        check_grid(self.alphas, self.taus)
        for name in ("alphas", "taus", "cache_slots"):  # a repeated value would be counted as more seeds
            values = getattr(self, name)
            check(name, values, len(set(values)) == len(values), "given without repeats")

    def cache_path(self) -> str:
        """The (first) cache: what the data flags not given follow (several caches must agree)."""
        return (self.cache_paths or (PAIR_DEFAULTS[self.pair][1],))[0]

    def resolve(self, recorded: dict) -> dict:
        defaults = {"model": PAIR_DEFAULTS[self.pair][0], "teacher_cache": (self.cache_path(),), "out_dir": "runs/sweep",
                    "eval_every": 0}
        return {k: v for k, v in defaults.items() if getattr(self, k) is None}


@explained(hide=("pretrained", "teacher", "teacher_weights", "seed", "aug_recipe"))
@dataclass
class ImportConfig(OutputConfig, ViewConfig, SourceConfig, TeacherConfig, ModelConfig):
    """Turn a plain state dict (or a library's pretrained weights) into a kdfast checkpoint with its .json, which
    records the data (--data) and the views (--augment.*) the weights were trained at: evaluate, predict and cache
    build use them."""

    weights: Annotated[Optional[str], tyro.conf.Positional] = None
    """The weights: a plain state dict in a .pth (torch.save; nested under "state_dict" / "model" and DDP's "module."
    prefix are unwrapped) or a .safetensors file. Default: none (then --teacher-pretrained)."""
    classes: tuple[str, ...] = ()
    """The class names, in the order of the model's outputs. Default: the classes of --data (sorted folder names)."""
    overwrite: bool = False
    """Replace a checkpoint of the same name."""


@explained
@dataclass
class LabReportConfig(Section):
    """The lab's report file."""

    report: str = "report.json"
    """The report; report.md and its figures go beside it. Labs of other pairs merge theirs into the same file."""


@explained(hide=("name",), positional=("out_dir",))
@dataclass
class ReportConfig(OutputConfig):
    """A report of the runs saved in a folder: for a lab's runs report.json and report.md (the runs, what the numbers
    show, curves, per-class accuracy and confusion matrices, sweeps, how to reproduce); for any other runs report.md
    (a table of every run with its metrics and the config fields that differ)."""

    report: Optional[str] = None
    """Where the report goes (report.md and the figures beside it). Default: OUT_DIR/report.json, beside the runs.
    A report of other runs there is refused unless --overwrite."""
    overwrite: bool = False
    """Replace a report at --report that was written from other runs."""

    sweep: Optional[str] = None
    """A sweep's --out-dir whose sweep.md and heatmap are included (a lab's own sweeps, OUT_DIR/sweep_<pair>, always
    are). Default: none."""


@explained(hide=("seed", "aug_recipe", "dist_timeout", "progress"), positional=("checkpoint",))
@dataclass(kw_only=True)
class PredictConfig(RuntimeConfig, ViewConfig, CheckpointConfig):
    """Run a checkpoint on your own images: the top classes of each with their probabilities, at the views the
    checkpoint records (--augment.* given override them)."""

    images: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="IMAGES")]
    """Image files, folders (every image inside, at any depth; hidden ones left out) or globs (quoted:
    "photos/*.png")."""
    top_k: int = 5
    """How many classes to list per image (at most the checkpoint's)."""
    out: Optional[str] = None
    """Also write the predictions as CSV (image, then class and probability per rank). Default: none."""

    def check(self) -> None:
        if not self.images:
            raise ValueError("IMAGES: give one or more image files, folders or globs after the checkpoint")
        check_int(self, "top_k", 1)
