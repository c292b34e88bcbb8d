"""What accuracies on a test set can and cannot show: the standard error of an accuracy, and a comparison of two
runs said in words only as far as the test set's size (and the seeds' spread) supports it. Pure functions."""
from __future__ import annotations

import math


def standard_error(accuracy: float, samples: int) -> float:
    """Of an accuracy measured on `samples` test images (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(samples, 1))


def resolution(a: float, b: float, samples: int) -> float:
    """Two standard errors of the difference of two accuracies on `samples` images each (taken as independent, which
    overstates it a little for two models on the same images): a smaller difference is not told apart."""
    return 2 * math.hypot(standard_error(a, samples), standard_error(b, samples))


def compare(name_a: str, a: float, name_b: str, b: float, samples: int, spread: float | None = None) -> str:
    """One sentence on a - b: shown (beyond two standard errors and beyond the seeds' spread) or not shown."""
    d, r = a - b, resolution(a, b, samples)
    head = f"{name_a} {a:.4f} against {name_b} {b:.4f} ({d:+.4f})"
    if abs(d) < r:
        return (f"{head}: within what {samples:,} test images resolve (±{r:.4f}, two standard errors), so no "
                "difference is shown")
    if spread is not None and abs(d) <= spread:
        return f"{head}: within the spread of the seeds ({spread:.4f}), so no difference is shown"
    return f"{head}: {name_a} is {'more' if d > 0 else 'less'} accurate, beyond what {samples:,} test images resolve " \
           f"(±{r:.4f})" + (f" and beyond the seeds' spread ({spread:.4f})" if spread is not None else "")


def against_chance(name: str, accuracy: float, classes: int, samples: int) -> str | None:
    """A sentence when a model is not told apart from guessing (1 / classes); None when it is."""
    chance = 1 / classes
    if accuracy - chance >= 2 * standard_error(chance, samples):
        return None
    return (f"{name} ({accuracy:.4f}) is not told apart from guessing ({chance:.4f} for {classes} classes): it has "
            "learned nothing measurable yet (more epochs or data)")


def shown(a: float, b: float, samples: int, spread: float | None = None) -> bool:
    """Whether a - b is beyond two standard errors and the seeds' spread: what a warning may rest on."""
    return abs(a - b) >= resolution(a, b, samples) and (spread is None or abs(a - b) > spread)
