"""Does the training step wait for the GPU? Syncs per steady step for the paths of issue #26 (default, --ema, DKD from
a cache, cct, rrc, the streamed tier), and on a GPU how busy it is.

On CUDA: torch.cuda.set_sync_debug_mode("warn") counts the synchronizing operations of each step
(kdfast.audit.CudaSyncCount), then torch.profiler over the same steady steps gives the kernels per step and the GPU's
busy time (the sum of kernel times over the wall time: near 1 when the host keeps ahead). On a CPU: kdfast.audit
counts what would synchronize on a GPU (no busy time).

    python benchmarks/gpu_sync.py --batch-size 512 --steps 12     # on the GPU
    python benchmarks/gpu_sync.py --batch-size 16 --steps 4        # anywhere: the plumbing
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kdfast.audit import CudaSyncCount, SyncAudit  # noqa: E402
from kdfast.engine.stepaudit import auditing  # noqa: E402
from kdfast.machine import describe  # noqa: E402

PATHS = {"default": [], "--ema 0.999": ["--ema", "0.999"], "DKD from a cache": ["distill", "dkd"],
         "--aug-recipe cct": ["--aug-recipe", "cct"],
         "rrc + trivialaugment": ["--augment.view", "rrc", "--augment.crop-size", "24", "--augment.policy",
                                  "trivialaugment"],
         "stream tier + cct": ["--data-tier", "stream", "--aug-recipe", "cct"]}


class Profiled:
    """The counter interface of kdfast.audit over torch.profiler: kernels per step and the GPU's busy fraction of the
    steady steps (no sync between them: the host runs ahead as in training)."""

    def __init__(self):
        self.steps, self.busy, self.kernels = [Counter()], 0.0, 0.0
        self._t0, self._n = None, 0

    def mark(self, *things):
        pass

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        return self

    @contextlib.contextmanager
    def step(self):
        self.steps.append(Counter())
        if len(self.steps) == 3:  # the steady steps start: after the set-up step
            torch.cuda.synchronize()
            self.prof.__enter__()
            self._t0 = time.perf_counter()
        self._n += len(self.steps) >= 3
        yield self.steps[-1]

    def __exit__(self, *exc):
        if self._t0 is None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self.prof.__exit__(*exc)
        events = [e for e in self.prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
        self.busy = busy_us / 1e6 / wall
        self.kernels = sum(e.count for e in events) / max(1, self._n)


def run(path: list[str], work: str, batch: int, steps: int, counter):
    import tyro

    from kdfast import distill, train
    from kdfast.config import DistillConfig, TrainConfig
    from tests.conftest import teacher_and_cache, write_image_folder

    common = ["--epochs", "1", "--batch-size", str(batch), "--no-progress", "--out-dir", tempfile.mkdtemp(dir=work)]
    per_class = -(-batch * (steps + 1) // 3)
    kd, data = Path(work) / "kd", os.path.join(work, "tiny")
    with contextlib.redirect_stdout(io.StringIO()):  # the data (and a teacher's cache), before the audit
        if path[:1] == ["distill"] and not (kd / "t.h5").exists():
            teacher_and_cache(kd, n_train=per_class)
        if not os.path.exists(data):
            write_image_folder(data, n_train=per_class)
    with auditing(steps, counter) as audits, contextlib.redirect_stdout(io.StringIO()):
        if path[:1] == ["distill"]:
            distill.run(tyro.cli(DistillConfig, args=["--teacher-cache", str(kd / "t.h5"), "--model", "resnet8",
                                                      "--method", path[1], "--data", str(kd / "tiny"), "--cache-dir",
                                                      str(kd / "cache"), *common]))
        else:
            train.run(tyro.cli(TrainConfig, args=["--model", "resnet8", *path, "--data", data, "--cache-dir",
                                                  os.path.join(work, "cache"), *common]))
    return audits[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12, help="steps per path (the first is set-up)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    print(f"machine: {describe()}")
    print("| path | syncs/step | kernels/step | GPU busy |\n|---|---|---|---|" if cuda else
          "| path | syncs/step (kdfast.audit on a CPU) | launches/step |\n|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name, path in PATHS.items():
            audit = run(path, work, args.batch_size, args.steps, CudaSyncCount if cuda else SyncAudit)
            steady = audit.steps[2:]
            syncs = sum(s["sync"] for s in steady) / len(steady)
            if cuda:
                prof = run(path, work, args.batch_size, args.steps, Profiled)
                print(f"| {name} | {syncs:.1f} | {prof.kernels:.0f} | {prof.busy:.0%} |", flush=True)
            else:
                print(f"| {name} | {syncs:.1f} | {sum(s['launches'] for s in steady) / len(steady):.0f} |", flush=True)
            if syncs:
                print(audit.report(), flush=True)


if __name__ == "__main__":
    main()
