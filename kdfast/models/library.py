"""Library models by name: ``timm:NAME`` and ``torchvision:NAME``, built with ``num_classes`` set.

``@SIZE`` after a name resizes the input on the device before the model (bilinear), for models made for their
pretraining size: ``timm:vit_tiny_patch16_224@224``. The resize is part of the model, so it follows the
augmented crop exactly as the crop follows (seed, sample), and a logit cache of such a teacher is keyed like
any other. ``--pretrained`` downloads the library's weights once (timm: the Hugging Face hub; torchvision:
torch hub, with its hash check) and reads them from the local cache afterwards.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

LIBRARIES = ("timm", "torchvision")
NAMING = ("timm:NAME (any of timm.list_models(), e.g. timm:resnet18, timm:mobilenetv3_small_100), "
          "torchvision:NAME (any of torchvision.models.list_models(), e.g. torchvision:mobilenet_v3_small); "
          "add @SIZE to resize the 32x32 input on the device for models made for a fixed size "
          "(timm:vit_tiny_patch16_224@224)")


class ResizeInput(nn.Module):
    """Resize the (augmented, normalized) batch to size x size on the device, then run the model."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(x)


def is_library_name(name: str) -> bool:
    return ":" in name


def parse(name: str) -> tuple[str, str, int | None]:
    """'timm:vit_tiny_patch16_224@224' -> ('timm', 'vit_tiny_patch16_224', 224)."""
    library, _, rest = name.partition(":")
    model, _, size = rest.partition("@")
    if library not in LIBRARIES or not model:
        raise ValueError(f"--model {name!r}: library models are named {NAMING}")
    if size and (not size.isdigit() or not 8 <= int(size) <= 1024):
        raise ValueError(f"--model {name!r}: @SIZE must be a whole number of pixels between 8 and 1024")
    return library, model, int(size) if size else None


@functools.lru_cache(maxsize=2)
def library_models(library: str) -> tuple[str, ...]:
    if library == "timm":
        import timm

        return tuple(timm.list_models())
    import torchvision

    return tuple(torchvision.models.list_models())


def check_name(name: str) -> tuple[str, str, int | None]:
    """The parsed name, or one sentence with the library's closest names."""
    library, model, size = parse(name)
    known = library_models(library)
    if model not in known:
        close = difflib.get_close_matches(model, known, n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(f'{library}:{c}' for c in close)}?" if close else ""
        raise ValueError(f"--model {name!r}: {library} has no model {model!r}.{hint} "
                         f"List them with python -c \"import {library}; print({_lister(library)})\".")
    return library, model, size


def _lister(library: str) -> str:
    return "timm.list_models()" if library == "timm" else "torchvision.models.list_models()"


class PretrainedError(ValueError):
    """The library's weights could not be had; the message names the flag that asked for them (default --pretrained;
    for_flag: the flag of the command that asked, --teacher-pretrained, --cnn-teacher-pretrained)."""

    def __init__(self, template: str, flag: str = "--pretrained"):
        super().__init__(template.replace("{flag}", flag))
        self.template = template

    def for_flag(self, flag: str) -> "PretrainedError":
        return PretrainedError(self.template, flag)


def pretrained_error(what: str, e: Exception, cached: str | None = None) -> PretrainedError:
    """Why the library's weights could not be had: a damaged file in its cache (named, with the command that removes
    it), or neither cached nor downloadable."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if cached and os.path.exists(cached):
        real = os.path.realpath(cached)
        files = f"{real} {cached}" if real != os.path.abspath(cached) else cached
        return PretrainedError(f"{{flag}}: the weights of {what} are in the local cache, but {cached} cannot be read "
                          f"({type(e).__name__}: {first}): the file is damaged (cut while downloading?). Remove it "
                          f"(rm -f {files}) and run again with internet, or copy a whole one there.")
    return PretrainedError(f"{{flag}}: could not get the weights of {what} ({type(e).__name__}: {first}). They are "
                           "neither in the local cache (timm: $HF_HOME or ~/.cache/huggingface; torchvision: "
                           "$TORCH_HOME or ~/.cache/torch/hub) nor downloadable here. Run once with internet (or copy "
                           "that cache over), or run without {flag}.")


def torchvision_pretrained(model: nn.Module, name: str, skip=()) -> nn.Module:
    """Load torchvision's default weights for `name` into `model`; tensors whose shapes differ (the head for
    another number of classes) or whose names start with `skip` keep their initialisation."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError (offline), a hash mismatch, a damaged file: all mean "no weights"
        import torch.hub
        from urllib.parse import urlparse

        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        raise pretrained_error(f"torchvision:{name} ({weights.url})", e, cached) from None
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(tuple(skip))}
    model.load_state_dict(keep, strict=False)
    return model


def timm_model(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    """timm.create_model, with a download failure said in one sentence."""
    import timm

    if not pretrained:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    with hub_offline_unless_reachable():
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:  # offline, not cached, gated, damaged: the hub's and httpx's errors have no common base
            raise pretrained_error(f"timm:{name}", e, timm_cached_file(name)) from None


def timm_cached_file(name: str) -> str | None:
    """The file of timm's pretrained weights of `name` in the Hugging Face cache, if one is there."""
    try:
        import huggingface_hub
        import timm

        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = huggingface_hub.try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(found, str):
                return found
    except Exception:  # no pretrained config, an unusual cache: nothing to name
        return None
    return None


@contextlib.contextmanager
def hub_offline_unless_reachable(timeout: float = 3.0):
    """The Hugging Face hub in offline mode (its local cache only) when its host cannot be reached in `timeout`
    seconds: without network the hub retries each request for about a minute before it gives up. Behind a proxy
    ($HTTPS_PROXY) the hub is left to decide."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    probe = not hub.HF_HUB_OFFLINE and not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    reachable = True
    if probe:
        url = urlparse(hub.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        except OSError:
            reachable = False
    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def build(name: str, num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    library, model_name, size = check_name(name)
    if library == "timm":
        model = timm_model(model_name, num_classes, pretrained)
    else:
        import torchvision

        builder = torchvision.models.get_model_builder(model_name)
        # segmentation and detection builders load a pretrained backbone unless told not to: nothing is downloaded
        # without --pretrained
        no_backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
        model = builder(num_classes=num_classes, **no_backbone)
        if pretrained:
            torchvision_pretrained(model, model_name)
    return ResizeInput(model, size) if size else model


@functools.lru_cache(maxsize=64)
def family(name: str) -> str:
    """'vit' for models with attention (they get the AdamW recipe), else 'cnn' (SGD, channels_last)."""
    with torch.device("meta"):
        model = build(name)
    attention = any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
                    for m in model.modules())
    return "vit" if attention else "cnn"
