"""The embedding lake on S3: a real S3 API (moto in server mode) on loopback, real Dagster runs.

Nothing is mocked in-process: pyarrow's S3 client talks HTTP to the moto server, exactly as it
would to MinIO or AWS with another endpoint. The warehouse stays a local DuckDB file; its
``embeddings`` view is served from the bucket through a pyarrow dataset (no httpfs download).
"""
from __future__ import annotations

import logging
import socket
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.resources import NfhmStorage, TorchDevice
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import EmbeddingStore
from nfhm_pipeline.store.remote import lake_dataset, redact
from nfhm_pipeline.store.text_store import read_text_embeddings

BUCKET = "nfhm-lake"
README_SQL = ("SELECT dataset, model, count(*) AS vectors, len(any_value(embedding)) AS dim\n"
              "FROM embeddings GROUP BY dataset, model ORDER BY dataset, model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_* set to dummies for the module only."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "nfhm-test-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "nfhm-test-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups off-cloud
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/nfhm-aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/nfhm-aws-credentials")
        port = _free_port()
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield {"port": port, "client": client}
        finally:
            server.stop()


def lake_uri(endpoint, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{endpoint['port']}&scheme=http"


def keys_under(endpoint, prefix: str) -> list[str]:
    pages = endpoint["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def small_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(textwrap.dedent("""
        datasets:
          demo_shapes:
            reader: demo_shapes
            labels: [species, genus, family]
            group: taxa
            images_per_species: 2
            size: 32
            split: {test_fraction: 0.2, seed: 0, folds: 2}
        models:
          raw-pixels:
            loader: raw_pixels
            image_size: 8
        """), encoding="utf-8")
    return path


def s3_resources(tmp_path: Path, root: str) -> dict:
    return {"storage": NfhmStorage(data_dir=str(tmp_path / "data"), storage_root=root),
            "torch_device": TorchDevice(device="cpu", batch_size=64, num_workers=0)}


def run(defs, instance, keys, partition_key=None):
    result = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["demo_shapes", k]) for k in keys],
                            instance=instance, resources=defs.resources, partition_key=partition_key,
                            raise_on_error=False)
    assert result.success, [e.event_specific_data.error.message for e in result.all_events
                            if e.event_type_value == "STEP_FAILURE"]
    return result


@pytest.fixture(scope="module")
def s3_demo(s3_endpoint, tmp_path_factory):
    """The small catalog materialized with the lake in the bucket: manifest → embeddings → splits → kNN,
    then the embeddings once more (nothing changed). Yields (tmp_path, lake root, instance)."""
    tmp_path = tmp_path_factory.mktemp("s3-demo")
    root = lake_uri(s3_endpoint, "demo/lake")
    defs = build_definitions(load_catalog(small_catalog(tmp_path)), s3_resources(tmp_path, root))
    with dg.instance_for_test() as instance:
        run(defs, instance, ["image_manifest"])
        run(defs, instance, ["image_embeddings", "text_embeddings"], "raw-pixels")
        run(defs, instance, ["splits"])
        run(defs, instance, ["knn_metrics"], "raw-pixels")
        run(defs, instance, ["image_embeddings"], "raw-pixels")
        yield tmp_path, root, instance


def test_storage_root_uri_carries_the_endpoint_settings(s3_endpoint):
    store = EmbeddingStore(lake_uri(s3_endpoint, "probe"))
    assert isinstance(store.fs, pafs.S3FileSystem)
    assert store.base == f"{BUCKET}/probe"
    assert store.uri("d", "m") == f"s3://{BUCKET}/probe/embeddings/dataset=d/model=m"


def test_pipeline_writes_the_lake_as_parquet_objects_in_the_bucket(s3_demo, s3_endpoint):
    tmp_path, _, _ = s3_demo
    keys = [k for k in keys_under(s3_endpoint, "demo/lake/") if not k.endswith("/")]  # skip folder markers
    folder = "demo/lake/embeddings/dataset=demo_shapes/model=raw-pixels"
    assert len(keys) == 3 and keys[0] == f"{folder}/_index.json"  # 54 images: one part and its index
    assert keys[1].startswith(f"{folder}/part-all-") and keys[1].endswith(".parquet")
    assert keys[2] == "demo/lake/text_embeddings/dataset=demo_shapes/model=raw-pixels/text_embeddings.parquet"
    assert not (tmp_path / "data" / "lake").exists()  # nothing of the lake landed on local disk


def test_embeddings_read_back_from_the_bucket_match_the_manifest(s3_demo):
    tmp_path, root, _ = s3_demo
    table = EmbeddingStore(root).read("demo_shapes", "raw-pixels")
    manifest = pd.read_parquet(tmp_path / "data" / "manifests" / "demo_shapes.parquet")
    assert table.vectors.shape == (54, 3 * 8 * 8) and table.vectors.dtype == np.float32
    assert list(table.image_ids) == list(manifest["image_id"])
    assert np.isfinite(table.vectors).all()
    prompts, _ = read_text_embeddings(EmbeddingStore(root), "demo_shapes", "raw-pixels")
    assert prompts.empty  # raw pixels have no text tower: an empty table, stored remotely too


def test_metrics_are_computed_from_the_remote_lake(s3_demo):
    tmp_path, _, _ = s3_demo
    m = warehouse.read_table(tmp_path / "data" / "warehouse.duckdb", "metrics", dataset="demo_shapes")
    top1 = m[(m["task"] == "knn") & (m["metric"] == "top1_cosine") & (m["grp"] == "all")]
    assert set(top1["level"]) == {"species", "genus", "family"}
    assert top1["value"].between(0, 1).all()


def test_unchanged_rerun_on_s3_reuses_every_vector(s3_demo):
    tmp_path, _, _ = s3_demo
    runs = warehouse.query(tmp_path / "data" / "warehouse.duckdb",
                           "SELECT new, reused, removed, resumed FROM embedding_runs ORDER BY finished_at")
    assert runs.values.tolist() == [[54, 0, 0, 0], [0, 54, 0, 0]]


def test_unchanged_rerun_does_not_upload_the_table_again(s3_endpoint, tmp_path):
    root = lake_uri(s3_endpoint, "no-reupload/lake")
    ids = [f"img{i}" for i in range(10)]

    def embed(positions):
        yield positions, np.ones((len(positions), 4), np.float32)

    store = EmbeddingStore(root)
    store.embed_incrementally("d", "m", ids, "fp", embed)
    [part] = store.part_paths("d", "m")
    client, key = s3_endpoint["client"], part.split("/", 1)[1]  # the key without the bucket
    # A tag lives on one stored object: any new PUT of the key replaces the object and drops it.
    client.put_object_tagging(Bucket=BUCKET, Key=key, Tagging={"TagSet": [{"Key": "probe", "Value": "1"}]})

    def tags():
        return client.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"]

    report = store.embed_incrementally("d", "m", ids, "fp", embed)
    assert (report.new, report.reused) == (0, 10)
    assert tags() == [{"Key": "probe", "Value": "1"}]
    store.write("d", "m", store.read("d", "m"))  # the probe notices a rewrite: a new part, the old deleted
    assert store.part_paths("d", "m") != [part]
    assert key not in keys_under(s3_endpoint, "no-reupload/lake/")


def test_interrupted_run_on_s3_resumes_from_its_checkpoint_parts(s3_endpoint):
    root = lake_uri(s3_endpoint, "resume/lake")
    ids = [f"img{i:02d}" for i in range(12)]
    calls = []

    def dies_on_third_chunk(positions):
        calls.append(list(positions))
        if len(calls) == 3:
            raise RuntimeError("simulated crash in the embedder")
        yield positions, np.asarray([[float(p)] * 3 for p in positions], np.float32)

    store = EmbeddingStore(root)
    with pytest.raises(RuntimeError):
        store.embed_incrementally("d", "m", ids, "fp", dies_on_third_chunk, chunk_size=4)
    parts = [k for k in keys_under(s3_endpoint, "resume/lake/") if "/_staging/" in k and k.endswith(".parquet")]
    assert len(parts) == 2 and not store.exists("d", "m")

    def embed(positions):
        yield positions, np.asarray([[float(p)] * 3 for p in positions], np.float32)

    report = store.embed_incrementally("d", "m", ids, "fp", embed, chunk_size=4)
    assert (report.resumed, report.new, report.total) == (8, 4, 12)
    table = store.read("d", "m")
    assert list(table.image_ids) == ids and table.vectors[:, 0].tolist() == [float(i) for i in range(12)]
    assert not [k for k in keys_under(s3_endpoint, "resume/lake/") if "/_staging/" in k and k.endswith(".parquet")]


def test_sql_on_the_embeddings_view_reads_the_bucket(s3_demo):
    tmp_path, _, _ = s3_demo
    frame = warehouse.query(tmp_path / "data" / "warehouse.duckdb", README_SQL)
    assert frame.to_dict("records") == [{"dataset": "demo_shapes", "model": "raw-pixels", "vectors": 54, "dim": 192}]


def test_nfhm_sql_command_reads_the_remote_lake(s3_demo, monkeypatch, capsys):
    from nfhm_pipeline.cli import main as nfhm

    tmp_path, _, _ = s3_demo
    monkeypatch.setenv("NFHM_DATA_DIR", str(tmp_path / "data"))
    assert nfhm(["sql", "--csv", "SELECT count(*) AS n FROM embeddings WHERE model = 'raw-pixels'"]) == 0
    assert capsys.readouterr().out.split() == ["n", "54"]


def test_warehouse_records_the_lake_root_without_secrets(s3_endpoint, tmp_path):
    root = lake_uri(s3_endpoint, "secret/lake") + "&access_key=nfhm-test-key&secret_key=nfhm-test-secret"
    db = tmp_path / "w.duckdb"
    warehouse.refresh_embedding_view(db, root)
    stored = warehouse.query(db, "SELECT root FROM nfhm_lake")["root"][0]
    assert "nfhm-test-secret" not in stored and "nfhm-test-key" not in stored
    assert stored == redact(root) and "endpoint_override" in stored


def test_empty_remote_lake_gives_an_empty_embeddings_view(s3_endpoint, tmp_path):
    root = lake_uri(s3_endpoint, "empty/lake")
    db = tmp_path / "w.duckdb"
    warehouse.refresh_embedding_view(db, root)
    frame = warehouse.query(db, README_SQL)
    assert frame.empty and list(frame.columns) == ["dataset", "model", "vectors", "dim"]
    assert lake_dataset(root).schema.names == ["image_id", "embedding", "dataset", "model"]


def test_checkpoint_parts_never_show_in_the_embeddings_view(s3_endpoint):
    root = lake_uri(s3_endpoint, "parts/lake")
    store = EmbeddingStore(root)

    def dies(positions):
        yield positions, np.zeros((len(positions), 2), np.float32)
        raise RuntimeError("crash after one chunk")

    with pytest.raises(RuntimeError):
        store.embed_incrementally("d", "m", ["a", "b", "c"], "fp", dies, chunk_size=2)
    assert lake_dataset(root).count_rows() == 0


def test_unreachable_endpoint_gives_a_storage_error_naming_the_lake(s3_endpoint):
    root = f"s3://{BUCKET}/x?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"
    with pytest.raises(StorageError, match=r"cannot reach the embedding lake s3://nfhm-lake/x\?endpoint_override=127.0.0.1:"):
        EmbeddingStore(root).read("d", "m")
