"""report.json: the course lab's keys (cnn/vit -> three accuracies as fractions) plus details per run."""
from __future__ import annotations

import os
import statistics

from . import evidence

SWEEP_FLAGS = "--sweep-alphas 0.1 0.5 0.9 --sweep-taus 1 2 4 8"
IDENTITY = ("model", "data_fingerprint", "seed", "epochs", "wall_time_s")  # what tells one run from another
SEEDS_DIR, SEED_SUFFIX = "seeds", "-s"  # a lab's students of its other seeds: OUT_DIR/seeds/cnn_student_no_kd-s1


def is_seed_run(name: str) -> bool:
    head, _, k = name.rpartition(SEED_SUFFIX)
    return bool(head) and k.isdigit()


def seed_spread(results: dict, name: str) -> dict | None:
    """The accuracies of a lab student over its seeds (name, name-s1, ...): mean, std, spread; None with one seed."""
    accs = [results[name]["test_accuracy"]] + [m["test_accuracy"] for n, m in sorted(results.items())
                                               if is_seed_run(n) and n.rpartition(SEED_SUFFIX)[0] == name]
    if len(accs) < 2:
        return None
    return {"accuracies": accs, "mean": round(statistics.mean(accs), 4), "std": round(statistics.stdev(accs), 4),
            "spread": round(max(accs) - min(accs), 4)}

LAB_RUNS = {  # report key -> checkpoint name suffix
    "teacher_accuracy": "teacher",
    "student_accuracy_without_kd": "student_no_kd",
    "student_accuracy_with_kd": "student_with_kd",
}


def run_details(meta: dict, extra: dict) -> dict:
    kd = meta.get("kd") or {}
    return {
        "model": meta["model"], "parameters": meta["parameters"], "epochs": meta["epochs"],
        "method": kd.get("method", "kd" if kd else None), "alpha": kd.get("alpha"), "tau": kd.get("tau"),
        "logit_std": kd.get("logit_std"), "kd_mode": kd.get("mode"),
        "teacher_cache_slots": kd.get("cache_slots"), "seed": meta["seed"],
        "device": meta["device"], "num_processes": meta["num_processes"], "precision": meta["precision"],
        "wall_time_s": meta["wall_time_s"], "train_img_per_s": meta["train_img_per_s"],
        "data_source": relative(meta["data"]["source"]), "data_fingerprint": meta["data"]["fingerprint"],
        "train_size": meta["data"]["train_size"], "test_size": meta["data"]["test_size"],
        **{k: meta[k] for k in ("val_accuracy", "val_samples", "test_top5") if k in meta},
        **({"test_per_class_accuracy": per_class_accuracy(meta)} if meta.get("test_confusion") else {}), **extra,
    }


def relative(path: str | None) -> str | None:
    """A local path relative to the working folder where it lies inside it: a report names no machine's folders."""
    if not path or not os.path.isabs(path):
        return path
    inside = os.path.relpath(path)
    return path if inside.startswith("..") else inside


def per_class_accuracy(meta: dict) -> dict[str, float]:
    """class -> test accuracy, from the confusion matrix of the checkpoint's .json."""
    return {c: round(row[i] / max(sum(row), 1), 4) for i, (c, row) in enumerate(zip(meta["classes"],
                                                                                  meta["test_confusion"]))}


def other_runs(old: dict, new: dict) -> list[str]:
    """What tells the runs of report.json `old` from those of `new` (empty: the same runs, or no old report)."""
    found = []
    for pair, entry in old.items():
        for role, details in (entry.get("details") or {}).items():
            if role not in LAB_RUNS.values() or not isinstance(details, dict):
                continue
            now = (new.get(pair, {}).get("details") or {}).get(role)
            if now is None:
                found.append(f"it has a {pair} {role} these runs lack")
            elif any(details.get(k) != now.get(k) for k in IDENTITY):
                found.append(f"its {pair} {role} is " + ", ".join(f"{k} {details.get(k)}" for k in IDENTITY)
                             + "; this one's " + ", ".join(f"{k} {now.get(k)}" for k in IDENTITY))
    return found


def lab_report(results: dict[str, dict], extra: dict) -> dict:
    """results: checkpoint name (cnn_teacher, ...) -> checkpoint metadata. Pairs with no run yet are left out."""
    report = {}
    for pair in ("cnn", "vit"):
        entry, details = {}, {}
        for key, suffix in LAB_RUNS.items():
            meta = results.get(f"{pair}_{suffix}")
            if meta is not None:
                entry[key] = meta["test_accuracy"]
                details[suffix] = run_details(meta, extra)
                seeds = seed_spread(results, f"{pair}_{suffix}")
                if seeds:
                    details[suffix]["seeds"] = seeds
        methods = {name[len(f"{pair}_student_"):]: meta for name, meta in results.items()
                   if name.startswith(f"{pair}_student_") and name[len(pair) + 1:] not in LAB_RUNS.values()
                   and not is_seed_run(name)}
        if methods:  # extra KD students (kdfast lab --methods): their accuracy beside the lab's three
            details["methods"] = {m: {"test_accuracy": meta["test_accuracy"], **run_details(meta, extra)}
                                  for m, meta in methods.items()}
        teacher, no_kd = entry.get("teacher_accuracy"), entry.get("student_accuracy_without_kd")
        if teacher is not None and no_kd is not None and teacher <= no_kd:
            details["warning"] = (f"the teacher ({teacher:.4f}) is not more accurate than the student trained without "
                                  f"KD ({no_kd:.4f}): KD from it is expected to hurt. Train the teacher longer.")
        with_kd = entry.get("student_accuracy_with_kd")
        kd = details.get("student_with_kd", {})
        if teacher is not None and no_kd is not None and with_kd is not None and teacher > no_kd and with_kd < no_kd \
                and evidence.shown(with_kd, no_kd, kd.get("test_size", 0)):
            again = (f"`{extra['command']} {SWEEP_FLAGS}`" if extra.get("command")
                     else f"the lab again with {SWEEP_FLAGS}")
            details["kd_warning"] = (
                f"KD (alpha {kd.get('alpha')}, tau {kd.get('tau')}) lost to no KD ({with_kd:.4f} < {no_kd:.4f}, beyond "
                f"what the test set resolves) although the teacher is better ({teacher:.4f}). Other settings may suit "
                f"this data: run {again} (the lab keeps its finished runs and sweeps its logit cache).")
        if entry:
            report[pair] = {**entry, "details": details}
    return report


def format_table(report: dict) -> str:
    methods = sorted({m for entry in report.values() for m in entry.get("details", {}).get("methods", {})})
    lines = [f"{'pair':<5} {'teacher':>9} {'no KD':>9} {'with KD':>9}" + "".join(f" {m:>9}" for m in methods)
             + "   (test accuracy)"]
    for pair, entry in report.items():
        extra = entry.get("details", {}).get("methods", {})
        cells = [entry.get(k) for k in LAB_RUNS] + [extra.get(m, {}).get("test_accuracy") for m in methods]
        lines.append(f"{pair:<5} " + " ".join(f"{c:>9.4f}" if c is not None else f"{'-':>9}" for c in cells))
    return "\n".join(lines)
