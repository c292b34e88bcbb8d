"""Vision Transformers from timm: for 32x32 input with 4x4 patches (64 tokens + class token), and ViT-Tiny at
its pretraining size (16x16 patches, the input resized to 224 on the device) for fine-tuning timm's weights."""
from __future__ import annotations

import timm
import torch.nn as nn

from .library import ResizeInput, timm_model
from .registry import register_model

PRETRAINED_TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def _vit(depth: int, num_classes: int, pretrained: bool, drop_path_rate: float,
         arch: str = "vit_tiny_patch16_224") -> nn.Module:
    kwargs = dict(img_size=32, patch_size=4, embed_dim=192, num_heads=3, drop_path_rate=drop_path_rate)
    if not pretrained:
        return timm.create_model(arch, num_classes=num_classes, depth=depth, **kwargs)
    # timm resamples the 16x16 patch embedding and the position embedding to 4x4 / 8x8 when loading
    model = timm_model(PRETRAINED_TAG, num_classes, True, depth=12, **kwargs)
    model.blocks = model.blocks[:depth]  # a shallower student keeps the first blocks
    return model


@register_model("vit")
def vit_tiny(num_classes: int = 10, pretrained: bool = False, drop_path_rate: float = 0.1) -> nn.Module:
    """ViT-Tiny (timm): 192-dim, 12 blocks, 3 heads, 4x4 patches for 32x32 input; 5.4M params."""
    return _vit(12, num_classes, pretrained, drop_path_rate)


@register_model("vit")
def vit_student(num_classes: int = 10, pretrained: bool = False, drop_path_rate: float = 0.05) -> nn.Module:
    """ViT student: ViT-Tiny with 6 blocks (192-dim, 3 heads, 4x4 patches); 2.7M params."""
    return _vit(6, num_classes, pretrained, drop_path_rate)


@register_model("vit")
def vit_student_distilled(num_classes: int = 10, pretrained: bool = False, drop_path_rate: float = 0.05) -> nn.Module:
    """ViT student with DeiT's distillation token and head (timm's VisionTransformerDistilled), for --method deit."""
    if pretrained:
        raise ValueError("vit_student_distilled has no pretrained weights: drop --pretrained")
    return _vit(6, num_classes, False, drop_path_rate, arch="deit_tiny_distilled_patch16_224")


@register_model("vit")
def vit_tiny_224(num_classes: int = 10, pretrained: bool = False, drop_path_rate: float = 0.1) -> nn.Module:
    """ViT-Tiny at its pretraining size: 16x16 patches, input resized to 224 on the device (fine-tune with --pretrained)."""
    model = timm_model(PRETRAINED_TAG if pretrained else "vit_tiny_patch16_224", num_classes, pretrained,
                       drop_path_rate=drop_path_rate)
    return ResizeInput(model, 224)
