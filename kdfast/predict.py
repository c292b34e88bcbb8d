"""Run a checkpoint on your own images: the top-k classes of each, with probabilities, at the checkpoint's views.

    kdfast predict models_saved/cnn_teacher.pth photo.jpg more_photos/ "shots/*.png" --top-k 3 --out predictions.csv
"""
from __future__ import annotations

import csv
import glob
import io
import os
import sys

import torch

from .checkpoint import load_checkpoint, read_meta
from .config import PredictConfig, resolved_store_size
from .data import check_view
from .data.sources import IMAGE_SUFFIXES, Listing
from .data.store import decode_split
from .engine import make_runtime, predict as predict_logits
from .errors import KdfastError, user_errors_exit
from .flags import command_line
from .files import write_text


def image_files(patterns: tuple[str, ...]) -> list[str]:
    """Each argument as files: a file itself, a folder's images at any depth (hidden ones left out, sorted), a glob's
    matches; one that names nothing is refused."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(root, f) for root, dirs, names in os.walk(pattern, followlinks=True)
                           for f in names if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
                           and not any(part.startswith(".") for part in os.path.relpath(root, pattern).split(os.sep)
                                       if part != "."))
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise KdfastError(f"{pattern}: no image here (a file, a folder of images, or a glob like 'photos/*.jpg')")
        files += found
    return files


def run(cfg: PredictConfig) -> list[dict]:
    cfg.validate()
    meta = read_meta(cfg.checkpoint)
    config = meta.get("config", {})
    cfg = cfg.resolved({"augment": config.get("augment"), "dataset": config.get("dataset", "cifar10"),
                        "precision": meta.get("precision", "auto")})
    files = image_files(cfg.images)
    listing = Listing("images", meta["classes"], {"test": [(0, f, f) for f in files]}, _read)
    split = decode_split(listing, "test", resolved_store_size(cfg.augment, config.get("store_size", 0)))
    check_view(split, cfg.augment)
    runtime = make_runtime(cfg.precision, deterministic=cfg.deterministic)
    model, meta = load_checkpoint(cfg.checkpoint, runtime.device)
    channels_last = meta.get("family") == "cnn"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = cfg.batch_size or meta.get("eval_batch_size", 500)
    logits = predict_logits(model, split, cfg.augment, runtime, batch_size, channels_last, workers=0)
    probs, top = logits.float().softmax(1).topk(min(cfg.top_k, len(meta["classes"])), dim=1)
    rows = [{"image": f, "top": [(meta["classes"][c], p) for c, p in zip(t.tolist(), q.tolist())]}
            for f, t, q in zip(files, top, probs)]
    for row in rows:
        runtime.print(f"{row['image']}: " + ", ".join(f"{c} {p:.3f}" for c, p in row["top"]))
    if cfg.out and runtime.accelerator.is_main_process:
        write_text(cfg.out, as_csv(rows))
        print(f"wrote {cfg.out} ({len(rows)} images)")
    return rows


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KdfastError(f"{path}: cannot be read ({e.strerror})") from None


def as_csv(rows: list[dict]) -> str:
    k = max(len(r["top"]) for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image"] + [f"{what}_{i + 1}" for i in range(k) for what in ("class", "probability")])
    for r in rows:
        writer.writerow([r["image"]] + [v for c, p in r["top"] for v in (c, f"{p:.6f}")])
    return buf.getvalue()


def parse(argv: list[str]) -> PredictConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(PredictConfig, argv, "kdfast predict")


@user_errors_exit
def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
