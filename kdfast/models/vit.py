"""Vision Transformers from timm, for 32x32 input with 4x4 patches (64 tokens + class token)."""
from __future__ import annotations

import timm
import torch.nn as nn

from .registry import register_model

PRETRAINED_TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def _cached_pretrained_file(tag: str) -> str:
    """Local path of timm's pretrained weights in the Hugging Face cache, or a clear error."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(tag)
    repo = cfg.hf_hub_id if cfg is not None else None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(path, str):
            return path
    raise FileNotFoundError(
        f"--pretrained: timm weights {tag} (hub repo {repo}) are not in the local Hugging Face cache. "
        f"Download them once where you are online (python -c \"import timm; timm.create_model('{tag}', pretrained=True)\"), "
        "or train from scratch without --pretrained."
    )


def _vit(depth: int, num_classes: int, pretrained: bool, drop_path_rate: float) -> nn.Module:
    kwargs = dict(img_size=32, patch_size=4, embed_dim=192, num_heads=3, num_classes=num_classes,
                  drop_path_rate=drop_path_rate)
    if not pretrained:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, **kwargs)
    # timm resamples the 16x16 patch embedding and the position embedding to 4x4 / 8x8 when loading
    model = timm.create_model(PRETRAINED_TAG, pretrained=True, depth=12,
                              pretrained_cfg_overlay=dict(file=_cached_pretrained_file(PRETRAINED_TAG)), **kwargs)
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
