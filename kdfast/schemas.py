"""What each kind of JSON file kdfast reads must hold, checked on every read: a saved file never causes a traceback.

A schema names each field's type ("int", "number", "str", "bool", "list", "list[str]", "dict", "null", joined with
"|" for several) or holds a nested Schema for a nested object. Required fields must be there; the others may be
missing (files of older versions lack some) but, when present, must have their type. Extra fields are allowed.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from .errors import KdfastError


@dataclass(frozen=True)
class Schema:
    fields: dict
    required: tuple = ()
    items: "Schema | None" = None  # for a mapping of names to objects of one schema (report.json's pairs)


def _is(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "list[int]":
        return isinstance(value, list) and all(_is(v, "int") for v in value)
    if kind == "list[list[int]]":
        return isinstance(value, list) and all(_is(v, "list[int]") for v in value)
    if kind == "list[number]":
        return isinstance(value, list) and all(_is(v, "number") for v in value)
    types = {"str": str, "bool": bool, "list": list, "dict": dict, "null": type(None)}
    return isinstance(value, types[kind])


def problems(obj, schema: Schema, where: str = "") -> list[str]:
    """What in obj does not fit the schema, each as "field 'a.b' is missing" / "field 'a.b' is a str, expected ..."."""
    if not isinstance(obj, dict):
        return [f"{'field ' + repr(where) if where else 'the file'} is a {type(obj).__name__}, expected an object"]
    found = []
    for name in schema.required:
        if name not in obj:
            found.append(f"field {where + name!r} is missing")
    for name, kind in schema.fields.items():
        if name not in obj:
            continue
        value = obj[name]
        if isinstance(kind, Schema):
            found += problems(value, kind, f"{where}{name}.") if value is not None or name in schema.required \
                else []
        elif not any(_is(value, k) for k in kind.split("|")):
            found.append(f"field {where + name!r} is {_describe(value)}, expected {kind.replace('|', ' or ')}")
    if schema.items is not None:
        for name, value in obj.items():
            if name not in schema.fields:
                found += problems(value, schema.items, f"{where}{name}.")
    return found


def unlike(saved, live, where: str) -> list[str]:
    """How a saved JSON value differs in shape from the live one it will replace (an optimizer's parameter group, a
    scheduler's state): missing keys, other types; numbers are numbers whether int or float, lists are compared
    element by element, a live None takes anything."""
    if live is None:
        return []
    if isinstance(live, dict):
        if not isinstance(saved, dict):
            return [f"field {where!r} is {_describe(saved)}, expected an object"]
        return [p for k, v in live.items() for p in
                ([f"field '{where}.{k}' is missing"] if k not in saved else unlike(saved[k], v, f"{where}.{k}"))]
    if isinstance(live, (list, tuple)):
        if not isinstance(saved, list):
            return [f"field {where!r} is {_describe(saved)}, expected a list"]
        return [p for i, (a, b) in enumerate(zip(saved, live)) for p in unlike(a, b, f"{where}.{i}")]
    kind = "bool" if isinstance(live, bool) else "number" if isinstance(live, (int, float)) else \
        "str" if isinstance(live, str) else None
    if kind and not _is(saved, kind):
        return [f"field {where!r} is {_describe(saved)}, expected {kind}"]
    return []


def _describe(value) -> str:
    return "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


def check(obj, schema: Schema, path: str, what: str, fix: str):
    """obj, or one line naming the file, the first field that does not fit, and the fix."""
    found = problems(obj, schema)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise KdfastError(f"{path}: damaged {what}: {found[0]}{more}. {fix}".replace(". .", "."))
    return obj


def from_dataclass(cls) -> Schema:
    """The schema of a config dataclass as to_dict saves it (nested dataclasses nested, tuples as lists)."""
    hints = typing.get_type_hints(cls)
    return Schema({f.name: kind for f in dataclasses.fields(cls) if (kind := _kind(hints[f.name])) is not None})


def _kind(t):
    origin, args = typing.get_origin(t), typing.get_args(t)
    if dataclasses.is_dataclass(t):
        return from_dataclass(t)
    if origin is typing.Union:
        kinds = [_kind(a) for a in args if a is not type(None)]
        if any(k is None or isinstance(k, Schema) for k in kinds):
            return None
        return "|".join(kinds + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return "|".join(sorted({"bool" if isinstance(a, bool) else "str" if isinstance(a, str) else "number"
                                for a in args}))
    if origin is tuple:
        element = {float: "number", int: "int", str: "str"}.get(args[0] if args else None)
        return f"list[{element}]" if element else "list"
    return {bool: "bool", int: "int", float: "number", str: "str", dict: "dict", list: "list"}.get(t)


# ---------------------------------------------------------------- the kinds of file

KD = Schema({"method": "str", "alpha": "number|null", "tau": "number|null", "mode": "str", "logit_std": "bool|null",
             "cache_slots": "int|null", "teacher": "str|null", "teacher_model": "str", "teacher_accuracy": "number|null"})

DATA = Schema({"source": "str|null", "fingerprint": "str", "train_size": "int", "test_size": "int", "tier": "str",
               "classes": "list[str]"})

# the run's config as NAME.json and state.json keep it: the fields read back from it (a cache build and an evaluation
# take their data flags from it)
def _run_config() -> Schema:
    from .config import DistillConfig  # a TrainConfig with the KD fields: every run's config is one of them

    schema = from_dataclass(DistillConfig)
    # one cache is recorded as its path (by the lab, a sweep and runs made before ensembles), several as a list
    return Schema({**schema.fields, "teacher_cache": "str|list[str]|null"})


RUN_CONFIG = _run_config()

# NAME.json beside a checkpoint: what loading it needs (imported weights have only this and a few more)
CHECKPOINT = Schema({"model": "str", "classes": "list[str]", "family": "str", "parameters": "int",
                     "test_accuracy": "number", "test_samples": "int", "test_top5": "number",
                     "test_confusion": "list[list[int]]", "val_accuracy": "number",
                     "val_samples": "int", "epochs": "int", "seed": "int", "train_img_per_s": "number",
                     "wall_time_s": "number", "precision": "str", "precision_reason": "str", "device": "str",
                     "num_processes": "int", "eval_batch_size": "int", "data": DATA, "recipe": "dict",
                     "config": RUN_CONFIG, "kd": KD, "trained_with": "dict|str", "weights_from": "str",
                     "copied_from": "str"},
                    required=("model", "classes"))

# a finished run's NAME.json (it has test_accuracy): what the lab, its report and sweeps read of it
FINISHED_RUN = Schema(CHECKPOINT.fields, required=("model", "classes", "test_accuracy", "config", "epochs",
                                                   "parameters", "seed", "device", "num_processes", "precision",
                                                   "wall_time_s", "train_img_per_s", "data"))
FINISHED_DATA = Schema(DATA.fields, required=("source", "fingerprint", "train_size", "test_size"))

PROGRESS = Schema({"epoch": "int", "step": "int", "sums": Schema({"loss": "number|list[number]",
                                                                   "correct": "int|list[int]", "seen": "int",
                                                                   "loss_is": "str"},
                                                                  required=("loss", "correct", "seen")),
                   "epoch_time_s": "number", "wall_time_s": "number"}, required=("epoch", "step", "wall_time_s"))

STATE = Schema({"version": "int", "progress": PROGRESS, "config": RUN_CONFIG,
                "optimizer": Schema({"scalars": "dict", "param_groups": "list", "tensor_params": "list"},
                                    required=("scalars", "param_groups")),
                "scheduler": "dict", "scaler": "dict|null", "modules": "list[str]"},
               required=("version", "progress", "config", "optimizer", "scheduler"))

METRICS_LINE = Schema({"epoch": "int", "train_loss": "number|null", "train_accuracy": "number|null",
                       "test_accuracy": "number|null", "val_accuracy": "number|null", "lr": "number",
                       "img_per_s": "number", "epoch_time_s": "number", "wall_time_s": "number"},
                      required=("epoch",))

PAIR = Schema({"teacher_accuracy": "number|null", "student_accuracy_without_kd": "number|null",
               "student_accuracy_with_kd": "number|null", "details": "dict"})
REPORT = Schema({}, items=PAIR)  # report.json: pair (cnn, vit) -> its accuracies and details


# a logit cache's HDF5 attributes (classes and augment are JSON text in the file)
CACHE_ATTRS = Schema({"format": "str", "format_version": "int", "dataset_fingerprint": "str", "classes": "list[str]",
                      "augment": RUN_CONFIG.fields["augment"], "train_size": "int", "test_size": "int",
                      "seeds": "list[int]", "topk": "int", "data_source": "str|null", "dataset": "str",
                      "train_per_class": "int", "test_per_class": "int", "val_per_class": "int", "val_seed": "int",
                      "store_size": "int", "teacher_model": "str", "teacher_sha256": "str",
                      "teacher_checkpoint": "str", "precision": "str", "aug_recipe": "str"},
                     required=("format", "format_version", "dataset_fingerprint", "classes", "augment", "train_size",
                               "test_size", "seeds", "teacher_model", "teacher_sha256"))


def check_finished(meta: dict, path: str, fix: str) -> dict:
    """A finished run's NAME.json with every field the lab, its report and sweeps read."""
    check(meta, FINISHED_RUN, path, "description of a finished run", fix)
    found = problems(meta["data"], FINISHED_DATA, "data.")
    if found:
        raise KdfastError(f"{path}: damaged description of a finished run: {found[0]}. {fix}")
    return meta


__all__ = ["CACHE_ATTRS", "CHECKPOINT", "FINISHED_RUN", "METRICS_LINE", "REPORT", "STATE", "Schema", "check", "check_finished",
           "problems"]
