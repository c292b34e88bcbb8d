"""Run configurations: one dataclass per entry point; CLI flags are generated from these fields.

A field left at None takes its value from the model family's recipe (RECIPES), so a CLI
default never overrides a recipe default; the resolved values are saved with every run.
"""
from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Literal, Optional

from .augment import AugmentSpec
from .augment.recipes import RECIPES as AUG_RECIPES, apply_recipe
from .flags import explained
from .machine import launcher_accumulation

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DatasetName = Literal["cifar10", "cifar100"]
Tracker = Literal["none", "tensorboard", "wandb", "mlflow", "aim", "all"]


def check(flag: str, value, ok: bool, rule: str) -> None:
    """Refuse a flag's value at start-up with one sentence naming the flag and what it must be."""
    if not ok:
        raise ValueError(f"--{flag.replace('_', '-')} must be {rule}, got {value!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_numbers(cfg, prefix: str = "") -> None:
    """Every whole-number field a whole number and every other numeric field finite, nested configs (augment)
    included, whether set by flags, the Python API or a saved config: the ranges are each entry point's checks."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if is_dataclass(value):
            check_numbers(value, name + ".")
            continue
        kind = _numeric_kind(hints[f.name])
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if kind == "int" and v is not None and not (isinstance(v, int) and not isinstance(v, bool)):
                check(name, value, False, "whole numbers" if isinstance(value, tuple) else "a whole number")
            if kind == "float" and v is not None and not _finite(v):
                check(name, value, False, "finite numbers" if isinstance(value, tuple) else "a finite number")


def _numeric_kind(t) -> str | None:
    """'int' or 'float' for a numeric field's type (Optional and tuples of them included), else None."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        kinds = {_numeric_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is tuple:
        return _numeric_kind(args[0]) if args else None
    return {int: "int", float: "float"}.get(t)


def check_int(cfg, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    check(name, value, isinstance(value, int) and value >= minimum, f"a whole number >= {minimum}")


def check_float(cfg, name: str, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = True) -> None:
    """None passes (the recipe's value is used); else finite and inside the interval."""
    value = getattr(cfg, name)
    if value is None:
        return
    ok = _finite(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    check(name, value, ok, f"a finite number in {lo}{low:g}, {high:g}{hi}" if high is not None
          else f"a finite number {'>' if low_open else '>='} {low:g}")


def check_augment(spec) -> None:
    check("augment.view", spec.view, spec.view in ("cifar", "rrc"), "cifar or rrc")
    check("augment.pad_mode", spec.pad_mode, spec.pad_mode in ("reflect", "zeros"), "reflect or zeros")
    check("augment.padding", spec.padding, spec.padding >= 0, "a whole number >= 0")
    check("augment.crop_size", spec.crop_size, spec.crop_size >= 1, "a whole number >= 1")
    check("augment.std", spec.std, all(_finite(s) and s > 0 for s in spec.std), "three finite numbers > 0")
    check("augment.mean", spec.mean, all(_finite(m) for m in spec.mean), "three finite numbers")
    check("augment.eval_size", spec.eval_size, isinstance(spec.eval_size, int) and spec.eval_size >= 0,
          "a whole number >= 0 (0: the training resolution)")
    check("augment.crop_fraction", spec.crop_fraction, _finite(spec.crop_fraction) and 0 < spec.crop_fraction <= 1,
          "a number in (0, 1]")
    (s0, s1), (r0, r1) = spec.scale, spec.ratio
    check("augment.scale", spec.scale, all(map(_finite, spec.scale)) and 0 < s0 <= s1 <= 1, "two numbers 0 < MIN <= MAX <= 1")
    check("augment.ratio", spec.ratio, all(map(_finite, spec.ratio)) and 0 < r0 <= r1, "two numbers 0 < MIN <= MAX")
    check_policies(spec)


def check_policies(spec) -> None:
    check("augment.policy", spec.policy, spec.policy in ("none", "randaugment", "trivialaugment"),
          "none, randaugment or trivialaugment")
    check("augment.policy_ops", spec.policy_ops, isinstance(spec.policy_ops, int) and spec.policy_ops >= 1,
          "a whole number >= 1")
    check("augment.policy_magnitude", spec.policy_magnitude,
          isinstance(spec.policy_magnitude, int) and 0 <= spec.policy_magnitude <= 30, "a whole number in 0..30")
    for name in ("mixup", "cutmix"):
        value = getattr(spec, name)
        check(f"augment.{name}", value, _finite(value) and value >= 0, "a number >= 0 (Beta's alpha; 0: off)")
    for name in ("mix_prob", "switch_prob", "erasing"):
        value = getattr(spec, name)
        check(f"augment.{name}", value, _finite(value) and 0 <= value <= 1, "a probability in [0, 1]")
    (a0, a1), (r0, r1) = spec.erasing_area, spec.erasing_ratio
    check("augment.erasing_area", spec.erasing_area, all(map(_finite, spec.erasing_area)) and 0 < a0 <= a1 < 1,
          "two numbers 0 < MIN <= MAX < 1")
    check("augment.erasing_ratio", spec.erasing_ratio, all(map(_finite, spec.erasing_ratio)) and 0 < r0 <= r1,
          "two numbers 0 < MIN <= MAX")


def resolved_store_size(spec, store_size: int) -> int:
    """The longest side images are stored at: the flag, else for the rrc view the resize-then-crop size of the
    larger of the train and eval resolutions (256 for 224, timm's crop_pct 0.875), else their own size (0)."""
    if store_size:
        return store_size
    if spec.view == "rrc":
        return int(round(max(spec.crop_size, spec.eval_resolution) / spec.crop_fraction))
    return 0


def check_data_flags(cfg) -> None:
    if cfg.store_size is not None:  # None: taken from elsewhere (a cache build's teacher)
        check_int(cfg, "store_size", 0)
    check_int(cfg, "data_workers", 0)
    check("data_tier", cfg.data_tier, cfg.data_tier in ("auto", "device", "stream"), "auto, device or stream")
    check_float(cfg, "data_budget_gb", 0.0)


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "aim": ("aim",)}


def check_tracker(log_with: str) -> None:
    """--log-with a tracker whose package is missing stops at start-up (Accelerate would only warn and train on)."""
    import importlib.util

    packages = TRACKER_PACKAGES.get(log_with, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise ValueError(f"--log-with {log_with}: the {packages[0]} package is not installed. pip install "
                         f"{packages[0]} (and log in, where it needs it), or drop --log-with.")


def check_grid(alphas, taus, alpha_flag: str = "alphas", tau_flag: str = "taus") -> None:
    check(alpha_flag, alphas, len(alphas) > 0 and all(_finite(a) and 0 <= a <= 1 for a in alphas),
          "one or more numbers in [0, 1]")
    check(tau_flag, taus, len(taus) > 0 and all(_finite(t) and t > 0 for t in taus), "one or more numbers > 0")


# (alpha, tau) when --alpha / --tau are not given. kd (and fitnets, whose KD term is kd's): the best point of an
# alpha x tau grid on CIFAR-10 (1,000 images per class, ResNet-20 -> ResNet-8) and on a 64 px folder (timm ResNet-18 ->
# ResNet-8, RandomResizedCrop), 8 epochs, 2 seeds (README "Defaults"); deit: DeiT's 0.5 (no temperature); dkd: its
# paper's CIFAR temperature (its CE weight is 1, alpha unused)
DIST_TIMEOUT_S = 1800.0  # torch's own default for gloo: long enough for any step the main process does alone
KD_DEFAULTS = (0.1, 2.0)
METHOD_DEFAULTS = {"deit": (0.5, 4.0), "dkd": (0.1, 4.0)}


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


@explained
@dataclass
class TrainConfig:
    """Train one model with cross-entropy on CIFAR-style data: a teacher, or a student without KD."""

    model: str = "resnet8"
    """A registered model (resnet18, resnet8, resnet20, vit_tiny, vit_student) or a library model:
    timm:NAME, torchvision:NAME, with @SIZE to resize the input on the device (timm:vit_tiny_patch16_224@224);
    `kdfast models`."""
    name: Optional[str] = None
    """Checkpoint name in out_dir (NAME.pth, .safetensors, .json, .metrics.jsonl); default: the model name."""
    out_dir: str = "models_saved"
    """Where the run's checkpoint, metrics and resumable state are written."""
    dataset: DatasetName = "cifar10"
    """Which torchvision dataset a torchvision folder (or the download) holds; also picks the normalization."""
    data: Optional[str] = None
    """Data source: a torchvision CIFAR folder, or a folder / .tar.gz with train/<class>/* and test/<class>/*.
    Default: $KDFAST_DATA, else ./data, where the dataset is downloaded when missing."""
    download: bool = False
    """Also download into an explicit --data folder when the dataset is missing there (./data always does)."""
    cache_dir: str = "cache"
    """Where decoded datasets (and teacher-logit caches) are kept."""
    train_per_class: int = 0
    """Use only the first N training images of each class (0 = all)."""
    test_per_class: int = 0
    """Use only the first N test images of each class (0 = all)."""
    val_per_class: int = 0
    """Hold out N training images of each class as a validation split (before --train-per-class is taken from the
    rest): the per-epoch metrics and a sweep's choice of its best point use it, the test set is evaluated once, at
    the end (0: no validation split; the per-epoch metrics are then the test set's)."""
    val_seed: int = 0
    """Which images the validation split holds: a class-balanced draw fixed by this seed (not by --seed, so the runs
    of a sweep share one split)."""
    store_size: int = 0
    """Longest side, in pixels, of images as stored (larger ones are reduced, keeping their aspect; 0: auto: for
    --augment.view rrc the eval crop's resize size, round(max(crop, eval size) / crop fraction), else their own size)."""
    data_tier: Literal["auto", "device", "stream"] = "auto"
    """device: every image decoded once and held in memory (fastest); stream: kept encoded in a memory-mapped file and
    decoded per batch by --data-workers; auto: device when the decoded images fit --data-budget-gb."""
    data_budget_gb: float = 0.0
    """Memory the device tier may take, in GB (0: half the device's free memory; host memory on a CPU)."""
    data_workers: int = 2
    """Background processes decoding the streamed tier's batches (0: in the training process)."""
    epochs: int = 30
    """Training epochs (passes over the training set)."""
    batch_size: int = 256
    """Global batch size: every optimizer step sees this many images, split evenly across processes and
    --grad-accum micro-batches (the last incomplete batch of an epoch is dropped)."""
    grad_accum: int = 0
    """Gradient accumulation: micro-batches per optimizer step, through Accelerate, so a global batch tuned on N
    devices runs on fewer (0: $ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1)."""
    eval_batch_size: int = 500
    """Images per evaluation batch (global)."""
    eval_every: int = 1
    """Evaluate every N epochs, on the validation split if there is one, else on the test set (the last epoch
    always; 0: the last only)."""
    recipe: Literal["auto", "cnn", "vit"] = "auto"
    """Optimizer/schedule family; auto = the model's family."""
    optimizer: Optional[Literal["sgd", "adamw"]] = None
    """sgd (Nesterov) or adamw. Default: the recipe's (cnn: sgd, vit: adamw)."""
    lr: Optional[float] = None
    """Peak learning rate. Default: the recipe's (cnn 0.1, vit 1e-3), scaled by --batch-size / 256."""
    weight_decay: Optional[float] = None
    """Weight decay, on weights only (not biases, norms, embeddings). Default: the recipe's (cnn 5e-4, vit 0.05)."""
    momentum: Optional[float] = None
    """SGD momentum, or AdamW's beta1. Default: the recipe's (0.9)."""
    schedule: Optional[Literal["onecycle", "cosine"]] = None
    """Learning-rate schedule after the warm-up: onecycle (linear to 0) or cosine. Default: the recipe's (cnn
    onecycle, vit cosine)."""
    warmup: Optional[float] = None
    """Fraction of all steps spent warming up linearly from 0. Default: the recipe's (cnn 0.15, vit 0.1)."""
    grad_clip: Optional[float] = None
    """Maximum gradient norm (0: off). Default: the recipe's (cnn off, vit 1.0)."""
    label_smoothing: Optional[float] = None
    """Label smoothing of the hard-label CE. Default: --aug-recipe's if it has one, else the recipe's (cnn 0, vit
    0.1)."""
    pretrained: bool = False
    """Start from the library's pretrained weights (timm: Hugging Face hub, torchvision: torch hub; downloaded
    once, then read from the local cache)."""
    precision: Precision = "auto"
    """auto = bf16 on GPUs that have it (fp16 on older ones); on CPUs bf16 only with AMX/AVX512-BF16, else fp32."""
    compile: bool = False
    """torch.compile the model being trained."""
    seed: int = 0
    """Run seed: the initial weights, the batch order and the augmentation seed of each epoch."""
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    """The training views and their policies (saved with the run and every cache; see README "Data")."""
    aug_recipe: Literal[tuple(AUG_RECIPES)] = "none"  # type: ignore[valid-type]
    """A named augmentation recipe: its policies fill the --augment fields left at their defaults, and its label
    smoothing --label-smoothing if unset. none; cct (RandAugment m9, mixup 0.8, CutMix 1.0, smoothing 0.1); deit
    (cct + random erasing 0.25); trivialaugment (TrivialAugmentWide + erasing 0.25); mixup (alpha 0.2).
    `kdfast recipes` lists them with their sources."""
    ema: float = 0.0
    """Keep an exponential moving average of the weights with this decay per step (0: off; e.g. 0.999): it is
    what is evaluated and exported, and it is in the resumable state."""
    tta: Literal["none", "flip", "translate"] = "none"
    """Test-time augmentation at evaluation: flip (mean of the logits of the image and its mirror), translate
    (airbench's: flip, plus the mirrored pair shifted by one pixel each way, weights 1/2, 1/4, 1/4)."""
    resume: bool = False
    """Continue an interrupted run from its saved state (out_dir/.state/NAME); refused if its config differs."""
    fresh: bool = False
    """Start over: discard an interrupted run's saved state, and replace a finished run of the same name trained with
    another config (without it, both are refused)."""
    auto_resume: bool = False
    """Resume by itself when the job is a restart (torchrun --max-restarts, a requeued Slurm job) and a saved state
    exists; a restart of a finished run keeps it. A first start behaves as without it (a saved state is refused)."""
    checkpoint_every: int = 0
    """Also save the resumable state every N optimizer steps (0: after every epoch only)."""
    dist_timeout: float = DIST_TIMEOUT_S
    """Several processes: seconds one waits in a collective for the others before the job stops, naming the rank
    lost. Keep it above the longest step the main process does alone (decoding a large folder)."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (statistics over the global batch) before training: GPUs with
    NCCL only (torch has no SyncBatchNorm on CPU)."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    log_with: Tracker = "none"
    """Also log each epoch's metrics and the resolved config to experiment trackers through Accelerate
    (tensorboard writes to OUT_DIR/logs/NAME; wandb, mlflow, aim need their package and login)."""

    def __post_init__(self):
        self.grad_accum = self.grad_accum or launcher_accumulation()
        self.augment = apply_recipe(self.augment, self.aug_recipe).for_dataset(self.dataset)
        recipe_smoothing = AUG_RECIPES[self.aug_recipe].label_smoothing
        if self.label_smoothing is None and recipe_smoothing is not None:
            self.label_smoothing = recipe_smoothing

    @property
    def stored_size(self) -> int:
        return resolved_store_size(self.augment, self.store_size)

    @property
    def run_name(self) -> str:
        return self.name or self.model.replace(":", "-").replace("@", "-")

    def validate(self) -> None:
        """Every numeric flag checked before any work: one sentence naming the flag."""
        check_numbers(self)
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            check_int(self, name, 1)
        for name in ("train_per_class", "test_per_class", "val_per_class", "val_seed", "eval_every",
                     "checkpoint_every", "seed"):
            check_int(self, name, 0)
        check_float(self, "lr", 0.0, low_open=True)
        check_float(self, "weight_decay", 0.0)
        check_float(self, "momentum", 0.0, 1.0)
        check_float(self, "warmup", 0.0, 1.0)
        check_float(self, "grad_clip", 0.0)
        check_float(self, "label_smoothing", 0.0, 1.0)
        check_float(self, "ema", 0.0, 1.0)
        check_augment(self.augment)
        check_data_flags(self)
        check_tracker(self.log_with)
        check_float(self, "dist_timeout", 1.0)
        if self.fresh and (self.resume or self.auto_resume):
            flag = "--resume" if self.resume else "--auto-resume"
            raise ValueError(f"{flag} and --fresh exclude each other: {flag} continues a saved state, "
                             "--fresh discards it")

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


@explained
@dataclass
class DistillConfig(TrainConfig):
    """Train a student with knowledge distillation from a trained teacher: online, or from a teacher-logit cache."""

    teacher: Optional[str] = None
    """Teacher checkpoint (.pth or .safetensors with its .json beside it), or a model name with --teacher-weights /
    --teacher-pretrained: run online on every batch. With --teacher-cache it is optional, and if given it must be the
    teacher the cache was built from. Default: none (then --teacher-cache is needed)."""
    teacher_weights: Optional[str] = None
    """With --teacher a model name (resnet18, timm:NAME, torchvision:NAME) instead of a checkpoint: its weights, a
    plain state dict (.pth or .safetensors, trained outside kdfast) for a head of the data's number of classes.
    Default: none (--teacher is a checkpoint)."""
    teacher_pretrained: bool = False
    """With --teacher a library model name: the library's pretrained weights (downloaded once)."""
    alpha: Optional[float] = None
    """Weight of the hard-label CE; (1-alpha) weighs the soft KL term. Default: 0.1 for kd and fitnets (the best
    point of grids measured on two datasets, README "Defaults"), 0.5 for deit (DeiT's); dkd does not use it."""
    tau: Optional[float] = None
    """Softmax temperature of the soft targets. Default: 2 for kd and fitnets (measured, README "Defaults"), 4 for
    dkd (its paper's CIFAR setting)."""
    teacher_cache: Optional[str] = None
    """HDF5 teacher-logit cache (kdfast cache build): no teacher pass; epoch e trains on slot e mod S's views. The
    data flags left unset are taken from it (data, subset, validation split, views). Default: none (teacher online)."""
    cache_slots: int = 0
    """Use only the first N slots of the cache (0 = all)."""
    method: str = "kd"
    """Distillation method: kd (Hinton), dkd (decoupled KD), fitnets (hints + KD, teacher online), deit (DeiT's
    distillation token, student vit_student_distilled: --alpha weighs the class head); `kdfast methods`."""
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

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is None:
            self.alpha = METHOD_DEFAULTS.get(self.method, KD_DEFAULTS)[0]
        if self.tau is None:
            self.tau = METHOD_DEFAULTS.get(self.method, KD_DEFAULTS)[1]

    def validate(self) -> None:
        super().validate()
        check_float(self, "alpha", 0.0, 1.0, high_open=False)
        check_float(self, "tau", 0.0, low_open=True)
        check_int(self, "cache_slots", 0)
        check_float(self, "dkd_alpha", 0.0)
        check_float(self, "dkd_beta", 0.0)
        check_float(self, "dkd_warmup", 0.0, 1.0, high_open=False)
        check_float(self, "hint_weight", 0.0)
        check_float(self, "hint_epochs", 0.0, 1.0)
        if not self.teacher and not self.teacher_cache:
            raise ValueError("distillation needs a teacher: --teacher CKPT (run online) or --teacher-cache FILE "
                             "(kdfast cache build)")


@explained
@dataclass
class EvaluateConfig:
    """Evaluate a saved checkpoint on the test set."""

    checkpoint: str
    """A .pth or .safetensors checkpoint with its .json beside it."""
    data: Optional[str] = None
    """Data source (default: the one recorded in the checkpoint's .json, else $KDFAST_DATA or ./data)."""
    cache_dir: str = "cache"
    """Where decoded datasets are kept."""
    test_per_class: Optional[int] = None
    """Test subset per class (default: as recorded in the checkpoint's .json)."""
    batch_size: Optional[int] = None
    """Default: the eval batch size recorded in the checkpoint's .json."""
    precision: Optional[Precision] = None
    """Default: the precision the checkpoint was evaluated with."""
    data_tier: Literal["auto", "device", "stream"] = "auto"
    """device, stream or auto (by --data-budget-gb); see kdfast train --help."""
    data_budget_gb: float = 0.0
    """Memory the device tier may take, in GB (0: half the device's free memory)."""
    data_workers: int = 2
    """Background processes decoding the streamed tier's batches."""
    store_size: int = 0
    """Default (0): as the checkpoint's run stored its images."""
    tta: Optional[Literal["none", "flip", "translate"]] = None
    """Test-time augmentation (default: as the checkpoint's run evaluated it); see kdfast train --help."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        check_numbers(self)
        check_data_flags(self)
        if self.test_per_class is not None:
            check_int(self, "test_per_class", 0)
        if self.batch_size is not None:
            check_int(self, "batch_size", 1)


@explained
@dataclass
class LabConfig:
    """The whole course lab: two teachers, two baseline students, two KD students, then report.json.

    Presets (--preset): smoke (minutes on any CPU: a class-balanced subset, 2 epochs), cpu (KD that visibly
    helps on a 2-core AMX CPU, 85 minutes: a fifth of the data, two seeds of KD against no KD), full (the real
    recipe for one GPU), imagenet (your own images at 224, ImageNet-style: --data a folder or Hugging Face dataset;
    timm ResNet-50 -> ResNet-18 and DeiT-S -> DeiT-Ti, pretrained teachers). Any field below overrides the preset's value.
    """

    preset: Literal["smoke", "cpu", "full", "imagenet"] = "smoke"
    """The named set of defaults below (see the class description); the smoke preset writes under runs/smoke/."""
    dataset: DatasetName = "cifar10"
    """Which torchvision dataset a torchvision folder (or the download) holds; also picks the normalization."""
    data: Optional[str] = None
    """Data source (default: $KDFAST_DATA, else ./data, where the dataset is downloaded when missing)."""
    download: bool = False
    """Also download into an explicit --data folder when the dataset is missing there."""
    cache_dir: str = "cache"
    """Where decoded datasets and the pairs' teacher-logit caches (<pair>_teacher.h5) are kept."""
    out_dir: str = "models_saved"
    """Where the six checkpoints (and any sweep) are written."""
    report: str = "report.json"
    """The report; report.md and its figures go beside it. Labs of other pairs merge theirs into the same file."""
    pairs: tuple[Literal["cnn", "vit"], ...] = ("cnn", "vit")
    """Which teacher -> student pairs to run."""
    train_per_class: int = 0
    """Use only the first N training images of each class (0 = all)."""
    test_per_class: int = 0
    """Use only the first N test images of each class (0 = all)."""
    val_per_class: int = 0
    """Hold out N training images per class as a validation split for every run (see kdfast train --help): the
    per-epoch metrics use it; report.json keeps the test accuracies and adds the validation ones in its details."""
    val_seed: int = 0
    """Seed of the validation split's draw."""
    grad_accum: int = 0
    """Gradient accumulation of every run (see kdfast train --help)."""
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
    alpha: Optional[float] = None
    """KD: weight of the hard-label CE. Default: the method's (kd 0.1; see kdfast distill --help)."""
    tau: Optional[float] = None
    """KD: temperature. Default: the method's (kd 2; see kdfast distill --help)."""
    eval_every: int = 1
    """Evaluate every N epochs (the last always); see kdfast train --help."""
    eval_batch_size: int = 500
    """Images per evaluation batch."""
    precision: Precision = "auto"
    """Precision of every run (see kdfast train --help)."""
    compile: bool = False
    """torch.compile every model trained."""
    seed: int = 0
    """Run seed of every run (and of the caches' slots)."""
    online: bool = False
    """Distil with the teacher run on every batch instead of from a teacher-logit cache (one slot per epoch)."""
    fresh: bool = False
    """Retrain every run; by default finished runs with the same config are kept and interrupted ones resumed."""
    checkpoint_every: int = 0
    """Also save each run's resumable state every N optimizer steps (0: after every epoch only)."""
    dist_timeout: float = DIST_TIMEOUT_S
    """Several processes: seconds one waits for the others in a collective (see kdfast train --help)."""
    methods: tuple[str, ...] = ()
    """Extra KD students, one per method (dkd, fitnets, ...), reported under each pair's details."""
    logit_std: bool = False
    """Logit standardization for the KD student(s)."""
    sweep_alphas: tuple[float, ...] = ()
    """With --sweep-taus: after each pair's runs, an alpha x tau sweep of its student from the pair's logit cache
    (kdfast sweep, with the no-KD baseline per seed) in OUT_DIR/sweep_<pair>, shown in report.md. The lab's own
    students are its points of the lab's --seed (and --alpha, --tau): copied there, not trained again."""
    sweep_taus: tuple[float, ...] = ()
    """Temperatures of the sweep (with --sweep-alphas)."""
    sweep_seeds: int = 2
    """Seeds per sweep point (0..N-1)."""
    progress: bool = True
    """Show progress bars (main process only)."""
    log_with: Tracker = "none"
    """Experiment trackers for every run (see kdfast train --help)."""
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    """The views of every run and cache (see kdfast train --help); the imagenet preset sets --augment.view rrc at 224."""
    cnn_aug_recipe: Literal[tuple(AUG_RECIPES)] = "none"  # type: ignore[valid-type]
    """Named augmentation recipe of the CNN pair's runs and cache (see kdfast train --help, `kdfast recipes`)."""
    vit_aug_recipe: Literal[tuple(AUG_RECIPES)] = "none"  # type: ignore[valid-type]
    """Named augmentation recipe of the ViT pair's runs and cache; the full preset's is cct, the imagenet preset's deit."""
    ema: float = 0.0
    """EMA decay of every run's weights (0: off; see kdfast train --help)."""
    tta: Literal["none", "flip", "translate"] = "none"
    """Test-time augmentation of every evaluation (see kdfast train --help)."""
    store_size: int = 0
    """Longest side of images as stored (0: auto; see kdfast train --help)."""
    data_tier: Literal["auto", "device", "stream"] = "auto"
    """device, stream or auto (by --data-budget-gb); see kdfast train --help."""
    data_budget_gb: float = 0.0
    """Memory the device tier may take, in GB (0: half the device's free memory)."""
    data_workers: int = 2
    """Background processes decoding the streamed tier's batches."""

    def validate(self) -> None:
        check_numbers(self)
        check_augment(self.augment)
        check_data_flags(self)
        check_tracker(self.log_with)
        check_float(self, "ema", 0.0, 1.0)
        check_float(self, "dist_timeout", 1.0)
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
        check_int(self, "eval_batch_size", 1)
        for name in ("train_per_class", "test_per_class", "val_per_class", "val_seed", "eval_every",
                     "checkpoint_every", "seed", "grad_accum"):
            check_int(self, name, 0)
        check_float(self, "alpha", 0.0, 1.0, high_open=False)
        check_float(self, "tau", 0.0, low_open=True)
        check("pairs", self.pairs, len(self.pairs) > 0, "one or more of cnn, vit")


@explained
@dataclass
class SweepConfig:
    """An alpha x tau grid of KD students from one teacher-logit cache, each point with several seeds, plus the no-KD
    baseline per seed. Finished points are kept: run the same command again to continue an interrupted sweep."""

    pair: Literal["cnn", "vit"] = "cnn"
    """Picks the defaults of --model (resnet8 / vit_student) and --teacher-cache (cache/<pair>_teacher.h5, the lab's)."""
    model: Optional[str] = None
    """The student model. Default: the pair's (resnet8, vit_student)."""
    teacher_cache: Optional[str] = None
    """The teacher-logit cache every point reads; its data, subset, validation split and views are the sweep's.
    Default: the pair's lab cache, cache/<pair>_teacher.h5."""
    alphas: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Weights of the hard-label CE to try."""
    taus: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Temperatures to try."""
    seeds: int = 2
    """Seeds 0..N-1 at every point (initialisation and batch order; the views and teacher logits come from the cache)."""
    method: str = "kd"
    """A method that reads teacher logits (kd, dkd); `kdfast methods`."""
    logit_std: bool = False
    """Logit standardization at every point."""
    epochs: int = 30
    """Epochs of every run."""
    batch_size: int = 256
    """Global batch size of every run."""
    eval_batch_size: int = 500
    """Images per evaluation batch."""
    eval_every: int = 0
    """Test every N epochs (the last epoch always; its accuracy is the one reported)."""
    data: Optional[str] = None
    """Default: the data the cache was built on."""
    cache_dir: str = "cache"
    """Where decoded datasets are kept."""
    train_per_class: Optional[int] = None
    """Default: the subset the cache was built on."""
    test_per_class: Optional[int] = None
    """Default: the test subset the cache was built on."""
    data_tier: Literal["auto", "device", "stream"] = "auto"
    """device, stream or auto (by --data-budget-gb); see kdfast train --help. The stored size comes from the cache."""
    data_budget_gb: float = 0.0
    """Memory the device tier may take, in GB (0: half the device's free memory)."""
    data_workers: int = 2
    """Background processes decoding the streamed tier's batches."""
    precision: Precision = "auto"
    """Precision of every run (see kdfast train --help)."""
    out_dir: str = "runs/sweep"
    """Every run's checkpoint and metrics, and sweep.json, sweep.csv, sweep.md."""
    fresh: bool = False
    """Retrain every point (default: finished points are kept, an interrupted one resumes)."""
    checkpoint_every: int = 0
    """Also save each run's resumable state every N optimizer steps (0: after every epoch only)."""
    dist_timeout: float = DIST_TIMEOUT_S
    """Several processes: seconds one waits for the others in a collective (see kdfast train --help)."""
    progress: bool = True
    """Show progress bars (main process only)."""
    log_with: Tracker = "none"
    """Experiment trackers for every run (see kdfast train --help)."""
    grad_accum: int = 0
    """Gradient accumulation of every run (see kdfast train --help)."""
    together: Literal["auto", "on", "off"] = "auto"
    """Train the KD points of one seed together in one pass (kdfast.group; same batches, each its own loss, metrics
    and checkpoint). auto: on a GPU; off on a CPU, where it was measured slower for both students (README)."""
    group_size: int = 0
    """At most this many students per pass (0: all the points of a seed)."""
    cache_slots: tuple[int, ...] = (0,)
    """Cache slots to train every point with (0: all): several values add sweep_slots.png, accuracy against slots."""

    def validate(self) -> None:
        check_numbers(self)
        check_int(self, "group_size", 0)
        check_float(self, "dist_timeout", 1.0)
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) is not None:
                check_int(self, name, 0)
        check_int(self, "grad_accum", 0)
        check_tracker(self.log_with)
        check_int(self, "data_workers", 0)
        check_float(self, "data_budget_gb", 0.0)
        check("cache_slots", self.cache_slots, len(self.cache_slots) > 0 and all(
            isinstance(s, int) and s >= 0 for s in self.cache_slots), "one or more whole numbers >= 0 (0: all)")
        for name in ("seeds", "epochs", "batch_size", "eval_batch_size"):
            check_int(self, name, 1)
        for name in ("eval_every", "checkpoint_every"):
            check_int(self, name, 0)
        check_grid(self.alphas, self.taus)
        for name in ("alphas", "taus", "cache_slots"):  # a repeated value would be counted as more seeds
            values = getattr(self, name)
            check(name, values, len(set(values)) == len(values), "given without repeats")


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
                          augment=AugmentSpec(view="rrc", crop_size=224), vit_aug_recipe="deit"),
    # the ViT pair with CCT's CIFAR recipe (RandAugment m9, mixup 0.8, CutMix 1.0, label smoothing 0.1; AdamW,
    # warm-up, cosine are the ViT family's); every evaluation with flip TTA. Not measured at this size here
    # alpha 0.5, tau 4: what its H100 results in report.json were measured with
    "full": LabConfig(preset="full", alpha=0.5, tau=4.0, cnn_teacher_epochs=100, cnn_student_epochs=200, vit_teacher_epochs=200,
                      vit_student_epochs=200, cnn_batch_size=512, vit_batch_size=512, eval_every=5,
                      vit_aug_recipe="cct", tta="flip"),
}
