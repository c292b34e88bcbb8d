"""Loss functions: pure functions of logits and labels."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_kd_params(alpha: float, tau: float) -> None:
    """Refuse α outside [0, 1] and τ <= 0 with a sentence that says the fix."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (the weight of the hard-label CE), got {alpha!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau (temperature) must be > 0, got {tau!r}; try 4.0")


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Batch-mean CE, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(p_t^τ ‖ p_s^τ), batch mean; no gradient reaches the teacher."""
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    tau: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """L = α·CE(y, p_s) + (1−α)·τ²·KL(p_t^τ ‖ p_s^τ)  (Hinton et al. 2015), batch mean."""
    check_kd_params(alpha, tau)
    hard = cross_entropy(student_logits, labels, label_smoothing)
    soft = soft_kl(student_logits, teacher_logits, tau)
    return alpha * hard + (1.0 - alpha) * tau**2 * soft
