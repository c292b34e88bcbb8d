"""A KD table as the papers print it: teacher -> student pairs x methods x seeds, with the published numbers beside.

    kdfast table --pairs resnet32x4:resnet8x4 resnet56:resnet20 --methods kd dkd kd+ls --seeds 3 --dataset cifar100
    kdfast table --pairs resnet56:resnet20 --epochs 24 --train-per-class 400 --val-per-class 50   # a CPU-sized one

For each pair: the teacher is trained (OUT/teachers/TEACHER, the tables' recipe) or reused (a .pth given as the
teacher, or a finished run of the same config), its logit cache built once (OUT/caches/TEACHER.h5, one slot a student
epoch: cached KD = online KD), then each method is a sweep of kdfast.sweep over the pair's folder OUT/TEACHER-STUDENT
(the students alone, ce, are every sweep's no-KD baseline: trained once, kept). No loop of its own: every run is an
ordinary kdfast run, finished ones are kept, so the same command continues a table after an interruption.
Results: table.md, table.csv, table.json in OUT: last-epoch test accuracy, mean ± std over seeds; where several
alphas or taus are given, the point chosen on the validation split (--val-per-class); the published CIFAR-100 number
and its source; wall time and img/s.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from functools import partial

from . import cache, published, sweep, train
from .config import (BuildConfig, DataConfig, EvalConfig, OutputConfig, RunConfig, RuntimeConfig, SweepConfig,
                     TrainConfig, TrainingConfig, ViewConfig, sections)
from .checkpoint import checkpoint_paths, read_meta
from .config.table import DKD_WARMUP, TableConfig
from .engine import on_main, process_state, say as print_on_main
from .engine.best import BEST
from .errors import user_errors_exit
from .files import FileLock, ensure_dir, read_json, write_json, write_text
from .flags import command_line
from .methods import method_entry
from .models import model_entry
from .rundir import RunDir, finished_run


def method_spec(spec: str) -> tuple[str, bool]:
    """(method, logit standardization) of a --methods entry: kd, dkd, kd+ls, ..."""
    name, _, extra = spec.partition("+")
    if extra not in ("", "ls"):
        raise ValueError(f"--methods {spec}: the only addition is +ls (logit standardization), e.g. kd+ls")
    entry = method_entry(name)
    if entry.needs != "logits" or name == "deit":
        raise ValueError(f"--methods {spec}: a table reads teacher logits from a cache; choose kd or dkd (+ls)")
    return name, extra == "ls"


def common_fields(cfg: TableConfig) -> dict:
    return {**sections(cfg, DataConfig, EvalConfig, TrainingConfig, RuntimeConfig, RunConfig, OutputConfig),
            "batch_size": cfg.batch_size, "recipe": "tables", "resume": not cfg.fresh}


def teacher_run(cfg: TableConfig, teacher: str) -> TrainConfig | None:
    """The teacher's training run (the tables' recipe), or None for a checkpoint given as the teacher."""
    if teacher.endswith((".pth", ".safetensors")):
        return None
    return TrainConfig(**{**common_fields(cfg), **sections(cfg, ViewConfig), "model": teacher, "name": teacher,
                          "epochs": cfg.teacher_epochs or cfg.epochs, "out_dir": os.path.join(cfg.out_dir, "teachers")})


def cache_build(cfg: TableConfig, teacher: str, checkpoint: str) -> BuildConfig:
    """The teacher's cache: one slot a student epoch (cached KD is then online KD). Kept while it holds this
    teacher's logits for these views; replaced when the teacher was trained again (the table owns OUT/caches)."""
    name = os.path.splitext(os.path.basename(teacher))[0]
    return BuildConfig(**{**sections(cfg, DataConfig, RuntimeConfig, ViewConfig), "teacher": checkpoint,
                          "out": os.path.join(cfg.out_dir, "caches", f"{name}.h5"), "slots": cfg.epochs,
                          "batch_size": max(cfg.eval_batch_size, 500), "progress": cfg.progress, "overwrite": True})


def method_sweep(cfg: TableConfig, student: str, spec: str, caches: tuple[str, ...], folder: str) -> SweepConfig:
    """One method's cell of a pair: a sweep of its alphas x taus with --seeds seeds, in the pair's folder, from the
    teacher's cache (several: their ensemble, probabilities at tau averaged)."""
    method, logit_std = method_spec(spec)
    shared = {k: v for k, v in common_fields(cfg).items() if k != "resume"}
    return SweepConfig(**{**shared, "model": student, "teacher_cache": caches, "method": method,
                          "logit_std": logit_std, "alphas": cfg.alphas, "taus": cfg.taus, "seeds": cfg.seeds,
                          "epochs": cfg.epochs, "dkd_warmup": DKD_WARMUP, "out_dir": folder,
                          "eval_every": 1 if cfg.best_epoch and not cfg.val_per_class else None})


def pair_names(pair: str) -> tuple[tuple[str, ...], str]:
    """(teachers, student) of TEACHER:STUDENT; TEACHER may be A+B+...: the ensemble of their caches."""
    teacher, student = pair.split(":")
    return tuple(teacher.split("+")), student


def teacher_key(teachers: tuple[str, ...]) -> str:
    """The teachers' name in folders and in the published tables: model names, or checkpoints' file names."""
    return "+".join(os.path.splitext(os.path.basename(t))[0] for t in teachers)


def check_models(cfg: TableConfig) -> None:
    """Every model name known before anything trains (a checkpoint teacher is checked when it loads)."""
    for pair in cfg.pairs:
        teachers, student = pair_names(pair)
        for name in [t for t in teachers if not t.endswith((".pth", ".safetensors"))] + [student]:
            try:
                model_entry(name)
            except ValueError as e:
                raise ValueError(f"--pairs {pair}: {e}") from None
        for spec in cfg.methods:
            method_spec(spec)


def teacher_cache(cfg: TableConfig, teacher: str, say) -> tuple[str, float]:
    """One teacher trained (or its finished run kept, or a checkpoint taken) and its cache built (or kept); returns
    the cache and the teacher's training wall time (as its run recorded it: a kept run's too)."""
    teacher_cfg = teacher_run(cfg, teacher)
    if teacher_cfg is None:
        checkpoint, meta = teacher, read_meta(teacher)
    else:
        meta = None if cfg.fresh else finished_run(teacher_cfg)
        kept = meta is not None
        meta = meta or train.run(teacher_cfg)
        checkpoint = RunDir(teacher_cfg.out_dir, teacher_cfg.run_name).paths["pth"]
        say(f"[table] teacher {teacher}: {meta['test_accuracy']:.4f} ({checkpoint}"
            + (", finished earlier with this config: kept)" if kept else ")"))
    return cache.build(cache_build(cfg, teacher, checkpoint)), float(meta.get("wall_time_s") or 0.0)


def run_pair(cfg: TableConfig, pair: str, say, donors: list) -> list[dict]:
    """The pair's teachers and caches, then every method's sweep; returns its rows (teacher, ce, each method).
    donors: the no-KD runs of the pairs before (extended with this pair's)."""
    teachers, student = pair_names(pair)
    built = [teacher_cache(cfg, t, say) for t in teachers]
    caches, teacher_time = tuple(c for c, _ in built), sum(t for _, t in built)
    folder = os.path.join(cfg.out_dir, f"{teacher_key(teachers)}-{student}")
    results = {}
    for spec in cfg.methods:
        say(f"[table] {pair}: {spec}, {cfg.seeds} seed(s) in {folder}")
        sweep_cfg = method_sweep(cfg, student, spec, caches, folder)
        results[spec] = sweep.run(sweep_cfg, tuple(donors))
        donors += results[spec]["baselines"]
    return pair_rows(cfg, pair, results, folder, teacher_time)


def pair_rows(cfg: TableConfig, pair: str, results: dict, folder: str, teacher_time: float) -> list[dict]:
    """Rows of one pair: the teacher (from its caches' test logits; an ensemble's at the first tau), ce (the no-KD
    baseline) and each method."""
    teachers, student = pair_names(pair)
    first = next(iter(results.values()))
    summary = first["summary"]
    base = summary["no_kd"]
    rows = [{"pair": pair, "method": "teacher", "seeds": 1, "mean": summary["teacher_accuracy"], "std": None,
             "published": published.published(teacher_key(teachers), student, "teacher"),
             "wall_time_s": teacher_time}]
    rows.append(cell(cfg, pair, "ce", base, None, first["runs"], folder, "no_kd"))
    for spec, result in results.items():
        rows.append(cell(cfg, pair, spec, result["summary"]["best"], base, result["runs"], folder, None,
                         result["summary"]["chosen_on"]))
    return rows


def cell(cfg: TableConfig, pair: str, spec: str, stat: dict, base: dict | None, runs: list[dict], folder: str,
         kind: str | None, chosen_on: str | None = None) -> dict:
    """One row: last-epoch test mean ± std over seeds, its gain over ce ± the standard error of that difference, the
    chosen point, the best-epoch figure, wall time and img/s of its runs, the published number."""
    teachers, student = pair_names(pair)
    mine = [r for r in runs if (r["kind"] == kind if kind else
                                (r["kind"] != "no_kd" and (r["alpha"], r["tau"]) == (stat["alpha"], stat["tau"])))]
    row = {"pair": pair, "method": spec, "seeds": stat["seeds"], "mean": stat["mean"], "std": stat["std"],
           "accuracies": stat["accuracies"], "val_mean": stat.get("val_mean"),
           "published": published.published(teacher_key(teachers), student, spec),
           "wall_time_s": sum(r["wall_time_s"] for r in mine),
           "img_per_s": sum(r["img_per_s"] for r in mine) / max(1, len(mine))}
    if base is not None:
        row["gain"] = stat["mean"] - base["mean"]
        row["gain_std"] = math.sqrt(stat["std"] ** 2 / stat["seeds"] + base["std"] ** 2 / base["seeds"])
        row["point"] = {"alpha": stat["alpha"], "tau": stat["tau"], "chosen_on": chosen_on}
    if cfg.best_epoch:
        row["best_epoch_mean"] = sum(best_epoch_accuracy(folder, r["name"]) for r in mine) / max(1, len(mine))
    return row


def best_epoch_accuracy(folder: str, name: str) -> float:
    """The test accuracy of the run's best epoch: the one chosen on validation where the run has a validation split
    (NAME.best.json, engine.best), else the highest of every epoch's test accuracy (chosen on test: optimistic)."""
    best = checkpoint_paths(folder, name + BEST)["json"]
    if os.path.exists(best):
        return read_json(best, "best-epoch record")["test_accuracy"]
    return max(r["test_accuracy"] for r in RunDir(folder, name).read_metrics() if "test_accuracy" in r)


def best_label(cfg: TableConfig) -> str:
    return ("best epoch (chosen on validation)" if cfg.val_per_class else
            "best epoch (chosen on test: optimistic)")


def percent(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def point_text(cfg: TableConfig, row: dict) -> str:
    """The row's α and τ (dkd: τ only, its CE weight is 1), and what they were chosen on where there was a choice."""
    point = row.get("point")
    if not point:
        return ""
    text = (f"τ {point['tau']:g}" if row["method"].startswith("dkd") else
            f"α {point['alpha']:g}, τ {point['tau']:g}")
    return text + (f" ({point['chosen_on']})" if len(cfg.alphas) > 1 or len(cfg.taus) > 1 else "")


def markdown(cfg: TableConfig, rows: list[dict]) -> str:
    """The table: a row per pair and method, then what the columns mean and where the published numbers come from."""
    best = f" | {best_label(cfg)}" if cfg.best_epoch else ""
    lines = [f"test accuracy (%) of the last epoch, mean ± std over {cfg.seeds} seed(s); {cfg.epochs} epochs of "
             f"the tables' recipe, batch {cfg.batch_size}", "",
             f"| teacher → student | method | accuracy | gain over ce | point (chosen on) | published | wall time | "
             f"img/s{best} |", "| --- | --- | ---: | ---: | --- | ---: | ---: | ---:" + (" | ---:" if best else "")
             + " |"]
    for r in rows:
        acc = percent(r["mean"]) + (f" ± {percent(r['std'])}" if r.get("std") is not None and r["seeds"] > 1 else "")
        gain = f"{100 * r['gain']:+.2f} ± {100 * r['gain_std']:.2f}" if "gain" in r else ""
        shown = point_text(cfg, r)
        pub = f"{r['published']:.2f}" if r.get("published") is not None else "-"
        ips = f"{r['img_per_s']:.0f}" if r.get("img_per_s") else "-"
        extra = f" | {percent(r.get('best_epoch_mean'))}" if best else ""
        teachers, student = pair_names(r["pair"])
        lines.append(f"| {teacher_key(teachers)} → {student} | {r['method']} | {acc} | {gain} | {shown} | {pub} | "
                     f"{r['wall_time_s'] / 60:.1f} min | {ips}{extra} |")
    lines += ["", "gain over ce: the difference of the means ± its standard error over seeds "
              "(sqrt(std_m²/n + std_ce²/n)). teacher: from its cache's test logits; its wall time is its training's"
              + (f"; A+B: the ensemble of their caches, probabilities at τ {cfg.taus[0]:g} averaged."
                 if any("+" in p.split(":")[0] for p in cfg.pairs) else "."),
              "published: CIFAR-100, 240 epochs of the same recipe; sources:"]
    lines += [f"- {k}: {v}" for k, v in published.SOURCES.items()]
    if cfg.dataset != "cifar100" or cfg.epochs != 240:
        lines.append(f"this table: --dataset {cfg.dataset}, {cfg.epochs} epochs: compare the gains, not the "
                     "accuracies, with the published ones.")
    return "\n".join(lines) + "\n"


def write_results(cfg: TableConfig, rows: list[dict]) -> None:
    write_json(os.path.join(cfg.out_dir, "table.json"), {"config": cfg.to_dict(), "rows": rows})
    buf = io.StringIO()
    fields = ["pair", "method", "seeds", "mean", "std", "gain", "gain_std", "val_mean", "published", "wall_time_s",
              "img_per_s", "best_epoch_mean"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(os.path.join(cfg.out_dir, "table.csv"), buf.getvalue())
    write_text(os.path.join(cfg.out_dir, "table.md"), markdown(cfg, rows))


def run(cfg: TableConfig) -> dict:
    cfg.validate()
    cfg = cfg.resolved()
    check_models(cfg)
    state = process_state(cfg.dist_timeout)
    say, held = partial(print_on_main, state), []

    def claim():
        ensure_dir(cfg.out_dir, "--out-dir")
        held.append(FileLock(os.path.join(cfg.out_dir, "table.lock"), f"the table in {cfg.out_dir}",
                             "choose another --out-dir").acquire(say))

    on_main(state, claim)
    try:
        rows, donors = [], []
        for pair in cfg.pairs:
            rows += run_pair(cfg, pair, say, donors)
            if state.is_main_process:
                write_results(cfg, rows)
        say("\n" + markdown(cfg, rows) + f"\nwrote {os.path.join(cfg.out_dir, 'table.md')} (.csv, .json)")
        return {"rows": rows}
    finally:
        for lock in held:
            lock.release()


def parse(argv: list[str]) -> TableConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(TableConfig, argv, "kdfast table")


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
