"""report.json: the course lab's keys (cnn/vit -> three accuracies as fractions) plus details per run."""
from __future__ import annotations

LAB_RUNS = {  # report key -> checkpoint name suffix
    "teacher_accuracy": "teacher",
    "student_accuracy_without_kd": "student_no_kd",
    "student_accuracy_with_kd": "student_with_kd",
}


def run_details(meta: dict, extra: dict) -> dict:
    kd = meta.get("kd") or {}
    return {
        "model": meta["model"], "parameters": meta["parameters"], "epochs": meta["epochs"],
        "alpha": kd.get("alpha"), "tau": kd.get("tau"), "kd_mode": kd.get("mode"),
        "teacher_cache_slots": kd.get("cache_slots"), "seed": meta["seed"],
        "device": meta["device"], "num_processes": meta["num_processes"], "precision": meta["precision"],
        "wall_time_s": meta["wall_time_s"], "train_img_per_s": meta["train_img_per_s"],
        "data_source": meta["data"]["source"], "data_fingerprint": meta["data"]["fingerprint"],
        "train_size": meta["data"]["train_size"], "test_size": meta["data"]["test_size"], **extra,
    }


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
        if entry:
            report[pair] = {**entry, "details": details}
    return report


def format_table(report: dict) -> str:
    lines = [f"{'pair':<5} {'teacher':>9} {'no KD':>9} {'with KD':>9}   (test accuracy)"]
    for pair, entry in report.items():
        cells = [entry.get(k) for k in LAB_RUNS]
        lines.append(f"{pair:<5} " + " ".join(f"{c:>9.4f}" if c is not None else f"{'-':>9}" for c in cells))
    return "\n".join(lines)
