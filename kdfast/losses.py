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


def hard_labels(targets) -> torch.Tensor:
    """The sample's own labels of targets given as labels or as mixed (labels, partner labels, λ)."""
    return targets[0] if isinstance(targets, tuple) else targets


def cross_entropy(student_logits: torch.Tensor, targets, label_smoothing: float = 0.0) -> torch.Tensor:
    """Batch-mean CE, computed in fp32 whatever the autocast dtype.

    targets: labels (B,), or mixed targets (labels, partner labels, λ) of mixup / CutMix: the CE against the soft
    target λ·y + (1 − λ)·y', label smoothing on top (timm's mixup_target with SoftTargetCrossEntropy).
    """
    logits = student_logits.float()
    if not isinstance(targets, tuple):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    labels, partner, lam = targets
    own = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    other = F.cross_entropy(logits, partner, label_smoothing=label_smoothing, reduction="none")
    return (lam * own + (1 - lam) * other).mean()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(p_t^τ ‖ p_s^τ), batch mean; no gradient reaches the teacher."""
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels,
    alpha: float,
    tau: float,
    label_smoothing: float = 0.0,
    standardized: bool = False,
) -> torch.Tensor:
    """L = α·CE(y, p_s) + (1−α)·τ²·KL(p_t^τ ‖ p_s^τ)  (Hinton et al. 2015), batch mean.

    labels: labels, or mixed targets (labels, partner labels, λ): the CE is then against the mixed target and the
    KL against the teacher's logits of the same mixed image (function matching).

    standardized=True z-scores both logits before the softened softmax (logit standardization); the hard
    CE keeps the raw student logits.
    """
    check_kd_params(alpha, tau)
    hard = cross_entropy(student_logits, labels, label_smoothing)
    if standardized:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits.detach())
    soft = soft_kl(student_logits, teacher_logits, tau)
    return alpha * hard + (1.0 - alpha) * tau**2 * soft


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each sample's logits over the classes (Sun et al., CVPR 2024, "logit standardization").

    The softened softmax of standardized logits is invariant to shifting and (positively) scaling the logits,
    so the student matches the teacher's logit *relations*, not their magnitude.
    """
    logits = logits.float()
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def _binary_kl(p_t: torch.Tensor, p_s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL([p_t, 1-p_t] ‖ [p_s, 1-p_s]) per sample."""
    return (p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))
            + (1 - p_t) * (torch.log1p(-p_t + eps) - torch.log1p(-p_s + eps)))


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD, teacher's target probability) of Decoupled KD (Zhao et al., CVPR 2022), no τ² factor.

    TCKD = KL(b_t ‖ b_s) over the binary (target, rest) probabilities; NCKD = KL(p̂_t ‖ p̂_s) over the
    non-target classes renormalized. Identity (their Eq. 4): KL(p_t ‖ p_s) = TCKD + (1 − p_t[target])·NCKD.
    """
    s, t = student_logits.float() / tau, teacher_logits.detach().float() / tau
    target = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, labels[..., None], True)  # one_hot checks on the host
    own = labels[..., None]  # a gather, not a boolean mask (which a GPU answers with a sync)
    p_s_target = F.softmax(s, dim=-1).gather(-1, own).squeeze(-1)
    p_t_target = F.softmax(t, dim=-1).gather(-1, own).squeeze(-1)
    tckd = _binary_kl(p_t_target, p_s_target)
    masked = torch.finfo(torch.float32).min / 4  # drops the target class from the softmax
    log_q_s = F.log_softmax(s.masked_fill(target, masked), dim=-1)
    log_q_t = F.log_softmax(t.masked_fill(target, masked), dim=-1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0.0).sum(-1)
    return tckd, nckd, p_t_target


def dkd_loss(student_logits, teacher_logits, labels, alpha: float, beta: float, tau: float, warmup: float = 1.0,
             ce_weight: float = 1.0, label_smoothing: float = 0.0, standardized: bool = False) -> torch.Tensor:
    """ce_weight·CE + warmup·τ²·(α·TCKD + β·NCKD), batch mean (mdistiller's DKD: ce 1, α 1, β 8, τ 4).

    labels may be mixed targets (labels, partner labels, λ): the CE takes the mixed target, the decoupling the
    sample's own label (its target class).
    """
    s, t = (standardize(student_logits), standardize(teacher_logits.detach())) if standardized else \
        (student_logits, teacher_logits)
    tckd, nckd, _ = dkd_terms(s, t, hard_labels(labels), tau)
    hard = cross_entropy(student_logits, labels, label_smoothing)
    return ce_weight * hard + warmup * tau**2 * (alpha * tckd.mean() + beta * nckd.mean())


def deit_loss(class_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor, labels,
              alpha: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """DeiT's hard distillation (Touvron et al. 2021): α·CE(class head, labels) + (1−α)·CE(distillation head, the
    teacher's argmax), batch mean; labels may be mixed targets, the teacher's argmax is of the same mixed image."""
    hard_teacher = teacher_logits.detach().argmax(-1)
    return alpha * cross_entropy(class_logits, labels, label_smoothing) + (1 - alpha) * cross_entropy(dist_logits,
                                                                                                    hard_teacher)


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss: mean squared error between the regressed student features and the teacher's."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"hint features differ in shape: student {tuple(student_features.shape)} (after the "
                         f"regressor), teacher {tuple(teacher_features.shape)}")
    return F.mse_loss(student_features.float(), teacher_features.detach().float())


def ensemble_logits(teacher_logits: list[torch.Tensor], weights: list[float], tau: float,
                    mode: str = "probs") -> torch.Tensor:
    """Several teachers' logits as one teacher's: with mode "probs", logits whose softmax at tau is the weighted mean
    of the teachers' softmaxes at tau (tau * log sum_i w_i softmax(z_i / tau)): every loss that softens the teacher
    at tau then sees the teachers' mixture; with mode "logits", the weighted mean of the logits. weights sum to 1."""
    if len(teacher_logits) == 1:
        return teacher_logits[0]
    if mode == "logits":
        return sum(w * z.float() for w, z in zip(weights, teacher_logits))
    log_mix = torch.logsumexp(torch.stack([F.log_softmax(z.float() / tau, dim=-1) + math.log(w)
                                           for w, z in zip(weights, teacher_logits)]), dim=0)
    return tau * log_mix
