"""Policies keyed per sample: RandAugment, TrivialAugment, mixup, CutMix, random erasing; their views are pure
functions of (seed, index), whatever the batch; mixed targets; named recipes."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kdfast.augment import AugmentSpec, erase_boxes, mix_params
from kdfast.augment.mixing import keyed_beta
from kdfast.augment.ops import apply_op, apply_op_batch
from kdfast.augment.policy import OPS, SPACES, apply_policy, magnitudes_of, policy_params
from kdfast.augment.recipes import RECIPES, apply_recipe
from kdfast.config import TrainConfig
from kdfast.data import Split, TrainLoader
from kdfast.losses import cross_entropy, kd_loss

def magnitude_of(space: dict, op: str, level: int, negative: bool, h: int, w: int) -> float:
    """The reference: the magnitude torchvision's RandAugment.forward computes for one image."""
    table, signed = space[op]
    if table is None:
        return 0.0
    m = float(table(h, w)[level])
    return -m if signed and negative else m


ALL_ON = AugmentSpec(policy="randaugment", mixup=0.8, cutmix=1.0, erasing=0.5)
SPECS = {"randaugment": replace(AugmentSpec(), policy="randaugment"),
         "trivialaugment": replace(AugmentSpec(), policy="trivialaugment"),
         "mixup": replace(AugmentSpec(), mixup=0.8), "cutmix": replace(AugmentSpec(), cutmix=1.0),
         "erasing": replace(AugmentSpec(), erasing=1.0), "all": ALL_ON,
         "all-rrc": replace(ALL_ON, view="rrc", crop_size=24)}


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def split(n: int = 300, size: int = 32) -> Split:
    x = images(n, size)
    return Split(x, torch.arange(n) % 10, torch.tensor([[size, size]] * n))


def views(sp: Split, idx: torch.Tensor, spec: AugmentSpec, seed: int, batch: int, device="cpu"):
    """The training views and mixed targets of samples idx in chunks of `batch` (as the cache's teacher pass)."""
    out, lam, partner = [], [], []
    for b in eval_batches_of(sp, idx, spec, seed, batch, device):
        out.append(b.images.cpu())
        lam.append(b.mix[1].cpu() if b.mix else torch.ones(len(b.labels)))
        partner.append(b.mix[0].cpu() if b.mix else b.labels.cpu())
    return torch.cat(out), torch.cat(lam), torch.cat(partner)


def eval_batches_of(sp, idx, spec, seed, batch, device):
    from kdfast.data.loader import Batch, view_batches
    chunks = [idx[i:i + batch] for i in range(0, len(idx), batch)]
    for x, y, i, mixed in view_batches(sp, chunks, spec, seed, device):
        yield Batch(x, y, i, seed, mix=mixed)


@pytest.mark.parametrize("name", list(SPECS))
def test_views_are_a_pure_function_of_seed_and_index(name):
    spec, sp = SPECS[name], split()
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:256]
    whole = views(sp, idx, spec, 7, 256)
    for batch, n in ((1, 12), (7, 63)):
        assert all(torch.equal(a[:n], b) for a, b in zip(whole, views(sp, idx[:n], spec, 7, batch)))
    order = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    shuffled = views(sp, idx[order], spec, 7, 64)
    assert all(torch.equal(a[order], b) for a, b in zip(whole, shuffled))
    other_seed = views(sp, idx, spec, 8, 256)[0]
    assert not torch.equal(whole[0], other_seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(SPECS))
def test_views_on_cuda_equal_the_cpus(name):
    spec, sp = SPECS[name], split()
    idx = torch.arange(256)
    cpu, gpu = views(sp, idx, spec, 3, 256), views(sp, idx, spec, 3, 64, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(cpu[1:], gpu[1:]))  # the mixing: partners and λ
    if spec.policy == "none" and not spec.mixes:
        assert torch.equal(cpu[0], gpu[0])
    else:  # what the README states: Color / Contrast blends (a GPU's fused multiply-add) and the mix in float32 may
        # differ by one level in a few pixels
        level = 1 / (255 * min(spec.std)) + 1e-5
        differ = (cpu[0] - gpu[0]).abs()
        assert differ.max() <= level and (differ > 1e-6).float().mean() < 1e-3


def test_every_op_follows_torchvision_per_image_and_identity_keeps_pixels():
    x = images(4) // 2 + 40  # values 40..167: every op has something to change
    for space_name, space in SPACES.items():
        for op in OPS:
            for level in (0, 9, 30):
                m = magnitude_of(space, op, level, True, 32, 32)
                out = apply_op(x, op, m)
                per_image = torch.cat([apply_op(x[i:i + 1], op, m) for i in range(4)])
                assert torch.equal(out, per_image), (space_name, op, level)
                if op == "Identity":
                    assert torch.equal(out, x)
                elif level == 30 or space[op][0] is None:
                    assert not torch.equal(out, x), (space_name, op, level)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_every_op_with_a_magnitude_per_image_equals_torchvision_on_each_image(size):
    """The batched ops (one magnitude per image: blends, masks, thresholds, affine grids) against torchvision's
    functions called image by image: every bin with both signs, in one batch."""
    level = torch.arange(31).repeat(2)
    negative = torch.arange(62) >= 31
    x = images(62, 48)[..., :size[0], :size[1]] // 2 + 40
    for space_name, space in SPACES.items():
        for op in OPS:
            m = magnitudes_of(space, op, level, negative, *size)
            batched = apply_op_batch(x, op, m)
            one_by_one = torch.cat([apply_op(x[i:i + 1], op, magnitude_of(space, op, int(level[i]), bool(negative[i]),
                                                                            *size)) for i in range(62)])
            assert torch.equal(batched, one_by_one), (space_name, op, size)


def test_policy_draws_ops_and_signs_evenly_and_randaugment_keeps_its_magnitude():
    idx = torch.arange(14_000)
    op, level, negative = policy_params(0, idx, "randaugment", 2, 9)
    counts = torch.bincount(op.flatten(), minlength=len(OPS))
    assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000
    assert (level == 9).all() and 0.48 < negative.float().mean() < 0.52
    _, ta_level, _ = policy_params(0, idx, "trivialaugment", 2, 9)
    assert ta_level.shape == (14_000, 1) and torch.bincount(ta_level.flatten(), minlength=31).min() > 300
    x = images(64)
    assert torch.equal(apply_policy(x, torch.arange(64), 0, "none"), x)


def test_cutmix_label_weight_is_the_pasted_area_and_lambda_follows_beta():
    idx = torch.arange(20_000)
    p = mix_params(0, idx, 1000, 32, 24, mixup=0.0, cutmix=1.0)
    top, bottom, left, right = p.box.unbind(1)
    assert (0 <= top).all() and (bottom <= 32).all() and (0 <= left).all() and (right <= 24).all()
    assert torch.allclose(1 - p.lam, ((bottom - top) * (right - left)).double() / (32 * 24))
    assert p.cut.all() and (p.partner >= 0).all() and (p.partner < 1000).all()
    sp = split(40)
    x, lam, partner = views(sp, torch.arange(40), replace(AugmentSpec(), cutmix=1.0), 5, 40)
    plain = views(sp, torch.arange(40), AugmentSpec(), 5, 40)[0]
    params = mix_params(5, torch.arange(40), 40, 32, 32, 0.0, 1.0)
    for i in range(40):  # outside the box: the sample's own view; inside: its partner's
        t, b, l, r = params.box[i].tolist()
        own = torch.ones(32, 32, dtype=torch.bool)
        own[t:b, l:r] = False
        assert torch.equal(x[i][:, own], plain[i][:, own])
        assert torch.equal(x[i][:, t:b, l:r], plain[params.partner[i]][:, t:b, l:r])
    for alpha in (0.2, 0.8, 1.0, 2.0):  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
        lam = keyed_beta(3, idx, 0, alpha)
        assert ((lam >= 0) & (lam <= 1)).all()  # Beta(0.2, 0.2) reaches 1 - 1e-16
        assert lam.mean() == pytest.approx(0.5, abs=0.01)
        assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


def test_mixup_blends_two_views_and_the_targets_weigh_their_labels():
    sp = split(50)
    spec = replace(AugmentSpec(), mixup=0.8)
    x, lam, partner = views(sp, torch.arange(50), spec, 2, 50)
    plain = views(sp, torch.arange(50), AugmentSpec(), 2, 50)[0]
    params = mix_params(2, torch.arange(50), 50, 32, 32, 0.8, 0.0)
    expected = plain * params.lam.float().view(-1, 1, 1, 1) + plain[params.partner] * (1 - params.lam).float().view(
        -1, 1, 1, 1)
    assert torch.equal(x, expected) and torch.equal(partner, sp.labels[params.partner])
    logits = torch.randn(50, 10)
    soft = lam[:, None] * F.one_hot(sp.labels, 10) + (1 - lam[:, None]) * F.one_hot(partner, 10)
    smoothed = soft * 0.9 + 0.1 / 10  # timm's mixup_target with smoothing 0.1
    reference = -(smoothed * logits.log_softmax(-1)).sum(-1).mean()
    ours = cross_entropy(logits, (sp.labels, partner, lam), 0.1)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert cross_entropy(logits, (sp.labels, sp.labels, torch.ones(50)), 0.1).item() == pytest.approx(
        cross_entropy(logits, sp.labels, 0.1).item(), rel=1e-6)
    assert kd_loss(logits, logits, (sp.labels, partner, lam), 1.0, 4.0).item() == pytest.approx(ours.item() * 0 +
        cross_entropy(logits, (sp.labels, partner, lam)).item(), rel=1e-6)


def test_erasing_boxes_lie_inside_the_view_and_zero_it_there():
    idx = torch.arange(5000)
    boxes = erase_boxes(0, idx, 32, 24, 0.5, (0.02, 1 / 3), (0.3, 3.3))
    top, bottom, left, right = boxes.unbind(1)
    erased = (bottom > top) & (right > left)
    assert 0.45 < erased.float().mean() < 0.55
    assert (top >= 0).all() and (bottom <= 32).all() and (left >= 0).all() and (right <= 24).all()
    area = ((bottom - top) * (right - left))[erased].double() / (32 * 24)
    assert area.min() > 0.01 and area.max() < 0.36
    sp = split(20)
    x = views(sp, torch.arange(20), replace(AugmentSpec(), erasing=1.0), 4, 20)[0]
    plain = views(sp, torch.arange(20), AugmentSpec(), 4, 20)[0]
    for i, (t, b, l, r) in enumerate(erase_boxes(4, torch.arange(20), 32, 32, 1.0, (0.02, 1 / 3), (0.3, 3.3)).tolist()):
        assert b > t and (x[i][:, t:b, l:r] == 0).all()
        x[i][:, t:b, l:r] = plain[i][:, t:b, l:r]
    assert torch.equal(x, plain)


def test_train_loader_batches_equal_the_cache_passes_views_under_two_processes():
    sp, spec = split(), ALL_ON
    whole = TrainLoader(sp, 32, seed=0, spec=spec, device="cpu")
    halves = [TrainLoader(sp, 32, seed=0, spec=spec, device="cpu", process_index=r, num_processes=2) for r in (0, 1)]
    for step, b, h0, h1 in zip(range(3), whole.epoch(1, 11), halves[0].epoch(1, 11), halves[1].epoch(1, 11)):
        assert torch.equal(b.images, torch.cat([h0.images, h1.images]))
        assert torch.equal(b.mix[1], torch.cat([h0.mix[1], h1.mix[1]]))
        cached, lam, partner = views(sp, b.indices, spec, 11, 12)  # what a cache build's pass computes
        assert torch.equal(cached, b.images) and torch.equal(lam, b.mix[1]) and torch.equal(partner, b.mix[0])


def test_spec_saves_policies_only_when_on_and_recipes_fill_defaults():
    assert set(AugmentSpec().to_dict()) == {"crop_size", "padding", "pad_mode", "flip", "mean", "std"}
    saved = ALL_ON.to_dict()
    assert saved["policy"] == "randaugment" and saved["mixup"] == 0.8 and saved["erasing"] == 0.5
    assert AugmentSpec.from_dict(saved) == ALL_ON
    cfg = TrainConfig(aug_recipe="deit")
    assert (cfg.augment.policy, cfg.augment.mixup, cfg.augment.cutmix, cfg.augment.erasing) == ("randaugment", 0.8,
                                                                                                1.0, 0.25)
    assert cfg.label_smoothing == 0.1
    mine = TrainConfig(aug_recipe="cct", augment=AugmentSpec(mixup=0.2), label_smoothing=0.0)
    assert mine.augment.mixup == 0.2 and mine.augment.cutmix == 1.0 and mine.label_smoothing == 0.0
    assert apply_recipe(AugmentSpec(), "none") == AugmentSpec() and all(r.source for r in RECIPES.values())
