"""PNG figures for the reports (matplotlib, no display): the alpha x tau heatmap of a sweep, test accuracy per
epoch of a lab's runs, confusion matrices, accuracy against cache slots. Each function takes plain numbers and a
path."""
from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def sweep_heatmap(alphas: list[float], taus: list[float], means: dict, no_kd: float | None, path: str,
                  title: str = "", chosen: tuple | None = None, label: str = "test accuracy") -> str:
    """means[(alpha, tau)] -> mean accuracy; each cell shows it and its difference to no KD; cells not above the
    no-KD baseline are hatched, the baseline is a line on the colour bar, and the chosen (alpha, tau) is boxed."""
    plt = _pyplot()
    grid = [[means.get((a, t), float("nan")) for t in taus] for a in alphas]
    fig, ax = plt.subplots(figsize=(max(5.2, 1.6 + 1.3 * len(taus)), max(3.6, 1.9 + 0.8 * len(alphas))))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    bar = fig.colorbar(image, ax=ax, label=label)
    if no_kd is not None:
        low, high = image.get_clim()
        image.set_clim(min(low, no_kd - 0.002), max(high, no_kd + 0.002))  # the baseline's line is on the bar
        bar.ax.axhline(no_kd, color="red", linewidth=2)  # the title says what the red line is
    for i, a in enumerate(alphas):
        for j, t in enumerate(taus):
            value = grid[i][j]
            if value != value:  # NaN: a point not run
                continue
            delta = f"\n{value - no_kd:+.3f}" if no_kd is not None else ""
            red, green, blue, _ = image.cmap(image.norm(value))  # dark text on light cells (viridis' yellow end)
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(j, i, f"{value:.3f}{delta}", ha="center", va="center", color=ink, fontsize=8)
            if no_kd is not None and value <= no_kd:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="red"))
            if chosen == (a, t):
                ax.add_patch(plt.Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, linewidth=3,
                                           edgecolor="black"))
                ax.text(j, i - 0.3, "chosen", ha="center", va="center", color=ink, fontsize=7, fontweight="bold")
    ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("tau (temperature)")
    ax.set_ylabel("alpha (CE weight)")
    ax.set_title(title or f"KD sweep: mean {label}\nhatched: not above no KD (red line)", fontsize=9)
    return _save(fig, path)


def accuracy_curves(curves: dict[str, list[tuple[int, float]]], path: str, title: str = "",
                    ylabel: str = "test accuracy", chance: float | None = None) -> str:
    """curves[label] -> [(epoch, accuracy)]; one line per run; whole epochs on the axis; accuracy from 0 to 1, with
    the chance level (1 / classes) as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, points in curves.items():
        if points:
            ax.plot([e for e, _ in points], [a for _, a in points], marker="o", markersize=3, label=label)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str], path: str, title: str = "") -> str:
    """matrices[label] -> counts[true][predicted]; one panel per model, each row as fractions of its class (the
    diagonal is the per-class accuracy); cells annotated up to 12 classes."""
    plt = _pyplot()
    n, k = len(classes), len(matrices)
    size = 1.2 + 0.32 * max(n, 8)
    fig, axes = plt.subplots(1, k, figsize=(size * k + 0.8, size + 0.6), squeeze=False, layout="constrained")
    for col, (ax, (label, counts)) in enumerate(zip(axes[0], matrices.items())):
        rows = [[c / max(sum(row), 1) for c in row] for row in counts]
        image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if counts[i][j]:
                        ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=6,
                                color="white" if rows[i][j] > 0.5 else "black")
        ticks = range(n) if n <= 30 else range(0, n, max(1, n // 20))
        names = [classes[t][:10] for t in ticks]
        ax.set_xticks(list(ticks), names, rotation=90, fontsize=6)
        ax.set_yticks(list(ticks), names if col == 0 else [], fontsize=6)
        ax.set_xlabel("predicted", fontsize=8)
        if col == 0:
            ax.set_ylabel("true", fontsize=8)
        ax.set_title(label, fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="fraction of the true class")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, tight=False)


def accuracy_vs_slots(points: list[tuple[int, float]], path: str, no_kd: float | None = None, title: str = "") -> str:
    """points: (cache slots, test accuracy) of cached-KD runs of one student; the no-KD baseline as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    points = sorted(points)
    ax.plot([s for s, _ in points], [a for _, a in points], marker="o", label="cached KD")
    if no_kd is not None:
        ax.axhline(no_kd, color="red", linestyle="--", label="no KD")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache slots (augmentation seeds)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str, tight: bool = True) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    if tight:
        fig.tight_layout()
    fig.savefig(tmp, dpi=110, bbox_inches=None if tight else "tight")
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path
