"""What every benchmark ends with: its rows as one table, and the table saved as JSON with the machine and config."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone


def print_and_save(rows: list[dict], out_dir: str, name: str, machine: dict, config: dict, ratio_key: str,
                   ratio_title: str, width: int = 52) -> str:
    """rows: {"what", "img_s", optional ratio_key}; prints them and writes OUT_DIR/NAME-STAMP.json."""
    print(f"\n{'what':<{width}} {'img/s':>10} {ratio_title:>15}")
    for r in rows:
        ratio = f"{r[ratio_key]:.2f}x" if ratio_key in r else ""
        print(f"{r['what']:<{width}} {r['img_s']:>10,.1f} {ratio:>15}")
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "config": config, "rows": rows, "date": stamp}, f, indent=2)
    print(f"\nsaved {path}")
    return path
