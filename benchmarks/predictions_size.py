"""The ``predictions`` table at a million test images: write time, peak memory and size on disk.

    .venv/bin/python benchmarks/predictions_size.py                    # 1,000,000 test images, both writers
    .venv/bin/python benchmarks/predictions_size.py --images 200000 --writers blocks

One model's kNN stage at scale writes test images x levels x rules rows: here 3 levels
(species / genus / family, 2,000 / 400 / 80 classes) x the 6 kNN rules = 18 blocks of N rows, plus
the 2 probes x 3 levels = 6 more (24 N rows). Each writer runs in a child process of its own on a
fresh DuckDB file and prints its peak resident memory (getrusage, minus the child's baseline
after imports), the time to build the blocks and to write them, and the file's size:

- ``blocks``: today's path: one Arrow table per block (``evaluation.tables.prediction_part``,
  labels dictionary-encoded, the image-id array shared by a level's rules), appended block by
  block through ``store.warehouse.replace_many`` in one transaction;
- ``pandas``: the path before it: one pandas frame per block, concatenated, the constant columns
  assigned and reindexed, and registered with DuckDB as one frame.

The file size is what a million images cost per model in the warehouse; x 10 models for the
scaling table in docs/scaling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS = {"species": 2000, "genus": 400, "family": 80}
RULES = ("top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean", "top1_euclidean_l2",
         "mean_euclidean_l2")
PROBES = (("linear_probe", "linear_svc"), ("logistic_probe", "logistic"))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(n: int, writer: str, db: Path) -> dict:
    import numpy as np
    import pandas as pd

    from nfhm_pipeline.evaluation.tables import prediction_part, with_constants
    from nfhm_pipeline.store import warehouse

    warehouse.replace_many(db, [])  # create the schema before measuring
    baseline = peak_rss()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    image_ids = np.array([f"specimen-{i:08d}.jpg" for i in range(n)], dtype=object)
    extra = {"dataset": "museum", "model": "bioclip", "run_id": "0123456789abcdef", "split_id": "split-0001"}
    blocks = []  # (task, level, rule, image_ids, true, predicted)
    for level, n_classes in LEVELS.items():
        classes = np.array([f"{level}_{c:05d}" for c in range(n_classes)], dtype=object)
        true = classes[rng.integers(0, n_classes, n)]
        keys = [("knn", rule) for rule in RULES] + list(PROBES)
        for task, rule in keys:
            hit = rng.random(n) < 0.7
            predicted = np.where(hit, true, classes[rng.integers(0, n_classes, n)])
            blocks.append((task, level, rule, true, predicted))
    if writer == "blocks":
        import pyarrow as pa

        ids = pa.array(image_ids.astype(str))
        parts = {}
        for task, level, rule, true, predicted in blocks:
            parts.setdefault(task, []).append(
                with_constants(prediction_part(task, level, "all", rule, ids, true, predicted), extra))
        writes = [("predictions", rows, {"dataset": "museum", "model": "bioclip", "task": task})
                  for task, rows in parts.items()]
    else:
        frames = [pd.DataFrame({"task": task, "level": level, "grp": "all", "rule": rule, "image_id": image_ids,
                                "true_label": true, "predicted_label": predicted})
                  for task, level, rule, true, predicted in blocks]
        every = pd.concat(frames, ignore_index=True)
        writes = [("predictions", every[every["task"] == task].assign(**extra),
                   {"dataset": "museum", "model": "bioclip", "task": task}) for task in every["task"].unique()]
    del blocks
    built = time.perf_counter()
    rows = warehouse.replace_many(db, writes)
    written = time.perf_counter()
    return {"writer": writer, "images": n, "rows": rows, "build_s": built - started, "write_s": written - built,
            "peak_growth_bytes": peak_rss() - baseline, "peak_bytes": peak_rss(), "file_bytes": db.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--writers", nargs="+", default=["blocks", "pandas"], choices=["blocks", "pandas"])
    parser.add_argument("--child", nargs=3, metavar=("N", "WRITER", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], Path(args.child[2]))))
        return
    print(f"predictions of one model: {args.images:,} test images x {len(LEVELS)} levels x "
          f"{len(RULES) + len(PROBES)} rules (6 kNN + 2 probes) = {args.images * 24:,} rows")
    print(f"{'writer':>7} {'build s':>8} {'write s':>8} {'peak RSS':>9} {'growth':>9} {'file':>9} {'bytes/row':>9}")
    for writer in args.writers:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "warehouse.duckdb"
            out = subprocess.run([sys.executable, __file__, "--child", str(args.images), writer, str(db)],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                print(f"{writer:>7} failed (rc {out.returncode}): {out.stderr.strip()[-600:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{writer:>7} {r['build_s']:8.1f} {r['write_s']:8.1f} {r['peak_bytes'] / 2**30:8.2f}G "
                  f"{r['peak_growth_bytes'] / 2**30:8.2f}G {r['file_bytes'] / 2**30:8.2f}G "
                  f"{r['file_bytes'] / r['rows']:9.1f}")
    print("per million test images and model: the file size above x (1e6 / images); 10 models: x 10")


if __name__ == "__main__":
    main()
