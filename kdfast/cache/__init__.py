"""The teacher-logit cache: the teacher's logits for every (augmentation seed, sample), precomputed into HDF5.

    accelerate launch -m kdfast.cache build --teacher models_saved/cnn_teacher.pth --slots 16 --out cache/cnn_teacher.h5
    kdfast cache info cache/cnn_teacher.h5
    kdfast cache verify cache/cnn_teacher.h5 --teacher models_saved/cnn_teacher.pth --samples 64

Slot k holds the views of augmentation seed seeds[k] = epoch_seed(seed, k): the views epoch k of a run with the same
--seed trains on. One module a concern:

    format   the HDF5 layout, the attributes and what must equal a run's; what a cache serves a run
    codecs   how a slot is stored: dense float16, or top-k (a new kind of cache is a new codec)
    reader   LogitCache (checked on opening, read a slot at a time), CachedTeacher (a batch's logits by index)
    ensemble several caches as one teacher: their agreement checked, EnsembleTeacher (their probabilities averaged)
    builder  the build: slots planned, the teacher over each slot's views, written, flushed, marked complete
    cli      build / info / verify
"""
from .builder import AUTO_TOPK, BUILD_CHUNK, build, default_cache_path, resolve_topk
from .cli import info, main, parse, verify
from .codecs import Codec, Dense, TopK, codec_of, densify
from .format import (FORMAT, FORMAT_VERSION, CacheError, cache_bytes, expected_attrs, read_attrs, recorded_source,
                     served_data, slot_bytes)
from .reader import CachedTeacher, LogitCache
from ..config import BuildConfig, InfoConfig, VerifyConfig

__all__ = ["AUTO_TOPK", "BUILD_CHUNK", "BuildConfig", "CacheError", "CachedTeacher", "Codec", "Dense", "FORMAT",
           "FORMAT_VERSION", "InfoConfig", "LogitCache", "TopK", "VerifyConfig", "build", "cache_bytes", "codec_of",
           "default_cache_path", "densify", "expected_attrs", "info", "main", "parse", "read_attrs",
           "recorded_source", "resolve_topk", "served_data", "slot_bytes", "verify"]
