"""End-to-end embedding throughput of the pipeline vs the bare model forward pass, per model.

    python benchmarks/embed_throughput.py [--models tiny-clip,mobilenet_v2,vit-b-32]
        [--collection leeds|demo|DIR] [--images N] [--batch-size 64] [--device auto] [--draft]

For each model, on the same images, batch size and device, prints images/s of:
  bare      embedder.embed_uint8 on pre-made uint8 tensors in memory (no I/O, no decode)
  decode    decoding alone (runtime.decode_images: read, hash, decode, resize; threads = cores)
  cold      the real embedding stage (embed_manifest -> EmbeddingStore.embed_incrementally) with an
            empty pixel cache: decode + resize + forward + cache and Parquet writes
  warm      the same again with the pixel cache filled (what every further model with the same
            preprocessing pays), best of two runs into new lakes, as bare is the best of two passes
and cold/bare, warm/bare against the issue's targets (CPU: tiny-clip warm >= 0.9; mobilenet_v2
cold >= 0.8 and warm >= 0.9; vit-b-32 warm >= 0.9), plus the run's EmbedTimings and the time the
pipeline spent beyond its forward passes (Parquet writes, waiting for pixels): on a machine shared
with other work the bare/pipeline ratio moves with the neighbours' load, that share much less.

mobilenet_v2 and vit-b-32 (open_clip ViT-B-32, the real architecture) use random weights: the same
compute as trained ones. --draft uses each model's spec with reduced-size JPEG decode. 'leeds' reads
../shared/data/leeds_butterfly when present. Never part of the tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"tiny-clip": {"warm": 0.9}, "mobilenet_v2": {"cold": 0.8, "warm": 0.9}, "vit-b-32": {"warm": 0.9}}


def collection(name: str, tmp: Path, n: int):
    import pandas as pd

    from nfhm_pipeline.ingest.demo import generate_demo_collection
    from nfhm_pipeline.ingest.images import validate_images
    from nfhm_pipeline.ingest.readers import read_image_folder, read_label_csv, read_vlm4bio_csv

    if name == "demo":
        root = generate_demo_collection(tmp / "demo", images_per_species=max(2, n // 27 + 1), size=128)
        cands = read_vlm4bio_csv(root / "metadata.csv", label_columns=("species",), taxa_column="taxa")
    elif name == "leeds":
        csv = REPO.parent / "shared" / "data" / "leeds_butterfly" / "labels.csv"
        if not csv.exists():
            sys.exit(f"{csv} is absent: use --collection demo")
        cands = read_label_csv(csv, path_column="filename", label_columns=("species",))
    else:
        cands = read_image_folder(name, label_column="species")
    manifest, _ = validate_images(cands, ["species"])
    return pd.DataFrame(manifest).head(n).reset_index(drop=True)


def embedder_for(model: str, tmp: Path, device: str):
    import torch

    from nfhm_pipeline.embedders.loaders import load_embedder
    from nfhm_pipeline.embedders.tiny import build_tiny_openclip_checkpoint

    if model == "mobilenet_v2":
        import torchvision

        path = tmp / "mobilenet_v2_random.pt"
        torch.save(torchvision.models.mobilenet_v2(weights=None, num_classes=1001).state_dict(), path)
        spec = {"loader": "torchvision", "model": "mobilenet_v2", "weights": str(path), "num_classes": 1001,
                "image_size": 224, "resize": "squash", "interpolation": "bilinear",
                "mean": [0.502] * 3, "std": [0.502] * 3}
    elif model == "vit-b-32":
        import open_clip

        path = tmp / "vit_b_32_random.pt"
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), path)
        spec = {"loader": "open_clip", "model": "ViT-B-32", "pretrained": str(path)}
    elif model == "tiny-clip":
        spec = {"loader": "open_clip", "model": "nfhm-tiny-clip",
                "pretrained": str(build_tiny_openclip_checkpoint(tmp / "tiny.safetensors"))}
    else:
        spec = {"loader": "raw_pixels", "image_size": 16}
    return load_embedder({**spec, "id": model}, device=device)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(model: str, manifest, tmp: Path, args, device: str) -> dict:
    import torch

    from nfhm_pipeline.embedders.runtime import (
        EmbedSettings, EmbedTimings, PixelCache, available_cores, decode_images, embed_manifest, use_jpeg_draft,
    )
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    embedder = embedder_for(model, tmp, device)
    if args.draft:
        use_jpeg_draft(embedder)
    spec = embedder.preprocess
    n = len(manifest)
    work = tmp / model
    cache = PixelCache(work / "pixels", max_bytes=None)
    settings = EmbedSettings(batch_size=args.batch_size, device=device, chunk_size=4096)

    items = list(zip(manifest["uri"].astype(str), manifest["image_id"].astype(str)))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(available_cores()) as pool:
        t0 = time.perf_counter()
        pixels = decode_images(items, spec, pool=pool, device=device)
        decode = time.perf_counter() - t0
    assert not any(isinstance(p, str) for p in pixels)
    batches = list(torch.split(torch.from_numpy(np.stack(pixels)), args.batch_size))

    def bare_pass() -> float:
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            embedder.embed_uint8(b)
        sync(device)
        return time.perf_counter() - t0

    embedder.embed_uint8(batches[0])  # warm-up (allocator, kernels, autotuning)
    timings = {}

    def stage(lake: str) -> float:
        timings[lake] = EmbedTimings()
        sync(device)
        t0 = time.perf_counter()
        report = embed_manifest(EmbeddingStore(work / lake), "bench", model, manifest, embedder, cache, settings,
                                timings=timings[lake])
        sync(device)
        assert report.new == n
        return time.perf_counter() - t0

    # bare measured before and after the pipeline runs, and the warm run twice (into two new
    # lakes): the machine is shared, and the best of two is the least disturbed figure of each
    bare = bare_pass()
    cold = stage("cold")
    warm, best = min([(stage(lake), lake) for lake in ("warm", "warm-again")])
    timings["warm"] = timings[best]
    bare = min(bare, bare_pass())
    return {"model": model, "n": n, "key": spec.pixel_key, "bare": bare, "decode": decode, "cold": cold,
            "warm": warm, "timings": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-clip,mobilenet_v2,vit-b-32")
    parser.add_argument("--collection", default="leeds")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--draft", action="store_true", help="reduced-size JPEG decode specs")
    args = parser.parse_args()

    import torch

    from nfhm_pipeline.embedders.runtime import available_cores

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="nfhm-bench-"))
    try:
        manifest = collection(args.collection, tmp, args.images)
        print(f"command: {' '.join(sys.argv)}")
        print(f"{len(manifest)} images from {args.collection} on {device}, {torch.get_num_threads()} torch threads, "
              f"{available_cores()} cores, batch {args.batch_size}; load average {os.getloadavg()[0]:.1f} at start")
        for model in args.models.split(","):
            r = bench_model(model.strip(), manifest, tmp, args, device)
            n = r["n"]
            print(f"\n{r['model']} (input {r['key']})")
            print(f"  bare forward : {n / r['bare']:9.1f} images/s ({r['bare']:.2f} s)")
            print(f"  decode only  : {n / r['decode']:9.1f} images/s ({r['decode']:.2f} s)")
            for kind in ("cold", "warm"):
                t = r["timings"][kind]
                target = TARGETS.get(r["model"], {}).get(kind)
                verdict = "" if target is None else f"  target >= {target:.2f}: " + (
                    "met" if r["bare"] / r[kind] >= target else "NOT met")
                print(f"  {kind} pipeline: {n / r[kind]:9.1f} images/s ({r[kind]:.2f} s), "
                      f"{kind}/bare {r['bare'] / r[kind]:.2f}{verdict}; "
                      f"decode_s {t.decode_s:.2f} forward_s {t.forward_s:.2f} wait_s {t.wait_s:.2f}; "
                      f"beyond the forward pass {r[kind] - t.forward_s:.2f} s "
                      f"({100 * (r[kind] - t.forward_s) / r[kind]:.1f} %)")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end (other processes share these cores)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
