"""Runs with the policies on: resume, EMA, TTA, cached = online KD and DKD, refusals of bad policy flags."""

import pytest
import torch

from kdfast import distill, evaluate, train
from kdfast.augment import AugmentSpec
from kdfast.cache import CachedTeacher, LogitCache, build
from kdfast.checkpoint import load_checkpoint, load_teacher
from kdfast.config import DistillConfig, EvaluateConfig
from kdfast.data import TrainLoader, load_dataset
from kdfast.engine import make_ema
from kdfast.losses import dkd_loss, kd_loss
from kdfast.tta import tta_logits

from .test_runs import Die, assert_same_weights, cfg_of, interrupt_at, one_line_error

ALL_ON = AugmentSpec(policy="randaugment", mixup=0.8, cutmix=1.0, erasing=0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from .conftest import write_image_folder
    root = tmp_path_factory.mktemp("recipes")
    return {"data": write_image_folder(str(root / "tiny")), "cache_dir": str(root / "cache")}


def test_a_run_with_every_policy_and_ema_resumes_mid_epoch_to_the_same_weights(data, tmp_path, monkeypatch):
    kw = dict(epochs=2, checkpoint_every=2, augment=ALL_ON, ema=0.9, label_smoothing=0.1)
    restore = interrupt_at(monkeypatch, epoch=1, step=1)
    with pytest.raises(Die):
        train.run(cfg_of(data, tmp_path / "b", **kw))
    restore()
    resumed = train.run(cfg_of(data, tmp_path / "b", resume=True, **kw))
    whole = train.run(cfg_of(data, tmp_path / "a", **kw))
    assert_same_weights(tmp_path / "a" / "run.pth", tmp_path / "b" / "run.pth")
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    plain = train.run(cfg_of(data, tmp_path / "c", **{**kw, "augment": AugmentSpec()}))
    assert plain["config"]["augment"] != whole["config"]["augment"]
    with pytest.raises(Exception, match="augment"):  # the policies are part of the compared config
        restore = interrupt_at(monkeypatch, epoch=1, step=1)
        try:
            train.run(cfg_of(data, tmp_path / "d", **kw))
        except Die:
            pass
        restore()
        train.run(cfg_of(data, tmp_path / "d", resume=True, **{**kw, "augment": AugmentSpec(mixup=0.2)}))


def test_ema_is_the_moving_average_of_the_weights_and_is_what_is_exported(data, tmp_path, monkeypatch):
    from kdfast import engine
    seen = []
    original = engine.loop.train_step

    def record(tr, batch, global_step):  # the weights after every step, as the EMA should have averaged them
        loss = original(tr, batch, global_step)
        seen.append({k: v.detach().clone() for k, v in tr.trained().state_dict().items()})
        return loss

    monkeypatch.setattr(engine.loop, "train_step", record)
    meta = train.run(cfg_of(data, tmp_path, epochs=1, ema=0.8))
    monkeypatch.setattr(engine.loop, "train_step", original)
    expected = {k: v.clone().double() for k, v in seen[0].items()}
    for state in seen[1:]:
        for k, v in state.items():
            if v.is_floating_point():
                expected[k] = 0.8 * expected[k] + 0.2 * v.double()
            else:
                expected[k] = v.double()
    saved, _ = load_checkpoint(str(tmp_path / "run.pth"))
    for k, v in saved.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), expected[k], atol=1e-5), k
    assert not all(torch.equal(v, seen[-1][k]) for k, v in saved.state_dict().items() if v.is_floating_point())
    assert meta["config"]["ema"] == 0.8
    reloaded = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "run.pth"), cache_dir=data["cache_dir"],
                                           progress=False))
    assert reloaded["accuracy"] == meta["test_accuracy"]


def test_make_ema_first_copies_then_averages():
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, 0.5)
    ema.update_parameters(model)
    assert torch.equal(ema.module.weight, model.weight)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, before + 0.5)


def test_tta_averages_the_logits_of_the_mirrored_and_shifted_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        flip = (model(x) + model(torch.flip(x, dims=[3]))) / 2
        assert torch.allclose(tta_logits(model, x, "flip"), flip, atol=1e-6)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        pairs = [(model(v) + model(torch.flip(v, dims=[3]))) / 2 for v in (padded[..., :8, :8], padded[..., 2:, 2:])]
        assert torch.allclose(tta_logits(model, x, "translate"), flip / 2 + (pairs[0] + pairs[1]) / 4, atol=1e-6)
        assert torch.equal(tta_logits(model, x, "none"), model(x))


def test_a_run_with_tta_records_it_and_evaluate_reproduces_it(data, tmp_path):
    meta = train.run(cfg_of(data, tmp_path, epochs=1, tta="translate"))
    again = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "run.pth"), cache_dir=data["cache_dir"],
                                        progress=False))
    assert again["tta"] == "translate" and again["accuracy"] == meta["test_accuracy"]
    plain = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "run.pth"), cache_dir=data["cache_dir"],
                                        progress=False, tta="none"))
    assert plain["tta"] == "none"


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_cached_and_online_distillation_agree_with_every_policy_on(data, tmp_path, method):
    teacher_cfg = cfg_of(data, tmp_path, name="teacher", epochs=1)
    train.run(teacher_cfg)
    teacher_path = str(tmp_path / "teacher.pth")
    from kdfast.cache import BuildConfig
    path = build(BuildConfig(teacher=teacher_path, out=str(tmp_path / "t.h5"), slots=2, data=data["data"],
                             cache_dir=data["cache_dir"], batch_size=7, precision="fp32", progress=False,
                             augment=ALL_ON))
    ds = load_dataset(data["data"], data["cache_dir"])
    teacher, _ = load_teacher(teacher_path, ds.classes, "cpu")
    served = CachedTeacher(LogitCache(path), 2, "cpu")
    loader = TrainLoader(ds.train, 6, seed=0, spec=ALL_ON, device="cpu", channels_last=True)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    mixed = 0
    for epoch in (0, 1):
        for batch in loader.epoch(epoch, served.aug_seed(epoch)):
            mixed += int((batch.mix[1] < 1).sum())
            with torch.no_grad():
                online = teacher(batch.images)
            cached = served(batch)
            assert torch.equal(cached, online.half().float())  # the teacher on the very same images, stored as fp16
            loss = kd_loss if method == "kd" else lambda s, t, y, a, tau: dkd_loss(s, t, y, 1.0, 8.0, tau)
            a = loss(student(batch.images), online.half().float(), batch.targets, 0.3, 4.0)
            b = loss(student(batch.images), cached, batch.targets, 0.3, 4.0)
            assert torch.equal(a, b)
    assert mixed > 0
    with pytest.raises(Exception, match="does not match"):  # a cache of other views is refused
        distill.run(cfg_of(data, tmp_path, cls=DistillConfig, name="s", teacher_cache=path, epochs=1,
                           augment=AugmentSpec(padding=2)))
    taken = distill.run(cfg_of(data, tmp_path, cls=DistillConfig, name="t", teacher_cache=path, epochs=1))
    assert taken["config"]["augment"] == ALL_ON.to_dict()  # views left at the defaults: the cache's
    meta = distill.run(cfg_of(data, tmp_path, cls=DistillConfig, name="s", teacher_cache=path, epochs=2,
                              augment=ALL_ON, method=method))
    assert meta["kd"]["mode"] == "cached" and meta["config"]["augment"]["mixup"] == 0.8


@pytest.mark.parametrize("flag, value, says", [
    ("--augment.policy-magnitude", "31", "0..30"), ("--augment.mixup", "-1", ">= 0"),
    ("--augment.erasing", "1.5", "[0, 1]"), ("--ema", "1.0", "--ema"), ("--augment.erasing-area", "0.5 0.2", "MIN")])
def test_bad_policy_flags_are_refused_in_one_line(capsys, data, tmp_path, flag, value, says):
    err = one_line_error(capsys, train.main, ["--data", data["data"], "--out-dir", str(tmp_path), flag, *value.split()])
    assert flag.split(".")[-1].replace("-", "_") in err.replace("-", "_") and says in err


def test_deit_distillation_token_learns_the_caches_argmax_and_its_checkpoint_reloads(data, tmp_path):
    from kdfast.cache import BuildConfig
    from kdfast.losses import deit_loss
    train.run(cfg_of(data, tmp_path, name="teacher", epochs=1))
    teacher_path = str(tmp_path / "teacher.pth")
    spec = AugmentSpec(mixup=0.8, cutmix=1.0)
    path = build(BuildConfig(teacher=teacher_path, out=str(tmp_path / "t.h5"), slots=2, data=data["data"],
                             cache_dir=data["cache_dir"], batch_size=7, precision="fp32", progress=False, augment=spec))
    ds = load_dataset(data["data"], data["cache_dir"])
    teacher, _ = load_teacher(teacher_path, ds.classes, "cpu")
    served = CachedTeacher(LogitCache(path), 2, "cpu")
    loader = TrainLoader(ds.train, 6, seed=0, spec=spec, device="cpu", channels_last=True)
    for batch in loader.epoch(1, served.aug_seed(1)):
        with torch.no_grad():
            online = teacher(batch.images)
        assert torch.equal(served(batch).argmax(-1), online.argmax(-1))  # the hard labels the token learns
    cls, dist = torch.randn(6, 3), torch.randn(6, 3)
    expected = 0.3 * torch.nn.functional.cross_entropy(cls, batch.labels) + 0.7 * torch.nn.functional.cross_entropy(
        dist, online.argmax(-1))
    assert deit_loss(cls, dist, online, batch.labels, 0.3).item() == pytest.approx(expected.item(), rel=1e-6)
    meta = distill.run(cfg_of(data, tmp_path, cls=DistillConfig, model="vit_student_distilled", name="deit",
                              teacher_cache=path, epochs=1, augment=spec, method="deit"))
    assert meta["kd"]["method"] == "deit" and meta["kd"]["tau"] is None
    again = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "deit.pth"), cache_dir=data["cache_dir"],
                                        progress=False))
    assert again["accuracy"] == meta["test_accuracy"]
    model, _ = load_checkpoint(str(tmp_path / "deit.pth"))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the exported model averages its two heads
        tokens = model.forward_features(x)
        heads = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        assert torch.allclose(model(x), heads, atol=1e-5)
    with pytest.raises(ValueError, match="distillation token"):
        distill.run(cfg_of(data, tmp_path, cls=DistillConfig, model="vit_student", name="x", teacher_cache=path,
                           epochs=1, augment=spec, method="deit"))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_streamed_tier_gives_the_device_tiers_mixed_views(data, workers):
    held = load_dataset(data["data"], data["cache_dir"], tier="device")
    streamed = load_dataset(data["data"], data["cache_dir"], tier="stream")
    for spec in (ALL_ON, AugmentSpec(view="rrc", crop_size=24, policy="trivialaugment", cutmix=1.0, erasing=0.5)):
        a = TrainLoader(held.train, 6, seed=0, spec=spec, device="cpu")
        b = TrainLoader(streamed.train, 6, seed=0, spec=spec, device="cpu", workers=workers)
        for x, y in zip(a.epoch(0, 5), b.epoch(0, 5)):
            assert torch.equal(x.images, y.images) and torch.equal(x.mix[0], y.mix[0]) and torch.equal(x.mix[1],
                                                                                                         y.mix[1])
        assert b.decoded == 2 * 6 * len(b)  # each sample and its partner


def test_students_trained_together_with_every_policy_and_ema_end_where_each_alone_ends(data, tmp_path):
    from kdfast import group
    from kdfast.cache import BuildConfig
    train.run(cfg_of(data, tmp_path, name="teacher", epochs=1))
    h5 = build(BuildConfig(teacher=str(tmp_path / "teacher.pth"), out=str(tmp_path / "t.h5"), slots=2,
                           data=data["data"], cache_dir=data["cache_dir"], precision="fp32", progress=False,
                           augment=ALL_ON))

    def members(out):
        kw = dict(cls=DistillConfig, teacher_cache=h5, epochs=2, seed=3, augment=ALL_ON, ema=0.5)
        return [cfg_of(data, out, name="a", alpha=0.9, tau=1.0, **kw), cfg_of(data, out, name="b", method="dkd", **kw)]

    for cfg in members(tmp_path / "alone"):
        distill.run(cfg)
    group.run(members(tmp_path / "together"), "together-s3")
    for name in ("a", "b"):
        wa = torch.load(tmp_path / "alone" / f"{name}.pth", weights_only=True)
        wt = torch.load(tmp_path / "together" / f"{name}.pth", weights_only=True)
        for k in wa:
            torch.testing.assert_close(wt[k], wa[k], rtol=1e-3, atol=2e-4, msg=f"{name}: {k}")


def test_a_recipe_never_overrides_a_flag_given_even_one_equal_to_its_default(data, tmp_path):
    """--aug-recipe cct sets mixup 0.8; --augment.mixup 0 (the default's value, given) wins, in the run and in its
    .json; the recipe fills what was not given (CutMix 1.0). The same for a cache build and a lab."""
    import json

    from kdfast import cache as cache_mod
    from kdfast import lab

    flags = ["--aug-recipe", "cct", "--augment.mixup", "0"]
    train.main(["--model", "resnet8", "--name", "r", "--epochs", "1", "--data", data["data"], "--cache-dir",
                data["cache_dir"], "--out-dir", str(tmp_path), "--batch-size", "6", "--precision", "fp32",
                "--no-progress", *flags])
    with open(tmp_path / "r.json") as f:
        views = json.load(f)["config"]["augment"]
    assert views["mixup"] == 0 and views["cutmix"] == 1.0 and views["policy"] == "randaugment"
    assert distill.parse(flags).resolved({}).augment.mixup == 0
    assert cache_mod.cli.parse(["build", *flags]).resolved({}).augment.mixup == 0
    assert lab.parse(flags).augment.given_values() == {"mixup": 0.0}


def test_a_student_of_a_recipe_s_cache_takes_the_recipe_s_label_smoothing_too(data, tmp_path, capsys):
    """A cache built with --aug-recipe cct serves its views; the student distilled from it without flags takes the
    recipe's label smoothing with them (said in the log), unless it gives its own."""
    import json

    from kdfast.cache import BuildConfig

    common = dict(data=data["data"], cache_dir=data["cache_dir"], batch_size=6, precision="fp32", progress=False)
    train.run(train.TrainConfig(model="resnet8", name="t", epochs=1, out_dir=str(tmp_path), **common))
    h5 = build(BuildConfig(teacher=str(tmp_path / "t.pth"), out=str(tmp_path / "t.h5"), slots=1, aug_recipe="cct",
                           cache_dir=data["cache_dir"], precision="fp32", progress=False))
    assert LogitCache(h5).attrs["aug_recipe"] == "cct"
    kd = dict(model="resnet8", teacher_cache=h5, epochs=1, out_dir=str(tmp_path), **common)
    meta = distill.run(DistillConfig(name="s", **kd))
    assert "built with --aug-recipe cct: its views, and its label smoothing 0.1" in capsys.readouterr().out
    assert meta["config"]["label_smoothing"] == 0.1 and meta["recipe"]["label_smoothing"] == 0.1
    assert meta["config"]["augment"]["policy"] == "randaugment"
    given = distill.run(DistillConfig(name="s0", label_smoothing=0.0, **kd))
    assert given["recipe"]["label_smoothing"] == 0.0 and "label smoothing 0.1" not in capsys.readouterr().out
