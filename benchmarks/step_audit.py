"""What each recipe's training step would make a GPU wait for, counted on this machine (kdfast.audit), per step in
the steady state: syncs (the host waits for the device), uploads (non-blocking host-to-device copies) and launches
(operations on device tensors, about one kernel each). With --baseline REF the same is counted on the code of REF
(a git worktree; the audit's three files copied into it) in the same run: one table, before and after.

    python benchmarks/step_audit.py --baseline 2afb29d          # before (REF) and after (this tree)
    python benchmarks/step_audit.py --json out.json              # this tree only; rows as JSON too

Tiny synthetic data (32 px; 24 px crops for rrc), batch 32, ResNet-8 (ViT: timm's test_vit), fp32. The counts do not
depend on the CPU; the streamed tier's rows count its GPU branch (views on the device) here, not in the baseline,
whose views a CPU makes in the workers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "default (cifar view, CE)": ["--model", "resnet8"],
    "--ema 0.999": ["--model", "resnet8", "--ema", "0.999"],
    "--aug-recipe cct": ["--model", "resnet8", "--aug-recipe", "cct"],
    "--aug-recipe deit (rrc)": ["--model", "resnet8", "--aug-recipe", "deit", "--augment.crop-size", "24"],
    "rrc + trivialaugment": ["--model", "resnet8", "--augment.view", "rrc", "--augment.crop-size", "24",
                             "--augment.policy", "trivialaugment"],
    "stream tier, cct": ["--model", "resnet8", "--data-tier", "stream", "--aug-recipe", "cct"],
    "ViT (timm test_vit)": ["--model", "timm:test_vit"],
    "distill KD from a cache": ["distill", "kd"],
    "distill DKD from a cache": ["distill", "dkd"],
}
AUDIT_FILES = ("kdfast/audit.py", "kdfast/transfer.py", "kdfast/engine/stepaudit.py")


def count(work: str, steps: int) -> dict:
    """Audit every recipe with the kdfast importable here; {recipe: {sync, uploads, launches}} per steady step."""
    import tyro

    from kdfast import distill, train
    from kdfast.augment import resample
    from kdfast.config import DistillConfig, TrainConfig
    from kdfast.engine.stepaudit import auditing
    from tests.conftest import teacher_and_cache, write_image_folder

    if not hasattr(resample, "CPU_BACKEND"):  # older code: the torch resize a GPU runs, not Pillow's
        from kdfast.augment import rrc

        plain = resample.crop_resize
        rrc.crop_resize = lambda *a, backend="auto", **k: plain(*a, backend="torch", **k)
    from pathlib import Path

    data = write_image_folder(os.path.join(work, "tiny"), n_train=60)
    h5, _ = teacher_and_cache(Path(work) / "kd")
    rows = {}
    for name, flags in RECIPES.items():
        out = os.path.join(work, "runs", str(len(rows)))
        common = ["--epochs", "1", "--batch-size", "32", "--precision", "fp32", "--no-progress", "--data-workers",
                  "0", "--out-dir", out]
        with auditing(steps) as audits:
            if flags[0] == "distill":
                distill.run(tyro.cli(DistillConfig, args=["--teacher-cache", h5, "--model", "resnet8", "--method",
                                                          flags[1], "--data", os.path.join(work, "kd", "tiny"),
                                                          "--cache-dir", os.path.join(work, "kd", "cache"), *common,
                                                          "--batch-size", "6"]))
            else:
                train.run(tyro.cli(TrainConfig, args=[*flags, "--data", data, "--cache-dir",
                                                      os.path.join(work, "cache"), *common]))
        steady = audits[0].steps[2:]
        rows[name] = {k: sum(s[k] for s in steady) / len(steady) for k in ("sync", "uploads", "launches")}
    return rows


def baseline(ref: str, steps: int) -> dict:
    """count() on the code of git ref REF, in a worktree, in a subprocess."""
    tree = tempfile.mkdtemp(prefix="kdfast-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, ref], check=True, capture_output=True)
    try:
        for path in AUDIT_FILES:
            shutil.copy(os.path.join(ROOT, path), os.path.join(tree, path))
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(tree, "tests"), dirs_exist_ok=True)
        shutil.copy(__file__, os.path.join(tree, "benchmarks", "step_audit.py"))
        out = subprocess.run([sys.executable, os.path.join(tree, "benchmarks", "step_audit.py"), "--rows-only",
                              "--steps", str(steps)], capture_output=True, text=True, cwd=tree,
                             env={**os.environ, "PYTHONPATH": tree})
        if out.returncode:
            raise SystemExit(f"the baseline {ref} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git ref to count too (before)")
    parser.add_argument("--steps", type=int, default=4, help="steps audited (the first is set-up, not counted)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as work:
        import contextlib
        import io

        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            after = count(work, args.steps)
    if args.rows_only:
        print(json.dumps(after))
        return
    before = baseline(args.baseline, args.steps) if args.baseline else None
    from kdfast.machine import describe

    print(f"machine: {describe()}")
    head = "| recipe | syncs/step | uploads/step | launches/step |"
    if before:
        head = (f"| recipe | syncs/step {args.baseline} | now | uploads/step {args.baseline} | now "
                f"| launches/step {args.baseline} | now |")
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for name, row in after.items():
        cells = [f"{row[k]:.0f}" if not before else f"{before.get(name, {}).get(k, float('nan')):.0f} | {row[k]:.0f}"
                 for k in ("sync", "uploads", "launches")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"after": after, "before": before, "baseline": args.baseline}, f, indent=1)


if __name__ == "__main__":
    main()
