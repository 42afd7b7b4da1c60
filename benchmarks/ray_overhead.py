"""What the ``ray`` embedding engine costs against the local engine, end to end through the store.

    python benchmarks/ray_overhead.py [--images 5000] [--size 32] [--models raw-pixels,tiny-clip]
        [--batch-size 64] [--concurrency 2] [--cpus 2]

On the same synthetic PNGs (smooth noise, --size px, written to a temp folder), per model, prints:
  local        runtime.make_batches -> EmbeddingStore.embed_incrementally (chunk_size 1024, the
               pipeline's checkpoint size), images/s
  ray/1024     ray_engine.ray_embed_chunk through the same store call and chunk size: one actor pool
               start and one model load per actor per chunk
  ray/all      the same with every image in one chunk (one pool start for the run)
  first batch  seconds from the embed_chunk call to its first vectors (actor processes start, import
               torch and the project, load the model, embed one batch): paid once per chunk
and once, the seconds `connect_ray` takes to start the local Ray (--cpus CPUs). No pixel cache on
either side (the ray workers have none). Never part of the tests.
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


def timed_store_run(lake: Path, key: str, ids, fingerprint, embed_chunk, chunk_size: int) -> float:
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    shutil.rmtree(lake, ignore_errors=True)
    store = EmbeddingStore(lake)
    t0 = time.perf_counter()
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
    args = parser.parse_args()

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
        print(f"local Ray started ({args.cpus} CPUs, {address}) in {time.perf_counter() - t0:.1f} s")
        paths = Paths.under(tmp / "data")
        catalog = load_catalog("demo")
        print(f"batch {args.batch_size}, ray: {args.concurrency} actor(s) x 1 CPU; images/s end to end")
        print(f"{'model':12} {'local':>8} {'ray/1024':>9} {'ray/all':>8} {'first batch s':>14}")
        for key in args.models.split(","):
            model = catalog.models[key]
            spec = model_spec(model, paths)
            embedder = load_embedder(spec)
            embedder.model_id = model.key
            local = make_batches(embedder, ids, uris, None, EmbedSettings(batch_size=args.batch_size))
            local_s = timed_store_run(tmp / "lake", key, ids, embedder.fingerprint, local, 1024)

            def ray_chunk():
                return ray_embed_chunk(spec, model.key, ids, uris, expected_fingerprint=embedder.fingerprint,
                                       batch_size=args.batch_size, concurrency=args.concurrency)

            t0 = time.perf_counter()
            first = next(iter(ray_chunk()(range(min(len(ids), args.batch_size)))))
            first_s = time.perf_counter() - t0
            assert len(first[0]) > 0
            ray_1024_s = timed_store_run(tmp / "lake", key, ids, embedder.fingerprint, ray_chunk(), 1024)
            ray_all_s = timed_store_run(tmp / "lake", key, ids, embedder.fingerprint, ray_chunk(), len(ids))
            n = len(ids)
            print(f"{key:12} {n / local_s:8.0f} {n / ray_1024_s:9.0f} {n / ray_all_s:8.0f} {first_s:14.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
