"""Run configurations: one dataclass per entry point; CLI flags are generated from these fields.

A field left at None takes its value from the model family's recipe (RECIPES), so a CLI
default never overrides a recipe default; the resolved values are saved with every run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, Optional

from .augment import AugmentSpec

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Recipe:
    """Optimizer and schedule of one model family."""

    optimizer: Literal["sgd", "adamw"]
    lr: float  # peak learning rate for a global batch of 256, scaled linearly with the batch size
    weight_decay: float
    momentum: float  # SGD (Nesterov) momentum; AdamW beta1
    schedule: Literal["onecycle", "cosine"]
    warmup: float  # fraction of all steps spent warming up linearly from 0
    grad_clip: float  # max gradient norm; 0 = off
    label_smoothing: float


RECIPES = {
    # SGD + Nesterov, one-cycle (linear up, linear down to 0): the usual fast CIFAR ResNet recipe
    "cnn": Recipe("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, schedule="onecycle", warmup=0.15,
                  grad_clip=0.0, label_smoothing=0.0),
    # AdamW, warm-up then cosine, gradient clipping: ViTs trained from scratch need all three
    "vit": Recipe("adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, schedule="cosine", warmup=0.1,
                  grad_clip=1.0, label_smoothing=0.1),
}


@dataclass
class TrainConfig:
    """Train one model with cross-entropy on CIFAR-style data: a teacher, or a student without KD."""

    model: str = "resnet8"
    """Registered model name: resnet18, resnet8, resnet20, vit_tiny, vit_student."""
    name: Optional[str] = None
    """Checkpoint name in out_dir (NAME.pth, .safetensors, .json, .metrics.jsonl); default: the model name."""
    out_dir: str = "models_saved"
    data: Optional[str] = None
    """Data source: torchvision CIFAR-10 folder, or a folder / .tar.gz with train/<class>/* and test/<class>/*. Default: $KDFAST_DATA, else ./data."""
    download: bool = False
    """Download CIFAR-10 with torchvision into --data when it is missing (needs internet)."""
    cache_dir: str = "cache"
    """Where decoded datasets (and teacher-logit caches) are kept."""
    train_per_class: int = 0
    """Use only the first N training images of each class (0 = all)."""
    test_per_class: int = 0
    """Use only the first N test images of each class (0 = all)."""
    epochs: int = 30
    batch_size: int = 256
    """Global batch size (split evenly across processes)."""
    eval_batch_size: int = 500
    eval_every: int = 1
    """Evaluate on the test set every N epochs (the last epoch always)."""
    recipe: Literal["auto", "cnn", "vit"] = "auto"
    """Optimizer/schedule family; auto = the model's family."""
    optimizer: Optional[Literal["sgd", "adamw"]] = None
    lr: Optional[float] = None
    """Peak learning rate (default: the recipe's, scaled by batch_size/256)."""
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    schedule: Optional[Literal["onecycle", "cosine"]] = None
    warmup: Optional[float] = None
    """Fraction of all steps spent warming up."""
    grad_clip: Optional[float] = None
    label_smoothing: Optional[float] = None
    pretrained: bool = False
    """Start from the library's pretrained weights (must be in the local cache)."""
    precision: Precision = "auto"
    """auto = bf16 on GPUs that have it (fp16 on older ones); on CPUs bf16 only with AMX/AVX512-BF16, else fp32."""
    compile: bool = False
    """torch.compile the model being trained."""
    seed: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    resume: bool = False
    """Continue from the last saved epoch of this run (out_dir/.state/NAME)."""
    progress: bool = True
    """Show a progress bar (main process only)."""

    @property
    def run_name(self) -> str:
        return self.name or self.model

    def resolved_recipe(self, family: str) -> Recipe:
        base = RECIPES[family if self.recipe == "auto" else self.recipe]
        overrides = {f.name: getattr(self, f.name) for f in fields(Recipe) if getattr(self, f.name) is not None}
        recipe = replace(base, **overrides)
        if self.lr is None:
            recipe = replace(recipe, lr=base.lr * self.batch_size / 256)
        return recipe

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d


@dataclass
class DistillConfig(TrainConfig):
    """Train a student with knowledge distillation from a trained teacher: online, or from a teacher-logit cache."""

    teacher: str = "models_saved/cnn_teacher.pth"
    """Teacher checkpoint (.pth or .safetensors with its .json beside it, as kdfast writes them)."""
    alpha: float = 0.5
    """Weight of the hard-label CE; (1-alpha) weighs the soft KL term."""
    tau: float = 4.0
    """Softmax temperature of the soft targets."""
    teacher_cache: Optional[str] = None
    """HDF5 teacher-logit cache (kdfast cache build): no teacher pass; epoch e trains on slot e mod S's views."""
    cache_slots: int = 0
    """Use only the first N slots of the cache (0 = all)."""


@dataclass
class EvaluateConfig:
    """Evaluate a saved checkpoint on the test set."""

    checkpoint: str
    """A .pth or .safetensors checkpoint with its .json beside it."""
    data: Optional[str] = None
    """Data source (default: the one recorded in the checkpoint's .json, else $KDFAST_DATA or ./data)."""
    cache_dir: str = "cache"
    test_per_class: Optional[int] = None
    """Test subset per class (default: as recorded in the checkpoint's .json)."""
    batch_size: Optional[int] = None
    """Default: the eval batch size recorded in the checkpoint's .json."""
    precision: Optional[Precision] = None
    """Default: the precision the checkpoint was evaluated with."""


@dataclass
class LabConfig:
    """The whole course lab: two teachers, two baseline students, two KD students, then report.json.

    Presets (--preset): smoke (minutes on any CPU: a class-balanced subset, 2 epochs), cpu (about an hour
    on a 2-core AMX CPU: full data, few epochs), full (the real recipe for one GPU). Any field below
    overrides the preset's value.
    """

    preset: Literal["smoke", "cpu", "full"] = "smoke"
    data: Optional[str] = None
    """Data source (default: $KDFAST_DATA, else ./data)."""
    download: bool = False
    cache_dir: str = "cache"
    out_dir: str = "models_saved"
    report: str = "report.json"
    pairs: tuple[Literal["cnn", "vit"], ...] = ("cnn", "vit")
    train_per_class: int = 0
    test_per_class: int = 0
    cnn_teacher: str = "resnet18"
    cnn_student: str = "resnet8"
    vit_teacher: str = "vit_tiny"
    vit_student: str = "vit_student"
    cnn_teacher_epochs: int = 30
    cnn_student_epochs: int = 30
    vit_teacher_epochs: int = 30
    vit_student_epochs: int = 30
    cnn_batch_size: int = 256
    vit_batch_size: int = 256
    alpha: float = 0.5
    """KD: weight of the hard-label CE."""
    tau: float = 4.0
    """KD: temperature."""
    eval_every: int = 1
    eval_batch_size: int = 500
    precision: Precision = "auto"
    compile: bool = False
    seed: int = 0
    online: bool = False
    """Distil with the teacher run on every batch instead of from a teacher-logit cache (one slot per epoch)."""
    fresh: bool = False
    """Retrain every run; by default finished runs with the same config are kept and interrupted ones resumed."""
    progress: bool = True


LAB_PRESETS = {
    "smoke": LabConfig(preset="smoke", train_per_class=100, test_per_class=50, cnn_teacher_epochs=2,
                       cnn_student_epochs=2, vit_teacher_epochs=2, vit_student_epochs=2, cnn_batch_size=100,
                       vit_batch_size=100),
    # measured on a 2-core AMX CPU in bf16 (img/s): resnet18 train 119 / infer 479, resnet8 train 2160,
    # vit_tiny train 79 / infer 632, vit_student train 178; online KD pays the teacher pass too
    "cpu": LabConfig(preset="cpu", cnn_teacher_epochs=2, cnn_student_epochs=5, vit_teacher_epochs=2,
                     vit_student_epochs=1, eval_every=0),
    "full": LabConfig(preset="full", cnn_teacher_epochs=100, cnn_student_epochs=200, vit_teacher_epochs=200,
                      vit_student_epochs=200, cnn_batch_size=512, vit_batch_size=512, eval_every=5),
}
