"""Bad days: a process killed mid-run, a full disk, an unwritable data folder, a source that changes
under the pipeline, a model that fails. (Two runs writing the warehouse at once: test_automation.py.)

Every test ends by checking that nothing was lost or duplicated: the lake holds each manifest image
exactly once with the vectors a clean run gives, and the warehouse holds every row it held before.
Faults are real (SIGKILL, RLIMIT_FSIZE, a path under a regular file, corrupted bytes), never mocks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from conftest import local_resources
from helpers import SPECIMENS_DATASET, noise_image, random_png, subprocess_env, user_error, write_leaves_catalog
from helpers import materialize as shared_materialize
from helpers import write_leaves as shared_write_leaves
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.resources import NfhmStorage
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import EmbeddingStore

CLASSES = ("acer", "betula", "quercus")


# -- helpers ---------------------------------------------------------------------------------------

def leaf_image(i: int, name: str):
    """Random pixels seeded by the name, so a leaf keeps its bytes whatever its position."""
    return noise_image(sum(map(ord, name)) * 7919 + len(name), (12, 12))


def write_leaves(root: Path, names: list[str]) -> Path:
    return shared_write_leaves(root, names, image=leaf_image, keep_existing=True)


def leaf_names(per_class: int, start: int = 0) -> list[str]:
    return [f"{c}_{i}" for c in CLASSES for i in range(start, start + per_class)]


def write_catalog(tmp_path: Path, models: dict[str, str], *, specimens: bool = False) -> Path:
    """A catalog with the 'leaves' CSV dataset (and the 54-image 'specimens' demo if asked);
    ``models`` maps key → YAML body of the entry."""
    csv = tmp_path / "leaves" / "leaves.csv"
    if not csv.exists():
        write_leaves(tmp_path / "leaves", leaf_names(4))
    return write_leaves_catalog(tmp_path / "catalog.yaml", csv, models,
                                extra_datasets=SPECIMENS_DATASET if specimens else "")


RAW8 = "loader: raw_pixels\nimage_size: 8"
RAW16 = "loader: raw_pixels\nimage_size: 16"


def materialize(defs, instance, dataset, stages, partition_key=None, raise_on_error=True):
    return shared_materialize(defs, instance, dataset, stages, partition_key, raise_on_error=raise_on_error)


def lake_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "lake").rglob("*") if p.is_file()]


# -- (a) SIGKILL during embedding --------------------------------------------------------------------

# Embeds the specimens with the very functions the image_embeddings asset calls, in checkpoints of
# 6 images and slowed to ~0.1 s per batch of 2 so the kill lands mid-run.
EMBED_SLOWLY = """
import sys, time
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.embedders.runtime import EmbedSettings, PixelCache, embed_manifest
from nfhm_pipeline.stages.base import Device, Paths, read_manifest
from nfhm_pipeline.stages.image_embeddings import load_model

catalog, paths = load_catalog(sys.argv[1]), Paths.under(sys.argv[2])
embedder = load_model(catalog.models["raw-pixels"], paths, Device("cpu", num_workers=0))
settings = EmbedSettings(batch_size=2, num_workers=0, chunk_size=6, device="cpu")
embed_manifest(paths.lake, "specimens", "raw-pixels", read_manifest(paths, "specimens"), embedder,
               PixelCache(paths.subdir("cache", "pixels")), settings, on_batch=lambda n: time.sleep(0.1))
print("finished", flush=True)
"""


def test_sigkill_during_embedding_then_rerun_keeps_every_image_exactly_once(tmp_path):
    catalog = write_catalog(tmp_path, {"raw-pixels": RAW8}, specimens=True)
    data = tmp_path / "data"
    defs = build_definitions(load_catalog(catalog), local_resources(data))
    ckpt = data / "lake" / "embeddings" / "dataset=specimens" / "model=raw-pixels" / "_staging"
    with dg.instance_for_test() as instance:
        materialize(defs, instance, "specimens", ["image_manifest"])
        proc = subprocess.Popen([sys.executable, "-c", EMBED_SLOWLY, str(catalog), str(data)],
                                env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not list(ckpt.rglob("ckpt-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (out, err[-2000:])
        assert b"finished" not in out
        parts_left = len(list(ckpt.rglob("ckpt-*.parquet")))
        assert parts_left >= 1 and not EmbeddingStore(data / "lake").exists("specimens", "raw-pixels")

        result = materialize(defs, instance, "specimens", ["image_embeddings"], "raw-pixels")
    meta = result.asset_materializations_for_node("specimens__image_embeddings")[0].metadata
    assert meta["resumed"].value == 6 * parts_left  # every finished part reused, none half-written
    assert meta["new"].value == 54 - 6 * parts_left and meta["reused"].value == 0

    manifest = pd.read_parquet(data / "manifests" / "specimens.parquet")
    table = EmbeddingStore(data / "lake").read("specimens", "raw-pixels")
    assert list(table.image_ids) == list(manifest["image_id"])  # every image once, manifest order
    # The resumed vectors are the ones a clean, uninterrupted run computes.
    clean = tmp_path / "clean"
    clean_defs = build_definitions(load_catalog(catalog), local_resources(clean))
    with dg.instance_for_test() as instance:
        materialize(clean_defs, instance, "specimens", ["image_manifest"])
        materialize(clean_defs, instance, "specimens", ["image_embeddings"], "raw-pixels")
    np.testing.assert_array_equal(table.vectors, EmbeddingStore(clean / "lake").read("specimens", "raw-pixels").vectors)
    assert not [p for p in lake_files(data) if p.name.endswith(".tmp") or "_staging" in p.parts]


# Replaces one dataset's 500 metric rows over and over; prints each value once committed.
REWRITE_WAREHOUSE = """
import sys
import pandas as pd
from nfhm_pipeline.store import warehouse
for i in range(1, 100000):
    frame = pd.DataFrame({"dataset": "d", "model": "m", "task": "knn", "metric": [f"m{j}" for j in range(500)],
                          "value": float(i)})
    warehouse.replace_rows(sys.argv[1], "metrics", frame, dataset="d", model="m")
    print(i, flush=True)
"""


def test_sigkill_during_warehouse_writes_leaves_the_last_committed_rows_whole(tmp_path):
    db = tmp_path / "warehouse.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", REWRITE_WAREHOUSE, str(db)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committed = [proc.stdout.readline() for _ in range(5)]  # five commits done, more in flight
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    last = int(([line for line in committed + rest.splitlines() if line.strip()])[-1])
    rows = warehouse.read_table(db, "metrics", dataset="d")
    assert len(rows) == 500 and rows["metric"].is_unique
    assert rows["value"].nunique() == 1 and rows["value"].iloc[0] >= last  # one whole generation


# -- (b) full disk, unwritable data folder -----------------------------------------------------------

def test_unwritable_data_dir_fails_the_run_with_a_storage_error_naming_the_folder(tmp_path):
    # Tests may run as root, for whom chmod does not block writes; a folder under a regular file
    # cannot be created by anyone.
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    data = blocker / "data"
    defs = build_definitions(load_catalog(write_catalog(tmp_path, {"raw-pixels": RAW8})), local_resources(data))
    with dg.instance_for_test() as instance:
        result = materialize(defs, instance, "leaves", ["image_manifest"], raise_on_error=False)
    assert not result.success
    message = user_error(result)
    assert message.startswith("StorageError: ") and str(data) in message and "writable folder" in message
    assert "Traceback" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_data_dir_fails_with_a_storage_error(tmp_path):
    data = tmp_path / "ro"
    data.mkdir()
    data.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            NfhmStorage(data_dir=str(data)).data_path
    finally:
        data.chmod(0o700)


def test_unwritable_lake_fails_the_embedding_run_and_names_the_path(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    catalog = load_catalog(write_catalog(tmp_path, {"raw-pixels": RAW8}))
    resources = {**local_resources(tmp_path / "data"),
                 "storage": NfhmStorage(data_dir=str(tmp_path / "data"), storage_root=str(blocker / "lake"))}
    defs = build_definitions(catalog, resources)
    with dg.instance_for_test() as instance:
        materialize(defs, instance, "leaves", ["image_manifest"])
        result = materialize(defs, instance, "leaves", ["image_embeddings"], "raw-pixels", raise_on_error=False)
    message = user_error(result)
    assert message.startswith("StorageError: cannot write ") and str(blocker) in message


# Under a 64 KiB file-size limit (what a nearly full disk looks like to a writer), try to replace
# a stored embedding table and the warehouse's metric rows with bigger ones.
FULL_DISK = """
import resource, signal, sys
import numpy as np, pandas as pd
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbeddingTable
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
vectors = np.random.default_rng(0).random((2000, 64), dtype=np.float32)  # incompressible
big = EmbeddingTable(np.array([f"n{i}" for i in range(2000)], dtype=object), vectors, "fp")
try:
    EmbeddingStore(sys.argv[1]).write("d", "m", big)
except StorageError as e:
    print("LAKE", e)
frame = pd.DataFrame({"dataset": "d", "model": "m", "task": "knn", "metric": [f"x{i}" for i in range(100000)],
                      "value": 2.0})
try:
    warehouse.replace_rows(sys.argv[2], "metrics", frame, dataset="d")
except StorageError as e:
    print("WAREHOUSE", e)
"""


def test_full_disk_gives_clear_errors_and_keeps_the_previous_table_and_rows(tmp_path):
    lake, db = tmp_path / "lake", tmp_path / "warehouse.duckdb"
    store = EmbeddingStore(lake)
    from nfhm_pipeline.store.embedding_store import EmbeddingTable

    old = EmbeddingTable(np.array(["a", "b"], dtype=object), np.eye(2, 4, dtype=np.float32), "fp")
    store.write("d", "m", old)
    warehouse.replace_rows(db, "metrics", pd.DataFrame({"dataset": "d", "model": "m", "task": "knn",
                                                        "metric": ["top1"], "value": [1.0]}), dataset="d")
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(lake), str(db)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot write" in lines["LAKE"] and "free space" in lines["LAKE"]
    assert "cannot write table metrics" in lines["WAREHOUSE"] and "free space" in lines["WAREHOUSE"]
    kept = store.read("d", "m")
    assert list(kept.image_ids) == ["a", "b"] and np.array_equal(kept.vectors, old.vectors)
    assert warehouse.read_table(db, "metrics")[["metric", "value"]].values.tolist() == [["top1", 1.0]]
    assert not [p for p in lake.rglob("*") if p.name.endswith(".tmp")]


# -- (c) the source changes between runs -------------------------------------------------------------

def test_images_added_removed_and_rewritten_between_runs_are_counted_exactly(tmp_path):
    names = leaf_names(4)
    catalog = write_catalog(tmp_path, {"raw-pixels": RAW8})
    data = tmp_path / "data"
    defs = build_definitions(load_catalog(catalog), local_resources(data))
    root = tmp_path / "leaves"
    with dg.instance_for_test() as instance:
        materialize(defs, instance, "leaves", ["image_manifest", "image_embeddings"], "raw-pixels")
        changed = [n for n in names if n not in ("acer_0", "betula_1")] + leaf_names(1, start=10)  # -2, +3
        write_leaves(root, changed)
        materialize(defs, instance, "leaves", ["image_manifest", "image_embeddings"], "raw-pixels")
        random_png(root / "images" / "quercus_2.png", seed=123456, size=(12, 12))  # same path, new bytes
        materialize(defs, instance, "leaves", ["image_manifest", "image_embeddings"], "raw-pixels")
    runs = warehouse.query(data / "warehouse.duckdb", "SELECT images, new, reused, removed, resumed "
                                                      "FROM embedding_runs ORDER BY finished_at")
    assert runs.values.tolist() == [[12, 12, 0, 0, 0], [13, 3, 10, 2, 0], [13, 1, 12, 1, 0]]
    manifest = pd.read_parquet(data / "manifests" / "leaves.parquet")
    table = EmbeddingStore(data / "lake").read("leaves", "raw-pixels")
    assert list(table.image_ids) == list(manifest["image_id"]) and len(set(table.image_ids)) == 13
    images = warehouse.read_table(data / "warehouse.duckdb", "images", dataset="leaves")
    assert sorted(images["image_id"]) == sorted(manifest["image_id"])


# -- (d) a model that fails --------------------------------------------------------------------------

def test_model_failing_on_one_batch_fails_only_its_partition(tmp_path):
    catalog = write_catalog(tmp_path, {"raw-pixels": RAW8, "raw-pixels-16": RAW16})
    data = tmp_path / "data"
    defs = build_definitions(load_catalog(catalog), local_resources(data))
    with dg.instance_for_test() as instance:
        materialize(defs, instance, "leaves", ["image_manifest", "splits"])
        materialize(defs, instance, "leaves", ["image_embeddings", "knn_metrics"], "raw-pixels")
        # The file goes bad after validation: only a model that still has to decode it meets it
        # (raw-pixels has its pixels cached at 8 px; raw-pixels-16 needs them at 16 px).
        bad = tmp_path / "leaves" / "images" / "betula_2.png"
        good_bytes = bad.read_bytes()
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        outcome = {model: materialize(defs, instance, "leaves", ["image_embeddings", "knn_metrics"], model,
                                      raise_on_error=False) for model in ("raw-pixels", "raw-pixels-16")}
        assert outcome["raw-pixels"].success and not outcome["raw-pixels-16"].success
        message = user_error(outcome["raw-pixels-16"])
        assert message.startswith("ManifestError: cannot load image ") and str(bad) in message
        assert "Re-run image validation" in message

        bad.write_bytes(good_bytes)  # the fix: the partition alone is rerun and succeeds
        assert materialize(defs, instance, "leaves", ["image_embeddings", "knn_metrics"], "raw-pixels-16").success
    metrics = warehouse.read_table(data / "warehouse.duckdb", "metrics", dataset="leaves")
    assert set(metrics["model"]) == {"raw-pixels", "raw-pixels-16"}
    runs = warehouse.read_table(data / "warehouse.duckdb", "embedding_runs", dataset="leaves")
    assert sorted(runs["model"]) == ["raw-pixels", "raw-pixels", "raw-pixels-16"]  # the failure wrote no row
    for model in ("raw-pixels", "raw-pixels-16"):
        assert len(EmbeddingStore(data / "lake").read("leaves", model)) == 12


def test_model_with_corrupt_weights_fails_its_partition_with_the_file_named(tmp_path):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(os.urandom(4096))
    broken = f"loader: open_clip\nmodel: nfhm-tiny-clip\npretrained: {weights}"
    catalog = write_catalog(tmp_path, {"raw-pixels": RAW8, "broken-clip": broken})
    defs = build_definitions(load_catalog(catalog), local_resources(tmp_path / "data"))
    with dg.instance_for_test() as instance:
        materialize(defs, instance, "leaves", ["image_manifest"])
        results = {m: materialize(defs, instance, "leaves", ["image_embeddings"], m, raise_on_error=False)
                   for m in ("broken-clip", "raw-pixels")}
    assert results["raw-pixels"].success and not results["broken-clip"].success
    message = user_error(results["broken-clip"])
    assert message.split(":")[0] in {"ModelLoadError", "MissingWeightsError"}
    assert "broken-clip" in message or str(weights) in message
