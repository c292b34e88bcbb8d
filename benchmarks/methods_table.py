"""Accuracy of each distillation method on one teacher, one cache and the same seeds: the table of issue #7.

    python benchmarks/methods_table.py --pair cnn --data ../shared/data/cifar10-jpeg.tar.gz \
        --teacher-epochs 30 --student-epochs 30 --seeds 0 1 --parallel 4 --out runs/methods-cnn

Trains the pair's teacher (kept if it is already there), builds its logit cache with one slot per student
epoch, then trains the student without KD and with each method (KD, DKD, KD + logit standardization,
FitNets joint and two-stage; `--methods` picks), every one with each seed, `--parallel` at a time as
separate `kdfast` processes. Prints a markdown table (last-epoch test accuracy, mean and spread over the
seeds; img/s) and saves it with every run's numbers as JSON beside the checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.machine import describe  # noqa: E402

PAIRS = {"cnn": ("resnet18", "resnet8"), "vit": ("vit_tiny", "vit_student")}
# name -> flags of kdfast distill (None: kdfast train, no KD)
METHODS = {
    "no KD": None,
    "KD": ["--method", "kd"],
    "DKD": ["--method", "dkd"],
    "KD + logit std": ["--method", "kd", "--logit-std"],
    "DKD + logit std": ["--method", "dkd", "--logit-std"],
    "FitNets joint": ["--method", "fitnets", "--fitnets-schedule", "joint"],
    "FitNets two-stage": ["--method", "fitnets", "--fitnets-schedule", "two-stage"],
}
DEFAULT_METHODS = ["no KD", "KD", "DKD", "KD + logit std", "FitNets joint", "FitNets two-stage"]


def kdfast(args, *command) -> list[str]:
    return [sys.executable, "-m", *command, "--data", args.data, "--cache-dir", args.cache_dir,
            "--precision", args.precision, "--no-progress", *args.extra]


def run_all(jobs: list[tuple[str, list[str]]], parallel: int, log_dir: str, threads: int) -> dict[str, int]:
    """Run (name, command) jobs, `parallel` at a time; returns each one's exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            log = open(os.path.join(log_dir, name + ".log"), "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                print(f"  {name}: exit {proc.returncode}", flush=True)
                del running[name]
        time.sleep(0.5)
    return codes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=list(PAIRS), default="cnn")
    p.add_argument("--teacher-model", default=None, help="another registered teacher than the pair's (e.g. resnet20)")
    p.add_argument("--data", default=os.environ.get("KDFAST_DATA", "data"))
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out", default="runs/methods")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="auto")
    p.add_argument("--parallel", type=int, default=1, help="student runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("extra", nargs="*", help="more flags for every run, after --, e.g. -- --train-per-class 1000")
    args = p.parse_args(argv)
    teacher_model, student_model = PAIRS[args.pair]
    teacher_model = args.teacher_model or teacher_model
    os.makedirs(args.out, exist_ok=True)
    teacher = os.path.join(args.out, "teacher.pth")
    cache = os.path.join(args.out, "teacher.h5")
    batch = ["--batch-size", str(args.batch_size), "--out-dir", args.out]
    t0 = time.time()
    if not os.path.exists(teacher):
        subprocess.run(kdfast(args, "kdfast.train", "--model", teacher_model, "--name", "teacher", "--epochs",
                              str(args.teacher_epochs), *batch, "--resume"), check=True)
    subprocess.run(kdfast(args, "kdfast.cache", "build", "--teacher", teacher, "--out", cache, "--slots",
                          str(args.student_epochs)), check=True)
    t_teacher = time.time() - t0
    jobs = []
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method.replace(' ', '_').replace('+', 'plus')}-s{seed}"
            flags = ["--model", student_model, "--name", name, "--epochs", str(args.student_epochs), "--seed",
                     str(seed), *batch, "--resume"]
            if METHODS[method] is None:
                jobs.append((name, kdfast(args, "kdfast.train", *flags)))
            else:
                source = ["--teacher", teacher] if "fitnets" in METHODS[method] else ["--teacher-cache", cache]
                jobs.append((name, kdfast(args, "kdfast.distill", *flags, *METHODS[method], *source)))
    t1 = time.time()
    codes = run_all(jobs, args.parallel, args.out, args.threads)
    rows = []
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            name = f"{method.replace(' ', '_').replace('+', 'plus')}-s{seed}"
            path = os.path.join(args.out, name + ".json")
            if codes.get(name) == 0 and os.path.exists(path):
                meta = json.load(open(path))
                runs.append({"seed": seed, "accuracy": meta["test_accuracy"], "img_s": meta["train_img_per_s"],
                             "wall_s": meta["wall_time_s"]})
        accs = [r["accuracy"] for r in runs]
        rows.append({"method": method, "runs": runs, "mean": statistics.mean(accs) if accs else None,
                     "spread": (max(accs) - min(accs)) if accs else None,
                     "img_s": statistics.mean(r["img_s"] for r in runs) if runs else None})
    teacher_meta = json.load(open(os.path.join(args.out, "teacher.json")))
    base = next((r["mean"] for r in rows if r["method"] == "no KD" and r["mean"] is not None), None)
    lines = [f"teacher {teacher_model}: {teacher_meta['test_accuracy']:.4f} ({args.teacher_epochs} epochs); "
             f"student {student_model}, {args.student_epochs} epochs, seeds {args.seeds}, {args.parallel} runs at a time",
             "", "| method | test accuracy, mean | spread (max-min) | per seed | vs no KD | img/s |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if r["mean"] is None:
            lines.append(f"| {r['method']} | failed | | | | |")
            continue
        per_seed = ", ".join(f"{x['accuracy']:.4f}" for x in r["runs"])
        gain = f"{r['mean'] - base:+.4f}" if base is not None else "-"
        lines.append(f"| {r['method']} | {r['mean']:.4f} | {r['spread']:.4f} | {per_seed} | {gain} | {r['img_s']:,.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\nteacher + cache {t_teacher:.0f}s, students {time.time() - t1:.0f}s")
    with open(os.path.join(args.out, "methods_table.json"), "w") as f:
        json.dump({"machine": describe(), "args": vars(args), "teacher_accuracy": teacher_meta["test_accuracy"],
                   "rows": rows, "table": table}, f, indent=2)
    with open(os.path.join(args.out, "methods_table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
