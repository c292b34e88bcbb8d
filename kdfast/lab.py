"""The course lab end to end: six runs (KD students from a teacher-logit cache), six checkpoints, report.json.

    python -m kdfast.lab --preset smoke      # minutes on any CPU
    python -m kdfast.lab --preset cpu        # KD that visibly helps, 85 minutes on a 2-core AMX CPU
    accelerate launch -m kdfast.lab --preset full
"""
from __future__ import annotations

import copy
import os
import shlex
import sys
import time
from dataclasses import fields, replace
from datetime import datetime, timezone
from functools import partial

import tyro

from . import cache, distill, labreport, schemas, sweep, train
from .augment import AugmentSpec
from .cache import BuildConfig
from .checkpoint import checkpoint_paths
from .config.view import stored_size
from .data import check_view, load_dataset
from .config import (LAB_PRESETS, DataConfig, DistillConfig, EvalConfig, KDConfig, LabConfig, OutputConfig, RunConfig,
                     RuntimeConfig, SweepConfig, TrainConfig, TrainingConfig, ViewConfig, sections)
from .engine import on_main, process_state, say as print_on_main
from .errors import KdfastError, user_errors_exit
from .flags import command_line, hidden
from .files import FileLock, LockedError, check_file_target, read_json, write_json
from .machine import describe
from .methods import method_entry
from .models import create_model
from .models.library import PretrainedError
from .preflight import check_model_input, view_sizes
from .report import SEED_SUFFIX, SEEDS_DIR, format_table, lab_report
from .rundir import RunDir, finished_run


def plan(cfg: LabConfig) -> list[tuple[str, object, TrainConfig | BuildConfig]]:
    """(name, module, config) for each step of the lab: teacher, student without KD, cache build, student with KD.
    Every run gets the lab's sections whole; the pair's fields set its models, epochs, batch size and recipe."""
    cfg, runs = cfg.resolved(), []
    for pair in cfg.pairs:
        teacher, student = getattr(cfg, f"{pair}_teacher"), getattr(cfg, f"{pair}_student")
        views = {**sections(cfg, DataConfig, ViewConfig, RuntimeConfig), "aug_recipe": cfg.pair_recipe(pair)}
        common = {**views, **sections(cfg, EvalConfig, TrainingConfig, RunConfig, OutputConfig),
                  "batch_size": getattr(cfg, f"{pair}_batch_size"), "resume": not cfg.fresh}
        kd = {**common, **sections(cfg, KDConfig), "model": student, "epochs": getattr(cfg, f"{pair}_student_epochs")}
        teacher_path = checkpoint_paths(cfg.out_dir, f"{pair}_teacher")["pth"]
        teacher_cache = None if cfg.online else os.path.join(cfg.cache_dir, f"{pair}_teacher.h5")
        runs += [
            (f"{pair}_teacher", train, TrainConfig(**{
                **common, "model": teacher, "name": f"{pair}_teacher", "epochs": getattr(cfg, f"{pair}_teacher_epochs"),
                "pretrained": getattr(cfg, f"{pair}_teacher_pretrained"), "lr": getattr(cfg, f"{pair}_teacher_lr")})),
            (f"{pair}_student_no_kd", train, TrainConfig(**{
                **common, "model": student, "name": f"{pair}_student_no_kd", "epochs": kd["epochs"]})),
        ]
        if teacher_cache:  # one slot per student epoch: the cached student sees exactly what an online one would
            runs.append((f"{pair}_teacher_cache", cache, BuildConfig(**{
                **views, "teacher": teacher_path, "out": teacher_cache, "slots": kd["epochs"],
                "batch_size": max(cfg.eval_batch_size, 500), "overwrite": True})))
        runs.append((f"{pair}_student_with_kd", distill, DistillConfig(**{
            **kd, "name": f"{pair}_student_with_kd", "teacher": teacher_path, "teacher_cache": teacher_cache})))
        runs += seed_runs(cfg, pair, runs[-1][2], runs[-2 if teacher_cache is None else -3][2])
        for method in cfg.methods:  # extra students, one per method, from the same teacher (and cache)
            needs_features = method_entry(method).needs == "features"
            runs.append((f"{pair}_student_{method}", distill, DistillConfig(**{
                **kd, "name": f"{pair}_student_{method}", "method": method, "teacher": teacher_path,
                "teacher_cache": None if needs_features else teacher_cache})))
    return runs


def seed_runs(cfg: LabConfig, pair: str, with_kd: DistillConfig, no_kd: TrainConfig) -> list[tuple]:
    """The pair's two students with the seeds after --seed (--seeds N), in OUT_DIR/seeds: their spread."""
    runs = []
    for k in range(1, cfg.seeds):
        for name, module, run_cfg in ((f"{pair}_student_no_kd", train, no_kd),
                                      (f"{pair}_student_with_kd", distill, with_kd)):
            seeded = f"{name}{SEED_SUFFIX}{k}"
            runs.append((seeded, module, replace(run_cfg, name=seeded, seed=run_cfg.seed + k,
                                                 out_dir=os.path.join(cfg.out_dir, SEEDS_DIR))))
    return runs


def run_sweep(cfg: LabConfig, pair: str) -> str:
    """The --sweep-alphas x --sweep-taus grid of the pair's student from the lab's cache; returns its folder.

    The lab's own students are the sweep's seed-0 points when they match (same seed, alpha, tau): copied."""
    donors = tuple(run_cfg for name, _, run_cfg in plan(cfg)
                   if name.startswith(f"{pair}_student") and isinstance(run_cfg, TrainConfig))
    out = os.path.join(cfg.out_dir, f"sweep_{pair}")
    shared = sections(cfg, DataConfig, EvalConfig, TrainingConfig, RuntimeConfig, RunConfig, KDConfig)
    sweep.run(SweepConfig(**{
        **{k: v for k, v in shared.items() if k not in hidden(SweepConfig)}, "pair": pair,
        "model": getattr(cfg, f"{pair}_student"), "teacher_cache": os.path.join(cfg.cache_dir, f"{pair}_teacher.h5"),
        "alphas": cfg.sweep_alphas, "taus": cfg.sweep_taus, "seeds": cfg.sweep_seeds,
        "epochs": getattr(cfg, f"{pair}_student_epochs"), "batch_size": getattr(cfg, f"{pair}_batch_size"),
        "out_dir": out}), donors)
    return out


def why_trained(cfg: LabConfig, run_cfg: TrainConfig, after_teacher: bool) -> str:
    """What the log says before a lab run trains: why it is not kept."""
    if cfg.fresh:
        return "training (--fresh: every run is retrained)"
    done = RunDir(run_cfg.out_dir, run_cfg.run_name).finished_meta()
    if done is None:
        return "training (no finished run of it yet)"
    if after_teacher and finished_run(run_cfg) is not None:
        return "training again: its teacher was trained again in this lab"
    return "a finished run of it exists with another config (below): refused unless --fresh"


def write_merged(path: str, report: dict) -> dict:
    """Write this lab's pairs into report.json, keeping the other pairs a lab of them wrote there; returns the
    merged report. Read, merge and write happen under a short lock (labs of other pairs may write meanwhile)."""
    lock = FileLock(path + ".lock", f"the lab report {path}", "choose another --report")
    for attempt in range(600):
        try:
            lock.acquire(lambda *_: None)
            break
        except LockedError:
            if attempt == 599:
                raise
            time.sleep(0.1)
    try:
        kept = {}
        if os.path.exists(path):
            try:
                old = read_json(path, "lab report", "", schemas.REPORT)
                kept = {p: v for p, v in old.items() if p in ("cnn", "vit") and p not in report and isinstance(v, dict)}
            except KdfastError:
                kept = {}  # a damaged report is rewritten whole
        merged = {p: (report.get(p) or kept.get(p)) for p in ("cnn", "vit") if p in report or p in kept}
        write_json(path, merged)
        return merged
    finally:
        lock.release()


def preset_overrides(cfg: LabConfig) -> dict:
    """The fields that change what the runs do and differ from the preset's values (where the data is and which pairs
    run are not among them)."""
    cfg, preset = cfg.resolved(), LAB_PRESETS[cfg.preset].resolved()
    ignored = set(LabConfig.not_compared()) | {"data", "download", "report", "pairs"}

    def value(c, name):
        v = getattr(c, name)
        return v.filled() if name == "augment" else v

    return {f.name: getattr(cfg, f.name) for f in fields(LabConfig)
            if f.name not in ignored and value(cfg, f.name) != value(preset, f.name)}


def flag_words(name: str, value) -> list[str]:
    """A config field's value as the command-line words that give it (--augment.* for a spec's given fields)."""
    if isinstance(value, AugmentSpec):
        return [w for k, v in value.given_values().items() for w in flag_words(f"augment.{k}", v)]
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        head, _, last = flag.rpartition(".") if "." in flag else ("", "", flag[2:])
        return [flag if value else (f"{head}.no-{last}" if head else f"--no-{last}")]
    if isinstance(value, (tuple, list)):
        return [flag, *map(str, value)] if value else []
    return [flag, str(value)]


def lab_command(cfg: LabConfig) -> str:
    """The command line of this lab: its preset, where its data and outputs are, and every field it overrides."""
    preset, resolved = LAB_PRESETS[cfg.preset].resolved(), cfg.resolved()
    words = ["kdfast", "lab", "--preset", cfg.preset] + (flag_words("data", cfg.data) if cfg.data else [])
    for name in ("pairs", "out_dir", "report", "cache_dir"):
        if getattr(resolved, name) != getattr(preset, name):
            words += flag_words(name, getattr(resolved, name))
    for name in preset_overrides(cfg):
        words += flag_words(name, cfg.augment if name == "augment" else getattr(resolved, name))
    return shlex.join(words)


def run(cfg: LabConfig, command: str | None = None) -> dict:
    """Run (or resume) the six runs and write report.json after each one; returns the report. `command`: the command
    line, as the report's "how to reproduce" shows it.

    Each of the lab's pairs is locked in the report for the whole lab (a second lab of the same pair on the same
    report refuses at once; labs of other pairs share it: their pairs are merged into one report.json); each run
    locks its own checkpoint name and each cache build its file.
    """
    cfg.validate()
    cfg = cfg.resolved()
    for method in cfg.methods:
        method_entry(method)
        if method == "kd":
            raise ValueError("--methods: kd is the lab's KD student already (student_with_kd); list other methods")
    state = process_state(cfg.dist_timeout)
    held = []  # the lock, on the main process only

    def claim():
        check_file_target(cfg.report, "--report")
        for pair in cfg.pairs:
            held.append(FileLock(f"{cfg.report}.{pair}.lock", f"the {pair} pair of the lab report {cfg.report}",
                                 "choose another --report and --out-dir")
                        .acquire(partial(print_on_main, state)))

    on_main(state, claim)
    try:
        return _run_locked(cfg, state, command)
    finally:
        for lock in held:
            lock.release()


def preflight(cfg: LabConfig) -> int:
    """What train and distill check at their start, for every run of the lab before the first one trains: the views
    each pair's runs take on the data (check_view) and each model at the views' sizes (check_model_input), so that a
    mistake in the second pair stops the lab before the first pair has trained. Returns the runs checked."""
    loaded, checked = {}, 0
    for name, module, run_cfg in plan(cfg):
        if module is cache:
            continue
        run_cfg = run_cfg.resolved()
        key = (run_cfg.data, run_cfg.dataset, stored_size(run_cfg), run_cfg.data_tier)
        if key not in loaded:
            budget = int(run_cfg.data_budget_gb * 2**30) if run_cfg.data_budget_gb else None
            loaded[key] = load_dataset(run_cfg.data, run_cfg.cache_dir, run_cfg.download, log=lambda *a: None,
                                       dataset=run_cfg.dataset, store_size=stored_size(run_cfg),
                                       tier=run_cfg.data_tier, budget=budget)
        data = loaded[key]
        check_view(data.train, run_cfg.augment)
        if run_cfg.batch_size > len(data.train):
            pair = name.split("_")[0]
            raise ValueError(f"--{pair}-batch-size {run_cfg.batch_size} is larger than the training set "
                             f"({len(data.train)} samples); lower --{pair}-batch-size")
        flag = "--" + "-".join(name.split("_")[:2])  # --cnn-teacher, --vit-student
        model = create_model(run_cfg.model, num_classes=len(data.classes))
        check_model_input(model, run_cfg.model, flag, view_sizes(run_cfg.augment, data), len(data.classes), "cpu")
        checked += 1
    return checked


def _run_locked(cfg: LabConfig, state, command: str | None) -> dict:
    say = partial(print_on_main, state)  # main process only
    checked = on_main(state, lambda: preflight(cfg))
    say(f"[lab] start-up checks passed: the views and models of {checked} runs")
    machine = describe()
    extra = {"preset": cfg.preset, "preset_overrides": preset_overrides(cfg),
             "machine": machine.get("gpu") or machine["cpu"], "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
             "command": command or lab_command(cfg)}
    results, retrained, report, t_lab = {}, set(), {}, time.perf_counter()
    for name, module, run_cfg in plan(cfg):
        pair = name.split("_")[0]
        if module is cache:  # kept when it already holds this teacher's logits for these seeds
            t0 = time.perf_counter()
            cache.build(run_cfg)
            say(f"[lab] {name}: {run_cfg.out} ready, wall time {time.perf_counter() - t0:.1f}s")
            continue
        meta = None if cfg.fresh or pair in retrained else finished_run(run_cfg)
        if meta is not None:
            say(f"[lab] {name}: finished earlier with this config ({meta['test_accuracy']:.4f}); kept")
        else:
            say(f"[lab] {name}: {why_trained(cfg, run_cfg, pair in retrained)}")
            t0 = time.perf_counter()
            try:
                meta = module.run(run_cfg)
            except PretrainedError as e:  # the lab's flag for the teacher's library weights
                raise e.for_flag(f"--{pair}-teacher-pretrained") from None
            retrained.add(pair)  # the runs after a retrained teacher depend on it
            say(f"[lab] {name}: {meta['test_accuracy']:.4f} test accuracy, wall time {time.perf_counter() - t0:.1f}s")
        results[name] = meta
        report = lab_report(results, extra)
        details = report.get(pair, {}).get("details", {})
        if details.get("warning") and name.endswith("student_no_kd"):
            say(f"[lab] warning: {pair}: {details['warning']}")
        if details.get("kd_warning") and name.endswith("student_with_kd"):
            say(f"[lab] warning: {pair}: {details['kd_warning']}")
        if state.is_main_process:
            report = write_merged(cfg.report, report)
            labreport.write(cfg.out_dir, cfg.report, report, results, extra, labreport.saved_sweeps(cfg.out_dir),
                            time.perf_counter() - t_lab)
    sweeps = {}
    for pair in cfg.pairs if cfg.sweep_alphas else ():  # after every run: a sweep reads the pair's cache
        sweeps[f"Sweep: {pair}"] = run_sweep(cfg, pair)
        if state.is_main_process:
            labreport.write(cfg.out_dir, cfg.report, report, results, extra, sweeps, time.perf_counter() - t_lab)
    md = os.path.splitext(cfg.report)[0] + ".md"
    say(f"\n[lab] preset {cfg.preset}: total wall time {time.perf_counter() - t_lab:.1f}s; wrote {cfg.report} and {md}")
    for name, meta in results.items():
        say(f"[lab]   {name:<22} {meta['model']:<12} {meta['epochs']:>4} epochs {meta['wall_time_s']:>8.1f}s "
              f"{meta['train_img_per_s']:>9,.0f} img/s  acc {meta['test_accuracy']:.4f}")
    say(format_table(report))
    return report


def parse(argv: list[str]) -> LabConfig:
    """--preset picks the defaults; every other flag overrides them."""
    preset = "smoke"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in LAB_PRESETS:
        raise ValueError(f"--preset {preset!r}: not a preset; choose one of {', '.join(LAB_PRESETS)}")
    default = copy.copy(LAB_PRESETS[preset])
    default.augment = AugmentSpec.not_given(**default.augment.given_values())  # tyro: None for every flag not given
    return command_line(LabConfig, argv, "kdfast lab", default=default)


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    again = [a for a in argv if a not in ("--fresh", "--no-fresh")]  # the command that continues this lab
    return run(parse(argv), shlex.join(["kdfast", "lab", *again]))


if __name__ == "__main__":
    main()
