"""`kdfast table`: teacher -> student pairs x methods x seeds under the KD tables' recipe, as one table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..flags import explained
from .checks import check, check_grid, check_int
from .data import DataConfig
from .evaluation import EvalConfig
from .run import OutputConfig, RunConfig, RuntimeConfig
from .training import TrainingConfig
from .view import ViewConfig

DKD_WARMUP = 20 / 240  # DKD's warm-up in the tables: 20 of 240 epochs (mdistiller's CIFAR-100 configs)


@explained(hide=("name", "resume", "auto_resume", "early_stop", "save_best"))
@dataclass
class TableConfig(RunConfig, RuntimeConfig, EvalConfig, TrainingConfig, ViewConfig, DataConfig, OutputConfig):
    """A KD table: for each TEACHER:STUDENT pair the teacher is trained (or reused), its logit cache built once, and
    the student trained alone (ce) and with each method, every cell with --seeds seeds, under the published tables'
    recipe (--recipe tables of kdfast train: SGD 0.05 at batch 64, x0.1 at 5/8, 3/4 and 7/8 of the epochs). Writes
    table.md, table.csv and table.json in --out-dir: last-epoch test accuracy, mean ± std over seeds, with the
    published CIFAR-100 number beside each cell. Run the same command again to continue: finished runs are kept."""

    pairs: tuple[str, ...] = ("resnet56:resnet20",)
    """TEACHER:STUDENT pairs of models (`kdfast models`: the zoo has the tables' resnet56, resnet32x4, wrn_40_2,
    vgg13, ...); a teacher given as a checkpoint (.pth) is reused instead of trained."""
    methods: tuple[str, ...] = ("kd", "dkd")
    """KD methods, one column each beside ce (the student alone, always trained): kd, dkd, and either with +ls
    (logit standardization), e.g. kd+ls."""
    seeds: int = 3
    """Seeds 0..N-1 of every student (initialisation and batch order)."""
    epochs: int = 240
    """Student epochs (the tables' 240; fewer keep the schedule's shape: x0.1 at the same fractions)."""
    teacher_epochs: Optional[int] = None
    """Teacher epochs. Default: --epochs."""
    batch_size: int = 64
    """Global batch size of every run (the tables' 64; the lr scales with it)."""
    alphas: tuple[float, ...] = (0.1,)
    """kd: weights of the hard-label CE to try (the tables' 0.1: CE 0.1, KL 0.9); several: chosen on validation."""
    taus: tuple[float, ...] = (4.0,)
    """Temperatures to try (the tables' 4 for kd and dkd); several: chosen on validation."""
    best_epoch: bool = False
    """Add the best epoch's test accuracy as an extra, labelled column: the epoch chosen on the validation split where
    there is one (--val-per-class), else the highest of every epoch's test accuracy (what several papers report: chosen
    on the test set, so optimistic; every epoch is then evaluated)."""

    def check(self) -> None:
        check("pairs", self.pairs, len(self.pairs) > 0 and all(
            len(p.split(":")) == 2 and all(p.split(":")) for p in self.pairs), "TEACHER:STUDENT, e.g. resnet56:resnet20")
        check("methods", self.methods, len(self.methods) > 0 and len(set(self.methods)) == len(self.methods),
              "one or more KD methods without repeats (kd, dkd, kd+ls, ...; ce is always trained)")
        for name in ("seeds", "epochs", "batch_size"):
            check_int(self, name, 1)
        check_int(self, "teacher_epochs", 1)
        check_grid(self.alphas, self.taus)

    def resolve(self, recorded: dict) -> dict:
        return {"out_dir": "runs/table"} if self.out_dir is None else {}
