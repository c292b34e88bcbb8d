"""A run's first steps under kdfast.audit: what each would make a GPU wait for, counted on any machine."""
from __future__ import annotations

import contextlib
import importlib

from ..audit import SyncAudit
from ..augment import resample
from .loop import grouped, train_step
from .trainer import Trainer

ENTRY_MODULES = ("kdfast.train", "kdfast.distill")  # the entry points that call engine.fit


def audit_trainer(tr: Trainer, aug_seed: int, steps: int = 4, counter=SyncAudit):
    """Audit `steps` training steps of epoch 0 (views, loss step, backward, optimizer, EMA) with a counter (SyncAudit;
    on a GPU audit.CudaSyncCount, or a profiler with their interface); its steps[1] is the first step (set-up
    included: the epoch's permutation, a cache slot), the later ones are the steady state."""
    tr.reset_sums()
    tr.model.train()
    tr.loader.view_in_worker = False  # the streamed tier's GPU branch: views on the device
    batches = grouped(tr.loader.epoch(0, aug_seed), tr.loader.accumulate)
    cpu_backend, resample.CPU_BACKEND = getattr(resample, "CPU_BACKEND", None), "torch"  # a GPU's, not Pillow's
    try:
        with counter() as audit:
            audit.mark(tr.model, tr.optimizer, tr.sums, tr.bad_step, tr.ema, tr.loader.images)
            for step in range(steps):
                with audit.step():
                    train_step(tr, next(batches), step)
    finally:
        resample.CPU_BACKEND = cpu_backend
    return audit


@contextlib.contextmanager
def auditing(steps: int = 4, counter=SyncAudit):
    """Within it, an entry point's run (train.run, distill.run, ...) sets up as usual, then audits its first steps
    instead of training: the audit is appended to the yielded list, and the run returns None."""
    audits: list[SyncAudit] = []

    def fit(tr, data, reporter, aug_seed_for_epoch=None):
        seed = aug_seed_for_epoch(0) if aug_seed_for_epoch else 0
        audits.append(audit_trainer(tr, seed, steps, counter))

    modules = [importlib.import_module(name) for name in ENTRY_MODULES]
    saved = [m.fit for m in modules]
    for m in modules:
        m.fit = fit
    try:
        yield audits
    finally:
        for m, original in zip(modules, saved):
            m.fit = original
