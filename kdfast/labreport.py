"""report.md: the lab's runs as a page people read (table, curves, a sweep when one was run), from saved runs.

    kdfast report models_saved --report report.json [--sweep runs/sweep]

`kdfast lab` writes report.md beside report.json after every run; `kdfast report DIR` rebuilds both from the
checkpoints and metrics files in DIR (report.json keeps exactly the lab's schema).
"""
from __future__ import annotations

import glob
import os
import sys

import tyro

from . import plots, schemas
from .config import ReportConfig
from .errors import KdfastError, user_errors_exit
from .files import ensure_dir, read_json, write_json, write_text
from .report import format_table, lab_report
from .rundir import RunDir

ROLE_LABELS = {"teacher": "teacher", "student_no_kd": "student, no KD", "student_with_kd": "student, KD"}


def saved_results(out_dir: str) -> dict[str, dict]:
    """name -> checkpoint metadata of every lab run saved in out_dir (cnn_teacher, vit_student_dkd, ...)."""
    order = {"teacher": 0, "student_no_kd": 1, "student_with_kd": 2}
    found = []
    for path in glob.glob(os.path.join(out_dir, "*_*.json")):
        name = os.path.basename(path)[:-5]
        pair, _, role = name.partition("_")
        if pair in ("cnn", "vit") and (role == "teacher" or role.startswith("student_")):
            found.append(((pair, order.get(role, 3), role), name, path))
    results = {}
    for _, name, path in sorted(found):
        fix = "Delete it (and its checkpoint), or train the run again."
        meta = read_json(path, "checkpoint description", fix, schemas.CHECKPOINT)
        if "test_accuracy" in meta:
            results[name] = schemas.check_finished(meta, path, fix)
    return results


def curves(out_dir: str, results: dict, pair: str) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for name in results:
        if name.startswith(pair + "_"):
            role = name[len(pair) + 1:]
            label = ROLE_LABELS.get(role, "student, " + role.replace("student_", ""))
            records = RunDir(out_dir, name).read_metrics()
            key = "val_accuracy" if any("val_accuracy" in r for r in records) else "test_accuracy"
            out[label] = [(r["epoch"] + 1, r[key]) for r in records if r.get(key) is not None]
    return out


def saved_sweeps(out_dir: str) -> dict[str, str]:
    """The sweeps a lab ran (OUT_DIR/sweep_cnn, sweep_vit), by title."""
    return {f"Sweep: {pair}": os.path.join(out_dir, f"sweep_{pair}") for pair in ("cnn", "vit")
            if os.path.exists(os.path.join(out_dir, f"sweep_{pair}", "sweep.md"))}


def markdown(report: dict, results: dict, extra: dict, images: dict[str, str], sweeps_md: dict[str, str],
             total_wall: float | None) -> str:
    header = [f"preset `{extra['preset']}`" + (f" (overrides: {extra.get('preset_overrides')})"
                                               if extra.get("preset_overrides") else "") if extra.get("preset") else None,
              f"machine: {extra['machine']}" if extra.get("machine") else None, extra.get("date"),
              f"total wall time {total_wall:.0f} s" if total_wall else None]
    lines = ["# kdfast lab report", "", " · ".join(h for h in header if h) or "rebuilt by kdfast report", "",
             "| run | model | epochs | test accuracy | wall time (s) | train img/s | precision | KD |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, meta in results.items():
        kd = meta.get("kd") or {}
        how = "" if not kd else (f"{kd.get('method', 'kd')} α {kd.get('alpha')} τ {kd.get('tau')}, {kd.get('mode')}"
                                 + (", logit std" if kd.get("logit_std") else ""))
        lines.append(f"| {name} | {meta['model']} | {meta['epochs']} | {meta['test_accuracy']:.4f} | "
                     f"{meta['wall_time_s']:.0f} | {meta['train_img_per_s']:,.0f} | {meta['precision']} | {how} |")
    lines += ["", "```", format_table(report), "```", ""]
    for pair, entry in report.items():
        for key in ("warning", "kd_warning"):
            if entry.get("details", {}).get(key):
                lines.append(f"**Warning ({pair}):** {entry['details'][key]}\n")
    for label, image in images.items():
        lines += [f"## {label}", "", f"![{label}]({image})", ""]
    for title, text in sweeps_md.items():
        lines += [f"## {title}", "", text]
    return "\n".join(lines) + "\n"


def write(out_dir: str, report_path: str, report: dict, results: dict, extra: dict,
          sweeps: dict[str, str] | None = None, total_wall: float | None = None) -> str:
    """Write report.md and its figures beside report_path; returns the report.md path."""
    folder = os.path.dirname(os.path.abspath(report_path))
    stem = os.path.splitext(os.path.basename(report_path))[0]
    images = {}
    for pair in report:
        points = curves(out_dir, results, pair)
        if any(points.values()):
            image = f"{stem}_{pair}_curves.png"
            split = "validation" if any(r.get("val_samples") for r in results.values()) else "test"
            title = f"{pair}: {split} accuracy per epoch"
            plots.accuracy_curves(points, os.path.join(folder, image), title, f"{split} accuracy")
            images[title] = image
    sweeps_md = {}
    for title, sweep_dir in (sweeps or {}).items():
        if os.path.exists(os.path.join(sweep_dir, "sweep.md")):
            with open(os.path.join(sweep_dir, "sweep.md")) as f:
                sweeps_md[title] = f.read().replace("](sweep_heatmap.png)",
                                                    f"]({os.path.relpath(sweep_dir, folder)}/sweep_heatmap.png)")
    path = os.path.join(folder, stem + ".md")
    write_text(path, markdown(report, results, extra, images, sweeps_md, total_wall))
    return path


def run(cfg: ReportConfig) -> str:
    cfg = cfg.resolved()
    if cfg.sweep and not os.path.exists(os.path.join(cfg.sweep, "sweep.md")):
        raise KdfastError(f"--sweep {cfg.sweep}: no sweep here (no sweep.md). Point at a kdfast sweep's --out-dir.")
    results = saved_results(cfg.out_dir)
    if not results:
        raise KdfastError(f"{cfg.out_dir}: no lab runs saved here (cnn_teacher.json, ...). Point at the lab's --out-dir.")
    old = read_json(cfg.report, "lab report", "Delete it: kdfast report writes it again.", schemas.REPORT) \
        if os.path.exists(cfg.report) else {}
    extra = {}
    for entry in old.values():  # preset, machine and date as the lab recorded them
        for details in entry.get("details", {}).values():
            if isinstance(details, dict) and "preset" in details:
                extra = {k: details.get(k) for k in ("preset", "preset_overrides", "machine", "date")}
    report = lab_report(results, extra)
    ensure_dir(os.path.dirname(os.path.abspath(cfg.report)), "--report's folder")
    write_json(cfg.report, report)
    sweeps = {**saved_sweeps(cfg.out_dir), **({"Sweep": cfg.sweep} if cfg.sweep else {})}
    path = write(cfg.out_dir, cfg.report, report, results, extra, sweeps)
    print(f"wrote {cfg.report} and {path}")
    return path


def parse(argv: list[str]) -> ReportConfig:
    return tyro.cli(ReportConfig, args=argv, prog="kdfast report")


@user_errors_exit
def main(argv: list[str] | None = None):
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
