"""engine/best.py: NAME.best (the best epoch on validation, with its test accuracy) and early stopping, on real runs
whose validation accuracy is made to rise then fall (the evaluation's numbers scripted, the training real)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from kdfast import train
from kdfast.config import TrainConfig
from kdfast.engine import records

from .conftest import common

FALLING = [0.30, 0.60, 0.50, 0.40, 0.20, 0.10]  # the validation accuracy after each epoch: best at epoch 2


@pytest.fixture
def scripted(monkeypatch):
    """Each epoch's validation accuracy from FALLING; the weights the model had at each evaluation."""
    seen = {"weights": []}
    real = records.evaluations

    def evaluations(cfg, runtime, model, data, channels_last, epoch=None):
        fields, evals = real(cfg, runtime, model, data, channels_last, epoch)
        if epoch is not None and "val" in evals:
            evals["val"]["accuracy"] = fields["val_accuracy"] = FALLING[epoch]
            seen["weights"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return fields, evals

    monkeypatch.setattr(records, "evaluations", evaluations)
    return seen


def test_the_best_epoch_on_validation_is_saved_beside_the_last(tiny_data, tmp_path, scripted):
    meta = train.run(TrainConfig(model="resnet8", name="r", epochs=5, val_per_class=3,
                                 **common(tiny_data, tmp_path)))  # --save-best: on, by default with a validation split
    best = json.loads((tmp_path / "r.best.json").read_text())
    assert best["best_epoch"] == 2 and best["val_samples"] == 9 and "test_accuracy" in best
    weights = load_file(str(tmp_path / "r.best.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in scripted["weights"][1].items())  # epoch 2's model
    assert not all(torch.equal(weights[k], v) for k, v in scripted["weights"][4].items())
    assert meta["epochs"] == 5 and "early_stop" not in meta  # the last epoch's model is NAME.pth, as always


def test_early_stop_ends_the_run_after_its_patience(tiny_data, tmp_path, scripted, capsys):
    meta = train.run(TrainConfig(model="resnet8", name="r", epochs=6, val_per_class=3, early_stop=2,
                                 **common(tiny_data, tmp_path)))
    assert meta["early_stop"] == {"patience": 2, "best_epoch": 2, "epochs_trained": 4}
    assert len(scripted["weights"]) == 4  # epochs 5 and 6 never ran
    lines = [json.loads(l) for l in open(tmp_path / "r.metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert "early stop: no better validation accuracy in 2 evaluations (best 0.6000 at epoch 2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.best.json").read_text())["best_epoch"] == 2
    ends = train.run(TrainConfig(model="resnet8", name="e", epochs=4, val_per_class=3, early_stop=2,
                                 **common(tiny_data, tmp_path)))
    assert "early_stop" not in ends  # its patience ran out at the last epoch: the run ended, it did not stop early


def test_save_best_and_early_stop_need_a_validation_split(tiny_data, tmp_path):
    for flags in ({"early_stop": 2}, {"save_best": True}):
        with pytest.raises(ValueError, match="--val-per-class"):
            train.run(TrainConfig(model="resnet8", name="r", epochs=2, **flags, **common(tiny_data, tmp_path)))
    train.run(TrainConfig(model="resnet8", name="r", epochs=1, **common(tiny_data, tmp_path)))
    assert not (tmp_path / "r.best.json").exists()  # no validation split: no best to choose


def test_two_processes_agree_on_the_best_epoch_and_the_stop(tiny_data, tmp_path):
    """torchrun + gloo: the processes save NAME.best once, stop together (no collective left waiting), and the .json
    says when."""
    import os
    import subprocess
    import sys

    from .test_runs import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29617", "-m", "kdfast.train", "--model", "resnet8", "--name", "r", "--epochs", "30",
                           "--val-per-class", "3", "--early-stop", "1", "--data", tiny_data["data"],
                           "--cache-dir", tiny_data["cache_dir"], "--out-dir", str(tmp_path), "--batch-size", "6",
                           "--eval-batch-size", "5", "--precision", "fp32", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "r.json").read_text())  # 9 validation images: at most 9 rises in a row, then a stop
    stop = meta["early_stop"]
    assert stop["epochs_trained"] == stop["best_epoch"] + 1 <= 11 and meta["num_processes"] == 2
    assert json.loads((tmp_path / "r.best.json").read_text())["best_epoch"] == stop["best_epoch"]
    lines = (tmp_path / "r.metrics.jsonl").read_text().splitlines()
    assert len(lines) == stop["epochs_trained"]
    assert done.stdout.count("early stop:") + done.stderr.count("early stop:") == 1  # the main process says it
