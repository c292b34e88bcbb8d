"""Indices -> batches: one permutation per epoch, this process's share of every global batch, the views.

The device tier indexes its uint8 tensor and computes the views batch-wise on the device (no DataLoader, no
per-sample Python). The streamed tier hands each step's share to background workers (a torch DataLoader over
steps, not samples) that decode the files, and on a CPU also compute the views there; on a GPU the views are
computed on the device. Both give the same views for the same (seed, index): the same stored pixels, the same
exact view functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment import (AugmentSpec, MixParams, Parcel, augment, eval_view, mix, mixing_params, normalize, plan_augment,
                       plan_train_tensor, views_of_pil)
from ..transfer import to_device, upload
from .types import DataError, Split
from .workers import WorkerFailure, batches, ignore_trainer_signals


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float, normalized
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64, sample indices into the split (-1: padding of an evaluation batch)
    aug_seed: int | None  # augmentation seed of these views (None: evaluation views)
    epoch: int = -1  # the training epoch (0-based) of these batches; -1 outside training
    mix: tuple | None = None  # mixup / CutMix: (partner labels (B,), λ (B,) float32), on the device

    @property
    def targets(self):
        """What the hard-label term is taken against: the labels, or (labels, partner labels, λ) when mixed."""
        return self.labels if self.mix is None else (self.labels, *self.mix)


def _permutation_seed(seed: int, epoch: int) -> int:
    return (seed * 7919 + epoch * 104_729 + 17) % (1 << 62)


def _views(images_u8, indices, sizes, spec: AugmentSpec, aug_seed: int | None, cpu_indices=None) -> torch.Tensor:
    if aug_seed is None:
        return eval_view(images_u8, spec, sizes)
    return augment(images_u8, indices, aug_seed, spec, sizes, cpu_indices)


def _mixing(spec: AugmentSpec, aug_seed: int | None, safe: torch.Tensor, n: int) -> MixParams | None:
    """The chunk's mixing parameters when training views are mixed (None otherwise)."""
    if aug_seed is None or not spec.mixes:
        return None
    size = spec.crop_size
    return mixing_params(aug_seed, safe, n, size, size, spec)


class _StepViews(torch.utils.data.Dataset):
    """The worker side of the streamed tier: item k is chunk k's stored images decoded (and, on a CPU, viewed),
    with its mixing partners' when the views are mixed."""

    def __init__(self, split, chunks: list[torch.Tensor], spec: AugmentSpec, aug_seed: int | None, view: bool):
        self.split, self.chunks, self.spec, self.aug_seed, self.view = split, chunks, spec, aug_seed, view

    def __len__(self) -> int:
        return len(self.chunks)

    def _images(self, safe: torch.Tensor):
        sizes = self.split.sizes[safe]
        if self.view and self.spec.view == "rrc":  # decoded straight into Pillow, viewed there: no tensor copies
            return views_of_pil(self.split.decode_pil(safe), safe, self.aug_seed, self.spec, sizes), sizes
        images, sizes = self.split.decode(safe)
        if self.view:
            images = _views(images, safe, sizes, self.spec, self.aug_seed)
        return images, sizes

    def __getitem__(self, k: int):
        try:
            return self._item(k)
        except DataError as e:  # a user's error: returned, raised in the trainer as it is (workers.batches)
            return WorkerFailure(str(e))

    def _item(self, k: int):
        idx = self.chunks[k]
        safe = idx.clamp(min=0)
        images, sizes = self._images(safe)
        params = _mixing(self.spec, self.aug_seed, safe, len(self.split))
        partner = None
        if params is not None:
            partner = (*self._images(params.partner), params.partner, params.lam, params.cut, params.box)
        return images, self.split.labels[safe], idx, sizes, partner


def is_streamed(split) -> bool:
    return not isinstance(split, Split)


def _plan_batch(parcel: Parcel, spec: AugmentSpec, aug_seed: int, safe, sizes, params: MixParams | None,
                partner_sizes, on_device, view: bool):
    """Plan a batch on the host, every parameter added to the parcel (one copy for the step): the mixing parameters,
    both sides' views (when view: made here from the stored images, else made by the workers) and erasing. Returns
    the function that, once the parcel is sent, maps (images, partner images) on the device to (normalized views,
    mix); partner images may be a function of the partners' indices on the device. on_device: the samples' indices
    on the device (or a function giving them once sent); sizes, partner_sizes: the stored images' true sizes."""
    handles = None if params is None else [parcel.add(t) for t in params.tensors()]
    mixing = (lambda: None) if params is None else (lambda: MixParams(*(parcel[h] for h in handles)))

    def side(indices, side_sizes, device_indices):
        made = plan_augment(parcel, indices, aug_seed, spec, side_sizes, device_indices) if view else (lambda x: x)
        normalized = plan_train_tensor(parcel, indices, aug_seed, spec, spec.crop_size, spec.crop_size)
        return lambda images: normalized(made(images))

    own = side(safe, sizes, on_device)
    partner = None if params is None else side(params.partner, partner_sizes, lambda: parcel[handles[0]])

    def run(images, partner_images, labels):
        out, on_device_mix = own(images), mixing()
        if on_device_mix is None:
            return out, None
        theirs = partner_images(on_device_mix.partner) if callable(partner_images) else partner_images
        return mix(out, partner(theirs), on_device_mix), (labels[on_device_mix.partner],
                                                         on_device_mix.lam.to(torch.float32))

    return run


def _layout(out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def _eval_views(images_u8, sizes, spec: AugmentSpec, channels_last: bool) -> torch.Tensor:
    return _layout(normalize(eval_view(images_u8, spec, sizes), spec), channels_last)


def view_batches(split, chunks: list[torch.Tensor], spec: AugmentSpec, aug_seed: int | None, device,
                 channels_last: bool = False, workers: int = 2, images_on_device: torch.Tensor | None = None,
                 view_in_worker: bool | None = None):
    """(normalized views, labels, indices on the device, mix) of each chunk of sample indices (CPU, -1 = padding);
    mix: (partner labels, λ) where the views are mixed, else None. view_in_worker (streamed tier): the views are
    computed by the workers (default on a CPU) or on the device (default on a GPU). A training step's parameters,
    drawn on the host, go to the device in one non-blocking copy (kdfast.transfer)."""
    device = torch.device(device)
    if not is_streamed(split):
        images = to_device(split.images, device) if images_on_device is None else images_on_device
        flat = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
        flat, labels = upload(flat, split.labels, device=device)  # the pass's indices and the labels: one copy
        for idx, idx_on_device in zip(chunks, flat.split([len(idx) for idx in chunks])):
            safe = idx.clamp(min=0)
            on_device = idx_on_device.clamp(min=0)
            if aug_seed is None:
                yield _eval_views(images[on_device], split.sizes[safe], spec, channels_last), labels[on_device], \
                    idx_on_device, None
                continue
            parcel = Parcel(device)
            params = _mixing(spec, aug_seed, safe, len(split))
            run = _plan_batch(parcel, spec, aug_seed, safe, split.sizes[safe], params,
                              None if params is None else split.sizes[params.partner], on_device, view=True)
            parcel.send()
            out, mixed = run(images[on_device], lambda partners: images[partners], labels)
            yield _layout(out, channels_last), labels[on_device], idx_on_device, mixed
        return
    view_in_worker = device.type == "cpu" if view_in_worker is None else view_in_worker
    loader = torch.utils.data.DataLoader(_StepViews(split, chunks, spec, aug_seed, view_in_worker), batch_size=None,
                                         shuffle=False, num_workers=workers, prefetch_factor=4 if workers else None,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_trainer_signals)
    labels_all = upload(split.labels, device=device)[0] if aug_seed is not None and spec.mixes else None  # partners' labels
    for images, labels, idx, sizes, partner in batches(loader):
        safe = idx.clamp(min=0)
        parcel = Parcel(device)
        sent = [parcel.add(t) for t in (labels, idx)]
        if aug_seed is None:
            images = upload(images, device=device)[0]
            parcel.send()
            out = _layout(normalize(images if view_in_worker else eval_view(images, spec, sizes), spec), channels_last)
            yield out, parcel[sent[0]], parcel[sent[1]], None
            continue
        params = None if partner is None else MixParams(*partner[2:])
        run = _plan_batch(parcel, spec, aug_seed, safe, sizes, params, None if partner is None else partner[1],
                          lambda: parcel[sent[1]].clamp(min=0), view=not view_in_worker)
        images, partner_images = _pinned(images, partner, device)
        parcel.send()
        out, mixed = run(images, partner_images, labels_all)
        yield _layout(out, channels_last), parcel[sent[0]], parcel[sent[1]], mixed


def _pinned(images, partner, device):
    """The worker's batch (and the partners' images) on the device: pinned by the DataLoader, sent as they are."""
    sent = upload(images, *(() if partner is None else (partner[0],)), device=device)
    return sent[0], (sent[1] if partner is not None else None)


def check_batch_size(split, batch_size: int) -> None:
    if batch_size > len(split):
        raise ValueError(f"--batch-size {batch_size} is larger than the training set ({len(split)} samples); lower "
                         "--batch-size")


def check_view(split, spec: AugmentSpec) -> None:
    """The cifar view crops at the image's own size: it needs images of one size, and reflect padding needs the
    padded crop to stay within one reflection of the image."""
    if spec.view != "cifar" or not len(split):
        return
    if not bool((split.sizes == split.sizes[0]).all()):
        sizes = sorted({tuple(s) for s in split.sizes.tolist()})
        raise DataError(f"the images have {len(sizes)} different sizes ({sizes[0][0]}x{sizes[0][1]} ... "
                        f"{sizes[-1][0]}x{sizes[-1][1]}); the cifar view (pad + crop + flip) needs one size. Use "
                        "--augment.view rrc (RandomResizedCrop, any size) or resize the images to one size.")
    size = min(int(v) for v in split.sizes[0].tolist())
    if spec.pad_mode == "reflect" and (spec.padding > size - 1 or spec.crop_size + spec.padding > 2 * size - 1):
        raise DataError(f"--augment.padding {spec.padding} with --augment.crop-size {spec.crop_size} reaches beyond "
                        f"one reflection of the {size} px images (reflect padding needs padding <= {size - 1} and "
                        f"crop size + padding <= {2 * size - 1}). Lower them (crop size {size}: the image's own), "
                        "use --augment.pad-mode zeros, or --augment.view rrc.")


class TrainLoader:
    """Shuffled training batches of views keyed by (augmentation seed, sample index), from either tier.

    batch_size is global: each step takes the next batch_size indices of the epoch's permutation (same on every
    process), cut into num_processes x accumulate contiguous micro-batches; micro-batch m of process k is piece
    m * num_processes + k, so one process accumulating 2 sees what 2 processes see. Results do not depend on the
    number of processes; in the streamed tier a process decodes only its share. The last incomplete batch is
    dropped.
    """

    def __init__(self, split, batch_size: int, seed: int, spec: AugmentSpec, device, process_index: int = 0,
                 num_processes: int = 1, channels_last: bool = False, workers: int = 2, accumulate: int = 1):
        pieces = num_processes * accumulate
        if batch_size % pieces:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes "
                             f"({num_processes}) x --grad-accum ({accumulate}) = {pieces}")
        check_batch_size(split, batch_size)
        check_view(split, spec)
        self.split, self.labels = split, split.labels
        self.images = None if is_streamed(split) else to_device(split.images, device)
        self.batch_size, self.seed, self.spec, self.device = batch_size, seed, spec, device
        self.rank, self.world = process_index, num_processes
        self.accumulate = accumulate
        self.local_batch = batch_size // pieces  # one micro-batch
        self.channels_last, self.workers = channels_last, workers
        self.decoded = 0  # streamed tier: training images this process (its workers) decoded
        self.view_in_worker: bool | None = None  # streamed tier: where the views are made (None: by the device type)

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_permutation_seed(self.seed, epoch))
        return torch.randperm(len(self.labels), generator=g)  # on CPU: identical everywhere

    def shares(self, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
        """This process's sample indices of each micro-batch of each step of the epoch from start_step on."""
        perm = self.permutation(epoch)
        starts = [step * self.batch_size + (m * self.world + self.rank) * self.local_batch
                  for step in range(start_step, len(self)) for m in range(self.accumulate)]
        return [perm[s:s + self.local_batch] for s in starts]

    def epoch(self, epoch: int, aug_seed: int, start_step: int = 0):
        """The epoch's batches from start_step on (a resumed epoch skips the steps already done)."""
        for images, labels, idx, mixed in view_batches(self.split, self.shares(epoch, start_step), self.spec,
                                                       aug_seed, self.device, self.channels_last, self.workers,
                                                       self.images, self.view_in_worker):
            if is_streamed(self.split):
                self.decoded += len(idx) * (2 if mixed is not None else 1)
            yield Batch(images, labels, idx, aug_seed, epoch, mixed)


def eval_batches(split, batch_size: int, spec: AugmentSpec, device, process_index: int = 0,
                 num_processes: int = 1, channels_last: bool = False, aug_seed: int | None = None, workers: int = 2,
                 lo: int = 0, hi: int | None = None):
    """Batches of this process's share (strided) of samples lo..hi-1 of a split (default: all), in index order, for
    evaluation or teacher passes.

    Every process gets the same number of batches of the same size, padded with index -1, so gathers line
    up and each sample counts once. aug_seed=None: evaluation views; else the training views of that seed.
    """
    hi = len(split) if hi is None else hi
    per_process = -(-(hi - lo) // num_processes)
    idx = torch.arange(lo + process_index, lo + process_index + per_process * num_processes, num_processes)
    idx = torch.where(idx < hi, idx, torch.full_like(idx, -1))
    chunks = [idx[start:start + batch_size] for start in range(0, per_process, batch_size)]
    for images, labels, chunk, mixed in view_batches(split, chunks, spec, aug_seed, device, channels_last, workers):
        yield Batch(images, labels, chunk, aug_seed, mix=mixed)
