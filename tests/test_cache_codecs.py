"""The cache's codecs: each stores a slot its own way and decodes a batch back to dense logits; the file layout, the
reader's checks and the build's size estimate all come from the codec."""
import h5py
import numpy as np
import pytest
import torch

from kdfast.cache import CacheError, Dense, LogitCache, TopK, cache_bytes, codec_of, slot_bytes
from kdfast.cache.builder import mark_complete, write_rows
from kdfast.cache.format import FORMAT, FORMAT_VERSION, create, layout


def logits(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed)) * 4


def stored(codec, x: torch.Tensor) -> list[torch.Tensor]:
    """A slot as the reader holds it: each dataset's rows as written, back as tensors."""
    return [torch.from_numpy(a) for a in codec.encode(x).values()]


def test_dense_decodes_exactly_what_float16_holds():
    x = logits(12, 10)
    codec = Dense(10)
    idx = torch.tensor([3, 0, 11])
    assert torch.equal(codec.decode(stored(codec, x), idx), x.half().float()[idx])
    assert codec.bytes_per_sample() == 20 and codec.names == ["train/logits"]


def test_topk_keeps_the_k_largest_and_the_rest_mass_at_tau_1():
    x = logits(20, 100)
    codec = TopK(100, 5)
    out = codec.decode(stored(codec, x), slice(None))
    top = x.topk(5, dim=1)
    assert torch.equal(out.gather(1, top.indices), top.values.half().float())  # the top k exactly (to float16)
    rest = x.scatter(1, top.indices, float("-inf"))
    others = out.scatter(1, top.indices, float("-inf"))  # every other class holds the one rest logit
    mass = torch.logsumexp(rest, 1)
    assert torch.allclose(torch.logsumexp(others, 1), mass, atol=0.02)  # the rest's softmax mass at tau 1
    assert (others.isinf() | (others == others.amax(1, keepdim=True))).all()


@pytest.mark.parametrize("classes,dtype,per_sample", [(100, "int16", 5 * 4 + 2), (2**15, "int32", 5 * 6 + 2)])
def test_topk_index_width_follows_the_number_of_classes(classes, dtype, per_sample):
    codec = TopK(classes, 5)
    assert codec.index_dtype == dtype and codec.encode(logits(3, classes))["train/topk_indices"].dtype == dtype
    assert codec.bytes_per_sample() == per_sample


def test_topk_refuses_stored_classes_out_of_range():
    codec = TopK(10, 3)
    parts = stored(codec, logits(4, 10))
    parts[1][0, 0] = 10
    with pytest.raises(RuntimeError, match="out of range"):
        codec.check(parts)


def test_codec_of_and_the_sizes_it_gives():
    assert isinstance(codec_of(10, 0), Dense) and isinstance(codec_of(1000, 10), TopK)
    attrs = {"seeds": [0, 1, 2], "train_size": 50, "test_size": 20, "classes": [str(i) for i in range(10)], "topk": 0}
    assert slot_bytes(attrs) == 50 * 20 and cache_bytes(attrs) == 3 * 50 * 20 + 20 * (2 * 10 + 8)


@pytest.mark.parametrize("topk", [0, 4])
def test_a_file_laid_out_by_its_codec_reads_back_through_the_reader(tmp_path, topk):
    classes = [f"c{i}" for i in range(10)]
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset_fingerprint": "f", "classes": classes,
             "augment": {"crop_size": 32, "padding": 4, "pad_mode": "reflect", "flip": True, "mean": [0.5] * 3,
                         "std": [0.25] * 3}, "train_size": 9, "test_size": 4, "seeds": [7, 8], "topk": topk,
             "teacher_model": "resnet8", "teacher_sha256": "0" * 64}
    path = str(tmp_path / "c.h5")
    f = create(path, attrs)
    assert {name: tuple(f[name].shape) for name in layout(attrs)} == {n: s for n, (s, _) in layout(attrs).items()}
    codec, slots = codec_of(10, topk), [logits(9, 10, seed) for seed in (1, 2)]
    for slot, x in enumerate(slots):
        write_rows(f, slot, 0, x[:5], codec)  # a slot in two chunks
        write_rows(f, slot, 5, x[5:], codec)
        mark_complete(f, slot)
    f["test/logits"][:] = logits(4, 10).numpy().astype("float16")
    f["test/labels"][:] = np.arange(4)
    f.close()
    cache = LogitCache(path)
    for slot, x in enumerate(slots):
        assert torch.equal(cache.slot_logits(slot), codec.decode(stored(codec, x), slice(None)))
    cache.close()
    with h5py.File(path, "r+") as f:
        f["train/complete"][1] = False
    with pytest.raises(CacheError, match=r"slots \[1\] are not complete"):
        LogitCache(path)
