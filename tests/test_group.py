"""K students trained together in one pass (kdfast.group, kdfast sweep --together): each ends where its run alone
ends on the same batches (fp32, BatchNorm buffers included), with its own metrics and a plain checkpoint."""
import json
from dataclasses import replace

import pytest
import torch

from kdfast import distill, evaluate, group, sweep, train
from kdfast.config import DistillConfig, EvaluateConfig, SweepConfig, TrainConfig

from .conftest import sweep_cfg, teacher_and_cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    common, h5 = teacher_and_cache(tmp_path_factory.mktemp("group"))[::-1]
    return common, h5


def members(model, out_dir, common, h5, epochs=2):
    base = dict(model=model, seed=3, epochs=epochs, out_dir=str(out_dir), **common)
    return [DistillConfig(name="kd-a0.9-t1", teacher_cache=h5, alpha=0.9, tau=1.0, **base),
            DistillConfig(name="kd-a0.3-t2", teacher_cache=h5, alpha=0.3, tau=2.0, **base),
            DistillConfig(name="dkd-t4", teacher_cache=h5, method="dkd", tau=4.0, **base)]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("model", ["resnet8", "vit_student"])
def test_students_together_end_where_each_alone_ends(setup, tmp_path, model):
    common, h5 = setup
    alone = members(model, tmp_path / "alone", common, h5)
    for cfg in alone:
        (distill if isinstance(cfg, DistillConfig) else train).run(cfg)
    together = members(model, tmp_path / "together", common, h5)
    metas = group.run(together, "together-s3")
    for a, t, meta in zip(alone, together, metas):
        wa = torch.load(f"{a.out_dir}/{a.run_name}.pth", weights_only=True)
        wt = torch.load(f"{t.out_dir}/{t.run_name}.pth", weights_only=True)
        assert wa.keys() == wt.keys()  # a plain checkpoint of the student's own architecture
        for k in wa:  # BatchNorm running means, variances and counters included
            torch.testing.assert_close(wt[k], wa[k], rtol=1e-3, atol=2e-4, msg=f"{t.run_name}: {k}")
        ma, mt = read_metrics(f"{a.out_dir}/{a.run_name}.metrics.jsonl"), read_metrics(f"{t.out_dir}/{t.run_name}.metrics.jsonl")
        assert [r["epoch"] for r in mt] == [0, 1]
        for ra, rt in zip(ma, mt):
            assert rt["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-3, abs=1e-4)
            assert rt["train_accuracy"] == pytest.approx(ra["train_accuracy"], abs=1 / 24 + 1e-9)
        assert meta["config"]["name"] == t.run_name and meta["trained_with"]["students"] == 3
        again = evaluate.run(EvaluateConfig(checkpoint=f"{t.out_dir}/{t.run_name}.pth"))
        assert again["accuracy"] == meta["test_accuracy"]  # kdfast evaluate reloads each student


def test_a_sweep_together_keeps_points_and_names_them(setup, tmp_path):
    common, h5 = setup
    cfg = SweepConfig(teacher_cache=h5, alphas=(0.2, 0.8), taus=(2.0,), seeds=2, epochs=1, batch_size=6,
                      eval_batch_size=5, precision="fp32", out_dir=str(tmp_path / "sw"), progress=False,
                      together="on", data=common["data"], cache_dir=common["cache_dir"])
    result = sweep.run(cfg)
    assert sorted(r["name"] for r in result["runs"]) == sorted(
        f"{n}-s{s}" for n in ("nokd", "kd-a0.2-t2", "kd-a0.8-t2") for s in (0, 1))
    for r in result["runs"]:
        assert r["test_accuracy"] == read_metrics(f"{cfg.out_dir}/{r['name']}.metrics.jsonl")[-1]["test_accuracy"]
    again = sweep.run(cfg)  # every point finished: nothing is trained again
    assert again["runs"] == result["runs"]


def test_groups_refuse_what_they_cannot_train_exactly(setup, tmp_path):
    common, h5 = setup
    mixed = members("resnet8", tmp_path, common, h5)
    mixed[1].seed = 4
    with pytest.raises(ValueError, match="must share seed"):
        group.run(mixed, "g")
    fitnets = members("resnet8", tmp_path, common, h5)
    fitnets[1] = DistillConfig(name="f", model="resnet8", teacher_cache=h5, method="fitnets", seed=3, epochs=2,
                               out_dir=str(tmp_path), **common)
    with pytest.raises(ValueError, match="logit methods only"):
        group.run(fitnets, "g")
    with pytest.raises(ValueError, match="without KD .* runs alone"):
        group.run([TrainConfig(name="nokd", model="resnet8", out_dir=str(tmp_path), **common)], "g")


def test_a_sweep_over_cache_slots_plots_accuracy_against_slots(setup, tmp_path):
    common, h5 = setup
    cfg = SweepConfig(teacher_cache=h5, alphas=(0.5,), taus=(2.0,), seeds=1, epochs=2, batch_size=6, eval_batch_size=5,
                      precision="fp32", out_dir=str(tmp_path / "sw"), progress=False, together="on", cache_slots=(1, 0),
                      data=common["data"], cache_dir=common["cache_dir"])
    result = sweep.run(cfg)
    names = sorted(r["name"] for r in result["runs"])
    assert names == ["kd-a0.5-t2-c1-s0", "kd-a0.5-t2-s0", "nokd-s0"]
    with open(f"{cfg.out_dir}/kd-a0.5-t2-c1-s0.json") as f:
        assert json.load(f)["kd"]["cache_slots"] == 1  # epoch 2 reused slot 1's views
    md = open(f"{cfg.out_dir}/sweep.md").read()
    assert "accuracy against cache slots" in md and "sweep_slots.png" in md
    assert (tmp_path / "sw" / "sweep_slots.png").exists()
    assert result["summary"]["best"]["slots"] == 0


def test_students_together_stopped_mid_epoch_resume_to_the_same_weights(setup, tmp_path, monkeypatch):
    import os
    import signal

    from kdfast import engine
    from kdfast.errors import Interrupted

    common, h5 = setup
    original = engine.loop.train_step

    def step_with_signal(tr, batch, global_step):
        loss = original(tr, batch, global_step)
        if global_step == len(tr.loader) + 1:  # inside epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(engine.loop, "train_step", step_with_signal)
    with pytest.raises(Interrupted, match="after step 2 of epoch 2"):
        group.run(members("resnet8", tmp_path / "b", common, h5), "g")
    monkeypatch.setattr(engine.loop, "train_step", original)
    with pytest.raises(Exception, match="--resume"):  # a rerun without --resume is refused, as for any run
        group.run(members("resnet8", tmp_path / "b", common, h5), "g")
    resumed = group.run([replace(m, resume=True) for m in members("resnet8", tmp_path / "b", common, h5)], "g")
    whole = group.run(members("resnet8", tmp_path / "a", common, h5), "g")
    for r, w in zip(resumed, whole):
        name = w["config"]["name"]
        wa = torch.load(tmp_path / "a" / f"{name}.pth", weights_only=True)
        wb = torch.load(tmp_path / "b" / f"{name}.pth", weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert read_metrics(tmp_path / "a" / f"{name}.metrics.jsonl")[-1]["train_loss"] == \
            read_metrics(tmp_path / "b" / f"{name}.metrics.jsonl")[-1]["train_loss"]
    assert not (tmp_path / "b" / ".state" / "g").exists()


def test_together_auto_follows_the_measurements():
    on_cpu = lambda **kw: sweep.use_together(SweepConfig(**kw), "cpu")  # noqa: E731
    assert not on_cpu(pair="cnn") and not on_cpu(pair="vit")  # both measured slower on a CPU at K >= 3
    assert sweep.use_together(SweepConfig(pair="cnn"), "cuda")
    assert on_cpu(pair="cnn", together="on") and not on_cpu(pair="vit", together="off")


def test_a_together_pass_stopped_after_saving_some_students_continues_with_the_rest(small_cache, tmp_path,
                                                                                     monkeypatch):
    """Killed (here: an exception) after the first of three students was saved: the rerun of the same sweep resumes
    the pass, keeps the saved student's files, saves the other two, and they equal an uninterrupted pass's."""
    from kdfast import group

    def cfg(out):
        return sweep_cfg(small_cache, out, alphas=(0.3, 0.7), taus=(1.0, 2.0), together="on")

    original, saved = group.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        if len(saved) == 1:
            raise KeyboardInterrupt  # what a kill while saving the second student leaves
        saved.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(group, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg(tmp_path / "b"))
    monkeypatch.setattr(group, "save_checkpoint", original)
    first = (tmp_path / "b" / f"{saved[0]}.pth").read_bytes()
    assert (tmp_path / "b" / ".state").exists() and len(saved) == 1
    result = sweep.run(cfg(tmp_path / "b"))  # the same command: no refusal as "another config"
    assert len(result["runs"]) == 5 and not (tmp_path / "b" / ".state").exists()
    assert (tmp_path / "b" / f"{saved[0]}.pth").read_bytes() == first  # kept, not trained again
    sweep.run(cfg(tmp_path / "a"))
    for row in result["runs"]:
        a, b = ((tmp_path / d / f"{row['name']}.safetensors").read_bytes() for d in ("a", "b"))
        assert a == b, row["name"]
