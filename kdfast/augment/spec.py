"""The view spec: what a training view and an evaluation view are. Data, saved with every run and every cache."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Annotated, Literal, Optional

import tyro

from ..flags import check, explained, finite, unset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# ImageNet's: what timm's and torchvision's pretrained configs use for nearly every CNN and ViT
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the normalization of each dataset: --augment.mean/--augment.std left at CIFAR-10's take the dataset's
DATASET_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
# the fields a CIFAR view has always saved: its saved form stays exactly this, so older runs and caches match
CIFAR_FIELDS = ("crop_size", "padding", "pad_mode", "flip", "mean", "std")
RRC_FIELDS = ("view", "crop_size", "eval_size", "crop_fraction", "scale", "ratio", "flip", "mean", "std")
# the policies' fields, saved only when the policy is on (a spec without policies saves what it always saved)
POLICY_FIELDS = {"policy": ("policy", "policy_ops", "policy_magnitude"),
                 "mixing": ("mixup", "cutmix", "mix_prob", "switch_prob"),
                 "erasing": ("erasing", "erasing_area", "erasing_ratio")}


@explained
@dataclass(frozen=True)
class AugmentSpec:
    """What a view does; saved with every run and every logit cache."""

    view: Optional[Literal["cifar", "rrc"]] = unset("cifar")
    """cifar: pad + random crop + flip at the image's own size (the CIFAR recipe); evaluation on the whole image.
    rrc: RandomResizedCrop + flip resized to --augment.crop-size (ImageNet style, any image size); evaluation by
    resize + center crop (--augment.crop-fraction) to --augment.eval-size."""
    crop_size: Optional[int] = unset(32)
    """Training resolution: the side of every training view, in pixels."""
    padding: Optional[int] = unset(4)
    """cifar view: pixels of padding around the image before the random crop."""
    pad_mode: Optional[str] = unset("reflect")
    """cifar view: reflect or zeros."""
    flip: Optional[bool] = unset(True)
    """Random horizontal flip (both views)."""
    eval_size: Optional[int] = unset(0)
    """rrc view: evaluation resolution (0: the training resolution)."""
    crop_fraction: Optional[float] = unset(0.875)
    """rrc view: evaluation takes the center square of this fraction of the shorter side (timm's crop_pct)."""
    scale: Optional[tuple[float, float]] = unset((0.08, 1.0))
    """rrc view: range of the crop's area as a fraction of the image's."""
    ratio: Optional[tuple[float, float]] = unset((3 / 4, 4 / 3))
    """rrc view: range of the crop's aspect ratio (width / height), drawn log-uniformly."""
    interpolation: Optional[Literal["bilinear", "bicubic"]] = unset("bilinear")
    """rrc view: the resampling filter of the crop's resize, antialiased as Pillow does (bicubic: timm's for ViTs and
    DeiT); both views."""
    policy: Optional[Literal["none", "randaugment", "trivialaugment"]] = unset("none")
    """Per-sample augmentation policy on the view (torchvision's RandAugment / TrivialAugmentWide: their ops,
    magnitudes and 31 bins), keyed by (seed, index)."""
    policy_ops: Optional[int] = unset(2)
    """randaugment: ops applied in sequence (torchvision's num_ops)."""
    policy_magnitude: Optional[int] = unset(9)
    """randaugment: magnitude bin, 0..30 (torchvision's magnitude)."""
    mixup: Optional[float] = unset(0.0)
    """Mixup's Beta(alpha, alpha) (0: off); the partner is drawn from the whole training set by the hash."""
    cutmix: Optional[float] = unset(0.0)
    """CutMix's Beta(alpha, alpha) (0: off)."""
    mix_prob: Optional[float] = unset(1.0)
    """Probability that a sample is mixed (mixup or CutMix on)."""
    switch_prob: Optional[float] = unset(0.5)
    """Probability of CutMix rather than mixup when both are on."""
    erasing: Optional[float] = unset(0.0)
    """Random erasing probability (0: off); the box is zeroed in the normalized view."""
    erasing_area: Optional[tuple[float, float]] = unset((0.02, 1 / 3))
    """Random erasing: range of the box's area as a fraction of the view's."""
    erasing_ratio: Optional[tuple[float, float]] = unset((0.3, 3.3))
    """Random erasing: range of the box's aspect ratio, drawn log-uniformly."""
    mean: Optional[tuple[float, float, float]] = unset(CIFAR10_MEAN)
    """Normalization mean (default: the dataset's for the cifar view, ImageNet's for the rrc view)."""
    std: Optional[tuple[float, float, float]] = unset(CIFAR10_STD)
    """Normalization std (default as --augment.mean)."""
    given: Annotated[Optional[tuple[str, ...]], tyro.conf.Suppress] = field(default=None, compare=False, repr=False)
    """The fields given by flags or the Python API (the others were filled: by a recipe, a recorded spec, the dataset's
    normalization or the defaults); only these are never replaced. Not saved."""

    def __post_init__(self):
        # a field left None is not given: it takes its default here, and may still be replaced when a run resolves
        # its views against a recipe or a recorded spec (resolve_views)
        if self.given is None:
            object.__setattr__(self, "given", tuple(n for n in VIEW_FIELDS if getattr(self, n) is not None))
        for f in fields(self):
            if f.name != "given" and getattr(self, f.name) is None:
                object.__setattr__(self, f.name, f.metadata["fallback"])

    @classmethod
    def not_given(cls, **given) -> "AugmentSpec":
        """A spec with only `given` set and nothing filled: a config's default (a preset's), so that tyro passes None
        for every flag left out (tyro reads a nested default's values as the flags' defaults)."""
        spec = object.__new__(cls)
        for f in fields(cls):
            object.__setattr__(spec, f.name, given.get(f.name))
        return spec

    def given_values(self) -> dict:
        """The fields given, with their values (a not_given() spec: those that are not None)."""
        names = self.given if self.given is not None else [n for n in VIEW_FIELDS if getattr(self, n) is not None]
        return {n: getattr(self, n) for n in names}

    def values(self) -> dict:
        """Every view field and its value (not `given`)."""
        return {n: getattr(self, n) for n in VIEW_FIELDS}

    def filled(self) -> "AugmentSpec":
        """This spec with every field set (a not_given() spec: its given fields, the defaults elsewhere)."""
        return self if self.given is not None else AugmentSpec(**self.given_values())

    def check(self) -> None:
        """The fields' ranges (one sentence naming the --augment flag); fields not yet given or filled pass."""
        check_spec(self)

    def for_dataset(self, dataset: str) -> "AugmentSpec":
        """This spec with the normalization of the view and dataset where mean and std were not given: the dataset's
        (cifar view) or ImageNet's (rrc view)."""
        mean, std = normalization(self.view, dataset)
        given = self.given_values()
        return replace(self.filled(), mean=given.get("mean", mean), std=given.get("std", std))

    def describe(self) -> str:
        """One line for the log: the view and whose normalization it uses."""
        known = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet's", (CIFAR10_MEAN, CIFAR10_STD): "CIFAR-10's",
                 (CIFAR100_MEAN, CIFAR100_STD): "CIFAR-100's"}
        whose = known.get((tuple(self.mean), tuple(self.std)), "the given")
        flip = " + flip" if self.flip else ""
        filtered = f" ({self.interpolation})" if self.interpolation != "bilinear" else ""
        view = (f"RandomResizedCrop{flip} at {self.crop_size} px{filtered}, eval {self.eval_resolution} px"
                if self.view == "rrc" else f"pad {self.padding} + crop {self.crop_size}{flip}")
        return f"views: {view}{self.describe_policies()}, {whose} mean/std"

    def describe_policies(self) -> str:
        parts = []
        if self.policy == "randaugment":
            parts.append(f"RandAugment {self.policy_ops} ops m{self.policy_magnitude}")
        elif self.policy == "trivialaugment":
            parts.append("TrivialAugmentWide")
        if self.mixup:
            parts.append(f"mixup {self.mixup:g}")
        if self.cutmix:
            parts.append(f"CutMix {self.cutmix:g}")
        if self.mixes and self.mix_prob < 1:
            parts.append(f"mixed with p {self.mix_prob:g}")
        if self.erasing:
            parts.append(f"erasing {self.erasing:g}")
        return "".join(" + " + p for p in parts)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def policy_fields(self) -> tuple[str, ...]:
        on = {"policy": self.policy != "none", "mixing": self.mixes, "erasing": self.erasing > 0}
        return tuple(f for group, names in POLICY_FIELDS.items() if on[group] for f in names)

    @property
    def eval_resolution(self) -> int:
        return self.eval_size or self.crop_size if self.view == "rrc" else self.crop_size

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.view == "rrc":
            d["eval_size"] = self.eval_resolution
        return {k: d[k] for k in (RRC_FIELDS if self.view == "rrc" else CIFAR_FIELDS) + self.added_fields()
                + self.policy_fields()}

    def added_fields(self) -> tuple[str, ...]:
        """Fields added since views were first saved: saved only when they change the views, so that the runs and
        caches saved before them still match."""
        return ("interpolation",) if self.view == "rrc" and self.interpolation != "bilinear" else ()

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentSpec":
        """The spec saved by to_dict (in a run's config or a cache's attributes): what it holds counts as given."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in VIEW_FIELDS})


VIEW_FIELDS = tuple(f.name for f in fields(AugmentSpec) if f.name != "given")


def normalization(view: str, dataset: str) -> tuple[tuple, tuple]:
    """The default mean and std of a view on a dataset: ImageNet's for the rrc view, else the dataset's."""
    return (IMAGENET_MEAN, IMAGENET_STD) if view == "rrc" else DATASET_STATS[dataset]


def resolve_views(spec: AugmentSpec, recipe: dict | None = None, dataset: str = "cifar10",
                  recorded: dict | AugmentSpec | None = None, pin: bool = False) -> AugmentSpec:
    """The views a run trains on: what was given, else a recipe's fields (AugRecipe.augment), else a recorded spec's (a
    cache's, a teacher's), else the defaults, with the normalization of the view and dataset where neither the flags
    nor the recorded spec set it. An explicit value is never replaced, even one equal to its default.

    pin: the result counts as given whole (a run's views once resolved: resolving them again keeps them)."""
    given = spec.given_values()
    values = recorded.values() if isinstance(recorded, AugmentSpec) else dict(recorded or {})
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in VIEW_FIELDS}
    values.update(recipe or {})
    values.update(given)
    mean, std = normalization(values.get("view") or "cifar", dataset)
    values.setdefault("mean", mean)
    values.setdefault("std", std)
    return AugmentSpec(**values, given=VIEW_FIELDS if pin else tuple(given))


def check_spec(spec: AugmentSpec) -> None:
    """Each --augment flag in its range (a spec with fields not yet filled is checked as it will be filled)."""
    spec = spec.filled()
    check("augment.view", spec.view, spec.view in ("cifar", "rrc"), "cifar or rrc")
    check("augment.pad_mode", spec.pad_mode, spec.pad_mode in ("reflect", "zeros"), "reflect or zeros")
    check("augment.padding", spec.padding, spec.padding >= 0, "a whole number >= 0")
    check("augment.crop_size", spec.crop_size, spec.crop_size >= 1, "a whole number >= 1")
    check("augment.std", spec.std, all(finite(s) and s > 0 for s in spec.std), "three finite numbers > 0")
    check("augment.mean", spec.mean, all(finite(m) for m in spec.mean), "three finite numbers")
    check("augment.eval_size", spec.eval_size, isinstance(spec.eval_size, int) and spec.eval_size >= 0,
          "a whole number >= 0 (0: the training resolution)")
    check("augment.crop_fraction", spec.crop_fraction, finite(spec.crop_fraction) and 0 < spec.crop_fraction <= 1,
          "a number in (0, 1]")
    (s0, s1), (r0, r1) = spec.scale, spec.ratio
    check("augment.scale", spec.scale, all(map(finite, spec.scale)) and 0 < s0 <= s1 <= 1,
          "two numbers 0 < MIN <= MAX <= 1")
    check("augment.ratio", spec.ratio, all(map(finite, spec.ratio)) and 0 < r0 <= r1, "two numbers 0 < MIN <= MAX")
    check("augment.interpolation", spec.interpolation, spec.interpolation in ("bilinear", "bicubic"),
          "bilinear or bicubic")
    check_policies(spec)


def check_policies(spec: AugmentSpec) -> None:
    check("augment.policy", spec.policy, spec.policy in ("none", "randaugment", "trivialaugment"),
          "none, randaugment or trivialaugment")
    check("augment.policy_ops", spec.policy_ops, isinstance(spec.policy_ops, int) and spec.policy_ops >= 1,
          "a whole number >= 1")
    check("augment.policy_magnitude", spec.policy_magnitude,
          isinstance(spec.policy_magnitude, int) and 0 <= spec.policy_magnitude <= 30, "a whole number in 0..30")
    for name in ("mixup", "cutmix"):
        value = getattr(spec, name)
        check(f"augment.{name}", value, finite(value) and value >= 0, "a number >= 0 (Beta's alpha; 0: off)")
    for name in ("mix_prob", "switch_prob", "erasing"):
        value = getattr(spec, name)
        check(f"augment.{name}", value, finite(value) and 0 <= value <= 1, "a probability in [0, 1]")
    (a0, a1), (r0, r1) = spec.erasing_area, spec.erasing_ratio
    check("augment.erasing_area", spec.erasing_area, all(map(finite, spec.erasing_area)) and 0 < a0 <= a1 < 1,
          "two numbers 0 < MIN <= MAX < 1")
    check("augment.erasing_ratio", spec.erasing_ratio, all(map(finite, spec.erasing_ratio)) and 0 < r0 <= r1,
          "two numbers 0 < MIN <= MAX")
