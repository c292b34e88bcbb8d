"""How one slot of teacher logits is stored: a codec per kind of cache, each encoding a chunk of logits into the
slot's HDF5 datasets and decoding a batch back to dense logits.

    dense   float16 logits (N, C): exact to float16, 1 MB a slot for CIFAR-10
    topk    the k largest float16 logits, their int16 (int32 from 2^15 classes) class indices, and one float16 logit
            standing for every other class (their log-mean-exp: the exact mass at tau = 1)

A new kind (sampled logits, embeddings) is a new codec: the reader, the builder and the checks take it from here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

CHUNK_SAMPLES = 8192  # samples per HDF5 chunk of a slot


class Codec:
    """datasets(): the slot's HDF5 datasets (name -> per-sample shape, dtype), stored [S, N, *shape] and chunked per
    slot; encode(): a chunk of float32 logits (n, C) -> name -> array (n, *shape); decode(): the stored tensors of a
    slot (as read, on any device) at a batch's indices -> dense float32 logits (B, C)."""

    classes: int

    def datasets(self) -> dict[str, tuple[tuple[int, ...], str]]:
        raise NotImplementedError

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, parts: list[torch.Tensor], indices: torch.Tensor | slice) -> torch.Tensor:
        raise NotImplementedError

    def check(self, parts: list[torch.Tensor]) -> None:
        """Refuse (RuntimeError) stored values that cannot be what encode wrote (ranges of indices)."""

    def bytes_per_sample(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                   for shape, dtype in self.datasets().values())

    @property
    def names(self) -> list[str]:
        return list(self.datasets())


class Dense(Codec):
    def __init__(self, classes: int):
        self.classes = classes

    def datasets(self):
        return {"train/logits": ((self.classes,), "float16")}

    def encode(self, logits):
        return {"train/logits": logits.numpy().astype("float16")}

    def decode(self, parts, indices):
        return parts[0][indices].float()  # float16 -> float32 is exact


class TopK(Codec):
    def __init__(self, classes: int, k: int):
        self.classes, self.k = classes, k

    @property
    def index_dtype(self) -> str:
        return "int16" if self.classes < 2**15 else "int32"

    def datasets(self):
        return {"train/topk_values": ((self.k,), "float16"), "train/topk_indices": ((self.k,), self.index_dtype),
                "train/rest_logit": ((), "float16")}

    def encode(self, logits):
        values, indices = logits.topk(self.k, dim=1)
        rest = logits.scatter(1, indices, float("-inf"))
        n_rest = logits.shape[1] - self.k
        # one logit standing for each class outside the top k: their log-mean-exp (exact mass at tau = 1)
        rest_logit = torch.logsumexp(rest, dim=1) - math.log(max(n_rest, 1))
        return {"train/topk_values": values.numpy().astype("float16"),
                "train/topk_indices": indices.numpy().astype(self.index_dtype),
                "train/rest_logit": rest_logit.numpy().astype("float16")}

    def decode(self, parts, indices):
        values, classes, rest = (t[indices] for t in parts)
        return densify(values, classes, rest, self.classes)

    def check(self, parts):
        classes = parts[1]
        if classes.numel() and (classes.min() < 0 or classes.max() >= self.classes):
            raise RuntimeError("top-k indices out of range")


def densify(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, classes: int) -> torch.Tensor:
    """Top-k logits (B, k) at class indices (B, k), the rest logit (B,) in every other class: (B, classes) float32."""
    return rest.float()[:, None].expand(-1, classes).clone().scatter_(1, indices.long(), values.float())


def codec_of(classes: int, topk: int) -> Codec:
    """The codec of a cache of `classes` classes: dense (topk 0) or the top `topk`."""
    return TopK(classes, topk) if topk else Dense(classes)
