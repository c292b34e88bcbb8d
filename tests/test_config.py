"""Configuration in sections: each field declared once with its help and its check; None means "not given", and what
was not given follows what was recorded (a cache, a teacher's run) or a recipe, never what was given."""
import dataclasses
import json

import pytest
import tyro

from kdfast import lab, train
from kdfast.augment import AugmentSpec
from kdfast.cache import served_data
from kdfast.config import (ENTRY_CONFIGS, BuildConfig, DataConfig, DistillConfig, EvaluateConfig, ImportConfig,
                           CheckpointConfig, InfoConfig, LabReportConfig, PredictConfig, ReportConfig,
                           LabConfig, OptimConfig, SweepConfig, TableConfig, TeacherCacheConfig, TrainConfig, VerifyConfig,
                           ViewConfig)
from kdfast.config.section import Section
from kdfast.flags import declared_in, field_doc, hidden
from kdfast.rundir import comparable_config

from .test_runs import one_line_error

# one word for two things, in commands that never share it (their flags are kept as they always were)
HOMONYMS = {
    "batch_size": {OptimConfig: "the global batch of every optimizer step", TableConfig: "every run of a table (64)",
                   CheckpointConfig: "images per forward pass of evaluate and predict",
                   BuildConfig: "images per teacher forward pass"},
    "seed": {ViewConfig: "the run's seed (views, initial weights, batch order)",
             VerifyConfig: "which cache entries are recomputed"},
    "cache_slots": {TeacherCacheConfig: "the slots a run uses", SweepConfig: "the values of it a sweep trains"},
    "file": {InfoConfig: "one cache or several to compare", VerifyConfig: "the one cache recomputed"},
    "overwrite": {BuildConfig: "replace a cache built otherwise", ImportConfig: "replace a checkpoint",
                  ReportConfig: "replace a report of other runs"},
    "out": {BuildConfig: "the cache file", PredictConfig: "the predictions' CSV"},
    "seeds": {LabConfig: "the seeds of each lab student", SweepConfig: "the seeds of each sweep point",
              TableConfig: "the seeds of each table cell (default: the tables' 3)"},
    "pairs": {LabConfig: "the lab's cnn / vit pairs", TableConfig: "TEACHER:STUDENT model pairs"},
    "methods": {LabConfig: "extra students of the lab", TableConfig: "the table's KD columns"},
    "epochs": {OptimConfig: "a run's epochs", TableConfig: "the table's student epochs (default: the tables' 240)"},
    "alphas": {SweepConfig: "a sweep's grid", TableConfig: "the alphas of each kd cell (default: the tables' 0.1)"},
    "taus": {SweepConfig: "a sweep's grid", TableConfig: "the taus of each cell (default: the tables' 4)"},
    "report": {LabReportConfig: "where a lab writes its report", ReportConfig: "where kdfast report writes (default: "
               "beside the runs)"},
}


def declaring_class(cls, name: str):
    return next(k for k in cls.__mro__ if dataclasses.is_dataclass(k) and name in declared_in(k))


def test_every_field_of_every_entry_point_is_declared_once_with_help():
    declared: dict[str, set] = {}
    for command, cls in ENTRY_CONFIGS.items():
        for f in dataclasses.fields(cls):
            doc = field_doc(cls, f.name)
            assert doc and len(doc) > 10, f"kdfast {command}: {f.name} has no help text"
            declared.setdefault(f.name, set()).add(declaring_class(cls, f.name))
    twice = {name: sorted(k.__name__ for k in where) for name, where in declared.items()
             if len(where) > 1 and where != set(HOMONYMS.get(name, ()))}
    assert not twice, f"declared in more than one config class: {twice}"
    for name, where in HOMONYMS.items():  # the list of homonyms cannot go stale
        assert declared[name] == set(where), name


def test_a_field_declared_twice_is_found(monkeypatch):
    @dataclasses.dataclass
    class Shadowing(TrainConfig):
        lr: float = 0.1
        """A second declaration of the learning rate."""

    monkeypatch.setitem(ENTRY_CONFIGS, "shadowing", Shadowing)
    with pytest.raises(AssertionError, match="lr"):
        test_every_field_of_every_entry_point_is_declared_once_with_help()


def test_hidden_fields_are_no_flags_and_are_refused_if_set():
    assert {"name", "resume", "auto_resume", "method"} <= set(hidden(LabConfig))
    with pytest.raises(SystemExit):
        tyro.cli(LabConfig, args=["--name", "x"])
    with pytest.raises(ValueError, match="--name: not an option of this command"):
        LabConfig(name="x").validate()
    with pytest.raises(ValueError, match="--alpha: not an option"):  # a sweep's points take --alphas
        SweepConfig(alpha=0.3).validate()


def test_an_explicit_value_equal_to_the_default_is_never_replaced():
    # a recipe fills only the views not given: --augment.mixup 0 stays 0 under cct (whose mixup is 0.8)
    parsed = train.parse(["--aug-recipe", "cct", "--augment.mixup", "0"]).augment
    assert (parsed.mixup, parsed.cutmix, parsed.policy) == (0.0, 1.0, "randaugment")
    given = TrainConfig(aug_recipe="cct", augment=AugmentSpec(mixup=0.0), label_smoothing=0.0)
    assert (given.augment.mixup, given.label_smoothing) == (0.0, 0.0)
    # a recorded value (a cache's) fills only the fields not given: an explicit 0 stays 0
    recorded = {"train_per_class": 5, "dataset": "cifar100", "store_size": 48,
                "augment": AugmentSpec(view="rrc", crop_size=40)}
    run = DistillConfig(teacher_cache="t.h5", train_per_class=0, dataset="cifar10").resolved(recorded)
    assert (run.train_per_class, run.dataset, run.store_size, run.augment.view) == (0, "cifar10", 48, "rrc")
    left = DistillConfig(teacher_cache="t.h5").resolved(recorded)
    assert (left.train_per_class, left.dataset, left.augment.crop_size) == (5, "cifar100", 40)
    # a teacher's run fills a cache build's data flags the same way
    build = BuildConfig(teacher="t.pth", val_per_class=0).resolved({"val_per_class": 3, "val_seed": 2})
    assert (build.val_per_class, build.val_seed) == (0, 2)


def test_the_views_resolve_once_and_keep_a_caches_views():
    spec = AugmentSpec(view="rrc", crop_size=40, mixup=0.2)
    run = DistillConfig(teacher_cache="t.h5").resolved(served_data({"augment": spec.to_dict(), "dataset": "cifar10"}))
    assert run.augment.to_dict() == spec.to_dict() and run.resolved() is run  # a resolved config resolves to itself
    assert run.to_dict()["augment"] == spec.to_dict()
    assert DistillConfig(teacher_cache="t.h5", augment=AugmentSpec(padding=2)).resolved(
        {"augment": spec}).augment.padding == 2


def test_a_section_resolves_what_was_not_given_from_the_record_else_its_fallback():
    @dataclasses.dataclass
    class Only(DataConfig):
        pass

    cfg = Only(test_per_class=3)
    assert cfg.value("train_per_class") == 0 and cfg.train_per_class is None
    done = cfg.resolved({"train_per_class": 7, "test_per_class": 9, "data_tier": "stream"})
    assert (done.train_per_class, done.test_per_class, done.val_per_class) == (7, 3, 0)
    assert done.data_tier == "auto"  # a setting is never taken from a record
    with pytest.raises(ValueError, match="--train-per-class must be a whole number >= 0"):
        Only(train_per_class=-1).validate()


def test_settings_are_not_compared_and_an_older_flat_config_still_compares_equal():
    cfg = TrainConfig(epochs=3, out_dir="here", progress=False, checkpoint_every=5)
    saved = cfg.to_dict()
    assert "progress" not in comparable_config(saved) and "progress" in Section.not_compared.__func__(TrainConfig)
    assert comparable_config({**saved, "out_dir": "elsewhere", "progress": True}) == comparable_config(saved)
    assert comparable_config({**saved, "epochs": 4}) != comparable_config(saved)
    older = {k: v for k, v in saved.items() if k not in ("sync_bn", "val_per_class", "val_seed", "tta", "ema",
                                                         "grad_accum", "store_size", "dataset", "aug_recipe")}
    assert comparable_config(json.loads(json.dumps(older))) == comparable_config(saved)


def test_the_lab_and_the_sweep_give_their_runs_their_sections_whole():
    cfg = lab.parse(["--preset", "smoke", "--ema", "0.5", "--tta", "flip", "--logit-std", "--dkd-beta", "4",
                     "--grad-accum", "2", "--methods", "dkd"])
    runs = {name: run_cfg for name, _, run_cfg in lab.plan(cfg)}
    for name in ("cnn_teacher", "cnn_student_no_kd", "cnn_student_with_kd", "cnn_student_dkd"):
        assert (runs[name].ema, runs[name].tta, runs[name].grad_accum) == (0.5, "flip", 2), name
    assert runs["cnn_student_dkd"].dkd_beta == 4 and runs["cnn_student_with_kd"].logit_std
    assert runs["cnn_teacher"].train_per_class == cfg.train_per_class == runs["cnn_teacher_cache"].train_per_class


def test_every_field_of_every_config_has_help_and_one_default():
    from kdfast.augment import AugmentSpec
    from kdfast.cache import InfoConfig, VerifyConfig
    from kdfast.config import EvaluateConfig
    from kdfast.import_weights import ImportConfig
    from kdfast.labreport import ReportConfig

    for cls in (TrainConfig, DistillConfig, EvaluateConfig, LabConfig, SweepConfig, BuildConfig, InfoConfig,
                VerifyConfig, ImportConfig, ReportConfig, AugmentSpec):
        for f in dataclasses.fields(cls):
            doc = field_doc(cls, f.name)
            assert doc and len(doc) > 10, f"{cls.__name__}.{f.name} has no help text"
            if f.default is None:  # tyro's "(default: None)" is hidden: the text must say the real default
                assert "default" in doc.lower(), f"{cls.__name__}.{f.name}: say its default"


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_without_its_package_is_refused(tiny_data, tmp_path, capsys):
    err = one_line_error(capsys, train.main, ["--log-with", "wandb", "--data", tiny_data["data"], "--out-dir", str(tmp_path),
                                              "--no-progress"])
    assert "--log-with wandb: the wandb package is not installed" in err


@pytest.mark.parametrize("field,values", [("alphas", (0.1, 0.1)), ("taus", (2.0, 4.0, 2.0)), ("cache_slots", (1, 1))])
def test_repeated_grid_values_are_refused(field, values):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be given without repeats"):
        SweepConfig(**{field: values}).validate()


def _numeric_fields(cls):
    """(path, kind) of every numeric field of a config class, nested dataclasses (augment) included."""
    from kdfast.schemas import Schema, from_dataclass

    for name, kind in from_dataclass(cls).fields.items():
        for path, k in ([(name, kind)] if not isinstance(kind, Schema) else
                        [(f"{name}.{sub}", v) for sub, v in kind.fields.items()]):
            if isinstance(k, str) and ("int" in k or "number" in k):
                yield path, k


def _with(cfg, path, value):
    from dataclasses import replace

    if "." in path:
        outer, inner = path.split(".")
        old = getattr(cfg, outer)
        value = type(getattr(old, inner))(value) if isinstance(getattr(old, inner), tuple) else value
        setattr(cfg, outer, replace(old, **{inner: value}))
    else:
        setattr(cfg, path, value)
    return cfg


def test_every_numeric_field_of_every_config_refuses_what_is_not_a_finite_number():
    """NaN and inf in any numeric field (nested ones included, as the Python API or a saved config can give them) are
    refused by validate() with the flag's name; no field's check crashes on them."""
    from kdfast.cache import BuildConfig
    from kdfast.config import DistillConfig, EvaluateConfig, LabConfig

    makers = {TrainConfig: TrainConfig, DistillConfig: lambda: DistillConfig(teacher_cache="t.h5"),
              SweepConfig: SweepConfig, LabConfig: LabConfig, EvaluateConfig: lambda: EvaluateConfig(checkpoint="c.pth"),
              BuildConfig: lambda: BuildConfig(teacher="t.pth")}
    tried = 0
    for cls, make in makers.items():
        for path, kind in _numeric_fields(cls):
            for bad in (float("nan"), float("inf")):
                value = (bad,) * len(getattr(getattr(make(), path.split(".")[0]), path.split(".")[1])
                                     or getattr(AugmentSpec(), path.split(".")[1])) \
                    if "list" in kind and "." in path else (bad,) if "list" in kind else bad
                cfg = _with(make(), path, value)
                with pytest.raises(ValueError, match=f"--{path.replace('_', '-')}"):
                    cfg.validate()
                tried += 1
    assert tried > 150
