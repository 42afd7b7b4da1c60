"""The warehouse under kills, locks and odd folder names, with real processes and real DuckDB files.

- Every asset writes all its tables in ONE transaction: a writer killed (SIGKILL) between two
  table writes leaves every table as it was, never new ``images`` next to old ``image_labels``.
  The kill point comes from the documented test hook ``NFHM_TEST_PAUSE_AFTER_TABLE`` in
  ``warehouse.replace_many`` (it prints where it is and sleeps), so no timing guess is involved.
- A writer waits for a lock held by a reader (``nfhm sql``, a notebook) instead of failing after
  60 s, and says every so often what it waits for.
- The ``embeddings`` view of a data folder named ``exp [v2]`` reads its own lake, not ``exp 2``'s.
"""
from __future__ import annotations

import inspect
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

import helpers
from conftest import local_resources
from helpers import noise_image, subprocess_env, write_leaves_catalog
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.errors import SettingsError, StorageError
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbeddingTable

PAUSE = "nfhm-test-pause: "


def run_until_pause(args: list[str], stop_at: int, env: dict) -> tuple[subprocess.Popen, list[str]]:
    """Start ``args``, read the test hook's pause lines from its stderr and SIGKILL it at the
    ``stop_at``-th one (1-based), where ``NFHM_TEST_PAUSE_AFTER_TABLE=<s>@<stop_at>`` holds it
    asleep. Returns the process and the points it passed."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    points: list[str] = []
    other: list[str] = []
    try:
        for line in proc.stderr:
            if line.startswith(PAUSE):
                points.append(line[len(PAUSE):].strip())
                if len(points) == stop_at:
                    break
            else:
                other.append(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert len(points) == stop_at, "".join(other)[-3000:]
    assert proc.returncode == -signal.SIGKILL
    return proc, points


# -- one transaction per write, killed in the middle ---------------------------------------------

def image_rows(generation: int, n: int) -> list[tuple[str, pd.DataFrame, dict]]:
    """images + image_labels + rejected_images of one manifest generation (ids differ per generation)."""
    ids = [f"g{generation}-{i}" for i in range(n)]
    images = pd.DataFrame({"dataset": "d", "image_id": ids, "uri": [f"/x/{i}.png" for i in ids], "label": "a"})
    labels = pd.DataFrame({"dataset": "d", "image_id": ids, "level": "species", "label": "a"})
    rejected = pd.DataFrame({"dataset": "d", "uri": [f"/bad/{generation}.png"], "reason": "undecodable"})
    return [("images", images, {"dataset": "d"}), ("image_labels", labels, {"dataset": "d"}),
            ("rejected_images", rejected, {"dataset": "d"})]


WRITE_GENERATION = f"""
import sys
import pandas as pd
from nfhm_pipeline.store import warehouse
{inspect.getsource(image_rows)}
warehouse.replace_many(sys.argv[1], image_rows(2, 21))
"""


def table_ids(db: Path) -> dict[str, set[str]]:
    return {"images": set(warehouse.read_table(db, "images")["image_id"]),
            "image_labels": set(warehouse.read_table(db, "image_labels")["image_id"]),
            "rejected_images": set(warehouse.read_table(db, "rejected_images")["uri"])}


@pytest.mark.parametrize("stop_at, expect", [(1, "old"), (2, "old"), (3, "old"), (4, "new")])
def test_sigkill_between_two_table_writes_leaves_every_table_as_it_was(tmp_path, stop_at, expect):
    db = tmp_path / "warehouse.duckdb"
    warehouse.replace_many(db, image_rows(1, 30))
    env = subprocess_env(NFHM_TEST_PAUSE_AFTER_TABLE=f"60@{stop_at}")
    _, points = run_until_pause([sys.executable, "-c", WRITE_GENERATION, str(db)], stop_at, env)
    # The hook's points: after each table's rows, inside the transaction, then after the commit.
    assert points == ["table images", "table image_labels", "table rejected_images", "commit"][:stop_at]
    generation = {"old": (1, 30), "new": (2, 21)}[expect]
    ids = {f"g{generation[0]}-{i}" for i in range(generation[1])}
    assert table_ids(db) == {"images": ids, "image_labels": ids, "rejected_images": {f"/bad/{generation[0]}.png"}}


def write_leaves(root: Path, names: list[str], seed: int = 0) -> Path:
    """The leaves collection; images of noise seeded by ``seed`` and their position."""
    return helpers.write_leaves(root, names, image=lambda i, _: noise_image(seed * 1000 + i, (10, 10)))


def write_catalog(tmp_path: Path) -> Path:
    csv = write_leaves(tmp_path / "leaves", [f"{c}_{i}" for c in ("acer", "betula", "quercus") for i in range(4)])
    return write_leaves_catalog(tmp_path / "catalog.yaml", csv, {"raw-pixels": "loader: raw_pixels\nimage_size: 8"})


MATERIALIZE_MANIFEST = """
import sys
import dagster as dg
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.resources import NfhmStorage, TorchDevice
defs = build_definitions(load_catalog(sys.argv[1]), {"storage": NfhmStorage(data_dir=sys.argv[2]),
                                                     "torch_device": TorchDevice(device="cpu", num_workers=0)})
dg.materialize(list(defs.assets), selection=[dg.AssetKey(["leaves", "image_manifest"])],
               instance=dg.DagsterInstance.ephemeral(), resources=defs.resources)
"""


def test_manifest_asset_killed_after_its_second_table_write_leaves_the_tables_agreeing(tmp_path):
    catalog, data = write_catalog(tmp_path), tmp_path / "data"
    defs = build_definitions(load_catalog(catalog), local_resources(data))
    db = data / "warehouse.duckdb"
    with dg.instance_for_test() as instance:
        assert dg.materialize(list(defs.assets), selection=[dg.AssetKey(["leaves", "image_manifest"])],
                              instance=instance, resources=defs.resources).success
    before = table_ids(db)
    # The source changes (9 images instead of 12, new pixels), and the rebuild is killed at the
    # hook's second pause: after two of its three table writes, whatever they are.
    (tmp_path / "leaves" / "leaves.csv").unlink()
    write_leaves(tmp_path / "leaves", [f"{c}_{i}" for c in ("acer", "betula", "quercus") for i in range(3)], seed=1)
    run_until_pause([sys.executable, "-c", MATERIALIZE_MANIFEST, str(catalog), str(data)], 2,
                    subprocess_env(NFHM_TEST_PAUSE_AFTER_TABLE="60@2"))
    after = table_ids(db)
    assert after["images"] == after["image_labels"]  # no images rows without their labels
    assert after == before  # nothing was committed: the kill came before the one commit


# -- every asset that writes the warehouse commits once ------------------------------------------

@pytest.mark.parametrize("asset, writes", [
    ("image_manifest", ["table images", "table image_labels", "table rejected_images"]),
    ("splits", ["table splits", "table split_exclusions"]),
    ("image_embeddings", ["table embedding_runs", "view embeddings"]),
    ("knn_metrics", ["table metrics", "table per_class_metrics", "table predictions"]),
])
def test_each_asset_writes_all_its_tables_in_one_transaction(tmp_path, monkeypatch, capfd, asset, writes):
    defs = build_definitions(load_catalog(write_catalog(tmp_path)), local_resources(tmp_path / "data"))
    order = ["image_manifest", "splits", "image_embeddings", "knn_metrics"]
    with dg.instance_for_test() as instance:
        def materialize(stage):
            partitioned = stage in ("image_embeddings", "knn_metrics")
            result = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["leaves", stage])],
                                    instance=instance, resources=defs.resources,
                                    partition_key="raw-pixels" if partitioned else None)
            assert result.success

        for stage in order[:order.index(asset)]:
            materialize(stage)
        monkeypatch.setenv("NFHM_TEST_PAUSE_AFTER_TABLE", "0")
        capfd.readouterr()
        materialize(asset)
        err = capfd.readouterr().err
    points = [line[len(PAUSE):].strip() for line in err.splitlines() if line.startswith(PAUSE)]
    # One commit, and every table the asset writes inside it (before it).
    assert points.count("commit") == 1 and points[-1] == "commit", points
    assert set(writes) <= set(points[:-1]), points


# -- a writer waits for a reader's lock, and says so ---------------------------------------------

HOLD_LOCK = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_writer_waits_for_a_readers_lock_logging_what_it_waits_for_then_writes(tmp_path, caplog):
    db = tmp_path / "warehouse.duckdb"
    warehouse.replace_rows(db, "images", image_rows(1, 2)[0][1], dataset="d")
    reader = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), "4"], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "held"
        said: list[str] = []
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="nfhm_pipeline"):
            with warehouse.connect(db, log_wait=said.append, log_every_s=0.5) as con:
                waited = time.monotonic() - started
                con.execute("DELETE FROM images")
    finally:
        reader.wait(60)
    assert waited > 1.0  # it did wait for the reader (which held the lock ~4 s), and then got in
    assert said and all("waiting" in line and str(db) in line and "nfhm sql" in line for line in said)
    assert any("warehouse lock on" in r.getMessage() for r in caplog.records if r.name.startswith("nfhm_pipeline"))
    assert warehouse.read_table(db, "images").empty


def test_lock_timeout_is_unlimited_for_writers_and_set_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(warehouse.LOCK_TIMEOUT_ENV, raising=False)
    assert warehouse.lock_timeout_s(read_only=False) is None
    assert warehouse.lock_timeout_s(read_only=True) == 60.0
    monkeypatch.setenv(warehouse.LOCK_TIMEOUT_ENV, "none")
    assert warehouse.lock_timeout_s(read_only=True) is None
    monkeypatch.setenv(warehouse.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(SettingsError, match="NFHM_WAREHOUSE_LOCK_TIMEOUT_S='soon'"):
        warehouse.lock_timeout_s(read_only=False)

    monkeypatch.delenv(warehouse.LOCK_TIMEOUT_ENV)
    db = tmp_path / "warehouse.duckdb"
    warehouse.replace_rows(db, "images", image_rows(1, 2)[0][1], dataset="d")
    monkeypatch.setenv(warehouse.LOCK_TIMEOUT_ENV, "0.5")
    reader = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), "3"], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "held"
        with pytest.raises(StorageError, match="locked by another process.*NFHM_WAREHOUSE_LOCK_TIMEOUT_S"):
            warehouse.replace_rows(db, "images", image_rows(2, 2)[0][1], dataset="d")
    finally:
        reader.wait(60)


# -- glob characters in the data folder ------------------------------------------------------------

# ('?' is left out: DuckDB itself cannot open a database file below a folder whose name has one.)
@pytest.mark.parametrize("name, sibling", [("exp [v2]", "exp 2"), ("run*", "run-1")])
def test_embeddings_view_reads_its_own_lake_when_the_folder_name_has_glob_characters(tmp_path, name, sibling):
    for folder, ids in ((sibling, ["sibling-0", "sibling-1", "sibling-2"]), (name, ["own-0"])):
        lake = tmp_path / folder / "lake"
        EmbeddingStore(lake).write("d", "m", EmbeddingTable(np.array(ids, dtype=object),
                                                            np.ones((len(ids), 4), dtype=np.float32), "fp"))
        warehouse.refresh_embedding_view(tmp_path / folder / "warehouse.duckdb", str(lake))
    got = warehouse.query(tmp_path / name / "warehouse.duckdb", "SELECT image_id, dataset, model FROM embeddings")
    assert got.values.tolist() == [["own-0", "d", "m"]]


def test_embedding_run_row_and_view_are_written_in_one_transaction(tmp_path):
    lake, db = tmp_path / "exp [v2]" / "lake", tmp_path / "exp [v2]" / "warehouse.duckdb"
    EmbeddingStore(lake).write("d", "m", EmbeddingTable(np.array(["a"], dtype=object), np.ones((1, 3), np.float32), "fp"))
    run = pd.DataFrame([{"dataset": "d", "model": "m", "fingerprint": "fp", "images": 1}])
    warehouse.replace_many(db, [("embedding_runs", run, {})], lake_root=str(lake))
    assert warehouse.query(db, "SELECT count(*) AS n FROM embeddings")["n"][0] == 1
    assert warehouse.query(db, "SELECT root FROM nfhm_lake")["root"][0] == str(lake)
