"""Checkpoints: NAME.pth (plain state dict), NAME.safetensors (same weights), NAME.json (what they are)."""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from .models import create_model, model_entry


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def checkpoint_paths(out_dir: str, name: str) -> dict[str, str]:
    base = os.path.join(out_dir, name)
    return {"pth": base + ".pth", "safetensors": base + ".safetensors", "json": base + ".json",
            "metrics": base + ".metrics.jsonl", "state": os.path.join(out_dir, ".state", name)}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors: loadable with torch.load(weights_only=True) and by safetensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(out_dir: str, name: str, model: nn.Module, meta: dict) -> dict[str, str]:
    """Write the three files of a checkpoint; the .json last, so its presence means the weights are whole."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    paths = checkpoint_paths(out_dir, name)
    state = plain_state_dict(model)
    _atomic_write(paths["pth"], lambda tmp: torch.save(state, tmp))
    _atomic_write(paths["safetensors"], lambda tmp: save_file(state, tmp, metadata={"model": meta["model"]}))
    write_json(paths["json"], meta)
    return paths


def read_meta(path: str) -> dict:
    """The .json beside a .pth / .safetensors checkpoint."""
    meta_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found. Train it first (kdfast train / kdfast lab) or fix the path.")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing. kdfast needs the .json it writes beside every checkpoint "
                                "(it names the model); copy it along with the weights.")
    with open(meta_path) as f:
        return json.load(f)


def load_checkpoint(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in the checkpoint's .json and load its weights (no pickled code is run)."""
    meta = read_meta(path)
    model = create_model(meta["model"], num_classes=len(meta["classes"]))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: weights do not fit model {meta['model']!r} ({str(e).splitlines()[0]})") from None
    return model.to(device), meta


def load_teacher(path: str, classes: list[str], device) -> tuple[nn.Module, dict]:
    """A frozen teacher in eval mode, refused if it was trained on other classes."""
    teacher, meta = load_checkpoint(path, device)
    if meta["classes"] != classes:
        raise ValueError(f"{path}: the teacher was trained on classes {meta['classes']}, but this data has {classes}. "
                         "Distil on the teacher's dataset, or train a teacher on this one.")
    if model_entry(meta["model"]).family == "cnn":
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    return teacher, meta


def weights_sha256(model: nn.Module) -> str:
    """A hash of the weights themselves (names, shapes, dtypes, values), whatever file they came from."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(plain_state_dict(model).items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()
