"""The view spec: what a training view and an evaluation view are. Data, saved with every run and every cache."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from ..flags import explained

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

    view: Literal["cifar", "rrc"] = "cifar"
    """cifar: pad + random crop + flip at the image's own size (the CIFAR recipe); evaluation on the whole image.
    rrc: RandomResizedCrop + flip resized to --augment.crop-size (ImageNet style, any image size); evaluation by
    resize + center crop (--augment.crop-fraction) to --augment.eval-size."""
    crop_size: int = 32
    """Training resolution: the side of every training view, in pixels."""
    padding: int = 4
    """cifar view: pixels of padding around the image before the random crop."""
    pad_mode: str = "reflect"
    """cifar view: reflect or zeros."""
    flip: bool = True
    """Random horizontal flip (both views)."""
    eval_size: int = 0
    """rrc view: evaluation resolution (0: the training resolution)."""
    crop_fraction: float = 0.875
    """rrc view: evaluation takes the center square of this fraction of the shorter side (timm's crop_pct)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """rrc view: range of the crop's area as a fraction of the image's."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """rrc view: range of the crop's aspect ratio (width / height), drawn log-uniformly."""
    policy: Literal["none", "randaugment", "trivialaugment"] = "none"
    """Per-sample augmentation policy on the view (torchvision's RandAugment / TrivialAugmentWide: their ops,
    magnitudes and 31 bins), keyed by (seed, index)."""
    policy_ops: int = 2
    """randaugment: ops applied in sequence (torchvision's num_ops)."""
    policy_magnitude: int = 9
    """randaugment: magnitude bin, 0..30 (torchvision's magnitude)."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) (0: off); the partner is drawn from the whole training set by the hash."""
    cutmix: float = 0.0
    """CutMix's Beta(alpha, alpha) (0: off)."""
    mix_prob: float = 1.0
    """Probability that a sample is mixed (mixup or CutMix on)."""
    switch_prob: float = 0.5
    """Probability of CutMix rather than mixup when both are on."""
    erasing: float = 0.0
    """Random erasing probability (0: off); the box is zeroed in the normalized view."""
    erasing_area: tuple[float, float] = (0.02, 1 / 3)
    """Random erasing: range of the box's area as a fraction of the view's."""
    erasing_ratio: tuple[float, float] = (0.3, 3.3)
    """Random erasing: range of the box's aspect ratio, drawn log-uniformly."""
    mean: tuple[float, float, float] = CIFAR10_MEAN
    """Normalization mean (default: the dataset's for the cifar view, ImageNet's for the rrc view)."""
    std: tuple[float, float, float] = CIFAR10_STD
    """Normalization std (default as --augment.mean)."""

    def for_dataset(self, dataset: str) -> "AugmentSpec":
        """The default normalization resolved: the dataset's (cifar view) or ImageNet's (rrc view), where mean and
        std are still CIFAR-10's defaults (explicit values are kept)."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.view == "rrc" else DATASET_STATS[dataset]
        return replace(self, mean=mean if self.mean == CIFAR10_MEAN else self.mean,
                       std=std if self.std == CIFAR10_STD else self.std)

    def describe(self) -> str:
        """One line for the log: the view and whose normalization it uses."""
        known = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet's", (CIFAR10_MEAN, CIFAR10_STD): "CIFAR-10's",
                 (CIFAR100_MEAN, CIFAR100_STD): "CIFAR-100's"}
        whose = known.get((tuple(self.mean), tuple(self.std)), "the given")
        flip = " + flip" if self.flip else ""
        view = (f"RandomResizedCrop{flip} at {self.crop_size} px, eval {self.eval_resolution} px" if self.view == "rrc"
                else f"pad {self.padding} + crop {self.crop_size}{flip}")
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
        return {k: d[k] for k in (RRC_FIELDS if self.view == "rrc" else CIFAR_FIELDS) + self.policy_fields()}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentSpec":
        """The spec saved by to_dict (in a run's config or a cache's attributes)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
