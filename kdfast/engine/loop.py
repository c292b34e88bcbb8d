"""The one training loop: run the epoch, end it, save the progress, stop if asked. Every run trains here: teachers,
students without KD, KD students, and K students together (kdfast.group); a reporter says what an epoch and the end
write (one record and checkpoint, or K)."""
from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from .. import collectives
from ..augment import epoch_seed
from ..data import Batch, DataError, Dataset
from ..data.types import WorkerLost
from ..errors import Interrupted, KdfastError
from ..progress import bar as progress_bar
from ..rundir import describe_progress
from .preemption import Preemption, lost_processes, resume_advice, stopped
from .records import ESTIMATE_STEPS, time_estimate, tracking
from .trainer import Trainer

LOG_EVERY = 25  # steps between progress-bar updates (each one is a host-device sync)


class Reporter(Protocol):
    """What a run writes: its start lines, each epoch's records, its checkpoints at the end."""

    def start(self, tr: Trainer, data: Dataset, progress: dict) -> None: ...

    def end_epoch(self, tr: Trainer, data: Dataset, epoch: int, epoch_time: float, wall: float) -> None: ...

    def finish(self, tr: Trainer, data: Dataset, wall: float): ...

    def stop_early(self) -> bool: ...


class NonFiniteLoss(KdfastError):
    """The loss became NaN or infinite: the run stops and writes no checkpoint."""


def fit(tr: Trainer, data: Dataset, reporter: Reporter, aug_seed_for_epoch: Callable[[int], int] | None = None):
    """Train tr.cfg.epochs epochs (a resumed run from its saved step) and return what the reporter's finish returns.

    Epoch e trains on the views of augmentation seed aug_seed_for_epoch(e) (default: a seed per epoch derived from
    the run's seed; a logit cache: its slots' seeds). Every process runs this; only the main process prints and writes.
    """
    aug_seed_for_epoch = aug_seed_for_epoch or (lambda epoch: epoch_seed(tr.cfg.seed, epoch))
    progress = restored(tr)
    reporter.start(tr, data, progress)
    wall = wall_clock(progress["wall_time_s"])
    with lost_processes(tr.run_dir, tr.cfg):
        with Preemption() as stop, tracking(tr):
            for epoch in range(progress["epoch"], tr.cfg.epochs):
                epoch_time = run_epoch(tr, epoch, progress, aug_seed_for_epoch(epoch), stop, wall)
                reporter.end_epoch(tr, data, epoch, epoch_time, wall())
                save_progress(tr, epoch + 1, 0, 0.0, wall())
                signum = stop.requested(tr.acc)
                if signum:  # asked during the evaluation: the epoch is whole and saved
                    raise stopped(signum, tr.cfg.run_name, f"epoch {epoch + 1}", tr.run_dir.state_dir, tr.cfg)
                if reporter.stop_early():
                    break
        return reporter.finish(tr, data, wall())


def restored(tr: Trainer) -> dict:
    """The progress to continue from: the saved state's (its weights, optimizer, schedule and scaler restored into the
    trainer), or the start."""
    if not tr.run_dir.resume_from:
        return {"epoch": 0, "step": 0, "wall_time_s": 0.0}
    progress = tr.run_dir.state.restore(tr.run_dir.resume_from, tr.modules(), tr.optimizer, tr.scheduler,
                                        tr.acc.scaler)
    tr.runtime.print(f"[{tr.cfg.run_name}] resuming {describe_progress(progress)} from {tr.run_dir.state_dir}")
    return progress


def wall_clock(before_s: float) -> Callable[[], float]:
    """Seconds of the run so far: before_s (the resumed state's) and this process's since now."""
    t0 = time.perf_counter()
    return lambda: before_s + time.perf_counter() - t0


def step_seed(run_seed: int, epoch: int, step: int, rank: int) -> int:
    """The torch RNG seed of one micro-batch (drop-path masks; rank: its piece of the global batch): resuming at any
    step needs no RNG state, and one process accumulating N micro-batches draws what N processes draw."""
    return (((run_seed * 1_000_003 + epoch) * 1_000_033 + step) * 131 + rank) % (1 << 62)


def train_step(tr: Trainer, micro_batches: list[Batch], global_step: int) -> torch.Tensor:
    """One optimizer step on the micro-batches of one global batch (one, unless --grad-accum), through Accelerate's
    gradient accumulation (no gradient sync before the last); returns the (detached) loss. No host-device sync."""
    step_loss, acc = 0.0, tr.acc
    epoch, step = divmod(global_step, len(tr.loader))
    for m, batch in enumerate(micro_batches):  # micro-batch m of this process is piece m * processes + rank
        torch.manual_seed(step_seed(tr.cfg.seed, epoch, step, m * acc.num_processes + acc.process_index))
        with acc.accumulate(tr.model):
            loss, logits = tr.loss_step(tr.model, batch)
            acc.backward(loss.sum())  # K students: the sum reaches each one's own parameters only
        step_loss = step_loss + loss.detach() / len(micro_batches)
        tr.sums["correct"] += (logits.detach().argmax(-1) == batch.labels).sum(-1)
        tr.sums["seen"] += len(batch.labels)
    if tr.recipe.grad_clip > 0:
        tr.clip(acc, tr.model, tr.recipe.grad_clip)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.ema is not None:
        tr.ema.update_parameters(tr.trained())
    tr.sums["loss"] += step_loss / acc.num_processes  # summed over the processes: the step's mean loss
    tr.bad_step = torch.where((tr.bad_step < 0) & ~torch.isfinite(step_loss).all(), global_step, tr.bad_step)
    return step_loss.sum()


def grouped(batches, size: int):
    """Consecutive micro-batches in lists of `size`: one list per optimizer step."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def between_steps(batches, failed: Callable):
    """The batches; a failure of the data while the next one is fetched (a worker lost, a damaged stored image)
    is raised as failed(error) returns it."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except (DataError, WorkerLost) as e:
            raise failed(e) from None
        yield item


def data_stopped(tr: Trainer, e: Exception, epoch: int, done: int, epoch_time: float, wall: float) -> Exception:
    """A run whose data failed between two steps ends like a preemption: the steps done are saved (one process; with
    several, the others are inside a step's collectives and report this one lost) and the error says how to go on.
    A worker killed by a signal exits 128 + that signal, as the run would have."""
    if tr.acc.num_processes > 1:
        return e
    save_progress(tr, epoch, done, epoch_time, wall)
    text = (f"[{tr.cfg.run_name}] {str(e).rstrip('.')}: stopped after step {done} of epoch {epoch + 1}; the state is "
            f"saved in {tr.run_dir.state_dir}. {resume_advice(tr.cfg)}")
    if isinstance(e, WorkerLost) and e.signum:
        return Interrupted(e.signum, text)
    return type(e)(text)


def estimated(tr: Trainer, epoch: int, start: int, done: int, t_first: float, estimate: int) -> float:
    """At the end of the first step: its time; at the end of the estimate's steps: the line of the run's estimate."""
    if tr.runtime.device.type == "cuda":
        torch.cuda.synchronize()  # twice a run: the time of steps, not of their launches
    now = time.perf_counter()
    if done == start + 1:
        return now
    steps = len(tr.loader)
    step_s = (now - t_first) / (estimate - 1)
    tr.runtime.print(time_estimate(tr.cfg.run_name, step_s, steps, steps * (tr.cfg.epochs - epoch) - done,
                                   estimate - 1))
    return now


def check_finite(tr: Trainer) -> None:
    """Stop at the first non-finite loss (collective under several processes); a host-device sync."""
    bad = int(collectives.all_reduce(tr.bad_step.clone(), "max").item())
    if bad < 0:
        return
    saved = tr.run_dir.state.saved()
    kept = (f"the last good state ({describe_progress(saved['progress'])}) is kept in {saved['dir']}" if saved
            else "no state was saved before it")
    steps = len(tr.loader)
    raise NonFiniteLoss(f"[{tr.cfg.run_name}] the loss became NaN or infinite at step {bad % steps + 1} of epoch "
                        f"{bad // steps + 1}; stopped, no checkpoint written; {kept}. Lower --lr (or raise --warmup / "
                        "set --grad-clip), then start over with --fresh.")


def save_progress(tr: Trainer, epoch: int, step: int, epoch_time: float, wall: float) -> None:
    """Save the resumable state: `step` steps of epoch `epoch` are done (step 0: the epoch before is whole)."""
    check_finite(tr)
    sums = tr.global_sums()  # collective
    if tr.acc.is_main_process:
        progress = {"epoch": epoch, "step": step, "sums": sums, "epoch_time_s": epoch_time, "wall_time_s": wall}
        tr.run_dir.state.save(tr.modules(), tr.optimizer, tr.scheduler, tr.acc.scaler, progress, tr.cfg.to_dict())
    collectives.barrier()


def run_epoch(tr: Trainer, epoch: int, progress: dict, aug_seed: int, stop: Preemption, wall) -> float:
    """Train the rest of an epoch (a resumed one from its saved step and sums); returns its training time (s). Saves
    the state every --checkpoint-every steps, and on a stop asked for, then raises."""
    cfg, acc, loader = tr.cfg, tr.acc, tr.loader
    resumed = epoch == progress["epoch"] and progress.get("step", 0) > 0
    start_step, time_before = (progress["step"], progress.get("epoch_time_s", 0.0)) if resumed else (0, 0.0)
    tr.reset_sums(progress.get("sums") if resumed else None)
    # what makes the host wait for the device (a GPU's) happens on logging steps only: a stop request shared by
    # several processes, the finite-loss check, the bar's loss (read only when a bar shows it)
    check_every = 1 if acc.num_processes == 1 else LOG_EVERY  # one process: a flag, no collective
    finite_every = 1 if tr.runtime.device.type == "cpu" else LOG_EVERY  # .item() waits for a GPU
    show_every = max(1, min(LOG_EVERY, len(loader) // 10))  # the bar's loss: about 10 updates an epoch, or more
    bar = progress_bar(len(loader), f"{cfg.run_name} {epoch + 1}/{cfg.epochs}", cfg.progress and acc.is_main_process,
                       initial=start_step, leave=False)
    shows = not bar.disable
    # the first epoch this process trains: its time per step, from the steps after the first (compiling, warm-up)
    estimate = min(ESTIMATE_STEPS + 1, len(loader) - start_step) if epoch == progress["epoch"] else 0
    estimate = estimate if estimate >= 2 else 0
    measured = 0.0
    tr.model.train()  # evaluation left it in eval mode
    t0 = time.perf_counter()
    done = start_step

    def failed(e):  # the loader failed while fetching the next step: the `done` steps are whole
        return data_stopped(tr, e, epoch, done, time_before + time.perf_counter() - t0, wall())

    batches = between_steps(grouped(loader.epoch(epoch, aug_seed, start_step), loader.accumulate), failed)
    for step, micro in enumerate(batches, start=start_step):
        global_step = epoch * len(loader) + step
        loss = train_step(tr, micro, global_step)
        bar.update(1)
        done = step + 1
        if estimate and done in (start_step + 1, start_step + estimate):
            measured = estimated(tr, epoch, start_step, done, measured, estimate)
        if done % finite_every == 0:
            check_finite(tr)
        if shows and (done % show_every == 0 or done == len(loader)):
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{tr.scheduler.get_last_lr()[0]:.3g}")
        signum = stop.requested(acc) if done % check_every == 0 or done == len(loader) else 0
        if signum or (cfg.checkpoint_every and (global_step + 1) % cfg.checkpoint_every == 0 and done < len(loader)):
            save_progress(tr, epoch, done, time_before + time.perf_counter() - t0, wall())
        if signum:
            bar.close()
            raise stopped(signum, cfg.run_name, f"step {done} of epoch {epoch + 1}", tr.run_dir.state_dir, cfg)
    bar.close()
    check_finite(tr)
    if tr.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return time_before + time.perf_counter() - t0
