"""The course lab's config and its named presets: the flags shared with train, distill and cache build apply to every
run of the lab; the pair fields (--cnn-teacher, --vit-student-epochs, ...) to one pair's runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..augment import AugmentSpec
from ..augment.recipes import RECIPES as AUG_RECIPES
from ..flags import explained
from .checks import check, check_float, check_grid, check_int
from .commands import LabReportConfig
from .data import DataConfig
from .evaluation import EvalConfig
from .kd import KDConfig
from .run import OutputConfig, RunConfig, RuntimeConfig
from .training import TrainingConfig
from .view import ViewConfig


@explained(hide=("name", "resume", "auto_resume", "method"))
@dataclass
class LabConfig(RunConfig, RuntimeConfig, EvalConfig, TrainingConfig, KDConfig, ViewConfig, DataConfig, OutputConfig,
                LabReportConfig):
    """The whole course lab: two teachers, two baseline students, two KD students, then report.json.

    Presets (--preset): smoke (minutes on any CPU: a class-balanced subset, 2 epochs), cpu (KD that visibly
    helps on a 2-core AMX CPU, 85 minutes: a fifth of the data, two seeds of KD against no KD), full (the real
    recipe for one GPU), imagenet (your own images at 224, ImageNet-style: --data a folder or Hugging Face dataset;
    timm ResNet-50 -> ResNet-18 and DeiT-S -> DeiT-Ti, pretrained teachers). Any flag overrides the preset's value;
    the flags shared with kdfast train / distill / cache build apply to every run of the lab.
    """

    preset: Literal["smoke", "cpu", "full", "imagenet"] = "smoke"
    """The named set of defaults below (see the class description); the smoke preset writes under runs/smoke/."""
    pairs: tuple[Literal["cnn", "vit"], ...] = ("cnn", "vit")
    """Which teacher -> student pairs to run."""
    cnn_teacher: str = "resnet18"
    """The CNN pair's teacher: a registered or library model (`kdfast models`)."""
    cnn_student: str = "resnet8"
    """The CNN pair's student."""
    vit_teacher: str = "vit_tiny"
    """Registered or library model (`kdfast models`); vit_tiny_224 is ViT-Tiny at its pretraining size (16x16
    patches, input resized to 224 on the device): with --vit-teacher-pretrained and a small --vit-teacher-lr it
    fine-tunes timm's ImageNet weights."""
    vit_student: str = "vit_student"
    """The ViT pair's student."""
    cnn_teacher_pretrained: bool = False
    """Start the CNN teacher from its library's pretrained weights (downloaded once)."""
    vit_teacher_pretrained: bool = False
    """Start the ViT teacher from timm's pretrained weights (downloaded once): a fine-tune."""
    cnn_teacher_lr: Optional[float] = None
    """Default: the CNN recipe's (0.1 per 256 images)."""
    vit_teacher_lr: Optional[float] = None
    """Default: the ViT recipe's (1e-3 per 256 images); a fine-tune wants about 1e-4."""
    cnn_teacher_epochs: int = 30
    """Epochs of the CNN teacher."""
    cnn_student_epochs: int = 30
    """Epochs of each CNN student (and slots of its logit cache)."""
    vit_teacher_epochs: int = 30
    """Epochs of the ViT teacher."""
    vit_student_epochs: int = 30
    """Epochs of each ViT student (and slots of its logit cache)."""
    cnn_batch_size: int = 256
    """Global batch size of the CNN pair's runs."""
    vit_batch_size: int = 256
    """Global batch size of the ViT pair's runs."""
    online: bool = False
    """Distil with the teacher run on every batch instead of from a teacher-logit cache (one slot per epoch)."""
    methods: tuple[str, ...] = ()
    """Extra KD students, one per method (dkd, fitnets, ...), reported under each pair's details."""
    seeds: int = 1
    """Train each pair's two students (no KD, KD) with N seeds: --seed and the N - 1 after it (those in
    OUT_DIR/seeds/). report.md compares their means and spreads; the six checkpoints and report.json's accuracies
    are --seed's."""
    sweep_alphas: tuple[float, ...] = ()
    """With --sweep-taus: after each pair's runs, an alpha x tau sweep of its student from the pair's logit cache
    (kdfast sweep, with the no-KD baseline per seed) in OUT_DIR/sweep_<pair>, shown in report.md. The lab's own
    students are its points of the lab's --seed (and --alpha, --tau): copied there, not trained again."""
    sweep_taus: tuple[float, ...] = ()
    """Temperatures of the sweep (with --sweep-alphas)."""
    sweep_seeds: int = 2
    """Seeds per sweep point (0..N-1)."""
    cnn_aug_recipe: Optional[Literal[tuple(AUG_RECIPES)]] = None  # type: ignore[valid-type]
    """Named augmentation recipe of the CNN pair's runs and cache (see kdfast train --help, `kdfast recipes`).
    Default: --aug-recipe."""
    vit_aug_recipe: Optional[Literal[tuple(AUG_RECIPES)]] = None  # type: ignore[valid-type]
    """Named augmentation recipe of the ViT pair's runs and cache; the full preset's is cct, the imagenet preset's
    deit. Default: --aug-recipe."""

    def __post_init__(self):
        # the views as given (the others filled with the defaults): each run resolves them with its pair's recipe
        self.augment = self.augment.filled()

    def check(self) -> None:
        check("sweep_taus", self.sweep_taus, bool(self.sweep_alphas) == bool(self.sweep_taus),
              "given together with --sweep-alphas (both or neither)")
        if self.sweep_alphas:
            check_grid(self.sweep_alphas, self.sweep_taus, "sweep_alphas", "sweep_taus")
            check_int(self, "sweep_seeds", 1)
            check("online", self.online, not self.online, "off when sweeping: a sweep reads the logit cache")
        for pair in ("cnn", "vit"):
            for role in ("teacher_epochs", "student_epochs", "batch_size"):
                check_int(self, f"{pair}_{role}", 1)
            check_float(self, f"{pair}_teacher_lr", 0.0, low_open=True)
        check("pairs", self.pairs, len(self.pairs) > 0, "one or more of cnn, vit")
        check_int(self, "seeds", 1)

    def resolve(self, recorded: dict) -> dict:
        # the views stay as given: each run resolves them with its pair's recipe
        return {"augment": self.augment}

    def pair_recipe(self, pair: str) -> str:
        return getattr(self, f"{pair}_aug_recipe") or self.aug_recipe


LAB_PRESETS = {
    # writes under runs/smoke/ (checkpoints, logit caches, report), never over a real lab's models_saved/ and report
    "smoke": LabConfig(preset="smoke", out_dir="runs/smoke/models_saved", report="runs/smoke/report.json",
                       cache_dir="runs/smoke/cache", train_per_class=100, test_per_class=50, cnn_teacher_epochs=2,
                       cnn_student_epochs=2, vit_teacher_epochs=2, vit_student_epochs=2, cnn_batch_size=100,
                       vit_batch_size=100),
    # measured on a 2-core AMX CPU in bf16 (img/s): resnet18 train 119 / infer 479, resnet8 train 2160,
    # vit_tiny train 79 / infer 632, vit_student train 178; online KD pays the teacher pass too
    # a class-balanced fifth of CIFAR-10 (1,000 train / 300 test images per class): teachers trained twice as many
    # epochs as their students, so they are clearly better; KD (alpha 0.1, tau 4: the best point of a 3x3 ResNet-8
    # sweep on this subset) against no KD over two seeds, with the lab's sweep (its seed-0 points are the lab's
    # runs). Measured on an idle 2-core AMX CPU: 5,123 s in all (teachers 1,446 s and 1,583 s)
    "cpu": LabConfig(preset="cpu", train_per_class=1000, test_per_class=300, cnn_teacher_epochs=12,
                     cnn_student_epochs=6, vit_teacher_epochs=10, vit_student_epochs=5, alpha=0.1, tau=4.0,
                     eval_every=1, sweep_alphas=(0.1,), sweep_taus=(4.0,), sweep_seeds=2),
    # your own images (an ImageNet-style folder or a Hugging Face dataset, --data), ImageNet-style at 224: a timm
    # ResNet-50 into ResNet-18 and DeiT-S into DeiT-Ti, teachers fine-tuned from their ImageNet weights (downloaded
    # once), students from scratch; RandomResizedCrop + flip, evaluation by resize + center crop 0.875 (timm's)
    "imagenet": LabConfig(preset="imagenet", cnn_teacher="timm:resnet50", cnn_student="timm:resnet18",
                          vit_teacher="timm:deit_small_patch16_224", vit_student="timm:deit_tiny_patch16_224",
                          cnn_teacher_pretrained=True, vit_teacher_pretrained=True, cnn_teacher_lr=0.01,
                          vit_teacher_lr=1e-4, cnn_teacher_epochs=30, vit_teacher_epochs=30, cnn_student_epochs=100,
                          vit_student_epochs=100, eval_every=5, eval_batch_size=250,
                          augment=AugmentSpec.not_given(view="rrc", crop_size=224), vit_aug_recipe="deit"),
    # the ViT pair with CCT's CIFAR recipe (RandAugment m9, mixup 0.8, CutMix 1.0, label smoothing 0.1; AdamW,
    # warm-up, cosine are the ViT family's); every evaluation with flip TTA. Not measured at this size here
    # alpha 0.5, tau 4: what its H100 results in report.json were measured with
    "full": LabConfig(preset="full", alpha=0.5, tau=4.0, cnn_teacher_epochs=100, cnn_student_epochs=200, vit_teacher_epochs=200,
                      vit_student_epochs=200, cnn_batch_size=512, vit_batch_size=512, eval_every=5,
                      vit_aug_recipe="cct", tta="flip"),
}
