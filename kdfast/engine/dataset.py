"""A run's dataset in the tier its flags ask for, within its memory budget."""
from __future__ import annotations

from .. import collectives
from ..config import DataConfig
from ..config.view import stored_size
from ..data import DataError, Dataset, default_budget, load_dataset
from .runtime import Runtime, on_main


def data_budget(cfg: DataConfig, runtime: Runtime) -> int:
    """--data-budget-gb in bytes, else half the device's free memory, as the main process sees it: every process then
    chooses the same tier. The host's copy is one per node, whatever its number of processes (they map one file:
    data.store), so a CPU host's budget is not split between them; each GPU holds its own copy."""
    if cfg.data_budget_gb:
        return int(cfg.data_budget_gb * 2**30)
    return on_main(runtime.accelerator, lambda: default_budget(runtime.device))


def load_data(cfg: DataConfig, runtime: Runtime, batch_size: int = 0) -> Dataset:
    """The dataset of a resolved config with a DataConfig (its source, subsets, split, stored size and tier); the main
    process decodes (or indexes) and caches it first, the others then read the cache. batch_size: the global batch,
    checked against --data-budget-gb."""
    budget = data_budget(cfg, runtime)
    acc = runtime.accelerator
    data = collectives.main_first(acc.is_main_process, lambda: load_dataset(
        cfg.data, cfg.cache_dir, cfg.download, cfg.train_per_class, cfg.test_per_class, log=runtime.print,
        dataset=cfg.dataset, store_size=stored_size(cfg), tier=cfg.data_tier, budget=budget,
        progress=cfg.progress and acc.is_main_process, val_per_class=cfg.val_per_class, val_seed=cfg.val_seed))
    one_batch = batch_size * 3 * data.train.box[0] * data.train.box[1]
    if cfg.data_budget_gb and one_batch > budget:
        raise DataError(f"--data-budget-gb {cfg.data_budget_gb:g} is smaller than one batch: {batch_size} images of "
                        f"up to {data.train.box[0]}x{data.train.box[1]} px take {one_batch / 2**20:,.0f} MB decoded. "
                        "Raise --data-budget-gb, lower --batch-size or --store-size.")
    return data

