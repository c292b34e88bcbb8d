"""The checks every config section uses: one sentence naming the flag and what it must be."""
from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

from ..flags import check, finite

__all__ = ["check", "check_float", "check_grid", "check_int", "check_numbers", "finite"]


def check_numbers(cfg, prefix: str = "") -> None:
    """Every whole-number field a whole number and every other numeric field finite, nested configs (augment)
    included, whether set by flags, the Python API or a saved config: the ranges are each section's checks."""
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
            if kind == "float" and v is not None and not finite(v):
                check(name, value, False, "finite numbers" if isinstance(value, tuple) else "a finite number")


def _numeric_kind(t) -> str | None:
    """'int' or 'float' for a numeric field's type (Optional and tuples of them included), else None."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated:
        return _numeric_kind(args[0])
    if origin is typing.Union:
        kinds = {_numeric_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is tuple:
        return _numeric_kind(args[0]) if args else None
    return {int: "int", float: "float"}.get(t)


def check_int(cfg, name: str, minimum: int) -> None:
    """None passes (not given: resolved later); else a whole number >= minimum."""
    value = getattr(cfg, name)
    if value is not None:
        check(name, value, isinstance(value, int) and value >= minimum, f"a whole number >= {minimum}")


def check_float(cfg, name: str, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = True) -> None:
    """None passes (not given); else finite and inside the interval."""
    value = getattr(cfg, name)
    if value is None:
        return
    ok = finite(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    check(name, value, ok, f"a finite number in {lo}{low:g}, {high:g}{hi}" if high is not None
          else f"a finite number {'>' if low_open else '>='} {low:g}")


def check_grid(alphas, taus, alpha_flag: str = "alphas", tau_flag: str = "taus") -> None:
    check(alpha_flag, alphas, len(alphas) > 0 and all(finite(a) and 0 <= a <= 1 for a in alphas),
          "one or more numbers in [0, 1]")
    check(tau_flag, taus, len(taus) > 0 and all(finite(t) and t > 0 for t in taus), "one or more numbers > 0")
