"""An alpha x tau grid of KD students from one teacher-logit cache, with seeds, mean and spread, the best point.

    kdfast sweep --pair cnn --alphas 0.1 0.5 0.9 --taus 1 2 4 8 --seeds 2 --epochs 30
    kdfast sweep --pair cnn --method dkd --logit-std --taus 2 4 --alphas 0.5
    kdfast sweep --pair cnn --alphas 0.1 --taus 4 --cache-slots 1 2 4 0     # accuracy against cache slots
    kdfast sweep --pair cnn --together on        # the KD points of a seed in one fused pass (kdfast.group)

Every point reads the same cache (no teacher pass). Each run is an ordinary kdfast run in --out-dir (its
checkpoint reloads with `kdfast evaluate`); a finished one is kept and an interrupted one resumes, so the
same command continues a sweep after a crash or Ctrl-C. The accuracy of a run is its last epoch's, read
from its metrics file. Results: sweep.json, sweep.csv (one row per run) and sweep.md (every point, validation
and test side by side, the chosen one marked and why).
"""
from __future__ import annotations

import csv
import io
import itertools
import os
import statistics
import sys
from functools import partial

from . import distill, group, plots, train
from .cache import LogitCache, served_data
from .cache.ensemble import check_agreement, ensemble_test_logits, normalized_weights
from .config import (DataConfig, DistillConfig, EvalConfig, KDConfig, ModelConfig, OptimConfig, OutputConfig, RunConfig,
                     RuntimeConfig, SweepConfig, TeacherCacheConfig, TeacherConfig, TrainConfig, TrainingConfig, check,
                     sections)
from .engine import accuracy_and_loss, on_main, process_state, say as print_on_main
from .errors import KdfastError, user_errors_exit
from .flags import command_line
from .files import FileLock, ensure_dir, write_json, write_text
from .methods import method_entry
from .rundir import RunDir, adopt_finished_run, finished_run


def _num(x: float) -> str:
    return f"{x:g}"


def plan(cfg: SweepConfig, served: dict) -> list[tuple[dict, TrainConfig]]:
    """(point, run config) for every run: the no-KD baseline and every (alpha, tau), for each seed. cfg is resolved
    against its cache (served: what the cache records); every run gets the sweep's sections whole, and the cache's
    views explicitly (the baseline reads no cache)."""
    common = {**sections(cfg, DataConfig, OptimConfig, TrainingConfig, EvalConfig, RuntimeConfig, RunConfig,
                         OutputConfig, ModelConfig), "augment": served["augment"], "resume": not cfg.fresh}
    kd = {**common, **sections(cfg, TeacherConfig, KDConfig, TeacherCacheConfig), "cache_slots": 0}  # set below
    runs = []
    for seed in range(cfg.seeds):
        runs.append(({"kind": "no_kd", "alpha": None, "tau": None, "seed": seed},
                     TrainConfig(**{**common, "name": f"nokd-s{seed}", "seed": seed})))
        for alpha, tau, slots in itertools.product(cfg.alphas, cfg.taus, cfg.cache_slots):
            name = (f"{cfg.method}{'-ls' if cfg.logit_std else ''}-a{_num(alpha)}-t{_num(tau)}"
                    + (f"-c{slots}" if slots else "") + f"-s{seed}")
            runs.append(({"kind": cfg.method, "alpha": alpha, "tau": tau, "slots": slots, "seed": seed},
                         DistillConfig(**{**kd, "name": name, "seed": seed, "alpha": alpha, "tau": tau,
                                          "cache_slots": slots})))
    return runs


def last_epoch_accuracy(run_cfg: TrainConfig) -> dict:
    """The run's numbers from its metrics file (last line: the last epoch, always evaluated)."""
    run_dir = RunDir(run_cfg.out_dir, run_cfg.run_name)
    records = run_dir.read_metrics()
    last = records[-1] if records else {}
    missing = [k for k in ("test_accuracy", "img_per_s", "wall_time_s") if not isinstance(last.get(k), (int, float))]
    if missing:
        raise KdfastError(f"{run_dir.paths['metrics']}: the last epoch's record lacks {', '.join(missing)} (damaged). "
                          f"Delete {run_dir.paths['json']} to train the run again.")
    return {"test_accuracy": last["test_accuracy"], "epochs": last["epoch"] + 1, "img_per_s": last["img_per_s"],
            "wall_time_s": last["wall_time_s"], **({"val_accuracy": last["val_accuracy"]} if "val_accuracy" in last
                                                   else {})}


def summarize(rows: list[dict], teacher_accuracy: float | None) -> dict:
    """Mean, sample std and spread (max - min) over seeds for each point; the best point and its gain over no KD.

    The best point is chosen on the validation split where the runs have one (its test accuracy is reported beside
    it, never used to choose), else on the test accuracy (the summary says which)."""
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault((r["kind"], r["alpha"], r["tau"], r.get("slots", 0)), []).append(r)
    stats = []
    for (kind, alpha, tau, slots), runs in points.items():
        accs = [r["test_accuracy"] for r in runs]
        stat = {"kind": kind, "alpha": alpha, "tau": tau, "slots": slots, "seeds": len(accs), "accuracies": accs,
                "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "spread": max(accs) - min(accs)}
        if all("val_accuracy" in r for r in runs):
            vals = [r["val_accuracy"] for r in runs]
            stat.update(val_accuracies=vals, val_mean=statistics.mean(vals))
        stats.append(stat)
    base = next((s for s in stats if s["kind"] == "no_kd"), None)
    kd = [s for s in stats if s["kind"] != "no_kd"]
    kd = [s for s in kd if s["slots"] == main_slots([p["slots"] for p in kd])]
    on_val = bool(kd) and all("val_mean" in s for s in kd)
    best = max(kd, key=lambda s: s["val_mean" if on_val else "mean"]) if kd else None
    summary = {"points": stats, "no_kd": base, "best": best, "chosen_on": "validation" if on_val else "test",
               "teacher_accuracy": teacher_accuracy, "warnings": []}
    if best and base:
        gain = best["mean"] - base["mean"]
        summary["gain_over_no_kd"] = gain
        seeded = min(best["seeds"], base["seeds"]) > 1  # one seed has no spread to compare with: None
        summary["gain_beyond_spread"] = gain > max(best["spread"], base["spread"]) if seeded else None
    if base and teacher_accuracy is not None and teacher_accuracy <= base["mean"]:
        summary["warnings"].append(teacher_warning(teacher_accuracy, base["mean"]))
    return summary


def main_slots(slots: list[int]) -> int:
    """The slot count of the grid and the best point: all slots (0) when swept, else the most."""
    return 0 if 0 in slots else max(slots)


def slots_table(cfg: SweepConfig, summary: dict) -> list[str]:
    """Accuracy against cache slots, one row per (alpha, tau): how many augmentation seeds KD needs."""
    by = {(s["alpha"], s["tau"], s["slots"]): s for s in summary["points"] if s["kind"] != "no_kd"}
    order = sorted(cfg.cache_slots, key=lambda s: s or 1 << 30)
    lines = ["", "accuracy against cache slots (mean over seeds; all = every slot of the cache):", "",
             "| alpha, tau | " + " | ".join(str(s) if s else "all" for s in order) + " |",
             "| --- |" + " ---: |" * len(order)]
    for a, t in itertools.product(cfg.alphas, cfg.taus):
        cells = [f"{by[(a, t, s)]['mean']:.4f}" if (a, t, s) in by else "-" for s in order]
        lines.append(f"| {_num(a)}, {_num(t)} | " + " | ".join(cells) + " |")
    return lines


def teacher_warning(teacher: float, student: float) -> str:
    return (f"the teacher ({teacher:.4f}) is not more accurate than the student trained without KD ({student:.4f}): "
            "KD from it is expected to hurt. Train the teacher longer.")


def chosen_metric(summary: dict) -> tuple[str, str]:
    """(stat key, words) of the accuracy the point was chosen on: validation where the runs have one, else test."""
    return ("val_mean", "validation") if summary.get("chosen_on") == "validation" else ("mean", "test")


def point_rows(cfg: SweepConfig, summary: dict) -> list[str]:
    """One table: each point's validation and test accuracy side by side, its test gain over no KD, the chosen one
    marked."""
    top = main_slots(list(cfg.cache_slots))
    base, best = summary["no_kd"], summary["best"]
    lines = ["| point | validation | test (mean ± std) | test − no KD | |", "| --- | ---: | ---: | ---: | --- |"]

    def row(label: str, s: dict, mark: str) -> str:
        val = f"{s['val_mean']:.4f}" if "val_mean" in s else "-"
        gain = f"{s['mean'] - base['mean']:+.4f}" if base and s is not base else ""
        return f"| {label} | {val} | {s['mean']:.4f} ± {s['std']:.4f} | {gain} | {mark} |"

    if base:
        lines.append(row("no KD", base, "baseline"))
    for a, t in itertools.product(cfg.alphas, cfg.taus):
        s = next((p for p in summary["points"] if p["kind"] != "no_kd" and (p["alpha"], p["tau"], p["slots"])
                  == (a, t, top)), None)
        if s is not None:
            chosen = best is not None and s is best
            label = f"α {_num(a)}, τ {_num(t)}"
            lines.append(row(f"**{label}**" if chosen else label, s, "**◀ chosen**" if chosen else ""))
    return lines


def verdict(summary: dict) -> list[str]:
    """What the chosen point shows: its gain over no KD against the seed spread, or that no point beats no KD."""
    base, best = summary["no_kd"], summary["best"]
    if not (best and base):
        return []
    key, words = chosen_metric(summary)
    why = (f"the highest {words} accuracy" + ("; the test split is never used to choose" if words == "validation"
                                              else " (no validation split: pass --val-per-class to choose on one)"))
    point = f"alpha {_num(best['alpha'])}, tau {_num(best['tau'])}"
    if key in base and best[key] <= base[key]:
        return [f"no point beats no KD on {words} accuracy: no KD {base[key]:.4f}, the highest point ({point}) "
                f"{best[key]:.4f}. KD with these settings did not help this student here; {point} is reported as "
                f"the chosen point ({why}), test {best['mean']:.4f} ({summary['gain_over_no_kd']:+.4f} over no KD)."]
    beyond = summary["gain_beyond_spread"]
    spread = ("one seed, no spread to compare it with (--seeds 2 or more)" if beyond is None else
              f"{'beyond' if beyond else 'within'} the seed spread (no KD {base['spread']:.4f}, chosen "
              f"{best['spread']:.4f})")
    on = f"chosen on validation accuracy {best['val_mean']:.4f}; " if words == "validation" else ""
    return [f"chosen: {point} ({why}; {on}test {best['mean']:.4f} ± {best['std']:.4f}, spread "
            f"{best['spread']:.4f}), {summary['gain_over_no_kd']:+.4f} over no KD on test: {spread}"]


def markdown(cfg: SweepConfig, summary: dict) -> str:
    base = summary["no_kd"]
    lines = [f"{cfg.method}{' + logit std' if cfg.logit_std else ''}: accuracy of the last epoch, mean over "
             f"{cfg.seeds} seed(s), {cfg.epochs} epochs", "", *point_rows(cfg, summary), ""]
    if base:
        lines.append(f"no KD: {base['mean']:.4f} ± {base['std']:.4f} (spread {base['spread']:.4f}; "
                     + ", ".join(f"{a:.4f}" for a in base["accuracies"]) + ")")
    if summary.get("teacher_accuracy") is not None:
        lines.append(f"teacher (from the cache's test logits): {summary['teacher_accuracy']:.4f}")
    lines += verdict(summary)
    lines += [f"warning: {w}" for w in summary["warnings"]]
    if len(cfg.cache_slots) > 1:
        lines += slots_table(cfg, summary)
    return "\n".join(lines) + "\n"


def write_results(cfg: SweepConfig, rows: list[dict], summary: dict) -> None:
    write_json(os.path.join(cfg.out_dir, "sweep.json"), {"config": cfg.__dict__, "runs": rows, "summary": summary})
    buf = io.StringIO()
    fields = ["name", "kind", "alpha", "tau", "slots", "seed", "val_accuracy", "test_accuracy", "epochs", "img_per_s",
              "wall_time_s"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(os.path.join(cfg.out_dir, "sweep.csv"), buf.getvalue())
    top = main_slots(list(cfg.cache_slots))
    key, words = chosen_metric(summary)
    grid = [p for p in summary["points"] if p["kind"] != "no_kd" and p["slots"] == top]
    means = {(p["alpha"], p["tau"]): p[key] for p in grid if key in p}
    base = summary["no_kd"][key] if summary["no_kd"] and key in summary["no_kd"] else None
    best = summary.get("best")
    plots.sweep_heatmap(list(cfg.alphas), list(cfg.taus), means, base, os.path.join(cfg.out_dir, "sweep_heatmap.png"),
                        f"{cfg.method}{' + logit std' if cfg.logit_std else ''}: mean {words} accuracy of "
                        f"{cfg.seeds} seed(s)\n" + (f"hatched: not above no KD ({base:.3f}, red line)\n" if base
                                                    is not None else "") + f"boxed: chosen (highest {words})",
                        chosen=(best["alpha"], best["tau"]) if best else None, label=f"{words} accuracy")
    figures = "\n![alpha x tau](sweep_heatmap.png)\n"
    best = summary.get("best")
    if len(cfg.cache_slots) > 1 and best:
        total = summary.get("cache_slots_total") or 0
        line = [(p["slots"] or total, p["mean"]) for p in summary["points"]
                if (p["kind"], p["alpha"], p["tau"]) == (best["kind"], best["alpha"], best["tau"])]
        plots.accuracy_vs_slots(line, os.path.join(cfg.out_dir, "sweep_slots.png"), base,
                                f"alpha {_num(best['alpha'])}, tau {_num(best['tau'])}: accuracy against cache slots")
        figures += "\n![accuracy against cache slots](sweep_slots.png)\n"
    write_text(os.path.join(cfg.out_dir, "sweep.md"), markdown(cfg, summary) + figures)


def run(cfg: SweepConfig, donors: tuple = ()) -> dict:
    """The sweep; `donors` are finished run configs elsewhere (the lab's students) whose points are copied, not
    trained again, where they computed exactly what a point would (rundir.same_computation)."""
    cfg.validate()
    if method_entry(cfg.method).needs != "logits":
        raise ValueError(f"--method {cfg.method}: a sweep reads teacher logits from the cache; choose a logit method "
                         "(kd, dkd)")
    state = process_state(cfg.dist_timeout)
    caches = [LogitCache(path) for path in cfg.cache_paths or (cfg.cache_path(),)]
    check_agreement(caches)
    attrs = caches[0].attrs
    test_logits, test_labels, _ = ensemble_test_logits(  # an ensemble's: at the first tau (probs)
        caches, normalized_weights(cfg.cache_weights, len(caches)), cfg.taus[0], cfg.ensemble)
    for cache in caches:
        cache.close()
    served = served_data(attrs)
    cfg = cfg.resolved(served)
    held_slots = len(attrs["seeds"])
    check("cache_slots", cfg.cache_slots, all(s <= held_slots for s in cfg.cache_slots),
          f"at most the {held_slots} slots {caches[0].path} holds (0: all)")
    teacher_accuracy = accuracy_and_loss(test_logits, test_labels)["accuracy"]
    held = []

    def claim():
        ensure_dir(cfg.out_dir, "--out-dir")
        held.append(FileLock(os.path.join(cfg.out_dir, "sweep.lock"), f"the sweep in {cfg.out_dir}", "choose another --out-dir").acquire(partial(print_on_main, state)))

    on_main(state, claim)
    try:
        return _run_locked(cfg, state, attrs, served, teacher_accuracy, donors)
    finally:
        for lock in held:
            lock.release()


def use_together(cfg: SweepConfig, device_type: str) -> bool:
    """--together auto: on a GPU only. On a 2-core CPU it lost for both students: fused ResNet-8s at 0.79x of one
    at a time for K = 4 (benchmarks/together.py), three ViT students stacked at batch 256 at 0.67x in a real sweep
    (404 s against 271 s for one epoch; the benchmark's 1.37x at K = 2 was at batch 32)."""
    if cfg.together != "auto":
        return cfg.together == "on"
    if cfg.method == "deit":  # two heads per student: not stacked
        return False
    return device_type == "cuda"


def adopt(cfg: SweepConfig, runs: list, donors: tuple, state) -> set[str]:
    """The names of the points copied from a donor that computed them (main process copies; all get the set)."""
    def copy():
        adopted = set()
        for _, run_cfg in runs:
            if not cfg.fresh and finished_run(run_cfg) is not None:
                continue
            for donor in donors:
                if adopt_finished_run(donor, run_cfg, partial(print_on_main, state)) is not None:
                    print_on_main(state, f"[sweep] {run_cfg.run_name}: the same run as the finished "
                                         f"{donor.run_name} in {donor.out_dir}; copied, not trained again")
                    adopted.add(run_cfg.run_name)
                    break
        return adopted

    return on_main(state, copy) if donors else set()


def train_together(cfg: SweepConfig, runs: list, state, adopted: set[str]) -> None:
    """The unfinished points of each seed in groups of at most --group-size, one pass each (kdfast.group)."""
    by_seed: dict[tuple[int, int], list] = {}
    for point, run_cfg in runs:  # the no-KD baseline trains on its own seed's views, not the cache's: alone
        if isinstance(run_cfg, DistillConfig) and run_cfg.run_name not in adopted:
            by_seed.setdefault((point["seed"], point["slots"]), []).append(run_cfg)  # the same views
    for (seed, slots), members in by_seed.items():
        todo = [m for m in members if cfg.fresh or finished_run(m) is None]
        size = cfg.group_size or max(1, len(todo))
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            name = (f"together-s{seed}" + (f"-c{slots}" if slots else "")
                    + (f"-{start // size}" if size < len(todo) else ""))
            chunk = adopted_pass(members, chunk, name)
            print_on_main(state, f"[sweep] {name}: {len(chunk)} student{'s' * (len(chunk) > 1)} in one pass: "
                          + ", ".join(m.run_name for m in chunk))
            group.run(chunk, name)


def adopted_pass(members: list, chunk: list, name: str) -> list:
    """The members a pass runs: those left to train (chunk), or, where an interrupted pass of that name was saved
    with other points of the seed (it stopped while saving its students one by one), that pass's members: it
    resumes, and those finished since keep their files."""
    saved = group.saved_pass(name, members)
    return saved if saved and {m.run_name for m in chunk} <= {m.run_name for m in saved} else chunk


def _run_locked(cfg: SweepConfig, state, attrs: dict, served: dict, teacher_accuracy: float, donors: tuple) -> dict:
    runs = plan(cfg, served)
    adopted = adopt(cfg, runs, donors, state)
    if use_together(cfg, state.device.type):
        train_together(cfg, runs, state, adopted)
    rows, summary = [], {}
    for i, (point, run_cfg) in enumerate(runs):
        grouped = use_together(cfg, state.device.type) and isinstance(run_cfg, DistillConfig)
        done = None if cfg.fresh and not grouped and run_cfg.run_name not in adopted else finished_run(run_cfg)
        label = f"[sweep {i + 1}/{len(runs)}] {run_cfg.run_name}"
        if done is not None:
            kept = "copied above" if run_cfg.run_name in adopted else "finished earlier, kept"
            print_on_main(state, f"{label}: {done['test_accuracy']:.4f}" + ("" if grouped else f", {kept}"))
        else:
            (distill if isinstance(run_cfg, DistillConfig) else train).run(run_cfg)
        rows.append({"name": run_cfg.run_name, **point, **last_epoch_accuracy(run_cfg)})
        summary = {**summarize(rows, teacher_accuracy), "cache_slots_total": len(attrs.get("seeds", []))}
        if point["kind"] == "no_kd" and summary["warnings"]:
            print_on_main(state, f"[sweep] warning: {summary['warnings'][0]}")
        if state.is_main_process:
            write_results(cfg, rows, summary)
    print_on_main(state, "\n" + markdown(cfg, summary)
                  + f"\nwrote {os.path.join(cfg.out_dir, 'sweep.md')} (.json, .csv)")
    return {"runs": rows, "summary": summary,  # and the no-KD runs' configs: donors to a later sweep (kdfast table)
            "baselines": [run_cfg for point, run_cfg in runs if point["kind"] == "no_kd"]}


def parse(argv: list[str]) -> SweepConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(SweepConfig, argv, "kdfast sweep")


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
