"""Make a kdfast checkpoint of weights trained elsewhere: NAME.pth, .safetensors and the .json naming the model and
its classes, so an outside teacher can be cached, distilled from and evaluated like one kdfast trained.

    kdfast import teacher_state_dict.pth --model timm:resnet50 --data my_photos --name teacher \
        --augment.view rrc --augment.crop-size 224      # the views it was trained at: evaluated and predicted at them
    kdfast import --model torchvision:resnet50 --teacher-pretrained --data imagenet --name rn50    # the library's
"""
from __future__ import annotations

import os
import sys

from .checkpoint import checkpoint_paths, library_teacher, save_checkpoint
from .config import ImportConfig
from .data import load_dataset, list_source, resolve_source, source_kind
from .errors import KdfastError, user_errors_exit
from .flags import command_line
from .models import count_parameters
from .rundir import check_name


def class_names(cfg: ImportConfig) -> list[str]:
    if cfg.classes:
        return list(cfg.classes)
    source = resolve_source(cfg.data)
    if not source.startswith("hf:") and not os.path.exists(source):
        raise ValueError(f"--data {source}: no such file or folder; give the data the weights were trained on (for "
                         "its class names), or --classes NAME ...")
    kind = source_kind(source)
    if kind == "torchvision":
        return load_dataset(source, cfg.cache_dir, cfg.download, dataset=cfg.dataset, log=lambda *a: None).classes
    return list_source(source, kind, cfg.cache_dir).classes


def check_outputs(cfg: ImportConfig, paths: dict) -> None:
    """Nothing is written over without --overwrite: not the input weights file, not another checkpoint."""
    if cfg.overwrite:
        return
    written = [paths[k] for k in ("pth", "safetensors", "json")]
    for path in written:
        if cfg.weights and os.path.exists(path) and os.path.samefile(path, cfg.weights):
            raise KdfastError(f"{path}: the import would write over the weights file it reads (whatever else it holds, "
                              "an optimizer's state or an epoch, would be lost). Choose another --name or --out-dir, "
                              "or pass --overwrite to replace it.")
    existing = [p for p in written if os.path.exists(p)]
    if existing:
        raise KdfastError(f"{existing[0]}: a checkpoint of this name exists. Pass --overwrite to replace it, or "
                          "choose another --name.")


def recorded_config(cfg: ImportConfig) -> dict:
    """What the .json records of the weights' training, as a run's config: the data (when given) and the views, which
    evaluate, predict and cache build then use."""
    config = {k: v for k, v in cfg.to_dict().items() if k in ("augment", "dataset")}
    return {**config, **({"data": os.path.abspath(cfg.data) if os.path.exists(cfg.data) else cfg.data}
                         if cfg.data else {})}


def run(cfg: ImportConfig) -> dict:
    if not cfg.model:
        raise ValueError("--model is needed: the model the weights belong to (e.g. timm:resnet50; `kdfast models`)")
    cfg.validate()
    cfg = cfg.resolved()
    if bool(cfg.weights) == cfg.teacher_pretrained:
        raise ValueError("give either the weights file or --teacher-pretrained (not both, not neither)")
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise FileNotFoundError(f"{cfg.weights}: no such weights file")
    name = check_name(cfg.name or (os.path.splitext(os.path.basename(cfg.weights))[0] if cfg.weights
                                   else cfg.model.replace(":", "-").replace("@", "-")))
    paths = checkpoint_paths(cfg.out_dir, name)
    check_outputs(cfg, paths)
    classes = class_names(cfg)
    model, meta = library_teacher(cfg.model, classes, cfg.weights, cfg.teacher_pretrained)
    meta.update(parameters=count_parameters(model), imported=True, config=recorded_config(cfg))
    save_checkpoint(cfg.out_dir, name, model, meta)
    print(f"[import] {cfg.model} ({meta['parameters']:,} params, {len(classes)} classes: "
          f"{', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}) from {meta['weights_from']} -> {paths['pth']}; "
          f"use it as --teacher {paths['pth']}")
    return meta


def parse(argv: list[str]) -> ImportConfig:
    """The command's flags as its config (what the README test checks every shown command with)."""
    return command_line(ImportConfig, argv, "kdfast import")


@user_errors_exit
def main(argv: list[str] | None = None) -> dict:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
