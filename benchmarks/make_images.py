"""Make an ImageNet-style folder of larger images from a CIFAR-style archive or folder, for benchmarks and runs.

    python benchmarks/make_images.py --data cifar10-jpeg.tar.gz --out runs/cifar64 --size 64 --train-per-class 300
    python benchmarks/make_images.py --data cifar10-jpeg.tar.gz --out runs/photos --min-side 256 --max-side 500

Each image is upscaled (bicubic) to --size x --size, or to a random size with sides in [--min-side, --max-side]
(a random aspect ratio), and saved as JPEG (quality 90) in OUT/train/<class>/ and OUT/val/<class>/. The output is
derived from the source: keep it out of version control.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kdfast.data.sources import list_source, source_kind  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a CIFAR-style .tar.gz or folder (train/<class>/*, test/<class>/*)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=0, help="square side; 0: random sizes from --min-side/--max-side")
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--train-per-class", type=int, default=0, help="0: all")
    p.add_argument("--test-per-class", type=int, default=0, help="0: all")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from PIL import Image

    listing = list_source(args.data, source_kind(args.data))
    rng = np.random.default_rng(args.seed)
    for split, out_split, per_class in (("train", "train", args.train_per_class), ("test", "val", args.test_per_class)):
        taken: dict[int, int] = {}
        for label, name, key in listing.splits[split]:
            if per_class and taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            w, h = (args.size, args.size) if args.size else (int(v) for v in rng.integers(args.min_side, args.max_side + 1, 2))
            img = Image.open(io.BytesIO(listing.read(key))).convert("RGB").resize((w, h), Image.BICUBIC)
            folder = os.path.join(args.out, out_split, listing.classes[label])
            os.makedirs(folder, exist_ok=True)
            img.save(os.path.join(folder, os.path.basename(name.split(":")[-1]).rsplit(".", 1)[0] + ".jpg"), quality=90)
        print(f"{out_split}: {sum(taken.values())} images in {os.path.join(args.out, out_split)}")


if __name__ == "__main__":
    main()
