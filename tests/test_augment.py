import pytest
import torch
import torch.nn.functional as F

from kdfast.augment import AugmentSpec, augment, crop_flip_params, normalize
from kdfast.data import Split, TrainLoader


def images(n=64, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def reference_augment(img, dy, dx, flip, spec):
    """One image the slow, obvious way: pad, slice, flip."""
    mode = "reflect" if spec.pad_mode == "reflect" else "constant"
    padded = F.pad(img[None].float(), (spec.padding,) * 4, mode=mode)[0]
    out = padded[:, dy:dy + spec.crop_size, dx:dx + spec.crop_size]
    return (out.flip(-1) if flip else out).to(torch.uint8)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_augment_equals_pad_crop_flip(pad_mode):
    spec = AugmentSpec(pad_mode=pad_mode)
    data = images()
    idx = torch.arange(len(data))
    out = augment(data, idx, seed=5, spec=spec)
    dy, dx, flip = crop_flip_params(5, idx, spec)
    for i in range(len(data)):
        assert torch.equal(out[i], reference_augment(data[i], int(dy[i]), int(dx[i]), bool(flip[i]), spec))
    assert flip.any() and (~flip).any() and len(set(dy.tolist())) > 3  # it does vary


def test_a_sample_view_does_not_depend_on_its_batch():
    spec = AugmentSpec()
    data = images(100)
    all_idx = torch.arange(100)
    whole = augment(data, all_idx, 7, spec)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    for batch_size in (1, 3, 32):
        for start in range(0, 100, batch_size):
            idx = perm[start:start + batch_size]
            assert torch.equal(augment(data[idx], idx, 7, spec), whole[idx])


def test_seeds_give_different_views_and_same_seed_same_view():
    spec = AugmentSpec()
    idx = torch.arange(1000)
    a, b = crop_flip_params(1, idx, spec), crop_flip_params(2, idx, spec)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, crop_flip_params(1, idx, spec)))
    dy = a[0]
    assert dy.min() == 0 and dy.max() == 2 * spec.padding  # the whole offset range is used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augment_same_on_cpu_and_gpu():
    spec = AugmentSpec()
    data, idx = images(), torch.arange(64)
    assert torch.equal(augment(data, idx, 3, spec), augment(data.cuda(), idx.cuda(), 3, spec).cpu())


def test_normalize_uses_the_spec():
    spec = AugmentSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, spec), torch.full((1, 3, 2, 2), 2.0))


def test_sharded_loader_equals_single_process_loader():
    """Two processes' shards of a step are exactly the single-process batch, split in two."""
    split = Split(images(40), torch.arange(40) % 4)
    spec = AugmentSpec()
    single = list(TrainLoader(split, 8, seed=3, spec=spec, device="cpu").epoch(2, aug_seed=11))
    shards = [list(TrainLoader(split, 8, seed=3, spec=spec, device="cpu", process_index=r, num_processes=2).epoch(2, 11))
              for r in range(2)]
    assert len(single) == 5
    for step, batch in enumerate(single):
        assert torch.equal(batch.indices, torch.cat([shards[0][step].indices, shards[1][step].indices]))
        assert torch.equal(batch.images, torch.cat([shards[0][step].images, shards[1][step].images]))
    epoch_indices = torch.cat([b.indices for b in single])
    assert len(set(epoch_indices.tolist())) == 40  # a permutation: every sample once per epoch


def test_loader_refuses_impossible_batch_sizes():
    split = Split(images(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        TrainLoader(split, 5, 0, AugmentSpec(), "cpu", num_processes=2)
    with pytest.raises(ValueError, match="larger than the training set"):
        TrainLoader(split, 16, 0, AugmentSpec(), "cpu")


def test_spec_round_trips_through_its_saved_form():
    spec = AugmentSpec(padding=2, pad_mode="zeros", flip=False)
    assert AugmentSpec.from_dict(spec.to_dict()) == spec
