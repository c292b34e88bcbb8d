"""Where a student's teacher comes from, and the distillation method with its parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..flags import explained
from .checks import check_float, check_int
from .section import Section

# (alpha, tau) when --alpha / --tau are not given. kd (and fitnets, whose KD term is kd's): the best point of an
# alpha x tau grid on CIFAR-10 (1,000 images per class, ResNet-20 -> ResNet-8) and on a 64 px folder (timm ResNet-18 ->
# ResNet-8, RandomResizedCrop), 8 epochs, 2 seeds (README "Defaults"); deit: DeiT's 0.5 (no temperature); dkd: its
# paper's CIFAR temperature (its CE weight is 1, alpha unused)
KD_DEFAULTS = (0.1, 2.0)
METHOD_DEFAULTS = {"deit": (0.5, 4.0), "dkd": (0.1, 4.0)}


@explained
@dataclass
class TeacherConfig(Section):
    """A teacher: a checkpoint, or a library model with its weights."""

    teacher: Optional[str] = None
    """Teacher checkpoint (.pth or .safetensors with its .json beside it; `kdfast import` makes the .json of an outside
    one), or a model name with --teacher-weights / --teacher-pretrained. kdfast distill runs it online on every batch;
    with --teacher-cache it is optional and, if given, must be the teacher the cache was built from. Default: none
    (kdfast cache build and verify: models_saved/cnn_teacher.pth)."""
    teacher_weights: Optional[str] = None
    """With --teacher a model name (resnet18, timm:NAME, torchvision:NAME) instead of a checkpoint: its weights, a
    plain state dict (.pth or .safetensors, trained outside kdfast) for a head of the data's number of classes.
    Default: none (--teacher is a checkpoint)."""
    teacher_pretrained: bool = False
    """With --teacher a library model name: the library's pretrained weights (downloaded once), e.g. an ImageNet
    teacher for ImageNet data (kdfast import: of --model)."""


@explained
@dataclass
class TeacherCacheConfig(Section):
    """The teacher-logit cache a run reads instead of running its teacher."""

    teacher_cache: Optional[tuple[str, ...]] = None
    """HDF5 teacher-logit cache (kdfast cache build): no teacher pass; epoch e trains on slot e mod S's views. The
    data flags not given are taken from it (data, subset, validation split, views). Several: one teacher, their
    ensemble (--ensemble), from caches built on the same data, views and slots. Default: none (teacher online;
    kdfast sweep: the pair's lab cache, cache/<pair>_teacher.h5)."""
    cache_slots: int = 0
    """Use only the first N slots of the cache (0 = all)."""
    ensemble: Literal["probs", "logits"] = "probs"
    """With several --teacher-cache: average the teachers' probabilities at tau (probs: the target is their mixture)
    or their logits."""
    cache_weights: Optional[tuple[float, ...]] = None
    """With several --teacher-cache: each teacher's weight in the ensemble (scaled to sum 1). Default: equal."""

    def check(self) -> None:
        if not isinstance(self.cache_slots, tuple):  # a sweep's --cache-slots is its axis: checked by the sweep
            check_int(self, "cache_slots", 0)
        count = len(self.cache_paths)
        if self.cache_weights is not None and (len(self.cache_weights) != count or
                                               not all(w > 0 for w in self.cache_weights)):
            raise ValueError(f"--cache-weights: one weight > 0 for each --teacher-cache ({count} given), got "
                             f"{' '.join(map(str, self.cache_weights))}")

    @property
    def cache_paths(self) -> tuple[str, ...]:
        """The --teacher-cache files (one given as a plain path by a caller counts as one)."""
        value = self.teacher_cache
        return () if not value else (value,) if isinstance(value, str) else tuple(value)


@explained
@dataclass
class KDConfig(Section):
    """The distillation method, with its weights, temperature and parameters: what each student of a sweep's pass
    may have of its own."""

    method: str = "kd"
    """Distillation method: kd (Hinton), dkd (decoupled KD), fitnets (hints + KD, teacher online), deit (DeiT's
    distillation token, student vit_student_distilled: --alpha weighs the class head); `kdfast methods`."""
    alpha: Optional[float] = None
    """Weight of the hard-label CE; (1-alpha) weighs the soft KL term. Default: 0.1 for kd and fitnets (the best
    point of grids measured on two datasets, README "Defaults"), 0.5 for deit (DeiT's); dkd does not use it."""
    tau: Optional[float] = None
    """Softmax temperature of the soft targets. Default: 2 for kd and fitnets (measured, README "Defaults"), 4 for
    dkd (its paper's CIFAR setting)."""
    logit_std: bool = False
    """Logit standardization (Sun et al. 2024): z-score teacher and student logits before the softened softmax."""
    dkd_alpha: float = 1.0
    """DKD: weight of the target-class term (TCKD)."""
    dkd_beta: float = 8.0
    """DKD: weight of the non-target-class term (NCKD)."""
    dkd_warmup: float = 0.1
    """DKD: fraction of the epochs over which the KD term ramps up linearly (mdistiller: 20 of 240 epochs)."""
    hint: Optional[str] = None
    """FitNets: TEACHER_LAYER:STUDENT_LAYER (module names); default: the middle stage / block of each model."""
    hint_weight: float = 100.0
    """FitNets (joint schedule): L = L_KD + hint_weight * MSE(regressed student features, teacher features)."""
    fitnets_schedule: Literal["joint", "two-stage"] = "joint"
    """FitNets: joint loss, or the paper's two stages (hints alone, then KD alone)."""
    hint_epochs: float = 0.2
    """FitNets two-stage: fraction of the epochs spent on hint training alone."""

    def check(self) -> None:
        check_float(self, "alpha", 0.0, 1.0, high_open=False)
        check_float(self, "tau", 0.0, low_open=True)
        check_float(self, "dkd_alpha", 0.0)
        check_float(self, "dkd_beta", 0.0)
        check_float(self, "dkd_warmup", 0.0, 1.0, high_open=False)
        check_float(self, "hint_weight", 0.0)
        check_float(self, "hint_epochs", 0.0, 1.0)

    def method_defaults(self) -> dict:
        """alpha and tau where not given: the method's defaults."""
        alpha, tau = METHOD_DEFAULTS.get(self.method, KD_DEFAULTS)
        return {k: v for k, v in (("alpha", alpha), ("tau", tau)) if getattr(self, k) is None}
