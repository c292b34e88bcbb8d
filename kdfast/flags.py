"""How config fields become flags: one line of help per field, one default shown, and what an entry point hides."""
from __future__ import annotations

import dataclasses
import math
import textwrap
import typing
from typing import Annotated

import tyro
from tyro._docstrings import get_field_docstring  # tyro's own reading of a field's docstring


def explained(cls=None, *, hide: tuple[str, ...] = (), positional: tuple[str, ...] = ()):
    """Decorate a config dataclass: each field's docstring is its flag's help as one paragraph (tyro would keep the
    source's line breaks), and a field defaulting to None, whose docstring says its real default ("Default: the
    recipe's"), does not also show tyro's "(default: None)". Nested config dataclasses are left to tyro.

    An entry config embeds whole sections; `hide` names the fields of its sections the command has no use for (no
    flag; validate() refuses them if set), `positional` those it takes without a flag name."""
    if cls is None:
        return lambda c: explained(c, hide=hide, positional=positional)
    hints = typing.get_type_hints(cls, include_extras=True)
    own = cls.__dict__.get("__annotations__", {})
    for f in dataclasses.fields(cls):
        doc = get_field_docstring(cls, f.name, ())
        if f.name not in own or not doc or dataclasses.is_dataclass(hints[f.name]):
            continue
        doc, hint = " ".join(doc.split()), "" if f.default is None else None
        if _says_no_default(f, doc):  # a preset may set it: its value, else what it resolves to
            hint = lambda shown, fallback=_shown(f.metadata["fallback"]): \
                f"(default: {fallback if shown == 'None' else shown})"
        markers = (tyro.conf.DisallowNone,) if f.default is None else ()  # None means "not given", never typed
        own[f.name] = Annotated[(hints[f.name], *markers, tyro.conf.arg(help=doc, help_behavior_hint=hint))]
    for name in hide:  # the inherited field's annotation, overridden for this class only
        own[name] = Annotated[hints[name], tyro.conf.Suppress]
    for name in positional:
        own[name] = Annotated[hints[name], tyro.conf.Positional]
    cls.__hidden__ = tuple(getattr(cls, "__hidden__", ())) + tuple(hide)
    cls.__respelled__ = tuple(hide) + tuple(positional)  # not declarations: the test of one place skips them
    return cls


def hidden(cls) -> tuple[str, ...]:
    """The fields of an entry config's sections that the command hides (and refuses)."""
    return tuple(getattr(cls, "__hidden__", ()))


def declared_in(cls) -> list[str]:
    """The fields whose declaration (type, default, docstring) is in this class's own body."""
    respelled = cls.__dict__.get("__respelled__", ())
    return [n for n in cls.__dict__.get("__annotations__", {}) if n not in respelled
            and n in {f.name for f in dataclasses.fields(cls)}]


def help_text(f: dataclasses.Field, doc: str | None) -> str | None:
    """A field's help as one paragraph; a field left None until it is resolved says what it resolves to."""
    if not doc:
        return doc
    doc = " ".join(doc.split())
    return doc + f" (default: {_shown(f.metadata['fallback'])})" if _says_no_default(f, doc) else doc


def _says_no_default(f: dataclasses.Field, doc: str) -> bool:
    return "fallback" in f.metadata and "default" not in doc.lower()


def _shown(value) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, tuple) else \
        f"{value:g}" if isinstance(value, float) and not isinstance(value, bool) else str(value)


def field_doc(cls, name: str) -> str | None:
    """The help text of a field (its docstring, from the class in the MRO that declares it)."""
    for klass in cls.__mro__:
        if name in declared_in(klass) if dataclasses.is_dataclass(klass) else False:
            f = next(f for f in dataclasses.fields(klass) if f.name == name)
            return help_text(f, get_field_docstring(klass, name, ()))
    return None


def unset(fallback, *, compared: bool = True):
    """A field left None when not given; a config's resolved() fills it from a recorded value, else with `fallback`."""
    return dataclasses.field(default=None, metadata={"fallback": fallback, "compared": compared})


def setting(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING):
    """A field that never changes what a run computes (where files go, how progress is shown): not compared."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"compared": False})


def check(flag: str, value, ok: bool, rule: str) -> None:
    """Refuse a flag's value at start-up with one sentence naming the flag and what it must be."""
    if not ok:
        raise ValueError(f"--{flag.replace('_', '-')} must be {rule}, got {value!r}")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def description(cls) -> str:
    """A command's description (its config's docstring) as paragraphs wrapped at 100 columns: tyro joins a paragraph's
    lines into one unless the next is indented, so each wrapped line after the first is (by two spaces)."""
    paragraphs = textwrap.dedent(cls.__doc__ or "").strip().split("\n\n")
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 100, subsequent_indent="  ") for p in paragraphs)


def command_line(cls, argv: list[str], prog: str, **kwargs):
    """tyro's parse of a command's flags into its config, with the wrapped description."""
    return tyro.cli(cls, args=argv, prog=prog, description=description(cls), **kwargs)
