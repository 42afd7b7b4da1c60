"""Schedules, sensors and automation conditions, driven through Dagster's own evaluation APIs.

Every test builds the real ``Definitions`` from a small catalog written in ``tmp_path`` and uses
a real (temporary) Dagster instance; materializations are real runs except where a test only
needs "this partition exists" as the starting state (then a runless materialization event, the
instance's own API for recording work done elsewhere, stands in for minutes of embedding).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import multiprocessing as mp
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml
from PIL import Image

from conftest import local_resources
from helpers import SPECIMENS_DATASET, write_leaves_catalog
from helpers import write_leaves as shared_write_leaves
from nfhm_pipeline import automation as automation_module
from nfhm_pipeline.ingest import fingerprint
from nfhm_pipeline.automation import (
    DEFAULT_REEMBED_CRON, SOURCE_FINGERPRINT_KEY, build_manifest_sensor, fingerprint_source, source_fingerprint,
)
from nfhm_pipeline.ingest import READERS
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.store import warehouse

MODELS = {"raw-pixels": 8, "raw-pixels-4": 4}
CLASSES = ("acer", "betula", "quercus")


def write_leaves(root: Path, per_class: int = 4) -> Path:
    """A label_csv collection: ``root/images/<class>_<i>.png`` (distinct colours) + ``root/leaves.csv``."""
    names = [f"{name}_{i}" for name in CLASSES for i in range(per_class)]

    def colour(_, leaf: str):
        name, i = leaf.rsplit("_", 1)
        c = CLASSES.index(name)
        return Image.new("RGB", (12, 12), (40 + 60 * c, 10 + 20 * int(i), 200 - 50 * c))

    return shared_write_leaves(root, names, image=colour)


def write_catalog(tmp_path: Path, models=MODELS, *, folder: Path | None = None, name="catalog.yaml") -> Path:
    csv = tmp_path / "leaves" / "leaves.csv"
    if not csv.exists():
        write_leaves(tmp_path / "leaves")
    bark = f"bark:\n  reader: image_folder\n  root: {folder}\n  labels: [label]\n" if folder is not None else ""
    return write_leaves_catalog(tmp_path / name, csv,
                                {k: f"loader: raw_pixels\nimage_size: {s}" for k, s in models.items()},
                                leaves_extra="models: [raw-pixels]", extra_datasets=SPECIMENS_DATASET + bark)


def defs_for(catalog_path: Path, data_dir: Path) -> dg.Definitions:
    return build_definitions(load_catalog(catalog_path), local_resources(data_dir))


def requested(result) -> set[tuple[str, str | None]]:
    """(asset key, partition) pairs an automation evaluation requested."""
    return {(r.key.to_user_string(), p) for r in result.results if isinstance(r.key, dg.AssetKey)
            for p in result.get_requested_partitions(r.key)}


def materialize(defs: dg.Definitions, instance, keys, partition_key=None):
    result = dg.materialize(list(defs.assets), selection=[dg.AssetKey(k) for k in keys], instance=instance,
                            resources=defs.resources, partition_key=partition_key, raise_on_error=False)
    assert result.success, [e.event_specific_data.error.message for e in result.all_events
                            if e.event_type_value == "STEP_FAILURE"]
    return result


# -- schedule ------------------------------------------------------------------------------------

def schedule_tick(defs: dg.Definitions, instance, name: str, tick: dt.datetime):
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                        repository_def=defs.get_repository_def())
    return defs.resolve_schedule_def(name).evaluate_tick(context).run_requests


def test_schedules_request_one_partitioned_run_per_dataset_and_model(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    dg.Definitions.validate_loadable(defs)  # datasets with different model lists still load
    tick = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.timezone.utc)
    with dg.instance_for_test() as instance:
        requests = [r for ds in ("leaves", "specimens") for r in schedule_tick(defs, instance, f"reembed_{ds}", tick)]
    got = sorted((r.tags["nfhm/dataset"], r.partition_key) for r in requests)
    # 'leaves' is limited to raw-pixels in the catalog; 'specimens' gets every model.
    assert got == [("leaves", "raw-pixels"), ("specimens", "raw-pixels"), ("specimens", "raw-pixels-4")]
    for r in requests:
        ds = r.tags["nfhm/dataset"]
        assert set(r.asset_selection) == {dg.AssetKey([ds, "image_embeddings"]), dg.AssetKey([ds, "text_embeddings"])}
        assert tick.isoformat() in r.run_key  # a new key each night: run keys are deduplicated forever
    assert {s.name for s in defs.schedules} == {"reembed_leaves", "reembed_specimens"}


def test_schedule_run_keys_differ_between_nights(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    with dg.instance_for_test() as instance:
        keys = [{r.run_key for r in schedule_tick(defs, instance, "reembed_specimens",
                                                   dt.datetime(2025, 3, day, 2, 0, tzinfo=dt.timezone.utc))}
                for day in (1, 2)]
    assert len(keys[0]) == 2 and keys[0].isdisjoint(keys[1])


def test_scheduled_run_request_executes_as_a_partitioned_run(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    with dg.instance_for_test() as instance:
        materialize(defs, instance, [["leaves", "image_manifest"]])
        [request] = schedule_tick(defs, instance, "reembed_leaves", dt.datetime(2025, 3, 1, 2, 0))
        result = dg.materialize(list(defs.assets), selection=request.asset_selection, instance=instance,
                                resources=defs.resources, partition_key=request.partition_key, tags=request.tags)
        assert result.success
    runs = warehouse.read_table(tmp_path / "data" / "warehouse.duckdb", "embedding_runs", dataset="leaves")
    assert list(runs["model"]) == ["raw-pixels"] and list(runs["new"]) == [12]


def test_reembed_cron_is_nightly_by_default_and_set_by_environment(tmp_path, monkeypatch):
    catalog = write_catalog(tmp_path)
    monkeypatch.delenv("NFHM_REEMBED_CRON", raising=False)
    assert defs_for(catalog, tmp_path / "d").resolve_schedule_def("reembed_leaves").cron_schedule == DEFAULT_REEMBED_CRON
    monkeypatch.setenv("NFHM_REEMBED_CRON", "30 4 * * 1")
    assert defs_for(catalog, tmp_path / "d").resolve_schedule_def("reembed_leaves").cron_schedule == "30 4 * * 1"


# -- sensor --------------------------------------------------------------------------------------

def sensor_tick(defs: dg.Definitions, instance, cursor):
    sensor = defs.resolve_sensor_def("manifest_source_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def())
    data = sensor.evaluate_tick(context)
    return {r.tags["nfhm/dataset"]: r for r in data.run_requests}, data.cursor


def test_sensor_requests_manifests_on_first_tick_then_only_after_a_source_changes(tmp_path):
    folder = tmp_path / "bark"
    for label in ("smooth", "rough"):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 90, 90) if label == "smooth" else (30, 60, 20)).save(folder / label / "a.png")
    defs = defs_for(write_catalog(tmp_path, folder=folder), tmp_path / "data")
    csv = tmp_path / "leaves" / "leaves.csv"
    with dg.instance_for_test() as instance:
        first, cursor = sensor_tick(defs, instance, None)
        assert set(first) == {"leaves", "specimens", "bark"}
        assert set(first["leaves"].asset_selection) == {dg.AssetKey(["leaves", "image_manifest"]),
                                                        dg.AssetKey(["leaves", "splits"])}

        unchanged, cursor = sensor_tick(defs, instance, cursor)
        assert unchanged == {}

        Image.new("RGB", (12, 12), (1, 2, 3)).save(tmp_path / "leaves" / "images" / "acer_new.png")
        csv.write_text(csv.read_text(encoding="utf-8") + "images/acer_new.png,acer\n", encoding="utf-8")
        changed, cursor = sensor_tick(defs, instance, cursor)
        assert set(changed) == {"leaves"}
        assert changed["leaves"].run_key != first["leaves"].run_key

        Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "rough" / "b.png")  # a new file, no CSV
        added, cursor = sensor_tick(defs, instance, cursor)
        assert set(added) == {"bark"}

        assert sensor_tick(defs, instance, cursor)[0] == {}


def test_sensor_notices_an_image_rewritten_in_place_under_an_unchanged_csv(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    with dg.instance_for_test() as instance:
        _, cursor = sensor_tick(defs, instance, None)
        image = tmp_path / "leaves" / "images" / "betula_0.png"
        Image.new("RGB", (13, 13), (7, 7, 7)).save(image)  # other bytes → another image_id
        changed, _ = sensor_tick(defs, instance, cursor)
    assert set(changed) == {"leaves"}


def test_sensor_survives_a_missing_source_and_fires_when_it_appears(tmp_path):
    catalog = write_catalog(tmp_path)
    csv = tmp_path / "leaves" / "leaves.csv"
    text = csv.read_text(encoding="utf-8")
    csv.unlink()
    defs = defs_for(catalog, tmp_path / "data")
    with dg.instance_for_test() as instance:
        _, cursor = sensor_tick(defs, instance, None)  # the run it asks for fails with a clear ManifestError
        csv.write_text(text, encoding="utf-8")
        changed, _ = sensor_tick(defs, instance, cursor)
    assert set(changed) == {"leaves"}


def test_generated_dataset_fingerprint_changes_with_its_parameters_only(tmp_path):
    spec = load_catalog(write_catalog(tmp_path)).datasets["specimens"]
    same = load_catalog(write_catalog(tmp_path, name="same.yaml")).datasets["specimens"]
    bigger = dataclasses.replace(spec, params={**spec.params, "images_per_species": 3})
    assert source_fingerprint(same) == source_fingerprint(spec)
    assert source_fingerprint(bigger) != source_fingerprint(spec)


def test_every_reader_that_names_image_files_lists_them_for_the_sensor():
    # chexpert_csv was once missing: an X-ray rewritten under an unchanged CSV went unnoticed.
    for name, record in READERS.items():
        names_images = "image_root" in record.fields or "root" in record.fields
        assert record.lists_images == names_images, name
        if record.listing is not None:
            assert record.listing.csv_field in record.required and record.listing.csv_field in record.hashed_fields


def test_sensor_notices_an_xray_rewritten_under_an_unchanged_chexpert_csv(tmp_path):
    root = tmp_path / "chest"
    root.mkdir()
    lines = ["Path,Edema,Cardiomegaly"]
    for i in range(6):
        Image.new("L", (10, 10), 40 * i).save(root / f"view_{i}.png")
        lines.append(f"view_{i}.png,{i % 2}.0,{(i // 2) % 2}.0")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    catalog = tmp_path / "chest.yaml"
    catalog.write_text(textwrap.dedent(f"""
        datasets:
          chest:
            reader: chexpert_csv
            csv: {root / "labels.csv"}
            findings: [Edema, Cardiomegaly]
            labels: [label]
            split: {{test_fraction: 0.25, seed: 0, folds: 2}}
        models:
          raw-pixels: {{loader: raw_pixels, image_size: 8}}
        """), encoding="utf-8")
    defs = defs_for(catalog, tmp_path / "data")
    with dg.instance_for_test() as instance:
        first, cursor = sensor_tick(defs, instance, None)
        assert set(first) == {"chest"}
        assert sensor_tick(defs, instance, cursor)[0] == {}
        Image.new("L", (11, 11), 255).save(root / "view_3.png")  # new bytes, same name, same CSV
        changed, _ = sensor_tick(defs, instance, cursor)
    assert set(changed) == {"chest"}
    assert fingerprint_source(load_catalog(catalog).datasets["chest"]).files_stated == 6


def write_big_csv(folder: Path, rows: int, distinct: int) -> Path:
    """A label_csv listing ``distinct`` PNGs (written when few) over ``rows`` rows."""
    (folder / "img").mkdir(parents=True)
    if distinct <= 100:
        for i in range(distinct):
            Image.new("RGB", (6, 6), (i, 2 * i, 3 * i)).save(folder / "img" / f"{i}.png")
    body = "".join(f"img/{i % distinct}.png,{'ab'[i % distinct % 2]}\n" for i in range(rows))
    csv = folder / "big.csv"
    csv.write_text("path,species\n" + body, encoding="utf-8")
    return csv


def big_catalog(tmp_path: Path, csv: Path) -> Path:
    path = tmp_path / "big.yaml"
    path.write_text(write_catalog(tmp_path).read_text(encoding="utf-8").replace("models:\n", textwrap.indent(
        textwrap.dedent(f"""
        huge:
          reader: label_csv
          csv: {csv}
          path_column: path
          labels: [species]
        """), "  ") + "models:\n", 1), encoding="utf-8")
    return path


def test_sensor_tick_on_a_million_row_csv_stats_each_listed_file_once(tmp_path):
    csv = write_big_csv(tmp_path / "huge", 1_000_000, 30)
    catalog = big_catalog(tmp_path, csv)
    fingerprint = fingerprint_source(load_catalog(catalog).datasets["huge"])
    # The CSV is read for its path column only; 30 distinct files, 30 stat calls (not a million).
    assert (fingerprint.listed_rows, fingerprint.files_stated, fingerprint.sampled) == (1_000_000, 30, False)
    defs = defs_for(catalog, tmp_path / "data")
    with dg.instance_for_test() as instance:
        first, cursor = sensor_tick(defs, instance, None)
        assert set(first) == {"leaves", "specimens", "huge"}
        Image.new("RGB", (7, 7), (9, 9, 9)).save(tmp_path / "huge" / "img" / "17.png")  # rewritten in place
        assert set(sensor_tick(defs, instance, cursor)[0]) == {"huge"}


def test_many_distinct_listed_files_are_stated_as_a_bounded_stable_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "STAT_SAMPLE_LIMIT", 500)  # the real limit is 50 000 files
    csv = write_big_csv(tmp_path / "many", 20_000, 5_000)
    spec = load_catalog(big_catalog(tmp_path, csv)).datasets["huge"]
    first, again = fingerprint_source(spec), fingerprint_source(spec)
    assert (first.listed_rows, first.files_stated, first.sampled) == (20_000, 500, True)
    assert first.digest == again.digest  # the same sample every tick: no change, no run
    (tmp_path / "many" / "img" / "new.png").write_bytes(b"x")  # the folder's mtime changes
    assert fingerprint_source(spec).digest != first.digest


class StepClock:
    """A ``time`` stand-in whose ``monotonic()`` moves ``step`` seconds on every read: a budget then
    means a number of budget checks, the same on any machine (a real 0.2 s budget was not: a fast
    machine read the million-row CSV inside it)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_a_dataset_past_its_time_budget_is_skipped_without_blocking_the_others(tmp_path, monkeypatch):
    # One budget check per MiB hashed and per 200 000 CSV rows: the huge dataset makes about 17, a
    # 12-row CSV or generated demo parameters at most 3. A 0.1 s budget at 0.01 s a read allows 10.
    clock = StepClock(0.01)
    monkeypatch.setattr(fingerprint, "time", clock)
    monkeypatch.setattr(automation_module, "time", clock)
    csv = write_big_csv(tmp_path / "huge", 1_000_000, 30)
    catalog_path = big_catalog(tmp_path, csv)
    defs = defs_for(catalog_path, tmp_path / "data")
    catalog = load_catalog(catalog_path)

    def tick(sensor, cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def())
        data = sensor.evaluate_tick(context)
        return {r.tags["nfhm/dataset"] for r in data.run_requests}, json.loads(data.cursor)

    with dg.instance_for_test() as instance:
        got, cursor = tick(build_manifest_sensor(catalog, dataset_budget_s=0.1), None)
        assert got == {"leaves", "specimens"} and cursor["skipped"] == ["huge"]
        assert set(cursor["fingerprints"]) == {"leaves", "specimens"}
        got, cursor = tick(build_manifest_sensor(catalog), json.dumps(cursor))  # retried next tick
        assert got == {"huge"} and cursor["skipped"] == []

        # A dataset whose fingerprint raises (here a catalog entry built in code with a number for a
        # path) is skipped the same way; the others are still looked at.
        broken = dataclasses.replace(catalog.datasets["leaves"], name="broken",
                                     params={**catalog.datasets["leaves"].params, "csv": 5})
        with_broken = dataclasses.replace(catalog, datasets={"broken": broken, **catalog.datasets})
        got, cursor = tick(build_manifest_sensor(with_broken), None)
        assert got == {"leaves", "specimens", "huge"} and cursor["skipped"] == ["broken"]

        # A tick whose whole budget is spent skips what is left and starts there the next time.
        got, spent = tick(build_manifest_sensor(catalog, tick_budget_s=0.0), None)
        assert got == set() and sorted(spent["skipped"]) == ["huge", "leaves", "specimens"]


def test_first_tick_after_a_materialized_demo_requests_nothing_until_a_source_changes(tmp_path):
    folder = tmp_path / "bark"
    for label in ("smooth", "rough"):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 90, 90) if label == "smooth" else (30, 60, 20)).save(folder / label / "a.png")
    defs = defs_for(write_catalog(tmp_path, folder=folder), tmp_path / "data")
    with dg.instance_for_test() as instance:
        materialize(defs, instance, [[ds, "image_manifest"] for ds in ("leaves", "specimens", "bark")])
        event = instance.get_latest_materialization_event(dg.AssetKey(["leaves", "image_manifest"]))
        assert SOURCE_FINGERPRINT_KEY in event.asset_materialization.metadata
        # `make ui` after `make demo`: a fresh sensor (no cursor) finds every manifest up to date.
        nothing, cursor = sensor_tick(defs, instance, None)
        assert nothing == {}
        assert sensor_tick(defs, instance, cursor)[0] == {}

        Image.new("RGB", (12, 12), (5, 5, 5)).save(tmp_path / "leaves" / "images" / "acer_1.png")
        changed, _ = sensor_tick(defs, instance, cursor)
        assert set(changed) == {"leaves"}
        changed, _ = sensor_tick(defs, instance, None)  # also with a fresh cursor: not what was materialized
        assert set(changed) == {"leaves"}


# -- automation conditions -----------------------------------------------------------------------

def test_embeddings_then_metrics_follow_a_manifest_update_through_eager_conditions(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    leaves = dg.AssetSelection.groups("leaves")
    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=leaves)
        assert result.total_requested == 0  # nothing exists yet: the sensor starts things, not eagerness

        materialize(defs, instance, [["leaves", "image_manifest"], ["leaves", "splits"]])  # the sensor's run
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=leaves,
                                                   cursor=result.cursor)
        # Embeddings of every model, and in the same tick what depends on them (run in order).
        per_model = {"image_embeddings", "text_embeddings", "knn_metrics", "linear_probe_metrics",
                     "zero_shot_metrics", "embedding_maps"}
        assert requested(result) == {(f"leaves/{a}", "raw-pixels") for a in per_model}

        # The run that tick asked for (probes and maps left out: they are slow and not the point here).
        materialize(defs, instance, [["leaves", "image_embeddings"], ["leaves", "text_embeddings"],
                                     ["leaves", "knn_metrics"]], "raw-pixels")
        metrics = warehouse.read_table(tmp_path / "data" / "warehouse.duckdb", "metrics", dataset="leaves")
        assert set(metrics["model"]) == {"raw-pixels"}
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=leaves,
                                                   cursor=result.cursor)

        # Later only the embeddings update (the nightly schedule): the metrics follow, nothing else.
        materialize(defs, instance, [["leaves", "image_embeddings"]], "raw-pixels")
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=leaves,
                                                   cursor=result.cursor)
        assert requested(result) == {(f"leaves/{a}", "raw-pixels") for a in (
            "knn_metrics", "linear_probe_metrics", "zero_shot_metrics", "embedding_maps")}


def test_model_added_to_catalog_is_a_new_partition_and_gets_backfilled(tmp_path):
    one = write_catalog(tmp_path, {"raw-pixels": 8}, name="one.yaml")
    two = write_catalog(tmp_path, {"raw-pixels": 8, "raw-pixels-4": 4}, name="two.yaml")
    defs = defs_for(one, tmp_path / "data")
    specimens = dg.AssetSelection.groups("specimens")
    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=specimens)
        # Starting state: every asset of the one-model catalog materialized (recorded, not recomputed).
        for asset in defs.assets:
            for key in asset.keys:
                if key.path[0] != "specimens":
                    continue
                for partition in (asset.partitions_def.get_partition_keys() if asset.partitions_def else [None]):
                    instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=specimens,
                                                   cursor=result.cursor)
        assert result.total_requested == 0

        grown = defs_for(two, tmp_path / "data")  # the code location reloads with the new catalog
        embeddings = grown.resolve_assets_def(dg.AssetKey(["specimens", "image_embeddings"]))
        assert embeddings.partitions_def.get_partition_keys() == ["raw-pixels", "raw-pixels-4"]
        result = dg.evaluate_automation_conditions(defs=grown, instance=instance, asset_selection=specimens,
                                                   cursor=result.cursor)
        got = requested(result)
        assert ("specimens/image_embeddings", "raw-pixels-4") in got
        assert ("specimens/knn_metrics", "raw-pixels-4") in got
        assert all(partition == "raw-pixels-4" for _, partition in got)  # the old model is left alone

        again = dg.evaluate_automation_conditions(defs=grown, instance=instance, asset_selection=specimens,
                                                  cursor=result.cursor)
        assert again.total_requested == 0  # requested once, not on every tick


def test_automation_sensor_is_declared_running(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    sensor = defs.resolve_sensor_def("nfhm_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_sensor_def("manifest_source_sensor").default_status == dg.DefaultSensorStatus.RUNNING


# -- a run with no changes -----------------------------------------------------------------------

def test_rerun_without_changes_embeds_nothing(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    db = tmp_path / "data" / "warehouse.duckdb"
    with dg.instance_for_test() as instance:
        materialize(defs, instance, [["specimens", "image_manifest"]])
        seconds = []
        for _ in range(2):
            result = materialize(defs, instance, [["specimens", "image_embeddings"]], "raw-pixels")
            meta = result.asset_materializations_for_node("specimens__image_embeddings")[0].metadata
            seconds.append(meta["seconds"].value)
    runs = warehouse.query(db, "SELECT * FROM embedding_runs WHERE dataset = 'specimens' ORDER BY finished_at")
    first, second = runs.iloc[0], runs.iloc[1]
    assert (first["new"], first["reused"]) == (54, 0)
    assert (second["images"], second["new"], second["reused"], second["removed"], second["resumed"]) == (54, 0, 54, 0, 0)
    assert list(runs["seconds"]) == pytest.approx(seconds)
    # How much faster the no-op rerun is belongs in a benchmark, not here (a loaded CI machine flakes it).
    print(f"\nembedding run seconds: first {seconds[0]:.3f} s (54 new), unchanged rerun {seconds[1]:.3f} s (0 new)")


# -- partitions in parallel ----------------------------------------------------------------------

def _materialize_partition(catalog: str, data_dir: str, dagster_home: str, model: str) -> None:
    """One model's embeddings and kNN metrics, in a process of its own sharing data dir and instance."""
    defs = defs_for(Path(catalog), Path(data_dir))
    with dg.instance_for_test(temp_dir=dagster_home) as instance:
        materialize(defs, instance, [["specimens", "image_embeddings"], ["specimens", "knn_metrics"]], model)


def test_two_partitions_materialized_concurrently_lose_no_warehouse_rows(tmp_path):
    catalog = write_catalog(tmp_path)
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        materialize(defs_for(catalog, data), instance, [["specimens", "image_manifest"], ["specimens", "splits"]])
    # Two processes, as the multiprocess executor or two run workers would start them; DuckDB lets
    # one process write at a time and the warehouse retries the lock instead of failing.
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_materialize_partition, args=(str(catalog), str(data), str(home), m))
             for m in ("raw-pixels", "raw-pixels-4")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    db = data / "warehouse.duckdb"
    runs = warehouse.read_table(db, "embedding_runs", dataset="specimens")
    assert sorted(runs["model"]) == ["raw-pixels", "raw-pixels-4"] and set(runs["new"]) == {54}
    metrics = warehouse.read_table(db, "metrics", dataset="specimens").groupby("model").size()
    assert set(metrics.index) == {"raw-pixels", "raw-pixels-4"} and metrics.nunique() == 1  # same rules, all rows
    predictions = warehouse.read_table(db, "predictions", dataset="specimens").groupby("model").size()
    assert set(predictions.index) == {"raw-pixels", "raw-pixels-4"} and predictions.nunique() == 1
    frame = warehouse.query(db, "SELECT model, count(*) AS n FROM embeddings GROUP BY model ORDER BY model")
    assert frame.values.tolist() == [["raw-pixels", 54], ["raw-pixels-4", 54]]  # the view sees both tables


# -- shipped executor and instance configs ---------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_shipped_multiprocess_run_config_is_valid_for_the_asset_job(tmp_path):
    defs = defs_for(write_catalog(tmp_path), tmp_path / "data")
    job = defs.resolve_implicit_job_def_def_for_assets([dg.AssetKey(["specimens", "image_embeddings"])])
    config = yaml.safe_load((DEPLOY / "dagster-multiprocess.yaml").read_text(encoding="utf-8"))
    resolved = dg.validate_run_config(job, config)["execution"]["multi_or_in_process_executor"]["multiprocess"]
    assert resolved["max_concurrent"] == 4 and "forkserver" in resolved["start_method"]


def test_shipped_instance_config_limits_pools_and_runs_per_model():
    overrides = yaml.safe_load((DEPLOY / "dagster-instance.yaml").read_text(encoding="utf-8"))
    with dg.instance_for_test(overrides=overrides) as instance:
        config = instance.get_concurrency_config()
    assert config.pool_config.default_pool_limit == 1
    assert config.run_queue_config.max_concurrent_runs == 8
    assert config.run_queue_config.tag_concurrency_limits[0]["key"] == "dagster/partition"


def test_k8s_run_config_gives_a_gpu_to_exactly_the_embedding_steps_of_the_shipped_catalog():
    config = yaml.safe_load((DEPLOY / "k8s-run-config.yaml").read_text(encoding="utf-8"))["execution"]["config"]
    defs = build_definitions(load_catalog("vlm4bio"), local_resources(Path("unused")))
    embedding_steps = {a.node_def.name for a in defs.assets if a.key.path[-1] in ("image_embeddings", "text_embeddings")}
    per_step = config["per_step_k8s_config"]
    assert set(per_step) == embedding_steps
    for step in per_step.values():
        assert step["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in config["step_k8s_config"]["container_config"]["resources"]["limits"]
    tag = yaml.safe_load((DEPLOY / "k8s-gpu-op-tags.yaml").read_text(encoding="utf-8"))["dagster-k8s/config"]
    assert tag["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
