"""No-change reruns stay cheap (issue 14 item 4): a nightly re-embed that finds the manifest's
images stored under the model's current fingerprint records its run (new=0) without loading the
model; a changed weights file or catalog entry does re-embed.

Loads are counted on disk: the model is a loader registered in LOADERS for these tests that appends
a line to a trace file and then builds the project's real tiny open_clip model from its weights file
(open_clip's own pretrained=<file> path). Runs are real `dagster.materialize` runs on a tmp data dir.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pytest

from conftest import local_resources
from helpers import materialize, write_leaves, write_leaves_catalog
from nfhm_pipeline.embedders.loaders import LOADERS, LoaderRecord, load_key
from nfhm_pipeline.embedders.tiny import TINY_OPENCLIP_NAME, build_tiny_openclip_checkpoint, build_tiny_hf_hub_cache
from nfhm_pipeline.store import warehouse

TRACED = "traced_tiny_clip"
NAMES = [f"{species}_{i}" for species in ("oak", "ash", "elm") for i in range(4)]  # 12 images


def _tiny_spec(spec: dict) -> dict:
    return {"loader": "open_clip", "model": TINY_OPENCLIP_NAME, "pretrained": spec["weights"]}


def load_traced(spec: dict, *, model_id: str, device="cpu", precision="fp32", cache_dir=None):
    """Append one line to the file ``spec['trace']``, then load the real tiny open_clip model."""
    from nfhm_pipeline.embedders.openclip import load_open_clip

    with open(spec["trace"], "a", encoding="utf-8") as f:
        f.write(f"loaded {model_id}\n")
    return load_open_clip(_tiny_spec(spec), model_id=model_id, device=device, precision=precision,
                          cache_dir=cache_dir)


def traced_files(spec: dict, *, model_id: str, cache_dir=None):
    """The files the load reads: the open_clip loader's own resolution of the same weights."""
    return LOADERS["open_clip"].files(_tiny_spec(spec), model_id=model_id, cache_dir=cache_dir)


class Pipeline:
    """The 'leaves' dataset and the traced model 'tiny' in a fresh data dir, run through Dagster."""

    def __init__(self, root: Path, instance):
        import dagster  # noqa: F401  (the definitions below need it)

        from nfhm_pipeline.catalog import load_catalog
        from nfhm_pipeline.definitions import build_definitions

        self.root, self.instance = root, instance
        self.weights = build_tiny_openclip_checkpoint(root / "weights" / "tiny.safetensors", seed=0)
        self.trace = root / "loads.txt"
        self.trace.write_text("", encoding="utf-8")
        csv = write_leaves(root / "leaves", NAMES)
        catalog = write_leaves_catalog(root / "catalog.yaml", csv, {
            "tiny": f"loader: {TRACED}\nweights: {self.weights}\ntrace: {self.trace}",
            "px": "loader: raw_pixels\nimage_size: 8"})
        self.data = root / "data"
        self.defs = build_definitions(load_catalog(catalog), local_resources(self.data))
        assert materialize(self.defs, instance, "leaves", ["image_manifest"]).success

    def loads(self) -> int:
        return len(self.trace.read_text(encoding="utf-8").splitlines())

    def embed(self, model: str = "tiny"):
        result = materialize(self.defs, self.instance, "leaves", ["image_embeddings", "text_embeddings"], model)
        assert result.success
        return result

    def last_run(self) -> dict:
        rows = warehouse.query(self.data / "warehouse.duckdb",
                               "SELECT * FROM embedding_runs WHERE dataset = 'leaves' AND model = 'tiny'")
        return rows.iloc[-1].to_dict()

    @property
    def table(self) -> Path:
        [part] = (self.data / "lake" / "embeddings" / "dataset=leaves" / "model=tiny").glob("part-*.parquet")
        return part  # a small collection: one part

    @property
    def text_table(self) -> Path:
        return self.data / "lake" / "text_embeddings" / "dataset=leaves" / "model=tiny" / "text_embeddings.parquet"


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    import dagster as dg

    monkeypatch.setitem(LOADERS, TRACED, LoaderRecord(TRACED, load_traced, frozenset({"weights", "trace"}),
                                                      path_fields=frozenset({"weights"}), files=traced_files))
    with dg.instance_for_test() as instance:
        yield Pipeline(tmp_path, instance)


def _metadata(result, stage: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(f"leaves__{stage}")[0].metadata.items()}


def _messages(pipeline: Pipeline, result) -> list[str]:
    return [e.user_message for e in pipeline.instance.all_logs(result.run_id) if e.user_message]


def test_an_unchanged_rerun_loads_no_model_embeds_nothing_and_records_its_run(pipeline):
    # A warehouse written before decode_s / forward_s existed (the manifest run made the others):
    # its embedding_runs table gains them.
    with duckdb.connect(str(pipeline.data / "warehouse.duckdb")) as con:
        con.execute("DROP TABLE embedding_runs")
        con.execute("CREATE TABLE embedding_runs (dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, "
                    "fingerprint VARCHAR, images BIGINT, new BIGINT)")
        con.execute("INSERT INTO embedding_runs VALUES ('old', 'model', 'fp', 1, 1)")

    first = pipeline.embed()
    assert pipeline.loads() == 2  # each stage loads once: neither table existed
    run = pipeline.last_run()
    assert (run["new"], run["reused"]) == (len(NAMES), 0)
    assert run["decode_s"] >= 0 and run["forward_s"] > 0
    # The run log shows the progress: done / total, images/s.
    progress = [m for m in _messages(pipeline, first) if "leaves/tiny embedding:" in m]
    assert progress and re.search(rf"{len(NAMES)}/{len(NAMES)} images in \d+:\d\d, [\d.]+ images/s", progress[-1])
    written = pipeline.table.stat().st_mtime_ns, pipeline.text_table.stat().st_mtime_ns

    again = pipeline.embed()
    assert pipeline.loads() == 2  # not loaded again, by either stage
    run = pipeline.last_run()
    assert (run["new"], run["reused"], run["images"]) == (0, len(NAMES), len(NAMES))
    assert (run["decode_s"], run["forward_s"]) == (0.0, 0.0)
    assert (pipeline.table.stat().st_mtime_ns, pipeline.text_table.stat().st_mtime_ns) == written  # not rewritten
    meta = _metadata(again, "image_embeddings")
    assert meta["model_loaded"] is False and meta["new"] == 0 and meta["dim"] == 32
    assert _metadata(again, "text_embeddings")["model_loaded"] is False
    checks = {c.check_name: c.passed for c in again.get_asset_check_evaluations()}
    assert checks == {"every_image_embedded": True, "vectors_finite": True, "dimension_as_declared": True}
    assert any("model not loaded" in m for m in _messages(pipeline, again))

    old = warehouse.query(pipeline.data / "warehouse.duckdb", "SELECT * FROM embedding_runs WHERE dataset = 'old'")
    assert len(old) == 1 and old["decode_s"].isna().all() and old["forward_s"].isna().all()


def test_a_model_without_text_tower_keeps_its_empty_text_table_without_loading(pipeline):
    first = pipeline.embed("px")
    assert _metadata(first, "text_embeddings") == {"dagster/row_count": 0, "text_tower": False, "model_loaded": True}
    again = pipeline.embed("px")
    assert _metadata(again, "text_embeddings") == {"dagster/row_count": 0, "text_tower": False, "model_loaded": False}
    assert _metadata(again, "image_embeddings")["model_loaded"] is False


def test_changed_weights_re_embed_and_touched_weights_only_reload(pipeline):
    pipeline.embed()
    first_fingerprint = pipeline.last_run()["fingerprint"]
    assert pipeline.loads() == 2

    # Same bytes, new mtime: the load key changes, so the model is loaded once (by whichever stage
    # runs first; the other then knows the fingerprint), which proves nothing changed: no re-embed.
    os.utime(pipeline.weights, ns=(pipeline.weights.stat().st_atime_ns, pipeline.weights.stat().st_mtime_ns + 10**9))
    pipeline.embed()
    assert pipeline.loads() == 3
    run = pipeline.last_run()
    assert (run["new"], run["fingerprint"]) == (0, first_fingerprint)

    # Other weights (another seed) in the same file: both stages load, and every image is embedded again.
    build_tiny_openclip_checkpoint(pipeline.weights, seed=1)
    result = pipeline.embed()
    assert pipeline.loads() == 5
    run = pipeline.last_run()
    assert run["new"] == len(NAMES) and run["reused"] == 0 and run["fingerprint"] != first_fingerprint
    assert _metadata(result, "text_embeddings")["model_loaded"] is True
    pipeline.embed()
    assert pipeline.loads() == 5 and pipeline.last_run()["new"] == 0


def test_tables_embedded_before_the_fingerprint_memo_existed_are_recognised_not_re_embedded(pipeline):
    import shutil

    pipeline.embed()
    shutil.rmtree(pipeline.data / "cache" / "fingerprints")  # what a version without the memo left
    pipeline.embed()
    assert pipeline.loads() == 3  # one load: its fingerprint is the stored one
    assert pipeline.last_run()["new"] == 0
    pipeline.embed()
    assert pipeline.loads() == 3


# -- the load key: what it covers ---------------------------------------------------------------------

def test_load_key_changes_with_the_catalog_entry_and_the_precision():
    base = {"loader": "raw_pixels", "id": "px", "image_size": 16}
    assert load_key(base) == load_key(dict(base))
    assert load_key({**base, "image_size": 8}) != load_key(base)
    assert load_key(base, precision="fp16") != load_key(base)


def test_load_key_changes_with_the_weights_file_and_is_none_when_it_is_missing(tmp_path):
    weights = build_tiny_openclip_checkpoint(tmp_path / "w.safetensors", seed=0)
    spec = {"loader": "open_clip", "id": "tiny", "model": TINY_OPENCLIP_NAME, "pretrained": str(weights)}
    key = load_key(spec)
    assert key is not None and load_key(spec) == key
    build_tiny_openclip_checkpoint(weights, seed=1)  # same path, other bytes
    assert load_key(spec) != key
    assert load_key({**spec, "pretrained": str(tmp_path / "absent.safetensors")}) is None


def test_load_key_of_a_hub_model_follows_the_cached_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {"loader": "open_clip", "id": "hub-tiny", "model": "hf-hub:nfhm/tiny-clip"}
    cache = tmp_path / "hub"
    assert load_key(spec, cache_dir=cache) is None  # nothing cached: only a load can say what is missing
    build_tiny_hf_hub_cache(cache, seed=0)
    key = load_key(spec, cache_dir=cache)
    assert key is not None and load_key(spec, cache_dir=cache) == key
    build_tiny_hf_hub_cache(cache, seed=1)  # a new upload fetched: refs/main names another snapshot
    assert load_key(spec, cache_dir=cache) not in (None, key)


def test_a_loader_kind_that_cannot_name_its_files_always_loads(monkeypatch):
    monkeypatch.setitem(LOADERS, "opaque", LoaderRecord("opaque", load_traced, frozenset({"weights", "trace"})))
    assert load_key({"loader": "opaque", "id": "x", "weights": "w", "trace": "t"}) is None
