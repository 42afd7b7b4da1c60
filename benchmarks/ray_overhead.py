"""What the ``ray`` embedding engine costs against the local engine, end to end through the store.

    python benchmarks/ray_overhead.py [--images 5000] [--size 32] [--models raw-pixels,tiny-clip]
        [--batch-size 64] [--concurrency 2] [--cpus 2] [--repeats 2]

On the same synthetic PNGs (smooth noise, --size px, written to a temp folder), per model and
repeat, through EmbeddingStore.embed_incrementally with chunk_size 1024 (the pipeline's checkpoint
size) on both sides, prints:
  local        runtime.make_batches, images/s end to end (the model is loaded before the clock starts),
               with torch's default threads (as the local engine runs)
  local 1t     the same with torch.set_num_threads(1), for reference: on a small machine whose cores
               are busy, torch's default threads (one per core) spin against the decode threads and
               other processes and slow the local forward pass many times; the ray actors run one
               torch thread per reserved CPU (1 each here)
  ray e2e      ray_engine.ray_embed_chunk on a fresh engine (its actor pool starts inside the run and
               serves every chunk), images/s end to end, and its ratio to local
  start s      the fixed start-up: seconds from the run's start to its first vectors (actor processes
               start, import torch and the project, load the model, embed one batch); "load s" the
               slowest actor's own constructor seconds (imports and model load) within it
  ray steady   images/s after the first vectors: (images - first batch) / (seconds - start s), and
               its ratio to local; "1t e2e" / "1t steady" the ray rates' ratios to local 1t
and once, the seconds `connect_ray` takes to start the local Ray (--cpus CPUs): paid once per process
(the pipeline's ray_cluster resource), for every model; "e2e+init" adds it to the first repeat.
No pixel cache on either side (the ray workers have none). Never part of the tests.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_manifest(folder: Path, n: int, size: int):
    """n distinct smooth-noise RGB PNGs of size x size, validated into a manifest (uri, image_id)."""
    import pandas as pd
    from PIL import Image

    from nfhm_pipeline.ingest.images import validate_images

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
        path = folder / f"{i:05d}.png"
        small.resize((size, size), Image.Resampling.BICUBIC).save(path)
        uris.append(str(path))
    manifest, rejected = validate_images(pd.DataFrame({"uri": uris, "label": ["x"] * n}), ["label"])
    assert rejected.empty, rejected.head()
    return manifest.reset_index(drop=True)


def timed_store_run(lake: Path, key: str, ids, fingerprint, embed_chunk, chunk_size: int,
                    first_images=None) -> float:
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    shutil.rmtree(lake, ignore_errors=True)
    store = EmbeddingStore(lake)
    t0 = time.perf_counter()
    if first_images is not None:
        first_images["t0"] = t0
    report = store.embed_incrementally("bench", key, ids, fingerprint, embed_chunk, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    table = store.read("bench", key)
    assert report.new == len(ids) and sorted(map(str, table.image_ids)) == sorted(ids), "not every image once"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--models", default="raw-pixels,tiny-clip")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.embedders.loaders import load_embedder
    from nfhm_pipeline.embedders.ray_engine import connect_ray, ray_embed_chunk
    from nfhm_pipeline.embedders.runtime import EmbedSettings, make_batches
    from nfhm_pipeline.stages.base import Paths
    from nfhm_pipeline.stages.image_embeddings import model_spec

    tmp = Path(tempfile.mkdtemp(prefix="nfhm-ray-bench-"))
    try:
        t0 = time.perf_counter()
        manifest = synthetic_manifest(tmp / "images", args.images, args.size)
        print(f"{args.images} synthetic {args.size}px PNGs written and validated in {time.perf_counter() - t0:.1f} s")
        ids, uris = manifest["image_id"].tolist(), manifest["uri"].tolist()
        t0 = time.perf_counter()
        address = connect_ray(num_cpus=args.cpus)
        init_s = time.perf_counter() - t0
        print(f"local Ray started ({args.cpus} CPUs, {address}) in {init_s:.1f} s (once per process)")
        paths = Paths.under(tmp / "data")
        catalog = load_catalog("demo")
        n = len(ids)
        print(f"batch {args.batch_size}, chunk 1024, ray: {args.concurrency} actor(s); images/s")
        print(f"{'model':12} {'local':>7} {'ray e2e':>8} {'ratio':>6} {'e2e+init':>9} {'start s':>8} {'load s':>7} "
              f"{'ray steady':>11} {'ratio':>6} {'local 1t':>9} {'1t e2e':>7} {'1t steady':>10}")
        for key in args.models.split(","):
            model = catalog.models[key]
            spec = model_spec(model, paths)
            embedder = load_embedder(spec)
            embedder.model_id = model.key
            for repeat in range(args.repeats):
                local = make_batches(embedder, ids, uris, None, EmbedSettings(batch_size=args.batch_size))
                local_rate = n / timed_store_run(tmp / "lake", key, ids, embedder.fingerprint, local, 1024)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                local = make_batches(embedder, ids, uris, None, EmbedSettings(batch_size=args.batch_size))
                local_1t_rate = n / timed_store_run(tmp / "lake", key, ids, embedder.fingerprint, local, 1024)
                torch.set_num_threads(threads)

                first: dict = {}

                def on_images(count, first=first):
                    first.setdefault("t", time.perf_counter())
                    first.setdefault("n", count)

                engine = ray_embed_chunk(spec, model.key, ids, uris, expected_fingerprint=embedder.fingerprint,
                                         batch_size=args.batch_size, concurrency=args.concurrency,
                                         on_images=on_images)
                ray_s = timed_store_run(tmp / "lake", key, ids, embedder.fingerprint, engine, 1024, first)
                start_s = first["t"] - first["t0"]
                load_s = max(a["load_s"] for a in engine.actor_startup())
                engine.close()
                steady = (n - first["n"]) / (ray_s - start_s)
                with_init = n / (ray_s + init_s) if repeat == 0 else float("nan")
                print(f"{key:12} {local_rate:7.0f} {n / ray_s:8.0f} {n / ray_s / local_rate:6.2f} {with_init:9.0f} "
                      f"{start_s:8.2f} {load_s:7.2f} {steady:11.0f} {steady / local_rate:6.2f} {local_1t_rate:9.0f} "
                      f"{n / ray_s / local_1t_rate:7.2f} {steady / local_1t_rate:10.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
