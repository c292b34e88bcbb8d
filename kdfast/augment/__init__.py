"""Views keyed per sample: every training view is a pure function of (augmentation seed, sample index, the stored
image), computed batch-wise on the device. One module a concept:

    keyed     the hash every random decision draws from (splitmix64 of seed, index, stream)
    spec      the view spec (AugmentSpec): data, saved with every run and every cache
    cifar     the CIFAR view: pad + random crop + flip at the image's size
    rrc       ImageNet-style views: RandomResizedCrop + flip; resize + center crop for evaluation
    resample  the exact batched crop + antialiased resize both rrc views use
    policy    RandAugment and TrivialAugmentWide on the views: per-sample ops, signs and bins
    ops       their 14 ops on a batch with a magnitude per image (torchvision's formulas, tested equal to it)
    erasing   random erasing of a box of the normalized view
    mixing    mixup and CutMix with a partner drawn from the whole training set
    recipes   named recipes: the policies and label smoothing of CCT, DeiT, TrivialAugment

Order, as timm's: view -> policy (uint8) -> normalize -> erasing -> mixing (with the partner's view, itself
made the same way under its own index).
"""
from __future__ import annotations

import numpy as np
import torch

from ..transfer import Parcel
from .cifar import cifar_view, crop_flip_params
from .erasing import erase, erase_boxes, plan_erase
from .mixing import MixParams, mix, mix_params
from .policy import apply_policy, plan_policy
from .keyed import epoch_seed, sample_hash, splitmix64, uniform
from .rrc import center_view, center_view_pil, plan_rrc_view, rrc_boxes, rrc_view, rrc_view_pil
from .spec import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DATASET_STATS, IMAGENET_MEAN,
                   IMAGENET_STD, AugmentSpec)

__all__ = ["AugmentSpec", "MixParams", "Parcel", "augment", "plan_augment", "plan_train_tensor", "mix", "mixing_params", "train_tensor", "with_policy", "eval_view", "views_of_pil", "normalize", "epoch_seed", "crop_flip_params", "rrc_boxes",
           "sample_hash", "splitmix64", "uniform", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
           "DATASET_STATS", "IMAGENET_MEAN", "IMAGENET_STD"]


def _full_sizes(images_u8: torch.Tensor) -> torch.Tensor:
    return torch.tensor([images_u8.shape[-2:]], dtype=torch.int64).expand(len(images_u8), 2)


def plan_augment(parcel: Parcel, indices: torch.Tensor, seed: int, spec: AugmentSpec, sizes: torch.Tensor,
                 on_device: torch.Tensor | None = None, channels: int = 3):
    """The host's draws for the training views of the samples `indices` (host; sizes (B, 2): their true (h, w)),
    added to the parcel; returns the function of the stored images (B, C, H, W) uint8 that makes the views, the
    policy applied, once the parcel is sent. on_device: the same indices on the images' device (the cifar view
    hashes them there); a function returning them where they are sent with the parcel."""
    if spec.view == "rrc":
        view = plan_rrc_view(parcel, indices, seed, spec, sizes, channels)
    else:
        where = on_device if callable(on_device) else (lambda: indices if on_device is None else on_device)
        view = lambda images: cifar_view(images, where().to(images.device), seed, spec)  # noqa: E731
    policy = plan_policy(parcel, indices, seed, spec.policy, spec.policy_ops, spec.policy_magnitude, spec.crop_size,
                         spec.crop_size)
    return lambda images: policy(view(images))


def augment(images_u8: torch.Tensor, indices: torch.Tensor, seed: int, spec: AugmentSpec,
            sizes: torch.Tensor | None = None, cpu_indices: torch.Tensor | None = None) -> torch.Tensor:
    """The training views of the samples `indices` under augmentation seed `seed`, the policy applied; uint8 in,
    uint8 out.

    images_u8: (B, C, H, W) stored images; sizes: (B, 2) their true (h, w) inside that box (None: the whole box);
    cpu_indices: the same indices on the CPU when `indices` are on a GPU (the rrc boxes and the policy are drawn
    there: no sync).
    """
    parcel = Parcel(images_u8.device)
    run = plan_augment(parcel, indices if cpu_indices is None else cpu_indices, seed, spec,
                       _full_sizes(images_u8) if sizes is None else sizes, indices, images_u8.shape[1])
    parcel.send()
    return run(images_u8)


def with_policy(views_u8: torch.Tensor, indices: torch.Tensor, seed: int, spec: AugmentSpec) -> torch.Tensor:
    return apply_policy(views_u8, indices, seed, spec.policy, spec.policy_ops, spec.policy_magnitude)


def plan_train_tensor(parcel: Parcel, indices: torch.Tensor, seed: int | None, spec: AugmentSpec, h: int, w: int):
    """The erasing boxes of the samples `indices` (host) on views of size (h, w), added to the parcel; returns the
    function of the uint8 views that normalizes (and erases) them once the parcel is sent."""
    if seed is None or not spec.erasing:
        return lambda views_u8: normalize(views_u8, spec)
    erased = plan_erase(parcel, erase_boxes(seed, indices, h, w, spec.erasing, spec.erasing_area, spec.erasing_ratio))
    return lambda views_u8: erased(normalize(views_u8, spec))


def train_tensor(views_u8: torch.Tensor, indices: torch.Tensor, seed: int | None, spec: AugmentSpec) -> torch.Tensor:
    """Normalized float views; random erasing on when training (seed given) and the spec asks for it."""
    parcel = Parcel(views_u8.device)
    run = plan_train_tensor(parcel, indices, seed, spec, *views_u8.shape[-2:])
    parcel.send()
    return run(views_u8)


def mixing_params(seed: int, indices: torch.Tensor, n: int, h: int, w: int, spec: AugmentSpec) -> MixParams:
    """The partners, λ and CutMix boxes of the samples `indices` (CPU) of a training set of n samples."""
    return mix_params(seed, indices, n, h, w, spec.mixup, spec.cutmix, spec.mix_prob, spec.switch_prob)


def eval_view(images_u8: torch.Tensor, spec: AugmentSpec, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """The evaluation view: the image itself (cifar), or resize + center crop to the eval size (rrc)."""
    if spec.view == "rrc":
        return center_view(images_u8, spec, _full_sizes(images_u8) if sizes is None else sizes)
    return images_u8


def views_of_pil(images: list, indices: torch.Tensor, seed: int | None, spec: AugmentSpec,
                 sizes: torch.Tensor) -> torch.Tensor:
    """The rrc training views (seed given) or evaluation views (seed None) of stored images given as Pillow images;
    the same pixels as augment / eval_view of the same images as tensors."""
    if seed is None:
        return center_view_pil(images, spec, sizes)
    return with_policy(rrc_view_pil(images, indices, seed, spec, sizes), indices, seed, spec)


def normalize(images_u8: torch.Tensor, spec: AugmentSpec, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalized with the spec's mean and std."""
    out = images_u8.float()
    for c, (mean, std) in enumerate(zip(spec.mean, spec.std)):  # Python scalars: nothing to copy to the device
        shift = np.float32(mean) * np.float32(255)  # float32 arithmetic, as on float32 tensors
        out[:, c].sub_(float(shift)).mul_(float(np.float32(1) / (np.float32(std) * np.float32(255))))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()
