"""The `kdfast` command: `kdfast <command> [flags]`; `kdfast <command> --help` lists each command's flags."""
from __future__ import annotations

import importlib
import os
import sys
import textwrap

COMMANDS = {
    "train": ("kdfast.train", "train a teacher or a student without KD"),
    "distill": ("kdfast.distill", "train a student with knowledge distillation from a teacher checkpoint"),
    "cache": ("kdfast.cache", "build / info / verify a teacher-logit cache (HDF5): KD with no teacher pass"),
    "evaluate": ("kdfast.evaluate", "evaluate a checkpoint on the test set, at the views it records"),
    "predict": ("kdfast.predict", "the top classes of your own images (files, folders, globs) by a checkpoint"),
    "sweep": ("kdfast.sweep", "an alpha x tau grid with seeds from one teacher-logit cache: table, chosen point"),
    "table": ("kdfast.table", "a KD table: teacher:student pairs x methods x seeds, published numbers beside"),
    "lab": ("kdfast.lab", "the whole course lab: six checkpoints and report.json (--preset smoke|cpu|full)"),
    "import": ("kdfast.import_weights", "make a checkpoint (.pth, .safetensors, .json) of weights trained elsewhere"),
    "report": ("kdfast.labreport", "report.md of a folder of saved runs (a lab's: report.json too), beside them"),
    "models": (None, "list the registered models and how to name any timm / torchvision model"),
    "methods": (None, "list the distillation methods (kdfast distill --method NAME)"),
    "recipes": (None, "list the named augmentation recipes (--aug-recipe NAME) with their sources"),
}


def fill(text: str, indent: int) -> str:
    """A listing's entry wrapped at 100 columns, its continuation lines indented to its text."""
    return textwrap.fill(text, 100, subsequent_indent=" " * indent, break_on_hyphens=False)


def usage() -> str:
    lines = ["usage: kdfast <command> [flags]   (kdfast <command> --help for its flags; kdfast --version)", "",
             "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Multi-GPU / multi-node: accelerate launch -m kdfast.<command> [flags]"]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `kdfast models | head`: the reader left; not an error of kdfast's
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(argv: list[str]):
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
            print(fill(f"{name:<12} {entry.family:<4} {entry.description}", 18))
        print("\n" + fill(f"Any library model works too, for teachers and students (--model): {NAMING}. Its family "
                          "(cnn: SGD recipe and channels_last; vit: AdamW) is vit when it has attention layers, "
                          "else cnn; --recipe overrides it. --pretrained downloads the library's weights once, then "
                          "reads its local cache.", 0))
        return 0
    if command == "methods":
        from .methods import list_methods, method_entry

        for name in list_methods():
            entry = method_entry(name)
            source = "teacher logits: cache or online" if entry.needs == "logits" else "teacher features: online"
            print(fill(f"{name:<9} {source:<32} {entry.description}", 43))
        return 0
    if command == "recipes":
        from .augment.recipes import RECIPES

        for recipe in RECIPES.values():
            fields = ", ".join(f"{k} {v}" for k, v in recipe.augment.items()) or "-"
            smoothing = "" if recipe.label_smoothing is None else f"; label smoothing {recipe.label_smoothing:g}"
            print(fill(f"{recipe.name:<15} {fields}{smoothing}", 16) + "\n" + fill(f"{'':<15} {recipe.source}", 16))
        print("\n" + fill("Policies are torchvision's RandAugment / TrivialAugmentWide, keyed per sample: a recipe's "
                          "views are cached like any other (kdfast cache build --aug-recipe NAME).", 0))
        return 0
    importlib.import_module(COMMANDS[command][0]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
