"""report.md: saved runs as a page people read, from their checkpoints' .json and metrics files.

    kdfast report runs/smoke/models_saved                 # a lab's runs: OUT_DIR/report.json and report.md
    kdfast report runs/sweep --report runs/overview.json   # any runs: report.md, a table of every run

`kdfast lab` writes report.json and report.md after every run; `kdfast report DIR` rebuilds them from DIR (report.json
keeps exactly the lab's schema), beside the runs unless --report says where, never over a report of other runs.
"""
from __future__ import annotations

import glob
import os
import sys

from . import plots, schemas
from .config import ReportConfig
from .errors import KdfastError, user_errors_exit
from .flags import command_line
from .files import ensure_dir, read_json, write_json, write_text
from .report import SEED_SUFFIX, SEEDS_DIR, is_seed_run, lab_report, other_runs, relative
from .reportpage import markdown, pair_runs, run_label, runs_overview
from .rundir import RunDir


def saved_results(out_dir: str) -> dict[str, dict]:
    """name -> checkpoint metadata of every lab run saved in out_dir (cnn_teacher, vit_student_dkd, ...)."""
    order = {"teacher": 0, "student_no_kd": 1, "student_with_kd": 2}
    found = []
    for path in glob.glob(os.path.join(out_dir, "*_*.json")) + glob.glob(os.path.join(out_dir, SEEDS_DIR, "*_*.json")):
        name = os.path.basename(path)[:-5]
        pair, _, role = name.partition("_")
        role = role.rpartition(SEED_SUFFIX)[0] if is_seed_run(name) else role
        if pair in ("cnn", "vit") and "." not in name and (role == "teacher" or role.startswith("student_")):
            found.append(((pair, order.get(role, 3), role), name, path))
    results = {}
    for _, name, path in sorted(found):
        fix = "Delete it (and its checkpoint), or train the run again."
        meta = read_json(path, "checkpoint description", fix, schemas.CHECKPOINT)
        if "test_accuracy" in meta:
            results[name] = schemas.check_finished(meta, path, fix)
    return results


def curves(out_dir: str, results: dict, pair: str) -> dict[str, list[tuple[int, float]]]:
    """label (role, model and size) -> [(epoch, accuracy)] of the pair's runs: validation where they have it."""
    out = {}
    for name, meta in pair_runs(results, pair).items():
        records = RunDir(out_dir, name).read_metrics()
        key = "val_accuracy" if any("val_accuracy" in r for r in records) else "test_accuracy"
        out[run_label(name, pair, meta)] = [(r["epoch"] + 1, r[key]) for r in records if r.get(key) is not None]
    return out


def saved_sweeps(out_dir: str) -> dict[str, str]:
    """The sweeps a lab ran (OUT_DIR/sweep_cnn, sweep_vit), by title."""
    return {f"Sweep: {pair}": os.path.join(out_dir, f"sweep_{pair}") for pair in ("cnn", "vit")
            if os.path.exists(os.path.join(out_dir, f"sweep_{pair}", "sweep.md"))}


def figures(out_dir: str, folder: str, stem: str, report: dict, results: dict) -> dict[str, dict[str, str]]:
    """Each pair's accuracy curves (0 to 1, chance line) and its final models' confusion matrices, as PNGs beside the
    report; pair -> {"curves": file, "confusion": file} of those drawn."""
    drawn = {}
    split = "validation" if any(r.get("val_samples") for r in results.values()) else "test"
    for pair in report:
        runs, drawn[pair] = pair_runs(results, pair), {}
        classes = next(iter(runs.values()))["classes"] if runs else []
        points = curves(out_dir, results, pair)
        if any(points.values()):
            drawn[pair]["curves"] = f"{stem}_{pair}_curves.png"
            plots.accuracy_curves(points, os.path.join(folder, drawn[pair]["curves"]),
                                  f"{pair}: {split} accuracy per epoch", f"{split} accuracy", 1 / len(classes))
        matrices = {run_label(n, pair, m): m["test_confusion"] for n, m in runs.items() if m.get("test_confusion")}
        if matrices:
            drawn[pair]["confusion"] = f"{stem}_{pair}_confusion.png"
            plots.confusion_matrices(matrices, classes, os.path.join(folder, drawn[pair]["confusion"]),
                                     f"{pair}: test confusion matrices of the final models (rows: true class)")
    return drawn


def write(out_dir: str, report_path: str, report: dict, results: dict, extra: dict,
          sweeps: dict[str, str] | None = None, total_wall: float | None = None) -> str:
    """Write report.md and its figures beside report_path; returns the report.md path."""
    folder = os.path.dirname(os.path.abspath(report_path))
    stem = os.path.splitext(os.path.basename(report_path))[0]
    drawn = figures(out_dir, folder, stem, report, results)
    sweeps_md = {}
    for title, sweep_dir in (sweeps or {}).items():
        if os.path.exists(os.path.join(sweep_dir, "sweep.md")):
            with open(os.path.join(sweep_dir, "sweep.md")) as f:
                sweeps_md[title] = f.read().replace("](sweep_heatmap.png)",
                                                    f"]({os.path.relpath(sweep_dir, folder)}/sweep_heatmap.png)")
    path = os.path.join(folder, stem + ".md")
    write_text(path, markdown(report, results, extra, drawn, sweeps_md, total_wall, out_dir, report_path))
    return path


def finished_runs(out_dir: str) -> dict[str, dict]:
    """name -> metadata of every finished run saved in out_dir (NAME.json with a test accuracy beside its weights)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        stem = path[:-5]
        if os.path.exists(stem + ".pth") or os.path.exists(stem + ".safetensors"):
            meta = read_json(path, "checkpoint description", "Delete it (and its checkpoint), or train the run again.",
                             schemas.CHECKPOINT)
            if "test_accuracy" in meta and "config" in meta:
                runs[os.path.basename(stem)] = meta
    return runs


def recorded_extra(old: dict) -> dict:
    """preset, machine, date and command as the lab recorded them in its report.json."""
    for entry in old.values():
        for details in entry.get("details", {}).values():
            if isinstance(details, dict) and "preset" in details:
                return {k: details.get(k) for k in ("preset", "preset_overrides", "machine", "date", "command")
                        if details.get(k) is not None}
    return {}


def check_replaceable(path: str, old: dict, report: dict, overwrite: bool) -> None:
    """A report.json of other runs (another model, data, seed or wall time in a pair's runs) is not replaced without
    --overwrite."""
    other = [] if overwrite else other_runs(old, report)
    if other:
        raise KdfastError(f"--report {path} holds the report of other runs ({other[0]}). Write this one elsewhere "
                          "(--report PATH; default: beside the runs, OUT_DIR/report.json), or pass --overwrite.")


def overview(cfg: ReportConfig, report_path: str) -> str:
    """report.md for a folder of runs that are not a lab's: every run's metrics and the config fields that differ."""
    runs = finished_runs(cfg.out_dir)
    if not runs:
        raise KdfastError(f"{cfg.out_dir}: no finished runs here (NAME.json with a test accuracy beside NAME.pth). "
                          "Point at a kdfast run's, lab's or sweep's --out-dir.")
    md = os.path.splitext(report_path)[0] + ".md"
    marker = f"<!-- kdfast report of the runs in {os.path.abspath(cfg.out_dir)} -->"
    if os.path.exists(md) and not cfg.overwrite:
        with open(md, errors="replace") as f:
            if marker not in f.read():
                raise KdfastError(f"--report: {md} exists and is not a report of the runs in {cfg.out_dir}. Write "
                                  "this one elsewhere (--report PATH), or pass --overwrite.")
    ensure_dir(os.path.dirname(os.path.abspath(md)), "--report's folder")
    write_text(md, runs_overview(runs, cfg.out_dir) + "\n" + marker + "\n")
    print(f"wrote {md} ({len(runs)} runs)")
    return md


def run(cfg: ReportConfig) -> str:
    cfg = cfg.resolved()
    if cfg.sweep and not os.path.exists(os.path.join(cfg.sweep, "sweep.md")):
        raise KdfastError(f"--sweep {cfg.sweep}: no sweep here (no sweep.md). Point at a kdfast sweep's --out-dir.")
    report_path = cfg.report or os.path.join(cfg.out_dir, "report.json")
    results = saved_results(cfg.out_dir)
    if not results:
        return overview(cfg, report_path)
    old = read_json(report_path, "lab report", "Delete it, or write this report elsewhere with --report PATH.",
                    schemas.REPORT) if os.path.exists(report_path) else {}
    extra = recorded_extra(old)
    report = lab_report(results, extra)
    check_replaceable(report_path, old, report, cfg.overwrite)
    ensure_dir(os.path.dirname(os.path.abspath(report_path)), "--report's folder")
    write_json(report_path, report)
    sweeps = {**saved_sweeps(cfg.out_dir), **({"Sweep": cfg.sweep} if cfg.sweep else {})}
    path = write(cfg.out_dir, report_path, report, results, extra, sweeps)
    print(f"wrote {relative(os.path.abspath(report_path))} and {relative(path)}")
    return path


def parse(argv: list[str]) -> ReportConfig:
    return command_line(ReportConfig, argv, "kdfast report")


@user_errors_exit
def main(argv: list[str] | None = None):
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
