"""The recipes' learning-rate schedules (engine/optimizer.py)."""
import pytest
import torch

from kdfast.config import TrainConfig
from kdfast.engine.optimizer import build_optimizer, make_scheduler


def lr_at_epochs(cfg: TrainConfig, light: bool, steps_per_epoch: int) -> list[float]:
    """The lr of the first and last step of every epoch, as the trainer's scheduler sets it."""
    recipe = cfg.resolved_recipe("cnn", light)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, cfg.epochs * steps_per_epoch, recipe)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def published_lr(epoch: int, base: float) -> float:
    """The tables' schedule (RepDistiller's adjust_learning_rate): base x 0.1 for each of 150, 180, 210 passed."""
    return base * 0.1 ** sum(epoch >= m for m in (150, 180, 210))


@pytest.mark.parametrize("light,base", [(False, 0.05), (True, 0.01)])
def test_the_tables_recipe_has_the_published_lr_at_every_epoch(light, base):
    cfg = TrainConfig(model="resnet20", recipe="tables", epochs=240, batch_size=64)
    spe = 3
    lrs = lr_at_epochs(cfg, light, spe)
    for epoch in range(240):
        for lr in lrs[epoch * spe:(epoch + 1) * spe]:
            assert lr == pytest.approx(published_lr(epoch, base), rel=1e-9), epoch
    recipe = cfg.resolved_recipe("cnn", light)
    assert (recipe.optimizer, recipe.momentum, recipe.weight_decay, recipe.nesterov) == ("sgd", 0.9, 5e-4, False)


def test_a_shortened_tables_schedule_keeps_its_shape():
    lrs = lr_at_epochs(TrainConfig(model="resnet20", recipe="tables", epochs=24, batch_size=64), False, 2)
    per_epoch = [lrs[2 * e] for e in range(24)]
    assert per_epoch == pytest.approx([0.05] * 15 + [0.005] * 3 + [0.0005] * 3 + [0.00005] * 3)
