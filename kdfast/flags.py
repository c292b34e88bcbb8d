"""How config fields become flags: one line of help per field, one default shown."""
from __future__ import annotations

import dataclasses
import typing
from typing import Annotated

import tyro
from tyro._docstrings import get_field_docstring  # tyro's own reading of a field's docstring


def explained(cls):
    """Decorate a config dataclass: each field's docstring is its flag's help as one paragraph (tyro would keep the
    source's line breaks), and a field defaulting to None, whose docstring says its real default ("Default: the
    recipe's"), does not also show tyro's "(default: None)". Nested config dataclasses are left to tyro."""
    hints = typing.get_type_hints(cls, include_extras=True)
    own = cls.__dict__.get("__annotations__", {})
    for f in dataclasses.fields(cls):
        doc = get_field_docstring(cls, f.name, ())
        if f.name not in own or not doc or dataclasses.is_dataclass(hints[f.name]):
            continue
        hint = "" if f.default is None else None
        own[f.name] = Annotated[hints[f.name], tyro.conf.arg(help=" ".join(doc.split()), help_behavior_hint=hint)]
    return cls


def field_doc(cls, name: str) -> str | None:
    """The docstring of a field, from the class in the MRO that declares it."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return get_field_docstring(klass, name, ())
    return None
