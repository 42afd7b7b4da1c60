"""The packed pixel cache and the decode pipeline (issue 14): exact pixels across chunk boundaries,
a filler killed mid-chunk, two fillers at once, the size cap, reduced-size JPEG decode.

The reference for "exact" is the pre-cache path written out plainly: `load_verified_rgb` +
`decode_to_uint8` per image (what the per-image .npy cache stored), and `embed_uint8` on those
pixels in the same batches. Real files in tmp_path, real raw-pixel embedders, real subprocesses.
"""
from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import subprocess_env
from nfhm_pipeline.embedders import load_embedder
from nfhm_pipeline.embedders.pixel_cache import LAYOUT, MAX_GB_ENV, PixelCache, max_bytes_from_env
from nfhm_pipeline.embedders.preprocess import (
    DRAFT_TOLERANCE, PreprocessSpec, decode_jpeg_reduced, decode_jpegs_torch, decode_to_uint8,
)
from nfhm_pipeline.embedders.runtime import (
    EmbedSettings, EmbedTimings, decode_verified, embed_manifest, use_jpeg_draft,
)
from nfhm_pipeline.errors import ManifestError, SettingsError
from nfhm_pipeline.ingest.images import load_rgb, load_verified_rgb, validate_images
from nfhm_pipeline.store.embedding_store import EmbeddingStore

# raw pixels, shorter side to 8 then a centre crop: 192 bytes an image, so chunk_bytes=4 * 192
# makes chunks of 4 images and a few dozen images cross many chunk boundaries.
RAW = {"id": "raw", "loader": "raw_pixels", "image_size": 8, "resize": "shorter_crop", "interpolation": "bilinear"}
ROW_BYTES = 3 * 8 * 8


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth RGB image (blurred noise): resizing and JPEG behave as on photographs."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def collection(root: Path, n: int) -> pd.DataFrame:
    """n images of mixed formats, modes and shapes (PNG, JPEG, grey, RGBA, portrait, landscape),
    validated into a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = photo(i, (20 + 7 * (i % 5), 14 + 5 * (i % 4)))
        if i % 3 == 1:
            path = root / f"{i:03d}.jpg"
            image.save(path, quality=90)
        else:
            image = image.convert("L") if i % 6 == 2 else image.convert("RGBA") if i % 6 == 3 else image
            path = root / f"{i:03d}.png"
            image.save(path)
        paths.append(str(path))
    manifest, rejected = validate_images(pd.DataFrame({"uri": paths, "species": ["x"] * n}), ["species"])
    assert rejected.empty
    return manifest


def reference_pixels(manifest: pd.DataFrame, spec: PreprocessSpec) -> np.ndarray:
    return np.stack([decode_to_uint8(load_verified_rgb(u, i), spec)
                     for u, i in zip(manifest["uri"], manifest["image_id"])])


def chunk_ids(cache: PixelCache, key: str) -> list[list[str]]:
    folder = cache.root / LAYOUT / key
    return [p.read_text().split() for p in sorted(folder.glob("*.ids"))]


def embed(lake: Path, manifest, embedder, cache, batch_size=4, **kw):
    settings = EmbedSettings(batch_size=batch_size, num_workers=0, chunk_size=10)
    return embed_manifest(EmbeddingStore(lake), "d", "raw", manifest, embedder, cache, settings, **kw)


def test_packed_cache_gives_the_per_image_paths_pixels_and_embeddings_across_chunk_boundaries(tmp_path):
    manifest = collection(tmp_path / "img", 30)
    embedder = load_embedder(RAW)
    spec = embedder.preprocess
    reference = reference_pixels(manifest, spec)
    cache = PixelCache(tmp_path / "pixels", max_bytes=None, chunk_bytes=4 * ROW_BYTES)
    timings, counted = EmbedTimings(), []

    cold = embed(tmp_path / "lake-cold", manifest, embedder, cache, timings=timings, on_images=counted.append)
    chunks = chunk_ids(cache, spec.pixel_key)
    assert len(chunks) >= 8 and sorted(i for c in chunks for i in c) == sorted(manifest["image_id"])
    assert sum(counted) == 30 and timings.decode_s > 0 and timings.forward_s > 0

    # Read back in another order, through a fresh object (the index merged from disk).
    order = np.random.default_rng(0).permutation(30)
    out = np.zeros((30, 3, 8, 8), np.uint8)
    found = PixelCache(cache.root, max_bytes=None).read_into(spec.pixel_key, list(manifest["image_id"][order]), out)
    assert found.all()
    np.testing.assert_array_equal(out, reference[order])

    # Embeddings: bit-identical to embed_uint8 on the reference pixels in the pipeline's batches
    # (positions in checkpoints of 10, batches of 4), cold and warm alike.
    batches = [(c + k, min(c + k + 4, c + 10)) for c in range(0, 30, 10) for k in range(0, 10, 4)]
    expected = np.concatenate([embedder.embed_uint8(torch.from_numpy(reference[a:b])).numpy() for a, b in batches])
    warm = embed(tmp_path / "lake-warm", manifest, embedder, cache)
    assert len(chunk_ids(cache, spec.pixel_key)) == len(chunks)  # nothing decoded or written again
    np.testing.assert_array_equal(cold.table.vectors, expected)
    np.testing.assert_array_equal(warm.table.vectors, expected)
    uncached = embed(tmp_path / "lake-off", manifest, embedder, None)  # `cache: off`
    np.testing.assert_array_equal(uncached.table.vectors, expected)

def test_batches_read_as_one_run_or_image_by_image_give_the_same_pixels(tmp_path):
    """read_into copies a batch that is one run of a chunk in one step; every other batch (reversed,
    across two chunks, with gaps, with an id not cached) goes image by image: the same pixels."""
    cache = PixelCache(tmp_path, max_bytes=None)
    size, key = 4, "4-test"
    rng = np.random.default_rng(0)
    ids = [f"{i:064x}" for i in range(23)]
    pixels = {i: rng.integers(0, 256, (3, size, size), dtype=np.uint8) for i in ids}
    cache.write_chunk(key, ids[:10], np.stack([pixels[i] for i in ids[:10]]))
    cache.write_chunk(key, ids[10:], np.stack([pixels[i] for i in ids[10:]]))
    fresh = PixelCache(tmp_path, max_bytes=None)  # a reader that did not write them
    batches = [ids[:10], ids[2:7], ids[12:23], ids[6:14], ids[:10][::-1], ids[0:10:2], [ids[3]],
               ids[3:6] + ["f" * 64] + ids[6:8], ids[5:9] + ids[5:6],
               [ids[0], ids[2], ids[1], ids[3]]]  # the run's first and last rows, shuffled inside
    blank = np.full((3, size, size), 7, np.uint8)
    for reader in (cache, fresh):
        for batch in batches:
            out = np.full((len(batch) + 2, 3, size, size), 7, dtype=np.uint8)  # longer than the batch
            found = reader.read_into(key, batch, out[:len(batch)])
            assert found.tolist() == [i in pixels for i in batch]
            for row, iid in zip(out, batch):
                np.testing.assert_array_equal(row, pixels.get(iid, blank))
            assert (out[len(batch):] == 7).all()
    # a chunk deleted before a reader that has not opened it reads it: its images are not found
    late = PixelCache(tmp_path, max_bytes=None)
    late.refresh(key)
    first_chunk = sorted((tmp_path / LAYOUT / key).glob("*.npy"))[0]
    first_chunk.unlink()
    out = np.full((10, 3, size, size), 7, dtype=np.uint8)
    assert not late.read_into(key, ids[:10], out).any() and (out == 7).all()
    assert late.read_into(key, ids[10:12], out[:2]).all()



@pytest.mark.parametrize("ahead", [0, 2])
def test_batches_made_in_line_or_prefetched_give_the_same_cache_and_embeddings(tmp_path, ahead):
    """On CPU the batches are made in line by default (prefetch_batches None -> 0); with batches
    prefetched on a thread (the CUDA default) the cache and the vectors are the same."""
    manifest = collection(tmp_path / "img", 14)
    embedder = load_embedder(RAW)
    reference = reference_pixels(manifest, embedder.preprocess)
    cache = PixelCache(tmp_path / "pixels", max_bytes=None, chunk_bytes=3 * ROW_BYTES)
    settings = EmbedSettings(batch_size=4, chunk_size=6, prefetch_batches=ahead)
    timings = EmbedTimings()
    report = embed_manifest(EmbeddingStore(tmp_path / "lake"), "d", "raw", manifest, embedder, cache, settings,
                            timings=timings)
    expected = np.concatenate([embedder.embed_uint8(torch.from_numpy(reference[a:b])).numpy()
                               for c in range(0, 14, 6) for a, b in [(c, min(c + 4, c + 6, 14)),
                                                                     (c + 4, min(c + 6, 14))] if a < b])
    np.testing.assert_array_equal(report.table.vectors, expected)
    assert sorted(i for c in chunk_ids(cache, embedder.preprocess.pixel_key) for i in c) == sorted(manifest["image_id"])
    if ahead == 0:  # the forward loop waited for every batch it made
        assert timings.wait_s >= timings.decode_s * 0.9


def test_a_file_rewritten_after_the_manifest_is_neither_cached_nor_embedded(tmp_path):
    manifest = collection(tmp_path / "img", 6)
    photo(99, (30, 20)).save(manifest["uri"][4])
    cache = PixelCache(tmp_path / "pixels", max_bytes=None)
    with pytest.raises(ManifestError, match="changed after the manifest was built"):
        embed(tmp_path / "lake", manifest, load_embedder(RAW), cache, batch_size=2)
    cached = [i for c in chunk_ids(cache, load_embedder(RAW).preprocess.pixel_key) for i in c]
    assert manifest["image_id"][4] not in cached and set(cached) <= set(manifest["image_id"])


FILL = """
import os, sys, time
import pandas as pd
from nfhm_pipeline.embedders import load_embedder
from nfhm_pipeline.embedders.pixel_cache import PixelCache
from nfhm_pipeline.embedders.runtime import EmbedSettings, embed_manifest
from nfhm_pipeline.store.embedding_store import EmbeddingStore

manifest = pd.read_parquet(sys.argv[1])
spec = {"id": "raw", "loader": "raw_pixels", "image_size": 8, "resize": "shorter_crop", "interpolation": "bilinear"}
cache = PixelCache(sys.argv[2], max_bytes=None, chunk_bytes=4 * 192)
settings = EmbedSettings(batch_size=2, chunk_size=1000, decode_threads=1, prefetch_batches=1)
print("started", flush=True)
while len(sys.argv) > 5 and not os.path.exists(sys.argv[5]):  # the starting gun: both fill at once
    time.sleep(0.005)
embed_manifest(EmbeddingStore(sys.argv[3]), "d", "raw", manifest, load_embedder(spec), cache, settings,
               on_batch=lambda n: time.sleep(float(sys.argv[4])))
print("finished", flush=True)
"""


def fill_process(manifest_path: Path, cache_root: Path, lake: Path, pause: float, *go: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FILL, str(manifest_path), str(cache_root), str(lake), str(pause),
                             *map(str, go)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_cache_holds_exactly(cache_root: Path, manifest: pd.DataFrame, spec, *, once: bool) -> None:
    cache = PixelCache(cache_root, max_bytes=None)
    ids = [i for c in chunk_ids(cache, spec.pixel_key) for i in c]
    if once:
        assert sorted(ids) == sorted(manifest["image_id"])  # none lost, none twice
    else:
        assert set(ids) == set(manifest["image_id"])
    folder = cache_root / LAYOUT / spec.pixel_key
    assert {p.stem for p in folder.glob("*.ids")} <= {p.stem for p in folder.glob("*.npy")}
    out = np.zeros((len(manifest), 3, 8, 8), np.uint8)
    assert cache.read_into(spec.pixel_key, list(manifest["image_id"]), out).all()
    np.testing.assert_array_equal(out, reference_pixels(manifest, spec))


def test_a_filler_killed_mid_chunk_resumes_with_no_lost_or_duplicated_entry(tmp_path):
    manifest = collection(tmp_path / "img", 40)
    manifest.to_parquet(tmp_path / "manifest.parquet")
    cache_root, spec = tmp_path / "pixels", load_embedder(RAW).preprocess
    folder = cache_root / LAYOUT / spec.pixel_key
    proc = fill_process(tmp_path / "manifest.parquet", cache_root, tmp_path / "lake", 0.15)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("*.ids"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # into the next chunk: a batch decoded, its chunk not yet written
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    written = len(list(folder.glob("*.ids")))
    assert 2 <= written < 10  # 40 images in chunks of 4: killed part way

    report = embed(tmp_path / "lake2", manifest, load_embedder(RAW), PixelCache(cache_root, max_bytes=None,
                                                                                 chunk_bytes=4 * ROW_BYTES))
    assert report.new == 40
    assert_cache_holds_exactly(cache_root, manifest, spec, once=True)


def test_two_fillers_at_once_lose_no_entry(tmp_path):
    manifest = collection(tmp_path / "img", 40)
    first, second = manifest.iloc[:28], manifest.iloc[12:]  # 16 images in common
    first.to_parquet(tmp_path / "a.parquet")
    second.to_parquet(tmp_path / "b.parquet")
    cache_root, spec = tmp_path / "pixels", load_embedder(RAW).preprocess
    go = tmp_path / "go"
    procs = [fill_process(tmp_path / f"{name}.parquet", cache_root, tmp_path / f"lake-{name}", 0.05, go)
             for name in "ab"]
    for proc in procs:  # both imported and waiting: then both fill for ~0.7 s, at the same time
        assert proc.stdout.readline() == b"started\n"
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and b"finished" in out, err[-2000:]
    # Every image of either run is there with its exact pixels (an image both decoded may be in two
    # chunks: the index keeps one).
    assert_cache_holds_exactly(cache_root, manifest, spec, once=False)


def test_size_cap_drops_least_recently_used_chunks_and_embeddings_stay_identical(tmp_path):
    manifest = collection(tmp_path / "img", 24)
    embedder = load_embedder(RAW)
    key = embedder.preprocess.pixel_key
    unbounded = embed(tmp_path / "lake-free", manifest, embedder, PixelCache(tmp_path / "free", max_bytes=None))

    chunk_file = 4 * ROW_BYTES + 128  # 4 rows and the .npy header
    capped = PixelCache(tmp_path / "capped", max_bytes=3 * chunk_file, chunk_bytes=4 * ROW_BYTES)
    for lake in ("lake-1", "lake-2"):  # cold, then a rerun that finds most chunks gone
        report = embed(tmp_path / lake, manifest, embedder, capped)
        np.testing.assert_array_equal(report.table.vectors, unbounded.table.vectors)
        assert capped.total_bytes() <= 3 * chunk_file and 1 <= len(chunk_ids(capped, key)) <= 3

    # Least recently used goes first: of three chunks the one read last survives a cap of two.
    cache = PixelCache(tmp_path / "lru", max_bytes=None, chunk_bytes=4 * ROW_BYTES)
    pixels = reference_pixels(manifest, embedder.preprocess)
    ids = list(manifest["image_id"])
    names = [cache.write_chunk(key, ids[k:k + 4], pixels[k:k + 4]) for k in (0, 4, 8)]
    now = time.time()
    for age, name in zip((30, 20, 10), names):
        os.utime(cache.folder(key) / f"{name}.npy", (now - age, now - age))
    out = np.zeros((4, 3, 8, 8), np.uint8)
    assert PixelCache(cache.root, max_bytes=None).read_into(key, ids[:4], out).all()  # touches chunk 0
    assert cache.evict(max_bytes=2 * chunk_file) == 1
    assert sorted(p.stem for p in cache.folder(key).glob("*.ids")) == sorted([names[0], names[2]])
    found = PixelCache(cache.root, max_bytes=None).read_into(key, ids[:12], np.zeros((12, 3, 8, 8), np.uint8))
    assert found.tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_cap_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(MAX_GB_ENV, "0.5")
    assert max_bytes_from_env() == 1 << 29 and PixelCache(tmp_path).max_bytes == 1 << 29
    monkeypatch.setenv(MAX_GB_ENV, "")
    assert PixelCache(tmp_path).max_bytes is None
    for bad in ("lots", "-1", "0", "nan"):
        monkeypatch.setenv(MAX_GB_ENV, bad)
        with pytest.raises(SettingsError, match=MAX_GB_ENV):
            PixelCache(tmp_path)


# -- reduced-size JPEG decode -----------------------------------------------------------------------

def exact(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return decode_to_uint8(load_rgb_bytes(data), spec)


def load_rgb_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def assert_within_tolerance(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= DRAFT_TOLERANCE["mean_abs"], diff.mean()
    assert np.percentile(diff, 99) <= DRAFT_TOLERANCE["p99_abs"], np.percentile(diff, 99)


def test_draft_spec_has_its_own_pixel_key_and_fingerprint_and_leaves_the_exact_specs_alone():
    spec = PreprocessSpec(224, "shorter_crop", "bicubic", (0.5,) * 3, (0.5,) * 3, resize_size=256)
    draft = spec.with_jpeg_draft()
    assert draft.pixel_key == spec.pixel_key + "-draft" and not spec.jpeg_draft and draft.jpeg_draft
    assert "jpeg_draft" not in dataclasses.asdict(spec)  # the fingerprint payload of every old spec
    assert dataclasses.asdict(draft) == {**dataclasses.asdict(spec), "jpeg_draft": True} and draft != spec
    raw = load_embedder(RAW)
    exact_fingerprint = raw.fingerprint
    assert raw.preprocess.pixel_key == "8-shorter-crop-bilinear"
    use_jpeg_draft(raw)
    assert raw.preprocess.pixel_key == "8-shorter-crop-bilinear-draft" and raw.fingerprint != exact_fingerprint
    assert use_jpeg_draft(raw).fingerprint == raw.fingerprint  # once only


def test_a_large_jpeg_is_decoded_at_reduced_size_within_tolerance(tmp_path):
    buf = io.BytesIO()
    photo(3, (2400, 1800)).save(buf, format="JPEG", quality=92)
    data = buf.getvalue()
    for spec in (PreprocessSpec(224, "shorter_crop", "bicubic", (0.5,) * 3, (0.5,) * 3),
                 PreprocessSpec(64, "squash", "bilinear", (0.5,) * 3, (0.5,) * 3)):
        reduced = decode_jpeg_reduced(data, spec.with_jpeg_draft())
        assert reduced is not None and reduced.shape == (3, spec.size, spec.size)
        assert_within_tolerance(reduced, exact(data, spec))
    # Through the pipeline: the draft key's cache holds the reduced pixels, the exact key nothing.
    (tmp_path / "big.jpg").write_bytes(data)
    manifest = validate_images(pd.DataFrame({"uri": [str(tmp_path / "big.jpg")], "s": ["x"]}), ["s"])[0]
    raw = use_jpeg_draft(load_embedder(RAW))
    cache = PixelCache(tmp_path / "pixels", max_bytes=None)
    embed(tmp_path / "lake", manifest, raw, cache)
    np.testing.assert_array_equal(cache.get(raw.preprocess.pixel_key, manifest["image_id"][0], 8),
                                  decode_jpeg_reduced(data, raw.preprocess))
    assert cache.get(load_embedder(RAW).preprocess.pixel_key, manifest["image_id"][0], 8) is None
    # Too small to reduce: the exact path, bit for bit; a PNG is never reduced.
    small = io.BytesIO()
    photo(4, (300, 200)).save(small, format="JPEG")
    spec = PreprocessSpec(224, "shorter_crop", "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert decode_jpeg_reduced(small.getvalue(), spec.with_jpeg_draft()) is None
    path = tmp_path / "small.jpg"
    path.write_bytes(small.getvalue())
    image_id = validate_images(pd.DataFrame({"uri": [str(path)], "s": ["x"]}), ["s"])[0]["image_id"][0]
    np.testing.assert_array_equal(decode_verified(str(path), image_id, spec.with_jpeg_draft()),
                                  decode_to_uint8(load_rgb(path), spec))


def test_reduced_and_torch_decode_of_real_jpegs_match_full_decode_within_tolerance(shared_data):
    images = sorted((shared_data / "leeds_butterfly" / "images").glob("*.jpg"))[::40][:20]
    if not images:
        pytest.skip("no Leeds butterfly JPEGs")
    spec = PreprocessSpec(32, "shorter_crop", "bicubic", (0.5,) * 3, (0.5,) * 3)
    datas = [p.read_bytes() for p in images]
    reduced = 0
    # decode_jpegs_torch on the CPU is the GPU path's arithmetic (nvJPEG differs from libjpeg by at
    # most a level or so on top of it).
    for data, on_torch in zip(datas, decode_jpegs_torch(datas + [b"\xff\xd8 not a jpeg"], spec, "cpu")):
        want = exact(data, spec)
        got = decode_jpeg_reduced(data, spec.with_jpeg_draft())
        if got is not None:
            reduced += 1
            assert_within_tolerance(got, want)
        assert_within_tolerance(on_torch, want)
    assert reduced >= len(datas) // 2  # ~500 px sources at 32 px: reduced 4x
    assert decode_jpegs_torch([b"\xff\xd8 not a jpeg"], spec, "cpu") == [None]  # the CPU path takes it


def test_a_manifest_listing_an_image_twice_stores_each_image_with_its_own_pixels(tmp_path):
    # A hand-made manifest (a notebook's) may repeat a row; the pipeline's manifest rejects repeats.
    manifest = collection(tmp_path / "img", 12)
    repeated = pd.concat([manifest.iloc[:3], manifest.iloc[[1, 0]], manifest.iloc[3:], manifest.iloc[[7]]],
                         ignore_index=True)
    embedder = load_embedder(RAW)
    cache = PixelCache(tmp_path / "pixels", max_bytes=None)
    once = embed(tmp_path / "lake-once", manifest, embedder, cache).read_table()
    twice = embed(tmp_path / "lake-twice", repeated, embedder, None).read_table()
    assert twice.image_ids.tolist() == once.image_ids.tolist() == manifest["image_id"].tolist()
    np.testing.assert_array_equal(twice.vectors, once.vectors)
    np.testing.assert_array_equal(once.vectors, reference_pixels(manifest, embedder.preprocess).reshape(12, -1)
                                  .astype(np.float32) / 255.0)
