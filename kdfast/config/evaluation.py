"""How a run is evaluated: how often, in batches of how many images, with which test-time augmentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..flags import explained, setting, unset
from .checks import check_int
from .section import Section


@explained
@dataclass
class EvalConfig(Section):
    """When and how the validation split and the test set are evaluated."""

    eval_every: Optional[int] = unset(1)
    """Evaluate every N epochs, on the validation split if there is one, else on the test set (the last epoch
    always; 0: the last only). Default: 1 (kdfast sweep: 0)."""
    eval_batch_size: int = 500
    """Images per evaluation batch (global)."""
    tta: Optional[Literal["none", "flip", "translate"]] = unset("none")
    """Test-time augmentation at evaluation: flip (mean of the logits of the image and its mirror), translate
    (airbench's: flip, plus the mirrored pair shifted by one pixel each way, weights 1/2, 1/4, 1/4). Default: as
    recorded (kdfast evaluate: as the checkpoint's run evaluated), else none."""
    save_best: Optional[bool] = setting(None)
    """Also save the model of the epoch with the best validation accuracy, as NAME.best.pth (.safetensors, .json with
    its epoch and its test accuracy) beside the last epoch's NAME.pth. Default: on when the run has a validation
    split (--val-per-class), off otherwise (it needs one)."""
    early_stop: int = 0
    """Stop after this many validation evaluations in a row without a better validation accuracy (the patience); the
    checkpoint is then the last epoch trained and NAME.best the best one. Needs a validation split. 0: off."""

    def check(self) -> None:
        check_int(self, "eval_every", 0)
        check_int(self, "eval_batch_size", 1)
        check_int(self, "early_stop", 0)
