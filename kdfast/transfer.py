"""Host -> device copies that never make the host wait: one pinned buffer, one non-blocking copy.

A copy from pageable host memory makes CUDA wait for the stream first (cudaMemcpy semantics), so the host stops
until the device has finished every step queued before; from pinned memory, with non_blocking, it is queued like a
kernel. The caching host allocator keeps a pinned block until the copy that reads it has run.
"""
from __future__ import annotations

import torch

ALIGN = 8  # bytes: every piece starts where an int64 / float64 view of it may start
AUDIT = None  # kdfast.audit.SyncAudit while one is counting (it sees uploads that a CPU makes no copy for)


def upload(*tensors: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """The host tensors on `device`, sent without waiting: the small ones packed into one pinned buffer and one
    non-blocking copy (viewed back as their own dtypes and shapes there), pinned ones (a DataLoader's batch) each
    in its own non-blocking copy, tensors already there as they are. On a CPU they are returned as they are."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensors if AUDIT is None else AUDIT.uploaded(tensors)
    packed = [i for i, t in enumerate(tensors) if t.device.type == "cpu" and not t.is_pinned()]
    out = [t if i in packed or t.device == device else t.to(device, non_blocking=True) for i, t in enumerate(tensors)]
    pieces, places, offset = [], [], 0
    for i in packed:
        raw = tensors[i].detach().contiguous().reshape(-1).view(torch.uint8)  # its bytes
        pad = -raw.numel() % ALIGN
        pieces += [raw, torch.zeros(pad, dtype=torch.uint8)] if pad else [raw]
        places.append((i, offset, raw.numel()))
        offset += raw.numel() + pad
    if pieces:
        sent = torch.cat(pieces).pin_memory().to(device, non_blocking=True)
        for i, o, n in places:
            out[i] = sent[o:o + n].view(tensors[i].dtype).view(tensors[i].shape)
    return tuple(out)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A whole tensor on `device` once (a dataset): the tensor itself on a CPU, where .to("cpu:0"), the device a
    multi-process CPU job runs on, would copy it."""
    device = torch.device(device)
    return t if device.type == "cpu" and t.device.type == "cpu" else t.to(device)


class Parcel:
    """Host tensors gathered while the host plans a batch's work (add returns a handle), then sent by one upload;
    parcel[handle] is the tensor on the device."""

    def __init__(self, device):
        self.device, self.host, self.sent = torch.device(device), [], ()

    def add(self, t: torch.Tensor) -> int:
        self.host.append(t)
        return len(self.host) - 1

    def send(self) -> "Parcel":
        self.sent = upload(*self.host, device=self.device) if self.host else ()
        return self

    def __getitem__(self, handle: int) -> torch.Tensor:
        return self.sent[handle]
