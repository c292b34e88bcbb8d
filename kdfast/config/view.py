"""The training views: the spec of every view (--augment.*), a named recipe of policies, and the seed they are drawn
from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..augment import AugmentSpec
from ..augment.recipes import RECIPES as AUG_RECIPES
from ..augment.spec import VIEW_FIELDS, resolve_views
from ..flags import explained
from .checks import check_int
from .data import resolved_store_size
from .section import Section


@explained
@dataclass
class ViewConfig(Section):
    """What every training view is: resolved against a recipe, a recorded spec (a cache's) and the dataset."""

    augment: AugmentSpec = field(default_factory=AugmentSpec.not_given)
    """The training views and their policies (saved with the run and every cache; see README "Data"). A flag not
    given takes the recipe's value, else the recorded spec's (a teacher-logit cache's), else its default."""
    aug_recipe: Literal[tuple(AUG_RECIPES)] = "none"  # type: ignore[valid-type]
    """A named augmentation recipe: its policies fill the --augment fields not given, and its label smoothing
    --label-smoothing if unset. none; cct (RandAugment m9, mixup 0.8, CutMix 1.0, smoothing 0.1); deit (cct + random
    erasing 0.25); trivialaugment (TrivialAugmentWide + erasing 0.25); mixup (alpha 0.2). `kdfast recipes` lists them
    with their sources."""
    seed: int = 0
    """Run seed: the augmentation seed of each epoch (the views a cache's slot k holds are epoch k's of a run with this
    seed), the initial weights and the batch order."""

    def check(self) -> None:
        self.augment.check()
        check_int(self, "seed", 0)

    def settled_views(self) -> AugmentSpec:
        """The views as far as they are known without recorded data: the given flags, the recipe's, the defaults and
        the normalization of the dataset given (a cache may still fill what was not given)."""
        return resolve_views(self.augment, AUG_RECIPES[self.aug_recipe].augment, getattr(self, "dataset", None)
                             or "cifar10")

    def resolve(self, recorded: dict) -> dict:
        """The views resolved: given flags, else the recipe, else the recorded spec, else the defaults. The
        normalization follows the dataset where no flag set it: the recorded spec's, unless the run gives another
        dataset than the recorded one (then that dataset's)."""
        given_dataset, spec = getattr(self, "dataset", None), recorded.get("augment")
        if self.augment.given == VIEW_FIELDS and spec is None:
            return {}  # resolved already
        dataset = given_dataset or recorded.get("dataset") or "cifar10"
        if spec is not None and given_dataset and given_dataset != recorded.get("dataset", given_dataset):
            values = spec.values() if isinstance(spec, AugmentSpec) else spec
            spec = {k: v for k, v in values.items() if k not in ("mean", "std")}
        views = resolve_views(self.augment, AUG_RECIPES[self.aug_recipe].augment, dataset, spec, pin=True)
        return {"augment": views}


def stored_size(cfg) -> int:
    """The longest side a config's images are stored at: --store-size, else its views' automatic size (a command
    without views, evaluate or cache verify, stores them as recorded)."""
    return resolved_store_size(cfg.augment, cfg.store_size or 0) if isinstance(cfg, ViewConfig) else cfg.store_size
