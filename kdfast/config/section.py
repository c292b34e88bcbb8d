"""What every config section and entry config shares.

A section is a dataclass that owns a few fields: each declared once, with its type, default and docstring (its flag's
help), checked by the section's `check`. Entry configs embed sections by inheritance, the way Go embeds structs: the
fields are promoted, so the flags, the Python API (`TrainConfig(lr=0.1)`) and the saved form stay flat.

None means "not given". A field declared with `unset(fallback)` is None until the run resolves it: from what a saved
artifact recorded (a teacher's run, a cache, a checkpoint), else its fallback; a value that was given is never
replaced. A field declared with `setting(default)` changes how a run is kept or watched, never what it computes: a
resume or a finished run may differ in it (rundir.comparable_config).
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, fields, replace

from ..flags import hidden, setting, unset
from .checks import check_numbers

__all__ = ["Section", "fallback_of", "names", "own_hooks", "pick", "sections", "setting", "unset"]


def fallback_of(f: dataclasses.Field):
    return f.metadata.get("fallback")


def names(*sections) -> tuple[str, ...]:
    """The field names of some sections (what a recorded artifact may fill of them)."""
    return tuple(f.name for s in sections for f in fields(s))


def pick(recorded: dict, *sections) -> dict:
    """The values of a recorded config (a flat dict) that belong to these sections."""
    wanted = names(*sections)
    return {k: v for k, v in recorded.items() if k in wanted}


def sections(cfg, *sections) -> dict:
    """The values of whole sections of a config, as keyword arguments: what a lab or a sweep gives each of its runs."""
    return {name: getattr(cfg, name) for name in names(*sections)}


def own_hooks(cls, name: str):
    """Each class's own method `name` along the MRO, most derived first (sections add their checks and resolvers)."""
    return [k.__dict__[name] for k in cls.__mro__ if name in k.__dict__]


class Section:
    """Base of every section and entry config: validate(), resolved(), to_dict()."""

    def validate(self) -> None:
        """Every section's checks, before any work: one sentence naming the flag."""
        check_numbers(self)
        for name in hidden(type(self)):
            default = next(f for f in fields(self) if f.name == name)
            unchanged = getattr(self, name) == (default.default if default.default is not MISSING else
                                                default.default_factory())
            if not unchanged:
                raise ValueError(f"--{name.replace('_', '-')}: not an option of this command (it sets it itself); "
                                 "leave it out")
        for check in reversed(own_hooks(type(self), "check")):
            check(self)

    def resolved(self, recorded: dict | None = None):
        """This config with what was not given filled in: by each section's `resolve` hook (most derived first), else
        from `recorded` (a flat dict of saved field values), else by the field's fallback. Given values are kept."""
        recorded = recorded or {}
        changes: dict = {}
        for hook in own_hooks(type(self), "resolve"):
            for k, v in hook(self, recorded).items():
                changes.setdefault(k, v)
        for f in fields(self):
            if getattr(self, f.name) is None and f.name not in changes and "fallback" in f.metadata:
                value = recorded.get(f.name)
                value = fallback_of(f) if value is None else value
                if value is not None:  # a fallback of None (the data source's: $KDFAST_DATA, ./data) stays None
                    changes[f.name] = value
        changes = {k: v for k, v in changes.items() if v is not getattr(self, k)}
        return replace(self, **changes) if changes else self  # a resolved config resolves to itself

    def to_dict(self) -> dict:
        """The resolved config as it is saved: flat, nested specs as their own to_dict()."""
        cfg = self.resolved()
        return {f.name: (v.to_dict() if hasattr(v := getattr(cfg, f.name), "to_dict") else v) for f in fields(cfg)}

    def value(self, name: str):
        """A field's value, or the fallback it resolves to when not given and nothing is recorded."""
        value = getattr(self, name)
        return value if value is not None else fallback_of(next(f for f in fields(self) if f.name == name))

    @classmethod
    def not_compared(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("compared") is False)

    @classmethod
    def as_older_runs_had(cls) -> dict:
        """The value of each compared field in a config saved before the field existed: what a run that does not give
        it resolves to (a new field must default to the behaviour before it)."""
        return {f.name: fallback_of(f) if "fallback" in f.metadata else f.default for f in fields(cls)
                if f.metadata.get("compared") is not False and f.default is not MISSING}
