"""Checkpoints: NAME.pth (plain state dict), NAME.safetensors (same weights), NAME.json (what they are)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import KdfastError
from . import schemas
from .files import dump_json, read_json, remove_quietly, write_temp
from .models import create_model, model_entry
from .models.library import PretrainedError



def checkpoint_paths(out_dir: str, name: str) -> dict[str, str]:
    base = os.path.join(out_dir, name)
    return {"pth": base + ".pth", "safetensors": base + ".safetensors", "json": base + ".json",
            "metrics": base + ".metrics.jsonl", "state": os.path.join(out_dir, ".state", name)}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors: loadable with torch.load(weights_only=True) and by safetensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(out_dir: str, name: str, model: nn.Module, meta: dict, metrics: str | None = None) -> dict[str, str]:
    """Write the three files of a checkpoint: all to temporary names first, then renamed, the .json last.

    A failure while writing (a full disk) leaves the previous checkpoint whole and no temporary file. metrics: the
    run's per-epoch metrics kept elsewhere while it replaced a finished run, renamed to NAME.metrics.jsonl with them.
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    paths = checkpoint_paths(out_dir, name)
    state = plain_state_dict(model)

    def write_meta(tmp):
        with open(tmp, "w") as f:
            dump_json(meta, f)

    writers = {"pth": lambda tmp: torch.save(state, tmp),
               "safetensors": lambda tmp: save_file(state, tmp, metadata={"model": meta["model"]}),
               "json": write_meta}
    temps = {}
    try:
        for key, write in writers.items():
            temps[key] = write_temp(paths[key], write)
    except BaseException:
        for tmp in temps.values():
            remove_quietly(tmp)
        raise
    for key in writers:  # renames need no space: the .json, last, says the weights beside it are whole
        if key == "json" and metrics and os.path.exists(metrics):
            os.replace(metrics, paths["metrics"])
        os.replace(temps[key], paths[key])
    return paths


def state_dict_mismatch(e: RuntimeError) -> str:
    """load_state_dict's error in a few words: its first problem (missing keys, unexpected keys, a size mismatch)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "RuntimeError")
    more = f"; and {len(lines) - 2} more" if len(lines) > 2 else ""
    return (detail[:160] + (" ..." if len(detail) > 160 else "")) + more


def read_meta(path: str) -> dict:
    """The .json beside a .pth / .safetensors checkpoint."""
    meta_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(path):
        if _is_model_name(path):
            raise FileNotFoundError(f"{path}: a model name, not a checkpoint. A teacher by name needs its weights: "
                                    "--teacher-weights FILE (a plain state dict, .pth or .safetensors) or "
                                    "--teacher-pretrained (the library's); or `kdfast import` them into a checkpoint.")
        raise FileNotFoundError(f"{path}: checkpoint not found. Train it first (kdfast train / kdfast lab) or fix the path.")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing. kdfast needs the .json it writes beside every checkpoint "
                                "(it names the model and its classes): copy it along with the weights; for weights "
                                f"trained elsewhere, `kdfast import {path} --model NAME --data DATA` writes it (or "
                                f"pass --teacher NAME --teacher-weights {path}).")
    fix = "Copy it again from where the checkpoint was trained, or train the model again."
    meta = read_json(meta_path, "checkpoint description", fix, schemas.CHECKPOINT)
    if not meta["classes"]:
        raise KdfastError(f"{meta_path}: damaged checkpoint description, 'classes' is not a list of class names. {fix}")
    try:
        model_entry(meta["model"])
    except ValueError as e:
        raise KdfastError(f"{meta_path}: {e}") from None
    return meta


def _is_model_name(name: str) -> bool:
    try:
        model_entry(name)
        return True
    except ValueError:
        return False


def _unwrap_state(state):
    """A state dict nested the usual ways ({"state_dict": ...}, {"model": ...}, the "module." prefix of DDP, the
    "_orig_mod." prefix of torch.compile, in either order) as a plain one."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
            state = state[key]
    while isinstance(state, dict) and state and all(isinstance(k, str) for k in state):
        prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .pth (weights_only) or .safetensors file; a damaged file is named in one line."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / safetensors / zip errors: all mean "not a whole checkpoint"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if "weights_only" in first:  # torch's hint to unpickle arbitrary code is not advice kdfast gives
            first = "holds more than tensors, or is not a torch.save file"
        raise KdfastError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first}); the file is truncated, "
                          "damaged or not a kdfast checkpoint. Copy it again, or train the model again.") from None
    state = _unwrap_state(state)
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise KdfastError(f"{path}: holds {_described(state)}, not a state dict (parameter names to tensors, alone or "
                          "under 'state_dict', 'model' or 'model_state_dict'). Point at a file of model weights: "
                          "the .pth or .safetensors kdfast wrote, or torch.save(model.state_dict(), FILE).")
    return state


def _described(obj) -> str:
    """What a loaded file holds, in a few words."""
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        keys = ", ".join(repr(k) for k in list(obj)[:5]) + (" ..." if len(obj) > 5 else "")
        kinds = sorted({type(v).__name__ for v in obj.values()})
        return f"a dict of {len(obj)} entries ({keys}; values: {', '.join(kinds[:4])})"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in the checkpoint's .json and load its weights (no pickled code is run)."""
    meta = read_meta(path)
    model = create_model(meta["model"], num_classes=len(meta["classes"]))
    state = _read_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise KdfastError(f"{path}: weights do not fit model {meta['model']!r} ({state_dict_mismatch(e)}); the "
                          ".json beside it describes another model. Copy the pair together.") from None
    return model.to(device), meta


def library_teacher(name: str, classes: list[str], weights: str | None = None, pretrained: bool = False,
                    say=print) -> tuple[nn.Module, dict]:
    """A teacher by model name (registered, timm:NAME or torchvision:NAME) with outside weights: a plain state dict
    (.pth, .safetensors) or the library's pretrained ones; classes are the data's."""
    model_entry(name)
    if not weights and not pretrained:
        raise ValueError(f"--teacher {name}: a model name needs its weights: --teacher-weights FILE or "
                         "--teacher-pretrained")
    try:
        model = create_model(name, num_classes=len(classes), pretrained=pretrained or None)
    except PretrainedError as e:
        raise e.for_flag("--teacher-pretrained") from None
    if pretrained:
        say(f"[teacher] {name}: the library's pretrained weights with a head for this data's {len(classes)} classes "
            "(a head of another size is newly initialised: fine-tune it first with kdfast train --pretrained)")
    if weights:
        state = _read_weights(weights)
        target = model.model if hasattr(model, "model") and not any(k.startswith("model.") for k in state) else model
        try:
            target.load_state_dict(state)
        except RuntimeError as e:
            raise KdfastError(f"--teacher-weights {weights}: the weights do not fit {name} with {len(classes)} classes "
                              f"({state_dict_mismatch(e)}); check --teacher and the data's classes.") from None
    meta = {"model": name, "classes": classes, "family": model_entry(name).family,
            "weights_from": os.path.abspath(weights) if weights else "pretrained"}
    return model, meta


def load_teacher(path: str, classes: list[str], device, weights: str | None = None,
                 pretrained: bool = False) -> tuple[nn.Module, dict]:
    """A frozen teacher in eval mode: a kdfast checkpoint (refused if trained on other classes), or a model name with
    --teacher-weights / --teacher-pretrained (library_teacher)."""
    if weights or pretrained:
        teacher, meta = library_teacher(path, classes, weights, pretrained)
        teacher = teacher.to(device)
    else:
        teacher, meta = load_checkpoint(path, device)
    if meta["classes"] != classes:
        raise KdfastError(f"{path}: the teacher was trained on classes {meta['classes']}, but this data has {classes}. "
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
