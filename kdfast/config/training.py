"""The model a run trains, and how each of its steps is computed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..flags import explained, unset
from ..machine import launcher_accumulation
from .checks import check_float, check_int
from .section import Section


@explained
@dataclass
class ModelConfig(Section):
    """The model trained."""

    model: Optional[str] = unset("resnet8")
    """A registered model (resnet18, resnet8, resnet20, vit_tiny, vit_student) or a library model:
    timm:NAME, torchvision:NAME, with @SIZE to resize the input on the device (timm:vit_tiny_patch16_224@224);
    `kdfast models`. Default: resnet8 (kdfast sweep: the --pair's student)."""
    pretrained: bool = False
    """Start from the library's pretrained weights (timm: Hugging Face hub, torchvision: torch hub; downloaded
    once, then read from the local cache)."""


@explained
@dataclass
class TrainingConfig(Section):
    """How every optimizer step is computed: accumulation, compilation, the moving average, BatchNorm statistics."""

    grad_accum: Optional[int] = unset(1)
    """Gradient accumulation: micro-batches per optimizer step, through Accelerate, so a global batch tuned on N
    devices runs on fewer (0 or not given: $ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1)."""
    compile: bool = False
    """torch.compile the model being trained."""
    ema: float = 0.0
    """Keep an exponential moving average of the weights with this decay per step (0: off; e.g. 0.999): it is
    what is evaluated and exported, and it is in the resumable state."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (statistics over the global batch) before training: GPUs with
    NCCL only (torch has no SyncBatchNorm on CPU)."""

    def check(self) -> None:
        check_int(self, "grad_accum", 0)
        check_float(self, "ema", 0.0, 1.0)

    def resolve(self, recorded: dict) -> dict:
        return {} if self.grad_accum else {"grad_accum": launcher_accumulation()}
