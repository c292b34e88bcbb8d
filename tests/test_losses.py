import math

import pytest
import torch

from kdfast.losses import kd_loss


def kd_loss_by_hand(student, teacher, labels, alpha, tau):
    """The formula written out sample by sample, in float64, with no torch.nn.functional."""
    total = 0.0
    for s, t, y in zip(student.double().tolist(), teacher.double().tolist(), labels.tolist()):
        ce = -(s[y] - math.log(sum(math.exp(v) for v in s)))
        zs = sum(math.exp(v / tau) for v in s)
        zt = sum(math.exp(v / tau) for v in t)
        p_s = [math.exp(v / tau) / zs for v in s]
        p_t = [math.exp(v / tau) / zt for v in t]
        kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        total += alpha * ce + (1 - alpha) * tau**2 * kl
    return total / len(labels)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0, 10.0])
@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 10), (16, 100)])
def test_kd_loss_matches_formula(alpha, tau, batch, classes):
    g = torch.Generator().manual_seed(batch * 1000 + classes)
    student = torch.randn(batch, classes, generator=g) * 3
    teacher = torch.randn(batch, classes, generator=g) * 3
    labels = torch.randint(0, classes, (batch,), generator=g)
    got = kd_loss(student, teacher, labels, alpha, tau).item()
    assert got == pytest.approx(kd_loss_by_hand(student, teacher, labels, alpha, tau), rel=1e-5, abs=1e-6)


def test_kd_loss_is_zero_kl_when_student_equals_teacher():
    logits = torch.randn(4, 10)
    labels = torch.zeros(4, dtype=torch.long)
    assert kd_loss(logits, logits, labels, alpha=0.0, tau=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_reaches_the_teacher():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    loss = kd_loss(student(x), teacher(x), y, alpha=0.5, tau=4.0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("alpha,tau,match", [
    (-0.1, 4.0, "alpha must be in"), (1.5, 4.0, "alpha must be in"), (float("nan"), 4.0, "alpha must be in"),
    (0.5, 0.0, "tau"), (0.5, -2.0, "tau"), (0.5, float("inf"), "tau"),
])
def test_bad_alpha_tau_are_refused(alpha, tau, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), alpha, tau)


def test_an_ensemble_of_teachers_is_their_mixture_at_tau_or_their_mean_logits():
    from kdfast.losses import ensemble_logits

    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(5, 7) * 3
    mixed = ensemble_logits([a, b], [0.25, 0.75], 4.0, "probs")
    expected = 0.25 * torch.softmax(a / 4, -1) + 0.75 * torch.softmax(b / 4, -1)
    assert torch.allclose(torch.softmax(mixed / 4, -1), expected, atol=1e-6)
    assert torch.allclose(ensemble_logits([a, b], [0.25, 0.75], 4.0, "logits"), 0.25 * a + 0.75 * b)
    assert ensemble_logits([a], [1.0], 4.0) is a
