"""A run's claim on its directory: the lock, and what it resumes or replaces, decided before any data work."""
from __future__ import annotations

from contextlib import contextmanager

from .. import cluster
from ..rundir import RunDir, finished_run
from .runtime import Runtime, on_main


@contextmanager
def open_run(cfg, runtime: Runtime):
    """The run's directory, locked for the whole run, with `resume_from` decided (before any data work).

    Refuses: an invalid name, a second writer of the same output, an interrupted state without
    --resume / --fresh, a state written under another config, a finished run under another config without --fresh.
    """
    run_dir = RunDir(cfg.out_dir, cfg.run_name)
    check_sync_bn(cfg, runtime)
    restarted = cfg.auto_resume and cluster.restart_count() > 0

    def claim():
        run_dir.prepare()
        run_dir.lock.acquire(runtime.print)
        try:
            run_dir.remove_stale_temporaries(runtime.print)
            resume_from = run_dir.check_resume(cfg.to_dict(), cfg.resume or restarted, cfg.fresh, runtime.print)
            kept = finished_run(cfg) if restarted and resume_from is None else None
            if restarted:
                runtime.print(f"[{cfg.run_name}] --auto-resume: restart {cluster.restart_count()} of this job: " + (
                    "continuing its saved state" if resume_from else "its finished run is kept" if kept else
                    "no state was saved yet: starting"))
            if resume_from is None and kept is None:
                run_dir.check_overwrite(cfg.to_dict(), cfg.fresh, runtime.print)
            return resume_from, kept
        except BaseException:
            run_dir.lock.release()
            raise

    run_dir.resume_from, run_dir.kept = on_main(runtime.accelerator, claim)
    try:
        yield run_dir
    finally:
        run_dir.lock.release()


def check_sync_bn(cfg, runtime: Runtime) -> None:
    """--sync-bn needs NCCL: torch's SyncBatchNorm has no CPU (gloo) kernel."""
    if cfg.sync_bn and runtime.device.type != "cuda":
        raise ValueError(f"--sync-bn: SyncBatchNorm needs GPUs with NCCL; torch has none on {runtime.device.type} "
                         "(gloo). Leave --sync-bn out here: each process then normalizes with its own batch's "
                         "statistics.")
