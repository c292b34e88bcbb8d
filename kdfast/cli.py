"""The `kdfast` command: `kdfast <command> [flags]`; `kdfast <command> --help` lists each command's flags."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("kdfast.train", "train a teacher or a student without KD"),
    "distill": ("kdfast.distill", "train a student with knowledge distillation from a teacher checkpoint"),
    "cache": ("kdfast.cache", "build / info / verify a teacher-logit cache (HDF5): KD with no teacher pass"),
    "evaluate": ("kdfast.evaluate", "evaluate a checkpoint on the test set"),
    "sweep": ("kdfast.sweep", "an alpha x tau grid with seeds from one teacher-logit cache: table, best point"),
    "lab": ("kdfast.lab", "the whole course lab: six checkpoints and report.json (--preset smoke|cpu|full)"),
    "import": ("kdfast.import_weights", "make a checkpoint (.pth, .safetensors, .json) of weights trained elsewhere"),
    "report": ("kdfast.labreport", "rebuild report.json and report.md (table, curves, sweep) from a lab's saved runs"),
    "models": (None, "list the registered models and how to name any timm / torchvision model"),
    "methods": (None, "list the distillation methods (kdfast distill --method NAME)"),
    "recipes": (None, "list the named augmentation recipes (--aug-recipe NAME) with their sources"),
}


def usage() -> str:
    lines = ["usage: kdfast <command> [flags]   (kdfast <command> --help for its flags; kdfast --version)", "",
             "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Multi-GPU / multi-node: accelerate launch -m kdfast.<command> [flags]"]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        from . import __version__

        print(f"kdfast {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"kdfast: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command == "models":
        from .models import list_models, model_entry

        from .models.library import NAMING

        for name in list_models():
            entry = model_entry(name)
            print(f"{name:<12} {entry.family:<4} {entry.description}")
        print(f"\nAny library model works too, for teachers and students (--model): {NAMING}. Its family (cnn: SGD "
              "recipe and channels_last; vit: AdamW) is vit when it has attention layers, else cnn; --recipe "
              "overrides it. --pretrained downloads the library's weights once, then reads its local cache.")
        return 0
    if command == "methods":
        from .methods import list_methods, method_entry

        for name in list_methods():
            entry = method_entry(name)
            source = "teacher logits: cache or online" if entry.needs == "logits" else "teacher features: online"
            print(f"{name:<9} {source:<32} {entry.description}")
        return 0
    if command == "recipes":
        from .augment.recipes import RECIPES

        for recipe in RECIPES.values():
            fields = ", ".join(f"{k} {v}" for k, v in recipe.augment.items()) or "-"
            smoothing = "" if recipe.label_smoothing is None else f"; label smoothing {recipe.label_smoothing:g}"
            print(f"{recipe.name:<15} {fields}{smoothing}\n{'':<15} {recipe.source}")
        print("\nPolicies are torchvision's RandAugment / TrivialAugmentWide, keyed per sample: a recipe's views are cached "
              "like any other (kdfast cache build --aug-recipe NAME).")
        return 0
    importlib.import_module(COMMANDS[command][0]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
