"""Configuration in sections: each section owns its fields (their help, their checks, their resolution against what a
saved artifact recorded); each entry point's config embeds the sections it uses.

    checks      the one-sentence refusals every section uses
    section     Section: validate(), resolved(recorded), to_dict(); unset() and setting() fields
    data        SourceConfig, DataConfig: the source, subsets, validation split, stored size, tier
    view        ViewConfig: the views (--augment.*), the recipe, the seed
    optim       OptimConfig: epochs, batch size, the family recipe and its overrides
    training    ModelConfig (the model), TrainingConfig (accumulation, compile, EMA, SyncBatchNorm)
    evaluation  EvalConfig: how often, in which batches, with which TTA
    run         RuntimeConfig (precision, timeouts, progress), OutputConfig, RunConfig (resume, checkpoints, trackers)
    kd          TeacherConfig, TeacherCacheConfig, KDConfig (the method and its parameters)
    commands    the entry configs: train, distill, evaluate, predict, cache build / info / verify, sweep, import,
                report
    lab         LabConfig and its presets
    table       TableConfig: kdfast table's pairs, methods and the tables' schedule
"""
from .checks import check, check_float, check_grid, check_int, check_numbers, finite
from .commands import (DEFAULT_TEACHER, PAIR_DEFAULTS, BuildConfig, CheckpointConfig, DistillConfig, EvaluateConfig,
                       ImportConfig, InfoConfig, LabReportConfig, PredictConfig, ReportConfig, SweepConfig,
                       TrainConfig, VerifyConfig)
from .data import DataConfig, DatasetName, SourceConfig, resolved_store_size
from .evaluation import EvalConfig
from .kd import KD_DEFAULTS, METHOD_DEFAULTS, KDConfig, TeacherCacheConfig, TeacherConfig
from .lab import LAB_PRESETS, LabConfig
from .optim import RECIPES, OptimConfig, Recipe
from .run import DIST_TIMEOUT_S, OutputConfig, Precision, RunConfig, RuntimeConfig, Tracker, check_tracker
from .section import Section, names, pick, sections
from .table import TableConfig
from .training import ModelConfig, TrainingConfig
from .view import ViewConfig

# every entry point's config, by command (the tests walk them)
ENTRY_CONFIGS = {"train": TrainConfig, "distill": DistillConfig, "evaluate": EvaluateConfig, "cache build": BuildConfig,
                 "cache info": InfoConfig, "cache verify": VerifyConfig, "sweep": SweepConfig, "lab": LabConfig,
                 "import": ImportConfig, "report": ReportConfig, "predict": PredictConfig, "table": TableConfig}

__all__ = ["BuildConfig", "CheckpointConfig", "DEFAULT_TEACHER", "DIST_TIMEOUT_S", "DataConfig",
           "DatasetName", "DistillConfig", "ENTRY_CONFIGS", "EvalConfig", "EvaluateConfig", "ImportConfig",
           "InfoConfig", "KDConfig", "KD_DEFAULTS", "LAB_PRESETS", "LabConfig", "LabReportConfig",
           "METHOD_DEFAULTS", "ModelConfig", "OptimConfig", "OutputConfig", "PAIR_DEFAULTS", "Precision",
           "PredictConfig", "RECIPES", "Recipe", "ReportConfig", "RunConfig", "RuntimeConfig", "Section",
           "SourceConfig", "SweepConfig", "TableConfig", "TeacherCacheConfig", "TeacherConfig", "Tracker", "TrainConfig",
           "TrainingConfig", "VerifyConfig", "ViewConfig", "check", "check_float", "check_grid",
           "check_int", "check_numbers", "check_tracker", "finite", "names", "pick", "resolved_store_size",
           "sections"]
