"""Named augmentation recipes: the policies and label smoothing of published recipes, by name (--aug-recipe).

A recipe fills the augmentation fields (and label smoothing) that the command line did not give; an explicit flag
wins, even one equal to its default. The policies are torchvision's RandAugment / TrivialAugmentWide (policy.py), so a recipe
whose source used timm's `rand-m9-mstd0.5-inc1` gets torchvision's RandAugment at magnitude 9 instead.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .spec import AugmentSpec


@dataclass(frozen=True)
class AugRecipe:
    name: str
    augment: dict  # AugmentSpec fields
    label_smoothing: float | None
    source: str


RECIPES = {r.name: r for r in [
    AugRecipe("none", {}, None, "the view alone (CIFAR: pad 4 + crop + flip; rrc: RandomResizedCrop + flip)"),
    AugRecipe("cct", dict(policy="randaugment", policy_ops=2, policy_magnitude=9, mixup=0.8, cutmix=1.0), 0.1,
              "CCT on CIFAR-10 (Hassani et al. 2021, SHI-Labs/Compact-Transformers): RandAugment m9, mixup 0.8, "
              "CutMix 1.0, label smoothing 0.1"),
    AugRecipe("deit", dict(policy="randaugment", policy_ops=2, policy_magnitude=9, mixup=0.8, cutmix=1.0,
                           erasing=0.25), 0.1,
              "DeiT (Touvron et al. 2021): RandAugment m9, mixup 0.8, CutMix 1.0, random erasing 0.25, label "
              "smoothing 0.1"),
    AugRecipe("trivialaugment", dict(policy="trivialaugment", erasing=0.25), None,
              "TrivialAugment (Muller and Hutter 2021) on CIFAR ResNets: TrivialAugmentWide after crop + flip, "
              "with random erasing 0.25 in place of their cutout"),
    AugRecipe("mixup", dict(mixup=0.2), None,
              "mixup (Zhang et al. 2018) on CIFAR-10 ResNets: alpha 0.2 (their CIFAR-10 setting is 1.0; 0.2 "
              "suits short schedules, as in their ImageNet runs)"),
]}


def recipe_names() -> list[str]:
    return list(RECIPES)


def apply_recipe(spec: AugmentSpec, name: str) -> AugmentSpec:
    """The spec with the recipe's fields where the spec did not give them (an explicit value is kept, even one equal
    to its default)."""
    given = spec.given_values()
    return replace(spec.filled(), **{k: v for k, v in RECIPES[name].augment.items() if k not in given})
