"""The training engine on HF Accelerate: one loop for every run (teachers, students without KD, KD students, K students
together). One module a concern:

    runtime     this process's place in the job, the precision, an Accelerator per run, work on the main process only
    optimizer   the optimizer (decay on weights only), the schedule, the EMA of the weights
    dataset     a run's dataset in its tier and memory budget
    evaluation  logits of a split (each sample once), accuracy, what is evaluated after an epoch
    claim       the run directory's lock, and what a run resumes or replaces
    trainer     Trainer: the prepared model, optimizer, schedule, loader, loss step and the epoch's sums
    loop        fit(): run the epoch, end it, save the progress, stop if asked; the step
    records     RunReporter: the start lines, the metrics per epoch, the checkpoint; trackers
    preemption  a signal saves and stops; a lost process ends the job naming it
    stepaudit   a run's first steps counted by kdfast.audit: what each would make a GPU wait for (tests, benchmarks)
"""
from . import claim, dataset, evaluation, loop, optimizer, preemption, records, runtime, trainer
from .claim import check_sync_bn, open_run
from .dataset import data_budget, load_data
from .evaluation import accuracy_and_loss, evaluate_model, evaluations, predict
from .loop import LOG_EVERY, NonFiniteLoss, Reporter, fit, step_seed, train_step
from .optimizer import build_optimizer, lr_factor, make_ema
from .preemption import Preemption, lost_processes, resume_advice
from .records import RunReporter, checkpoint_meta, epoch_record, final_evaluations, tracking
from .runtime import Runtime, logging_dir, make_runtime, on_main, process_state, run_runtime, say
from .trainer import Trainer, clip_whole, make_trainer

__all__ = ["LOG_EVERY", "NonFiniteLoss", "Preemption", "Reporter", "RunReporter", "Runtime", "Trainer",
           "accuracy_and_loss", "build_optimizer", "check_sync_bn", "checkpoint_meta", "claim", "clip_whole",
           "data_budget", "dataset", "epoch_record", "evaluate_model", "evaluation", "evaluations",
           "final_evaluations", "fit", "load_data", "logging_dir", "loop", "lost_processes", "lr_factor",
           "make_ema", "make_runtime", "make_trainer", "on_main", "open_run", "optimizer", "predict", "preemption",
           "process_state", "records", "resume_advice", "run_runtime", "runtime", "say", "step_seed", "tracking",
           "train_step", "trainer"]
