"""Integrity under hostile input (issue 16 items 1, 3, 5): a file rewritten after the manifest, an
aspect-ratio bomb, a CSV listing few files many times. Real files in tmp_path, the real Dagster
instance and assets, real raw-pixel embeddings; nothing mocked."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO_ROOT, local_resources
from helpers import materialize, random_png, user_error
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.embedders import PreprocessSpec, decode_to_uint8, load_embedder
from nfhm_pipeline.embedders.preprocess import MAX_RESIZED_PIXELS
from nfhm_pipeline.ingest.images import MAX_ASPECT_RATIO, load_rgb, validate_images
from nfhm_pipeline.embedders.runtime import embedding_identity, model_loader_spec
from nfhm_pipeline.store.embedding_store import EmbeddingStore

MEAN = STD = (0.5, 0.5, 0.5)


# -- 16.1: a file rewritten between the manifest and the embedding ---------------------------------

@pytest.fixture
def csv_project(tmp_path):
    """A label_csv dataset of three PNGs and a raw-pixel model; returns (defs, data_dir, image paths)."""
    images = [random_png(tmp_path / "inbox" / "images" / f"{name}.png", seed)
              for seed, name in enumerate(["a", "b", "c"])]
    csv = tmp_path / "inbox" / "labels.csv"
    csv.write_text("path,species\nimages/a.png,acer\nimages/b.png,betula\nimages/c.png,acer\n", encoding="utf-8")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(textwrap.dedent(f"""\
        datasets:
          inbox:
            reader: label_csv
            csv: {csv}
            path_column: path
            labels: [species]
        models:
          raw-pixels:
            loader: raw_pixels
            image_size: 8
        """), encoding="utf-8")
    data = tmp_path / "data"
    return build_definitions(load_catalog(catalog), local_resources(data)), data, images


def files_holding(data: Path, image_id: str) -> list[Path]:
    """Pixel-cache chunks listing `image_id` (their .ids index fragments) and lake (table or
    checkpoint) Parquet files listing it."""
    found = [ids for ids in (data / "cache").rglob("*.ids") if image_id in ids.read_text().split()]
    for part in (data / "lake").rglob("*.parquet"):
        table = pq.read_table(part)
        if "image_id" in table.column_names and image_id in set(table.column("image_id").to_pylist()):
            found.append(part)
    return found


def test_file_rewritten_after_the_manifest_fails_embedding_clearly_and_stores_nothing_wrong(csv_project):
    defs, data, (a, b, c) = csv_project
    original = b.read_bytes()
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, "inbox", ["image_manifest"]).success
        manifest = pd.read_parquet(data / "manifests" / "inbox.parquet")
        old_id = manifest.loc[manifest["uri"] == str(b), "image_id"].item()

        random_png(b, seed=99)  # the file changes; the nightly re-embed runs without the manifest
        failed = materialize(defs, instance, "inbox", ["image_embeddings"], "raw-pixels")
        assert not failed.success
        message = user_error(failed)
        assert message.startswith("ManifestError: ") and str(b) in message
        assert "changed after the manifest" in message and "inbox/image_manifest" in message
        assert files_holding(data, old_id) == []  # neither cached nor stored under the old id

        b.write_bytes(original)  # restored: the same id, the same bytes
        result = materialize(defs, instance, "inbox", ["image_embeddings"], "raw-pixels")
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["every_image_embedded"] is True

    stored = EmbeddingStore(data / "lake").read("inbox", "raw-pixels")
    assert list(stored.image_ids) == list(manifest["image_id"])
    catalog = load_catalog(next(data.parent.glob("catalog.yaml")))
    embedder = load_embedder({**model_loader_spec(catalog.models["raw-pixels"], data / "models"), "id": "raw-pixels"})
    import torch

    fresh = embedder.embed_uint8(torch.from_numpy(decode_to_uint8(load_rgb(b), embedder.preprocess))[None])
    vector = stored.vectors[list(stored.image_ids).index(old_id)]
    assert np.array_equal(vector, np.asarray(fresh, dtype=np.float32)[0])


def test_a_rewritten_file_met_by_a_loader_worker_gives_the_plain_sentence(tmp_path):
    # GPU runs decode in DataLoader worker processes; the error must still be our sentence, without
    # the worker's traceback pasted into it.
    from nfhm_pipeline.errors import ManifestError
    from nfhm_pipeline.embedders.runtime import EmbedSettings, PixelCache, embed_manifest

    paths = [random_png(tmp_path / "img" / f"{i}.png", seed=i) for i in range(8)]
    frame = pd.DataFrame({"uri": [str(p) for p in paths], "species": ["x"] * 8})
    manifest, _ = validate_images(frame, ["species"])
    random_png(paths[5], seed=50)
    embedder = load_embedder({"id": "raw", "loader": "raw_pixels", "image_size": 8})
    settings = EmbedSettings(batch_size=2, num_workers=2, chunk_size=8)
    cache = PixelCache(tmp_path / "cache" / "pixels")
    with pytest.raises(ManifestError) as caught:
        embed_manifest(EmbeddingStore(tmp_path / "lake"), "inbox", "raw", manifest, embedder, cache, settings)
    message = str(caught.value)
    assert message.startswith(f"cannot load image {paths[5]}: it changed after the manifest")
    assert "Traceback" not in message and "worker" not in message
    assert files_holding(tmp_path, manifest["image_id"][5]) == []


def test_every_image_embedded_compares_ids_not_counts():
    # Same count and no manifest id missing, but a stranger stored in place of a repeated id: the old
    # count-based check ("missing == 0 and len(stored) == len(manifest)") passed this.
    outcome = embedding_identity(["a", "b", "b"], ["a", "b", "x"])
    assert outcome["passed"] is False and outcome["unexpected"] == 1
    assert embedding_identity(["a", "b"], ["b", "a"])["passed"] is False  # another manifest's order
    assert embedding_identity(["a", "b"], ["a", "b"]) == {
        "passed": True, "missing": 0, "unexpected": 0, "repeated": 0, "stored": 2, "expected": 2}


# -- 16.3: the aspect-ratio bomb -------------------------------------------------------------------

def strip_png(path: Path, width: int, height: int) -> Path:
    """A `width` x `height` PNG of three colour bands along its long side (a few KB when huge)."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    long = max(width, height)
    for i, colour in enumerate([(0, 255, 0), (0, 0, 255)], start=1):
        box = (0, i * long // 3, width, long) if height >= width else (i * long // 3, 0, long, height)
        image.paste(colour, box)
    image.save(path, format="PNG")
    return path


def test_a_one_by_a_million_png_is_rejected_as_extreme_aspect_ratio(tmp_path):
    bomb = strip_png(tmp_path / "strip.png", 1, 1_000_000)
    assert bomb.stat().st_size < 100_000
    ok = strip_png(tmp_path / "ok.png", 2, 2 * MAX_ASPECT_RATIO)
    frame = pd.DataFrame({"uri": [str(bomb), str(ok)], "species": ["x", "y"], "source_row": [2, 3]})
    manifest, rejected = validate_images(frame, ["species"])
    assert list(manifest["uri"]) == [str(ok)]
    assert rejected[["uri", "reason"]].values.tolist() == [[str(bomb), "extreme_aspect_ratio"]]
    assert "1x1000000" in rejected["detail"][0] and f"{MAX_ASPECT_RATIO}:1" in rejected["detail"][0]


def test_decoding_the_bomb_for_a_model_fits_in_1_5_gb(tmp_path):
    # Preprocessing on its own (a caller that skipped validation) must not build the 224 x 224,000,000
    # intermediate: under RLIMIT_AS = 1.5 GiB the old resize-then-crop died with a MemoryError.
    bomb = strip_png(tmp_path / "strip.png", 1, 1_000_000)
    script = textwrap.dedent(f"""
        import resource
        limit = 1536 * 1024 ** 2
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from PIL import Image
        from nfhm_pipeline.embedders.preprocess import PreprocessSpec, decode_to_uint8
        with Image.open({str(bomb)!r}) as im:
            im.load()
            out = decode_to_uint8(im, PreprocessSpec(224, "shorter_crop", "bicubic", (0.5,) * 3, (0.5,) * 3))
        print(out.shape, out[:, 112, 112].tolist())
        """)
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # the centre of the strip is its green band
    assert done.stdout.strip() == "(3, 224, 224) [0, 255, 0]"


@pytest.mark.parametrize("w,h", [(97, 41), (41, 97), (640, 480), (480, 640), (13, 600), (600, 13), (5, 5)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_images_under_the_intermediate_cap_decode_exactly_as_resize_then_crop(w, h, interpolation):
    image = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    spec = PreprocessSpec(32, "shorter_crop", interpolation, MEAN, STD, resize_size=40)
    new_w, new_h = (40, int(40 * h / w)) if w <= h else (int(40 * w / h), 40)
    assert new_w * new_h <= MAX_RESIZED_PIXELS
    left, top = int(round((new_w - 32) / 2.0)), int(round((new_h - 32) / 2.0))
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
    reference = image.resize((new_w, new_h), resample).crop((left, top, left + 32, top + 32))
    assert decode_to_uint8(image, spec).tobytes() == np.asarray(reference).transpose(2, 0, 1).tobytes()


def test_crop_first_path_keeps_the_centre_and_stays_close_to_the_full_resize():
    # Forced through the capped path on an image whose full resize is still affordable to compare.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3000, 40, 3), dtype=np.uint8))
    spec = PreprocessSpec(24, "shorter_crop", "bicubic", MEAN, STD)
    full = decode_to_uint8(image, spec).astype(int)
    capped = decode_to_uint8(image, spec, max_resized_pixels=1000).astype(int)
    assert capped.shape == full.shape == (3, 24, 24)
    assert np.abs(capped - full).mean() < 2.0


# -- 16.5: a CSV listing few files many times --------------------------------------------------------

def test_twenty_thousand_rows_over_five_files_read_each_file_once(tmp_path):
    files = [random_png(tmp_path / f"img{i}.png", seed=i) for i in range(5)]
    missing = tmp_path / "gone.png"
    n = 20_000
    uris = [str(files[i % 5]) for i in range(n - 2)] + [str(missing), str(missing)]
    frame = pd.DataFrame({"uri": uris, "species": [f"sp{i % 3}" for i in range(n)], "source_row": range(2, n + 2)})
    manifest, rejected = validate_images(frame, ["species"], workers=2)
    assert manifest.attrs["files_read"] == 6
    # today's semantics kept: the first row of each file is kept, every later row of it is a
    # duplicate_image naming that first row, and a missing file is rejected on each of its rows.
    assert list(manifest["uri"]) == [str(f) for f in files]
    assert list(manifest["species"]) == ["sp0", "sp1", "sp2", "sp0", "sp1"]
    assert len(rejected) == n - 5
    dupes = rejected[rejected["reason"] == "duplicate_image"]
    assert len(dupes) == n - 7 and dupes["source_row"].tolist() == list(range(7, n))
    assert dupes["detail"].iloc[0] == f"same bytes as {files[0]} (row 2)"
    assert rejected.loc[rejected["reason"] == "missing_file", "source_row"].tolist() == [n, n + 1]


# -- issue 11 item 16: no false "initialized randomly" warning for the tiny model --------------------

def test_tiny_clip_build_and_load_log_no_random_init_warning_and_load_the_checkpoint(tmp_path, caplog):
    import logging

    import torch
    from safetensors.torch import load_file

    from nfhm_pipeline.embedders import TINY_OPENCLIP_NAME, build_tiny_openclip_checkpoint, tiny

    tiny._tiny_state_dict_cached.cache_clear()  # build the seeded model now, as a fresh run does
    with caplog.at_level(logging.INFO):
        path = build_tiny_openclip_checkpoint(tmp_path / "tiny.safetensors", seed=0)
        embedder = load_embedder({"id": "tiny-clip", "loader": "open_clip", "model": TINY_OPENCLIP_NAME,
                                  "pretrained": str(path)})
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "initialized randomly" in m or "No pretrained weights" in m]
    assert any(f"Loading full pretrained weights from: {path}" in m for m in messages)  # still logged
    saved = load_file(path)
    loaded = embedder.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not [f for f in logging.getLogger().filters if type(f).__name__ == "_DropRandomInitWarning"]
