"""Distillation methods by name: each says what it needs from the teacher and binds a pure loss of losses.py.

    kd       Hinton et al. 2015: α·CE + (1−α)·τ²·KL(p_t^τ ‖ p_s^τ)                     teacher logits
    dkd      Zhao et al. 2022: CE + warm-up·τ²·(α·TCKD + β·NCKD)                        teacher logits
    fitnets  Romero et al. 2015: KD + β·MSE(regressor(student layer), teacher layer)   teacher features (online)
    deit     Touvron et al. 2021: α·CE(class head) + (1−α)·CE(distillation head, argmax of the teacher's logits)

Logit methods read the teacher's logits from a logit cache (no teacher pass) or run it online; every logit
term can use logit standardization (`--logit-std`, Sun et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import DistillConfig
from .losses import deit_loss, dkd_loss, hint_loss, kd_loss
from .models.registry import Registry, first_doc_line

# loss(student_logits, teacher_logits, labels, epoch, hints) -> scalar; hints = (regressed student, teacher) features
MethodLoss = Callable[..., "object"]


@dataclass(frozen=True)
class Method:
    name: str
    needs: str  # "logits": cached or online teacher logits; "features": the teacher online, with forward hooks
    build: Callable[[DistillConfig, float], MethodLoss]  # (config, label smoothing) -> loss
    description: str


_METHODS = Registry("method", flag="--method")


def register_method(needs: str):
    def wrap(fn):
        _METHODS.add(Method(fn.__name__, needs, fn, first_doc_line(fn)))
        return fn

    return wrap


def list_methods() -> list[str]:
    return _METHODS.names()


def method_entry(name: str) -> Method:
    return _METHODS.get(name)


def warmup_factor(epoch: int, fraction: float, epochs: int) -> float:
    """Linear warm-up over the first `fraction` of the epochs: (epoch + 1) / warm-up epochs, capped at 1."""
    warm = max(1, round(fraction * epochs))
    return min((epoch + 1) / warm, 1.0)


@register_method("logits")
def kd(cfg: DistillConfig, label_smoothing: float) -> MethodLoss:
    """Hinton KD: alpha*CE + (1-alpha)*tau^2*KL(p_t^tau || p_s^tau) (the lab's loss, the default)."""
    def loss(student_logits, teacher_logits, labels, epoch, hints=None):
        return kd_loss(student_logits, teacher_logits, labels, cfg.alpha, cfg.tau, label_smoothing, cfg.logit_std)

    return loss


@register_method("logits")
def dkd(cfg: DistillConfig, label_smoothing: float) -> MethodLoss:
    """Decoupled KD (Zhao et al. 2022): CE + warm-up*tau^2*(dkd_alpha*TCKD + dkd_beta*NCKD)."""
    def loss(student_logits, teacher_logits, labels, epoch, hints=None):
        warm = warmup_factor(epoch, cfg.dkd_warmup, cfg.epochs)
        return dkd_loss(student_logits, teacher_logits, labels, cfg.dkd_alpha, cfg.dkd_beta, cfg.tau, warm,
                        label_smoothing=label_smoothing, standardized=cfg.logit_std)

    return loss


@register_method("logits")
def deit(cfg: DistillConfig, label_smoothing: float) -> MethodLoss:
    """DeiT hard distillation: a distillation token's head learns the teacher's argmax (student vit_student_distilled)."""
    def loss(student_logits, teacher_logits, labels, epoch, hints=None):
        return deit_loss(*student_logits, teacher_logits, labels, cfg.alpha, label_smoothing)

    return loss


@register_method("features")
def fitnets(cfg: DistillConfig, label_smoothing: float) -> MethodLoss:
    """FitNets (Romero et al. 2015): KD + hint_weight*MSE(regressed student layer, teacher layer); or two stages."""
    kd_term = kd(cfg, label_smoothing)
    hint_epochs = max(1, round(cfg.hint_epochs * cfg.epochs))

    def loss(student_logits, teacher_logits, labels, epoch, hints):
        if cfg.fitnets_schedule == "two-stage":  # stage 1: hints alone (the layers after the guided one get no
            if epoch < hint_epochs:              # gradient); stage 2: KD alone
                return hint_loss(*hints)
            return kd_term(student_logits, teacher_logits, labels, epoch)
        return kd_term(student_logits, teacher_logits, labels, epoch) + cfg.hint_weight * hint_loss(*hints)

    return loss
