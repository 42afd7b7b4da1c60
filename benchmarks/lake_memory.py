"""Peak memory of the embedding writer against the collection size: it must stay flat.

    .venv/bin/python benchmarks/lake_memory.py                       # N = 20k, 50k, 100k, local engine
    .venv/bin/python benchmarks/lake_memory.py --sizes 20000 100000 --engines local ray

Makes the largest N tiny synthetic PNGs once (16 x 16, under a temp folder or --images), then for
each N and engine embeds the first N with the raw-pixels model (16 x 16 x 3 = 768 dims, the width
of a ViT-B/16) into a fresh sharded lake, in a child process of its own, and prints:

- the child's peak resident memory (getrusage; includes Python, torch and pyarrow, measured
  before the run as ``baseline``) and the growth over that baseline;
- the time, images/s, parts written, and the table's size in memory (N x 768 x 4 bytes).

The store holds one part (<= ~4,096 images) plus one embedding chunk at a time, so the growth
should not follow N; the table itself grows 5x from 20k to 100k. Target: peak < 1.5 GB at every N.
The ray engine runs on a local Ray cluster of this machine's cores (its workers' memory is
reported by Ray, not in this figure: the writer is the driver).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, resource, sys, time
import numpy as np, pandas as pd
from nfhm_pipeline.embedders.loaders import load_embedder
from nfhm_pipeline.embedders.runtime import EmbedSettings, embed_manifest
from nfhm_pipeline.store.embedding_store import EmbeddingStore

images, lake, n, engine = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
listing = json.load(open(f"{images}/listing.json"))[:n]
manifest = pd.DataFrame({"image_id": [i for i, _ in listing], "uri": [f"{images}/{name}" for _, name in listing]})
spec = {"loader": "raw_pixels", "image_size": 16, "id": "raw-pixels"}
embedder = load_embedder(spec)
embedder.model_id = "raw-pixels"
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
store = EmbeddingStore(lake)
t0 = time.perf_counter()
if engine == "local":
    report = embed_manifest(store, "bench", "raw-pixels", manifest, embedder, None,
                            EmbedSettings(batch_size=256, num_workers=0, chunk_size=4096))
else:
    from nfhm_pipeline.embedders.ray_engine import connect_ray, ray_embed_chunk
    connect_ray(num_cpus=2)
    chunk = ray_embed_chunk(spec, "raw-pixels", manifest["image_id"].tolist(), manifest["uri"].tolist(),
                            expected_fingerprint=embedder.fingerprint, batch_size=256, concurrency=1)
    report = store.embed_incrementally("bench", "raw-pixels", manifest["image_id"].tolist(), embedder.fingerprint,
                                       chunk, chunk_size=4096)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"n": n, "engine": engine, "baseline": baseline, "peak": peak, "seconds": seconds,
                  "parts": report.parts_written, "dim": report.dim}))
"""


def make_images(folder: Path, n: int) -> None:
    """n distinct 16 x 16 PNGs and a listing of (sha256, file name), made once per folder."""
    from PIL import Image

    listing_path = folder / "listing.json"
    if listing_path.exists() and len(json.loads(listing_path.read_text())) >= n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    listing = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        name = f"{i:06d}.png"
        (folder / name).write_bytes(data)
        listing.append((hashlib.sha256(data).hexdigest(), name))
    listing_path.write_text(json.dumps(listing))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    parser.add_argument("--engines", nargs="+", default=["local"], choices=["local", "ray"])
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "nfhm-lake-bench-images")
    args = parser.parse_args()
    t0 = time.perf_counter()
    make_images(args.images, max(args.sizes))
    print(f"{max(args.sizes):,} images in {args.images} ({time.perf_counter() - t0:.0f} s to make or find)")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"{'engine':<7}{'N':>9}{'table MB':>10}{'baseline MB':>13}{'peak MB':>9}{'growth MB':>11}"
          f"{'seconds':>9}{'img/s':>8}{'parts':>7}")
    for engine in args.engines:
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as lake:
                done = subprocess.run([sys.executable, "-c", CHILD, str(args.images), lake, str(n), engine],
                                      env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{engine} N={n}: failed\n{done.stderr[-3000:]}")
                return 1
            r = json.loads(done.stdout.strip().splitlines()[-1])
            mb = 1 / 2**20
            print(f"{engine:<7}{n:>9,}{n * r['dim'] * 4 * mb:>10.0f}{r['baseline'] * mb:>13.0f}{r['peak'] * mb:>9.0f}"
                  f"{(r['peak'] - r['baseline']) * mb:>11.0f}{r['seconds']:>9.1f}{n / r['seconds']:>8.0f}{r['parts']:>7}")
    print(f"peak resident memory of the writer process (getrusage) at {resource.getpagesize()}-byte pages; "
          "target < 1,536 MB at every N, flat in N")
    return 0


if __name__ == "__main__":
    sys.exit(main())
