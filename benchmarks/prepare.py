"""How long a source takes to prepare, once per dataset, in each tier: listed, every image decoded (and checked),
written to an empty cache (the streamed tier's Arrow files, the device tier's decoded file). Rounds alternate.

    python benchmarks/prepare.py --data cifar10-jpeg.tar.gz --rounds 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.data import load_dataset  # noqa: E402
from kdfast.machine import describe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder, archive or Hugging Face dataset")
    p.add_argument("--store-size", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print("machine:", describe())
    for r in range(args.rounds):
        for tier in ("stream", "device"):
            cache = tempfile.mkdtemp()
            t0 = time.perf_counter()
            ds = load_dataset(args.data, cache, tier=tier, store_size=args.store_size, log=lambda *a: None)
            n = len(ds.train) + len(ds.test)
            print(f"round {r + 1} {tier}: {n:,} images prepared in {time.perf_counter() - t0:.1f} s")
            shutil.rmtree(cache)


if __name__ == "__main__":
    main()
