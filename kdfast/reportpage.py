"""report.md's text: for a lab, the setup (data sizes, chance, what the test set resolves), the runs (model names and
sizes, schedule, precision, wall time), what the numbers show and do not show, per-class accuracy, the figures and
how to reproduce it; for any folder of runs, a table and what differs. Pure: results in, markdown out
(labreport.py draws the figures and writes the files)."""
from __future__ import annotations

import os
import shlex
import statistics

from . import evidence
from .report import format_table, is_seed_run, relative, seed_spread
from .rundir import comparable_config

ROLE_LABELS = {"teacher": "teacher", "student_no_kd": "student, no KD", "student_with_kd": "student, KD"}
SMALL_TRAIN, FEW_EPOCHS = 10_000, 10  # below either, a lab's numbers show that it runs, not which method is better


def short_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def model_label(meta: dict) -> str:
    return f"{meta['model']} ({short_count(meta['parameters'])} params)"


def role_label(name: str, pair: str) -> str:
    role = name[len(pair) + 1:]
    return ROLE_LABELS.get(role, "student, " + role.replace("student_", ""))


def run_label(name: str, pair: str, meta: dict) -> str:
    return f"{role_label(name, pair)}: {model_label(meta)}"


def pair_runs(results: dict, pair: str) -> dict:
    """The pair's runs of --seed (the lab's checkpoints), not those of its other seeds."""
    return {name: meta for name, meta in results.items() if name.startswith(pair + "_") and not is_seed_run(name)}


def setup(results: dict, extra: dict, total_wall: float | None) -> list[str]:
    header = [f"preset `{extra['preset']}`" if extra.get("preset") else None,
              f"machine: {extra['machine']}" if extra.get("machine") else None, extra.get("date"),
              f"total wall time {total_wall:.0f} s" if total_wall else None]
    lines = [" · ".join(h for h in header if h) or "rebuilt by kdfast report", "", "## Setup", ""]
    seen = set()
    for meta in results.values():
        d = meta["data"]
        if d["fingerprint"] in seen:
            continue
        seen.add(d["fingerprint"])
        n_cls = len(meta["classes"])
        val = f", {meta['val_samples']:,} validation images" if meta.get("val_samples") else ""
        lines.append(f"- **Data**: `{relative(d['source'])}` (fingerprint {d['fingerprint']}), {n_cls} classes: "
                     f"{d['train_size']:,} training images, {d['test_size']:,} test images{val}. Chance accuracy "
                     f"(guessing): {1 / n_cls:.4f}.")
        n, p = d["test_size"], 0.5
        lines.append(f"- **What the test set resolves**: an accuracy measured on {n:,} images has a standard error of "
                     f"up to {evidence.standard_error(p, n):.4f}; two accuracies closer than about "
                     f"{evidence.resolution(p, p, n):.4f} (two standard errors of their difference, at 0.5) are not "
                     "told apart by it. Every comparison below is judged this way.")
    small = [m for m in results.values() if m["data"]["train_size"] < SMALL_TRAIN or m["epochs"] < FEW_EPOCHS]
    if small:
        lines.append(f"- **Size**: {len(small)} of {len(results)} runs trained on fewer than {SMALL_TRAIN:,} images or "
                     f"for fewer than {FEW_EPOCHS} epochs: their numbers show that every part runs, not which method "
                     "is better. For results, run `kdfast lab --preset cpu` (a CPU, about an hour and a half) or "
                     "`kdfast lab --preset full` (a GPU).")
    return lines


def runs_table(results: dict) -> list[str]:
    lines = ["## Runs", "", "| run | model | params | epochs | batch | optimizer, lr, schedule | precision, device | "
             "test accuracy (± s.e.) | wall time (s) | train img/s | KD |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for name, meta in results.items():
        kd, recipe, cfg = meta.get("kd") or {}, meta.get("recipe") or {}, meta.get("config") or {}
        how = "" if not kd else (f"{kd.get('method', 'kd')} α {kd.get('alpha')} τ {kd.get('tau')}, {kd.get('mode')}"
                                 + (", logit std" if kd.get("logit_std") else ""))
        optim = f"{recipe.get('optimizer')}, {recipe.get('lr', 0):.3g}, {recipe.get('schedule')}" if recipe else "-"
        se = evidence.standard_error(meta["test_accuracy"], meta["data"]["test_size"])
        lines.append(f"| {name} | {meta['model']} | {short_count(meta['parameters'])} | {meta['epochs']} | "
                     f"{cfg.get('batch_size', '-')} | {optim} | {meta['precision']}, {meta['device']} "
                     f"x{meta['num_processes']} | {meta['test_accuracy']:.4f} ± {se:.4f} | "
                     f"{meta['wall_time_s']:.0f} | "
                     f"{meta['train_img_per_s']:,.0f} | {how} |")
    return lines


def findings(report: dict, results: dict) -> list[str]:
    """Per pair: each model against chance, the teacher against the student without KD, KD against no KD; each
    difference called shown or not by the test set's size."""
    lines = ["## What the numbers show", ""]
    for pair in report:
        runs = pair_runs(results, pair)
        named = {name[len(pair) + 1:]: (f"{role_label(name, pair)} ({meta['model']})", meta)
                 for name, meta in runs.items()}
        lines.append(f"**{pair}**")
        lines.append("")
        for label, meta in named.values():
            said = evidence.against_chance(label, meta["test_accuracy"], len(meta["classes"]),
                                           meta["data"]["test_size"])
            if said:
                lines.append(f"- {said}.")
        for a, b in (("teacher", "student_no_kd"), ("student_with_kd", "student_no_kd")):
            if a in named and b in named:
                (la, ma), (lb, mb) = named[a], named[b]
                sa, sb = (seed_spread(results, f"{pair}_{r}") for r in (a, b))
                if sa and sb:  # seeds on both sides: their means, judged against their spread too
                    lines.append("- " + evidence.compare(f"{la}, mean of {len(sa['accuracies'])} seeds", sa["mean"],
                                                         f"{lb}, mean of {len(sb['accuracies'])} seeds", sb["mean"],
                                                         ma["data"]["test_size"], max(sa["spread"], sb["spread"]))
                                 + f" (seeds: {seeds_text(sa)}; {seeds_text(sb)}).")
                    continue
                lines.append("- " + evidence.compare(la, ma["test_accuracy"], lb, mb["test_accuracy"],
                                                     ma["data"]["test_size"]) + ".")
        for key in ("warning", "kd_warning"):
            if report[pair].get("details", {}).get(key):
                lines.append(f"- **Warning:** {report[pair]['details'][key]}")
        lines.append("")
    return lines


def seeds_text(seeds: dict) -> str:
    return f"{seeds['mean']:.4f} ± {seeds['std']:.4f}, " + ", ".join(f"{a:.4f}" for a in seeds["accuracies"])


def per_class(results: dict, pair: str) -> list[str]:
    """Per-class test accuracy of the pair's final models (the diagonal of their confusion matrices)."""
    runs = {name: meta for name, meta in pair_runs(results, pair).items() if meta.get("test_confusion")}
    if not runs:
        return []
    first = next(iter(runs.values()))
    classes, names = first["classes"], list(runs)
    per_class_n = sum(first["test_confusion"][0])
    lines = [f"| class | " + " | ".join(role_label(n, pair) for n in names) + " |",
             "| --- |" + " ---: |" * len(names)]
    for i, cls in enumerate(classes):
        cells = []
        for n in names:
            row = runs[n]["test_confusion"][i]
            cells.append(f"{row[i] / max(sum(row), 1):.2f}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return lines + ["", f"Each class has about {per_class_n:,} test images: a per-class accuracy has a standard "
                        f"error of up to {evidence.standard_error(0.5, per_class_n):.2f}."]


def reproduce(extra: dict, results: dict, out_dir: str, report_path: str) -> list[str]:
    """The commands that made the report (as the lab recorded them) and that rebuild and check it."""
    command = extra.get("command")
    if not command:
        source = next((m["data"]["source"] for m in results.values()), None)
        command = f"kdfast lab --preset {extra.get('preset') or 'smoke'}" + (
            f" --data {shlex.quote(relative(source))}" if source else "")
        if extra.get("preset_overrides"):
            command += f"   # with the overrides {extra['preset_overrides']}"
    first = next(iter(results), None)
    lines = ["## How to reproduce", "", "```bash", command,
             f"kdfast report {shlex.quote(relative(os.path.abspath(out_dir)))} --report "
             f"{shlex.quote(relative(os.path.abspath(report_path)))}   # this page again, from the saved runs"]
    if first:
        checkpoint = relative(os.path.abspath(os.path.join(out_dir, first))) + ".pth"
        lines.append(f"kdfast evaluate --checkpoint {shlex.quote(checkpoint)}   # a run's test accuracy again, from "
                     "its checkpoint")
    return lines + ["```", ""]


def markdown(report: dict, results: dict, extra: dict, figures: dict[str, dict[str, str]],
             sweeps_md: dict[str, str], total_wall: float | None, out_dir: str, report_path: str) -> str:
    """figures[pair] -> {"curves": png, "confusion": png} (those drawn)."""
    lines = ["# kdfast lab report", "", *setup(results, extra, total_wall), "", *runs_table(results), "",
             "```", format_table(report), "```", "", *findings(report, results)]
    for pair in report:
        drawn = figures.get(pair, {})
        if "curves" in drawn:
            lines += [f"## {pair}: accuracy per epoch", "", f"![{pair}: accuracy per epoch]({drawn['curves']})", ""]
        table = per_class(results, pair)
        if table:
            lines += [f"## {pair}: per-class test accuracy and confusion matrices", "", *table, ""]
        if "confusion" in drawn:
            lines += [f"![{pair}: confusion matrices]({drawn['confusion']})", ""]
    for title, text in sweeps_md.items():
        lines += [f"## {title}", "", text]
    lines += reproduce(extra, results, out_dir, report_path)
    return "\n".join(lines) + "\n"


def differing_fields(runs: dict) -> dict[str, dict]:
    """name -> {field: value} of the config fields that change what a run computes and differ between the runs (as
    `--fresh` compares them: a field an older run lacks reads as what it resolved to)."""
    configs = {name: comparable_config(meta["config"]) for name, meta in runs.items()}
    keys = sorted({k for c in configs.values() for k in c})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
    return {name: {k: c.get(k) for k in differing} for name, c in configs.items()}


def runs_overview(runs: dict, out_dir: str) -> str:
    """report.md of any folder of runs: a table of each run's metrics, then what differs between their configs."""
    lines = [f"# kdfast runs in `{relative(os.path.abspath(out_dir))}`", "",
             f"{len(runs)} finished runs. Accuracy of the last epoch; ± one standard error of the test set.", "",
             "| run | model | params | epochs | validation | test (± s.e.) | KD | wall time (s) | train img/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, meta in runs.items():
        kd = meta.get("kd") or {}
        how = f"{kd.get('method', 'kd')} α {kd.get('alpha')} τ {kd.get('tau')}" if kd else ""
        se = evidence.standard_error(meta["test_accuracy"], meta.get("test_samples") or meta["data"]["test_size"])
        val = f"{meta['val_accuracy']:.4f}" if "val_accuracy" in meta else "-"
        lines.append(f"| {name} | {meta['model']} | {short_count(meta['parameters'])} | {meta['epochs']} | {val} | "
                     f"{meta['test_accuracy']:.4f} ± {se:.4f} | {how} | {meta['wall_time_s']:.0f} | "
                     f"{meta['train_img_per_s']:,.0f} |")
    accs = [m["test_accuracy"] for m in runs.values()]
    if len(accs) > 1:
        lines += ["", f"test accuracy over the runs: mean {statistics.mean(accs):.4f}, from {min(accs):.4f} to "
                      f"{max(accs):.4f}"]
    diffs = differing_fields(runs)
    fields = sorted({k for d in diffs.values() for k in d})
    lines += ["", "## What differs between the runs' configs", ""]
    if not fields:
        lines.append("Nothing but their names: the same config.")
    else:
        lines += ["| run | " + " | ".join(fields) + " |", "| --- |" + " --- |" * len(fields)]
        lines += [f"| {name} | " + " | ".join(f"{d.get(k)}" for k in fields) + " |" for name, d in diffs.items()]
    return "\n".join(lines) + "\n"
