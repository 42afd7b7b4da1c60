"""Memory of the kNN evaluation against the collection size: reading the lake part by part.

    .venv/bin/python benchmarks/eval_memory.py                         # N = 50k, 100k, 200k x 768
    .venv/bin/python benchmarks/eval_memory.py --sizes 50000 400000 --dim 512

For each N, a child process writes a sharded lake of N random 768-d float32 vectors (200 classes),
then two more children each read it and run the kNN stage's library call (``knn_tables`` on one
level, 2 % of the rows as test so the products stay short) and print their peak memory:

- ``streamed``: the stages' path: ``EmbeddingStore.read(into=...)`` streams the parts into a
  memory-mapped file, and the kNN gathers its train and test blocks from it (``knn.Rows``);
- ``in memory``: the parts concatenated into one array, and the train rows copied out of it.

Peak memory is sampled every 20 ms from /proc/self/status: ``anon`` is the process's own memory
(RssAnon: arrays, Python, torch), ``file`` the mapped table's pages (RssFile: the OS's page cache,
dropped and re-read under memory pressure, not memory the process holds). Target: the streamed
anon peak does not follow N (it is set by the block sizes and the kNN's cache of unit train
vectors, ``knn._CPU_TRAIN_CACHE_BYTES``: 1 GiB in the library, ``--train-cache-mb`` here); the
in-memory one grows by about twice the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_kb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


class Peak:
    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            s = status_kb()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_lake(root: Path, n: int, dim: int) -> None:
    import numpy as np

    from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbeddingTable

    rng = np.random.default_rng(0)
    ids = np.array([f"{i:09d}" for i in range(n)], dtype=object)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    EmbeddingStore(root).write("d", "m", EmbeddingTable(ids, vectors, "fp"))


def evaluate(root: Path, n: int, mode: str, cache_mb: int) -> dict:
    import numpy as np
    import pandas as pd

    from nfhm_pipeline.evaluation import knn

    knn._CPU_TRAIN_CACHE_BYTES = cache_mb << 20  # the kNN's one memory knob besides its block sizes

    from nfhm_pipeline.evaluation.tables import knn_tables
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    ids = [f"{i:09d}" for i in range(n)]
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"image_id": ids, "split": np.where(rng.random(n) < 0.02, "test", "train"), "fold": 0,
                          "group": None, "species": [f"c{c:03d}" for c in rng.integers(0, 200, n)]})
    # warm-up on 300 rows: torch's and the compiled kernel's one-off memory is not the table's
    small = frame.iloc[:300].assign(split=["test" if i % 10 == 0 else "train" for i in range(300)])
    knn_tables(small, rng.standard_normal((300, 8), dtype=np.float32), ["species"], device="cpu")
    before = status_kb()
    started = time.perf_counter()
    with Peak() as peak:
        store = EmbeddingStore(root)
        if mode == "streamed":
            with tempfile.TemporaryDirectory() as tmp:
                table = store.read("d", "m", order=ids, into=tmp)
                tables = knn_tables(frame, table.vectors, ["species"], device="cpu")
        else:
            table = store.read("d", "m", order=ids)
            train = np.flatnonzero(frame["split"].to_numpy() == "train")
            copy = table.vectors[train]  # what the stages did before: the train rows copied out
            tables = knn_tables(frame, table.vectors, ["species"], device="cpu")
            del copy
    seconds = time.perf_counter() - started
    accuracy = float(tables.frames()[0].query("metric == 'top1_cosine_accuracy'")["value"].iloc[0]) \
        if "top1_cosine_accuracy" in set(tables.frames()[0]["metric"]) else float("nan")
    return {"mode": mode, "n": n, "seconds": seconds, "anon_peak_kb": peak.anon, "file_peak_kb": peak.file,
            "anon_before_kb": before["RssAnon"], "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--train-cache-mb", type=int, default=256,
                        help="the kNN's CPU cache of unit train vectors (default in the library: 1024)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, root, n, extra, cache_mb = args.child
        if what == "make":
            make_lake(Path(root), int(n), int(extra))
            print("{}")
        else:
            print(json.dumps(evaluate(Path(root), int(n), extra, int(cache_mb))))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def child(*argv) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)], capture_output=True, text=True,
                             env=env)
        if out.returncode:
            raise SystemExit(f"child {argv} failed: {out.stderr.strip()[-800:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"kNN stage memory, one level of 200 classes, 2 % test, dim {args.dim}, train cache "
          f"{args.train_cache_mb} MB; GB = 2^30 bytes")
    print(f"{'N':>8} {'table':>7} {'mode':>10} {'seconds':>8} {'anon peak':>10} {'anon growth':>12} {'file peak':>10}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            child("make", tmp, n, args.dim, 0)
            for mode in ("streamed", "in-memory"):
                r = child("eval", tmp, n, mode, args.train_cache_mb)
                gb = 1 / 2**20
                print(f"{n:>8} {n * args.dim * 4 / 2**30:6.2f}G {mode:>10} {r['seconds']:8.1f} "
                      f"{r['anon_peak_kb'] * gb:9.2f}G {(r['anon_peak_kb'] - r['anon_before_kb']) * gb:11.2f}G "
                      f"{r['file_peak_kb'] * gb:9.2f}G")


if __name__ == "__main__":
    main()
