"""Distillation methods: each loss against an independent computation of its paper's formula, FitNets' hooks,
regressor, schedules, resume and DDP, the method registry, and the lab's extra students."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdfast import distill, engine, lab, train
from kdfast.config import DistillConfig, LabConfig, TrainConfig
from kdfast.hints import FeatureHook, HintedStudent, make_regressor
from kdfast.losses import dkd_loss, dkd_terms, hint_loss, kd_loss, standardize
from kdfast.methods import method_entry
from kdfast.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- reference formulas, in float64 numpy

def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def ref_kd(s, t, y, alpha, tau):
    ce = -np.log(np_softmax(s)[np.arange(len(y)), y])
    return (alpha * ce + (1 - alpha) * tau**2 * np_kl(np_softmax(t / tau), np_softmax(s / tau))).mean()


def ref_dkd_terms(s, t, y, tau):
    """TCKD and NCKD per sample, the non-target distribution built by deleting the target column."""
    p_s, p_t = np_softmax(s / tau), np_softmax(t / tau)
    tckd, nckd, pt_gt = [], [], []
    for i, c in enumerate(y):
        b_s, b_t = np.array([p_s[i, c], 1 - p_s[i, c]]), np.array([p_t[i, c], 1 - p_t[i, c]])
        tckd.append(np_kl(b_t, b_s))
        rest_s, rest_t = np.delete(p_s[i], c), np.delete(p_t[i], c)
        nckd.append(np_kl(rest_t / rest_t.sum(), rest_s / rest_s.sum()))
        pt_gt.append(p_t[i, c])
    return np.array(tckd), np.array(nckd), np.array(pt_gt)


def logits(batch, classes, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale
    t = torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, classes, (batch,), generator=g)
    return s, t, y


CASES = [(b, c, tau, a) for b, c in ((8, 10), (5, 100), (1, 10)) for tau in (1.0, 2.0, 4.0, 8.0) for a in (0.0, 0.3, 1.0)]


@pytest.mark.parametrize("batch,classes,tau,alpha", CASES)
def test_kd_loss_is_hintons_formula(batch, classes, tau, alpha):
    s, t, y = logits(batch, classes, seed=classes + batch)
    got = kd_loss(s, t, y, alpha, tau).item()
    assert got == pytest.approx(ref_kd(s.numpy(), t.numpy(), y.numpy(), alpha, tau), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("batch,classes,tau,beta", [(b, c, tau, beta) for b, c, tau, _ in CASES[::3] for beta in (1.0, 8.0)])
def test_dkd_loss_is_the_papers_formula(batch, classes, tau, beta):
    s, t, y = logits(batch, classes, seed=7 * classes + batch)
    tckd, nckd, _ = ref_dkd_terms(s.numpy(), t.numpy(), y.numpy(), tau)
    ce = -np.log(np_softmax(s.numpy())[np.arange(batch), y.numpy()]).mean()
    for alpha, warm in ((1.0, 1.0), (0.5, 0.25)):
        want = ce + warm * tau**2 * (alpha * tckd.mean() + beta * nckd.mean())
        got = dkd_loss(s, t, y, alpha, beta, tau, warm).item()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("classes,tau", [(10, 1.0), (10, 4.0), (100, 2.0), (100, 8.0)])
def test_dkd_decomposes_kd(classes, tau):
    """Zhao et al. Eq. 4: KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD, for every sample."""
    s, t, y = logits(16, classes, seed=classes)
    tckd, nckd, pt_gt = dkd_terms(s, t, y, tau)
    kl = np_kl(np_softmax(t.numpy() / tau), np_softmax(s.numpy() / tau))
    np.testing.assert_allclose((tckd + (1 - pt_gt) * nckd).numpy(), kl, rtol=1e-5, atol=1e-7)
    ref_t, ref_n, _ = ref_dkd_terms(s.numpy(), t.numpy(), y.numpy(), tau)
    np.testing.assert_allclose(tckd.numpy(), ref_t, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(nckd.numpy(), ref_n, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("classes", [10, 100])
def test_logit_standardization_ignores_shift_and_scale(classes):
    s, t, y = logits(8, classes, seed=3)
    z = standardize(s)
    assert torch.allclose(z.mean(-1), torch.zeros(8, dtype=z.dtype), atol=1e-5)
    assert torch.allclose(z.std(-1), torch.ones(8, dtype=z.dtype), atol=1e-4)
    for tau in (1.0, 4.0):
        base_kd = kd_loss(s, t, y, 0.0, tau, standardized=True)
        base_dkd = dkd_loss(s, t, y, 1.0, 8.0, tau, ce_weight=0.0, standardized=True)
        for a, b, c, d in ((2.0, 5.0, 0.5, -3.0), (10.0, -1.0, 3.0, 100.0)):
            moved = (a * s + b, c * t + d)
            assert kd_loss(*moved, y, 0.0, tau, standardized=True).item() == pytest.approx(base_kd.item(), rel=1e-4)
            assert dkd_loss(*moved, y, 1.0, 8.0, tau, ce_weight=0.0, standardized=True).item() == \
                pytest.approx(base_dkd.item(), rel=1e-4)
        assert kd_loss(2 * s, t, y, 0.0, tau).item() != pytest.approx(kd_loss(s, t, y, 0.0, tau).item(), rel=1e-3)


def test_kd_default_is_the_lab_loss_unchanged():
    s, t, y = logits(8, 10, seed=11)
    fn = method_entry("kd").build(DistillConfig(teacher="t", alpha=0.3, tau=2.0), 0.0)
    assert torch.equal(fn(s, t, y, 0), kd_loss(s, t, y, 0.3, 2.0))


def test_unknown_method_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean dkd"):
        method_entry("dkdd")


# ---------------------------------------------------------------- FitNets pieces

def test_hint_loss_is_zero_on_equal_features_and_shapes_must_match():
    f = torch.randn(4, 8, 5, 5)
    assert hint_loss(f, f.clone()).item() == 0.0
    assert hint_loss(f + 1, f).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(f, torch.randn(4, 8, 4, 4))


def test_gradients_reach_student_and_regressor_never_the_teacher():
    torch.manual_seed(0)
    teacher, student = create_model("resnet20"), create_model("resnet8")
    t_hook = FeatureHook(teacher, "layer2", "teacher")
    reg = make_regressor((2, 32, 16, 16), (2, 32, 16, 16), ("layer2", "layer2"))
    hinted = HintedStudent(student, "layer2", reg)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t_logits, t_feat = t_hook.capture(lambda: teacher(x))
    s_logits, s_hint = hinted(x)
    loss = method_entry("fitnets").build(DistillConfig(teacher="t"), 0.0)(s_logits, t_logits, y, 0, (s_hint, t_feat))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.conv1.weight.grad.abs().sum() > 0 and student.fc.weight.grad.abs().sum() > 0
    assert reg[0].weight.grad.abs().sum() > 0
    assert t_hook.value is None and hinted.hook.value is None  # no feature kept after the step
    t_hook.remove()
    hinted.remove_hooks()
    assert not any(m._forward_hooks for m in list(teacher.modules()) + list(student.modules()))


def test_regressor_resizes_maps_and_refuses_mismatched_tokens():
    reg = make_regressor((2, 16, 32, 32), (2, 64, 8, 8), ("a", "b"))
    assert reg(torch.randn(2, 16, 32, 32)).shape == (2, 64, 8, 8)
    up = make_regressor((2, 16, 4, 4), (2, 8, 8, 8), ("a", "b"))
    assert up(torch.randn(2, 16, 4, 4)).shape == (2, 8, 8, 8)
    assert make_regressor((2, 65, 96), (2, 65, 192), ("a", "b"))(torch.randn(2, 65, 96)).shape == (2, 65, 192)
    with pytest.raises(ValueError, match=r"teacher's features \(17, 192\) and the student's \(65, 192\)"):
        make_regressor((2, 65, 192), (2, 17, 192), ("a", "b"))
    with pytest.raises(ValueError, match="cannot be matched"):
        make_regressor((2, 64, 8, 8), (2, 65, 192), ("a", "b"))


def test_unknown_hint_layer_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"no layer .layer9.\. Did you mean layer3, layer2, layer1\? Layers: conv1, bn1, layer1"):
        FeatureHook(create_model("resnet8"), "layer9", "student")


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from .conftest import write_image_folder

    root = tmp_path_factory.mktemp("methods")
    data = write_image_folder(str(root / "tiny"))
    common = dict(data=data, cache_dir=str(root / "c"), out_dir=str(root / "m"), batch_size=6, eval_batch_size=5,
                  precision="fp32", progress=False)
    train.run(TrainConfig(model="resnet20", name="teacher", epochs=2, **common))
    train.run(TrainConfig(model="vit_student", name="vteacher", epochs=1, **common))
    return {**common, "teacher": str(root / "m" / "teacher.pth"), "vteacher": str(root / "m" / "vteacher.pth")}


def distill_cfg(setup, out, **kw):
    base = {**{k: v for k, v in setup.items() if k not in ("vteacher",)}, "out_dir": str(out), "model": "resnet8",
            "name": "s", "epochs": 3}
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("schedule", ["joint", "two-stage"])
def test_fitnets_run_leaves_no_hook_and_exports_a_plain_student(setup, tmp_path, monkeypatch, schedule):
    seen = {}
    real_load, real_build = distill.load_teacher, distill.build_student
    monkeypatch.setattr(distill, "load_teacher", lambda *a: seen.setdefault("teacher", real_load(*a)))
    monkeypatch.setattr(distill, "build_student", lambda *a: seen.setdefault("student", real_build(*a)))
    meta = distill.run(distill_cfg(setup, tmp_path, method="fitnets", fitnets_schedule=schedule))
    teacher, student = seen["teacher"][0], seen["student"][1]
    assert not any(m._forward_hooks for m in list(teacher.modules()) + list(student.modules()))
    state = torch.load(tmp_path / "s.pth", weights_only=True)
    assert not any(k.startswith(("regressor", "student.")) for k in state)
    create_model("resnet8", num_classes=3).load_state_dict(state)  # strict: exactly the plain student
    assert meta["kd"]["hint"] == "layer2:layer2" and meta["kd"]["fitnets_schedule"] == schedule


def test_two_stage_trains_only_up_to_the_guided_layer_first(setup, tmp_path):
    cfg = distill_cfg(setup, tmp_path, method="fitnets", fitnets_schedule="two-stage", hint_epochs=0.34, epochs=3)
    torch.manual_seed(0)
    init = create_model("resnet8", num_classes=3).state_dict()
    one_epoch = distill.run(DistillConfig(**{**cfg.__dict__, "epochs": 1, "hint_epochs": 1.0 - 1e-9, "name": "h"}))
    after = torch.load(tmp_path / "h.pth", weights_only=True)
    assert not torch.equal(after["layer2.0.conv1.weight"], init["layer2.0.conv1.weight"])  # guided: trained
    assert torch.equal(after["layer3.0.conv1.weight"], init["layer3.0.conv1.weight"])  # after it: untouched
    assert torch.equal(after["fc.weight"], init["fc.weight"])
    assert one_epoch["kd"]["method"] == "fitnets"


def test_fitnets_resumes_to_the_same_weights(setup, tmp_path, monkeypatch):
    original = engine.loop.train_step

    def dies(tr, batch, global_step):
        if global_step == len(tr.loader) + 1:
            raise KeyError("killed")
        return original(tr, batch, global_step)

    monkeypatch.setattr(engine.loop, "train_step", dies)
    with pytest.raises(KeyError):
        distill.run(distill_cfg(setup, tmp_path / "b", method="fitnets", checkpoint_every=1))
    monkeypatch.setattr(engine.loop, "train_step", original)
    saved = json.load(open(tmp_path / "b" / ".state" / "s" / "state.json"))
    assert saved["progress"]["step"] == 1
    distill.run(distill_cfg(setup, tmp_path / "b", method="fitnets", resume=True, checkpoint_every=1))
    distill.run(distill_cfg(setup, tmp_path / "a", method="fitnets"))
    a, b = (torch.load(tmp_path / d / "s.pth", weights_only=True) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fitnets_on_vit_tokens(setup, tmp_path):
    meta = distill.run(distill_cfg(setup, tmp_path, model="vit_student", teacher=setup["vteacher"], method="fitnets",
                                   epochs=1))
    assert meta["kd"]["hint"] == "blocks.2:blocks.2"


def test_logit_methods_run_from_the_cache_and_fitnets_refuses_it(setup, tmp_path):
    from kdfast.cache import BuildConfig, build

    # in bf16 the teacher's logits are exact in the cache's float16: cached and online runs are the same run
    cache = build(BuildConfig(teacher=setup["teacher"], out=str(tmp_path / "t.h5"), slots=3, data=setup["data"],
                              cache_dir=setup["cache_dir"], batch_size=7, precision="bf16", progress=False))
    for method, std in (("dkd", False), ("kd", True), ("dkd", True)):
        kw = dict(method=method, logit_std=std, name=f"{method}{std}", precision="bf16")
        cached = distill.run(distill_cfg(setup, tmp_path / "c", teacher=None, teacher_cache=cache, **kw))
        distill.run(distill_cfg(setup, tmp_path / "o", **kw))
        assert cached["kd"]["mode"] == "cached" and cached["kd"]["logit_std"] == std
        a, b = (torch.load(tmp_path / d / f"{method}{std}.pth", weights_only=True) for d in ("c", "o"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="needs the teacher's features"):
        distill.run(distill_cfg(setup, tmp_path / "f", method="fitnets", teacher_cache=cache))


@pytest.mark.parametrize("method", ["fitnets", "dkd"])
def test_methods_under_two_process_ddp(setup, tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    cmd = ["bash", "launch/cpu_ddp.sh", "2", "kdfast.distill", "--model", "resnet8", "--name", "s", "--method", method,
           "--teacher", setup["teacher"], "--data", setup["data"], "--cache-dir", setup["cache_dir"], "--out-dir",
           str(tmp_path), "--epochs", "2", "--batch-size", "6", "--eval-batch-size", "5", "--precision", "fp32",
           "--no-progress"]
    if method == "fitnets":
        cmd += ["--fitnets-schedule", "two-stage", "--hint-epochs", "0.5"]  # both stages leave parameters unused
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.load(open(tmp_path / "s.json"))
    assert (meta["num_processes"], meta["distributed_type"], meta["kd"]["method"]) == (2, "MULTI_CPU", method)


def test_lab_trains_one_extra_student_per_method(setup, tmp_path):
    cfg = LabConfig(preset="smoke", data=setup["data"], cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "m"),
                    report=str(tmp_path / "report.json"), pairs=("cnn",), cnn_teacher_epochs=1, cnn_student_epochs=1,
                    cnn_batch_size=6, eval_batch_size=5, precision="fp32", progress=False, methods=("dkd", "fitnets"))
    report = lab.run(cfg)
    assert set(report["cnn"]) == {"teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd",
                                  "details"}
    extra = report["cnn"]["details"]["methods"]
    assert set(extra) == {"dkd", "fitnets"}
    assert extra["fitnets"]["kd_mode"] == "online" and extra["dkd"]["kd_mode"] == "cached"
    for m in ("dkd", "fitnets"):
        assert extra[m]["test_accuracy"] == json.load(open(tmp_path / "m" / f"cnn_student_{m}.json"))["test_accuracy"]
    with pytest.raises(ValueError, match="kd is the lab's KD student"):
        lab.run(LabConfig(**{**cfg.__dict__, "methods": ("kd",)}))
