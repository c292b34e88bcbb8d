"""ImageNet-style views: RandomResizedCrop boxes keyed by (seed, index, size), the exact resize (Pillow on the CPU, the
same integers batch-wise in torch), evaluation."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.augment import AugmentSpec, augment, eval_view, rrc_boxes
from kdfast.augment.resample import crop_resize
from kdfast.augment.rrc import center_boxes


def smooth_images(n=16, h=96, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float()
    return F.avg_pool2d(x, 5, 1, 2).round().to(torch.uint8)  # smooth, so resizes can be compared


def test_boxes_are_a_pure_function_of_seed_index_and_size():
    spec = AugmentSpec(view="rrc", crop_size=32)
    idx = torch.arange(500)
    sizes = torch.stack([100 + idx % 37, 60 + idx % 91], 1)
    whole = rrc_boxes(3, idx, sizes, spec)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(1))
    for batch, stop in ((1, 40), (7, 500), (128, 500)):
        for start in range(0, stop, batch):
            part = perm[start:start + batch]
            for a, b in zip(rrc_boxes(3, part, sizes[part], spec), whole):
                assert torch.equal(a, b[part])
    other_seed = rrc_boxes(4, idx, sizes, spec)
    assert not torch.equal(other_seed[0], whole[0])
    bigger = rrc_boxes(3, idx, sizes + 50, spec)  # the source size is part of the key
    assert not torch.equal(bigger[2], whole[2])


def test_boxes_follow_the_scale_and_ratio_ranges_inside_the_image():
    spec = AugmentSpec(view="rrc", scale=(0.25, 0.5), ratio=(0.5, 2.0))
    idx = torch.arange(4000)
    sizes = torch.tensor([[300, 400]]).expand(4000, 2)
    top, left, h, w, flip = rrc_boxes(0, idx, sizes, spec)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
    area = (h * w).double() / (300 * 400)
    assert area.min() > 0.24 and area.max() < 0.51  # rounding of the sides only
    aspect = (w.double() / h).log()
    assert aspect.min() > math.log(0.5) - 0.05 and aspect.max() < math.log(2.0) + 0.05
    assert 0.45 < flip.double().mean() < 0.55 and top.unique().numel() > 50
    # a thin image: no try fits the ratio range, the fallback is the centered crop with the ratio clamped
    thin = rrc_boxes(0, torch.arange(10), torch.tensor([[10, 400]]).expand(10, 2), AugmentSpec(view="rrc", scale=(0.9, 1)))
    assert (thin[2] == 10).all() and (thin[3] == round(10 * 4 / 3)).all() and (thin[1] == (400 - 13) // 2).all()


def test_crop_resize_is_within_two_levels_of_torchs_antialiased_bilinear():
    x = smooth_images()
    for (top, left, h, w, out) in ((3, 5, 70, 60, 32), (0, 0, 96, 80, 64), (10, 20, 20, 17, 48), (1, 2, 90, 31, 24)):
        n = len(x)
        got = crop_resize(x, torch.full((n,), top), torch.full((n,), left), torch.full((n,), h), torch.full((n,), w), out, out)
        ref = F.interpolate(x[:, :, top:top + h, left:left + w].float(), size=(out, out), mode="bilinear",
                            antialias=True, align_corners=False).round()
        diff = (ref - got.float()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.35, (top, left, h, w, out, diff.max(), diff.mean())


def test_views_do_not_depend_on_the_batch_and_flip_mirrors():
    spec = AugmentSpec(view="rrc", crop_size=40)
    x, idx = smooth_images(24), torch.arange(24)
    sizes = torch.stack([96 - idx, 80 - idx], 1)  # letterboxed: each image top-left in the 96 x 80 box
    whole = augment(x, idx, 5, spec, sizes)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    for batch in (1, 5, 24):
        for start in range(0, 24, batch):
            part = perm[start:start + batch]
            assert torch.equal(augment(x[part], idx[part], 5, spec, sizes[part]), whole[part])
    unflipped = augment(x, idx, 5, AugmentSpec(view="rrc", crop_size=40, flip=False), sizes)
    flip = rrc_boxes(5, idx, sizes, spec)[4]
    assert flip.any() and (~flip).any()
    assert torch.equal(whole[flip], unflipped[flip].flip(-1)) and torch.equal(whole[~flip], unflipped[~flip])


def test_the_letterbox_is_never_read():
    spec = AugmentSpec(view="rrc", crop_size=32)
    x, idx = smooth_images(8), torch.arange(8)
    sizes = torch.tensor([[50, 40]]).expand(8, 2)
    noisy = x.clone()
    noisy[:, :, 50:, :] = 255
    noisy[:, :, :, 40:] = 0
    assert torch.equal(augment(x, idx, 1, spec, sizes), augment(noisy, idx, 1, spec, sizes))
    assert torch.equal(eval_view(x, spec, sizes), eval_view(noisy, spec, sizes))


def test_eval_view_is_the_center_crop_of_the_shorter_side():
    spec = AugmentSpec(view="rrc", crop_size=32, eval_size=48, crop_fraction=0.875)
    sizes = torch.tensor([[96, 80], [60, 100]])
    top, left, h, w = center_boxes(sizes, 0.875)
    assert h.tolist() == [70, 52] and w.tolist() == [70, 52]
    assert top.tolist() == [13, 4] and left.tolist() == [5, 24]
    out = eval_view(smooth_images(2, 100, 100), spec, sizes)
    assert out.shape == (2, 3, 48, 48)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rrc_views_same_on_cpu_and_gpu():
    spec = AugmentSpec(view="rrc", crop_size=64)
    x, idx = smooth_images(), torch.arange(16)
    assert torch.equal(augment(x, idx, 3, spec), augment(x.cuda(), idx, 3, spec).cpu())


def test_spec_saved_form_keeps_the_cifar_keys_and_round_trips():
    cifar = AugmentSpec()
    assert sorted(cifar.to_dict()) == ["crop_size", "flip", "mean", "pad_mode", "padding", "std"]  # as always saved
    rrc = AugmentSpec(view="rrc", crop_size=64, scale=(0.35, 1.0)).for_dataset("cifar10")
    assert rrc.to_dict()["eval_size"] == 64 and tuple(rrc.mean) == (0.485, 0.456, 0.406)  # ImageNet's for rrc
    assert AugmentSpec.from_dict(rrc.to_dict()) == AugmentSpec(view="rrc", crop_size=64, eval_size=64, scale=(0.35, 1.0),
                                                                mean=rrc.mean, std=rrc.std)


def random_boxes(g: torch.Generator, batch: int, side: int, out: int):
    """Random uint8 images (batch, 3, H, W) of sides < `side`, a box in each, and an output size < `out`."""
    H, W = (int(v) for v in torch.randint(2, side, (2,), generator=g))
    x = torch.randint(0, 256, (batch, 3, H, W), dtype=torch.uint8, generator=g)
    h, w = torch.randint(1, H + 1, (batch,), generator=g), torch.randint(1, W + 1, (batch,), generator=g)
    top = (torch.rand(batch, generator=g) * (H - h + 1)).floor().long()
    left = (torch.rand(batch, generator=g) * (W - w + 1)).floor().long()
    out_h, out_w = (int(v) for v in torch.randint(1, out, (2,), generator=g))
    return x, top, left, h, w, out_h, out_w


def test_torch_and_pillow_paths_are_pillows_crop_then_resize_bitwise():
    """The batched torch path (what a GPU runs) equals Pillow's C code pixel for pixel, both pass orders, any sizes;
    both equal torchvision's resized_crop of a PIL image (RandomResizedCrop's pixels)."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        x, top, left, h, w, out_h, out_w = random_boxes(g, 6, 200, 160)
        flip = torch.rand(6, generator=g) < 0.5
        pillow = crop_resize(x, top, left, h, w, out_h, out_w, flip, backend="pillow")
        assert torch.equal(pillow, crop_resize(x, top, left, h, w, out_h, out_w, flip, backend="torch"))
        img = Image.fromarray(x[0].permute(1, 2, 0).numpy().copy())
        ref = TF.resized_crop(img, int(top[0]), int(left[0]), int(h[0]), int(w[0]), [out_h, out_w],
                              TF.InterpolationMode.BILINEAR)
        ref = torch.from_numpy(np.asarray(TF.hflip(ref) if flip[0] else ref).copy()).permute(2, 0, 1)
        assert torch.equal(pillow[0], ref)


def test_bicubic_resize_is_pillows_bitwise_and_the_flag_reaches_every_view():
    """--augment.interpolation bicubic: the torch path equals Pillow's BICUBIC (negative weights rounded as Pillow
    does, overshoot clipped) and torchvision's; the views use it, the spec saves it only when it is not bilinear (older
    runs and caches still match), and the flag exists wherever the views are configured."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    from kdfast import distill, train
    from kdfast.cache import BuildConfig
    from kdfast.config import LabConfig

    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, top, left, h, w, out_h, out_w = random_boxes(g, 4, 120, 100)
        pillow = crop_resize(x, top, left, h, w, out_h, out_w, backend="pillow", interpolation="bicubic")
        assert torch.equal(pillow, crop_resize(x, top, left, h, w, out_h, out_w, backend="torch",
                                               interpolation="bicubic"))
        img = Image.fromarray(x[0].permute(1, 2, 0).numpy().copy())
        ref = TF.resized_crop(img, int(top[0]), int(left[0]), int(h[0]), int(w[0]), [out_h, out_w],
                              TF.InterpolationMode.BICUBIC)
        assert torch.equal(pillow[0], torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))
    x = smooth_images()
    idx = torch.arange(len(x))
    bicubic = AugmentSpec(view="rrc", crop_size=24, interpolation="bicubic")
    assert not torch.equal(augment(x, idx, 3, bicubic), augment(x, idx, 3, AugmentSpec(view="rrc", crop_size=24)))
    assert bicubic.to_dict()["interpolation"] == "bicubic" and "(bicubic)" in bicubic.describe()
    assert "interpolation" not in AugmentSpec(view="rrc", crop_size=24).to_dict()
    assert AugmentSpec.from_dict(bicubic.to_dict()).interpolation == "bicubic"
    flags = ["--augment.view", "rrc", "--augment.interpolation", "bicubic"]
    for parse in (train.parse, distill.parse):
        assert parse(flags).augment.interpolation == "bicubic"
    assert BuildConfig(augment=AugmentSpec(interpolation="bicubic")).augment.interpolation == "bicubic"
    assert LabConfig(augment=AugmentSpec(interpolation="bicubic")).augment.interpolation == "bicubic"
    with pytest.raises(ValueError, match="--augment.interpolation must be bilinear or bicubic"):
        AugmentSpec(interpolation="nearest").check()
