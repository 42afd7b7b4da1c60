"""Evaluation defects of issue 11 (items 3, 4, 6, 12) and issue 16 (item 2), each with a test that
failed before the fix: plain loops as references, real DuckDB files and real Dagster runs.

- 11.3 per-group kNN of a group holding one class is skipped (it is right by construction);
- 11.4 every result row names its split; a new split makes the other models stale, and the
  automation asks for their metrics again; an asset's tables change in one transaction;
- 11.6 top-k with k >= the number of classes (100 % by construction) is omitted;
- 11.12 an all-zero vector is "no prediction", scored wrong, instead of failing the whole model;
- 16.2 a row without a label at a level is left out of that level only, never a class 'nan'.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import local_resources
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.evaluation.classification import summarize_predictions
from nfhm_pipeline.evaluation.knn import L2_RULES, RULES
from nfhm_pipeline.resources import NfhmStorage
from nfhm_pipeline.evaluation.tables import EvalTables, knn_tables, probe_tables, zero_shot_tables
from nfhm_pipeline.store import provenance, warehouse
from test_knn import brute_force_labels, brute_force_rankings

SPECIES = ["Acer", "Betula", "Carex", "Draba"]


def eval_frame(species, split, group=None, genus=None) -> pd.DataFrame:
    n = len(species)
    return pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(n)], "split": split,
                         "fold": [i % 2 for i in range(n)], "group": group if group is not None else [None] * n,
                         "species": species, "genus": genus if genus is not None else species})


def clustered_frame(seed=0, n=60, n_classes=4, dim=6, test_every=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 2
    cls = np.arange(n) % n_classes
    vectors = (centres[cls] + rng.normal(size=(n, dim))).astype(np.float32)
    split = np.where((np.arange(n) // n_classes) % test_every == 0, "test", "train")  # every class on both sides
    return eval_frame(np.array(SPECIES[:n_classes] + [f"x{i}" for i in range(max(0, n_classes - 4))])[cls], split), vectors


def metric(tables: EvalTables, name: str, level="species", grp="all") -> float:
    m = tables.frames()[0]
    row = m[(m["metric"] == name) & (m["level"] == level) & (m["grp"] == grp)]
    assert len(row) == 1, (name, level, grp, len(row))
    return float(row["value"].iloc[0])


# --- 11.12: all-zero vectors -------------------------------------------------------------------

def reference_scores(true, pred):
    """Plain loops: accuracy, balanced accuracy (mean recall over true classes) and macro-F1 over
    the classes in true or (real) predictions; None is no prediction: wrong, and not a class."""
    n = len(true)
    accuracy = sum(t == p for t, p in zip(true, pred)) / n
    recalls = [sum(t == p == c for t, p in zip(true, pred)) / sum(t == c for t in true) for c in sorted(set(true))]
    f1s = []
    for c in sorted(set(true) | {p for p in pred if p is not None}):
        tp = sum(t == p == c for t, p in zip(true, pred))
        n_pred, n_true = sum(p == c for p in pred), sum(t == c for t in true)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return accuracy, sum(recalls) / len(recalls), sum(f1s) / len(f1s)


def test_summary_counts_no_prediction_as_wrong_and_not_as_a_class():
    true = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", None, "b", "a", None, "c"]
    got = summarize_predictions(np.array(true), np.array(pred, dtype=object))
    ref = reference_scores(true, pred)
    assert (got["accuracy"], got["balanced_accuracy"], got["macro_f1"]) == pytest.approx(ref, abs=1e-15)
    assert got["n"] == 6


def test_knn_scores_a_zero_test_vector_wrong_and_leaves_a_zero_train_vector_out():
    frame, vectors = clustered_frame(seed=3)
    train_rows = np.flatnonzero(frame["split"] == "train")
    test_rows = np.flatnonzero(frame["split"] == "test")
    zero_train, zero_test = train_rows[5], test_rows[2]
    vectors[[zero_train, zero_test]] = 0.0

    tables = knn_tables(frame, vectors, ["species"], ks=(1, 2), device="cpu")  # failed: "train row 5 is all zeros"

    labels = frame["species"].to_numpy()
    kept_train = train_rows[train_rows != zero_train]
    scored = test_rows[test_rows != zero_test]
    plain = brute_force_labels(vectors[kept_train], list(labels[kept_train]), vectors[scored])
    l2 = brute_force_labels(vectors[kept_train], list(labels[kept_train]), vectors[scored], normalize_euclidean=True)
    reference = {**plain, "top1_euclidean_l2": l2["top1_euclidean"], "mean_euclidean_l2": l2["mean_euclidean"]}
    ranked = brute_force_rankings(vectors[kept_train], list(labels[kept_train]), vectors[scored])
    predictions = tables.frames()[2]
    for rule in (*RULES, *L2_RULES):
        pred = dict(zip(scored, reference[rule]))
        full = [pred.get(i) for i in test_rows]  # the zero vector: no prediction
        acc, bal, f1 = reference_scores(list(labels[test_rows]), full)
        assert metric(tables, rule) == pytest.approx(acc, abs=1e-15), rule
        assert metric(tables, f"balanced_accuracy_{rule}") == pytest.approx(bal, abs=1e-15), rule
        assert metric(tables, f"macro_f1_{rule}") == pytest.approx(f1, abs=1e-15), rule
        stored = predictions[predictions["rule"] == rule].set_index("image_id")["predicted_label"]
        assert pd.isna(stored[frame["image_id"][zero_test]]) and stored.drop(frame["image_id"][zero_test]).notna().all()
        assert len(stored) == len(test_rows)  # every test image judged
    top2 = [labels[i] in ranked["top1_cosine"][j][:2] for j, i in enumerate(scored)]
    assert metric(tables, "top2_top1_cosine") == pytest.approx(sum(top2) / len(test_rows), abs=1e-15)
    exclusions = tables.exclusions_frame()
    assert exclusions[["task", "level", "image_id", "split", "reason"]].values.tolist() == [
        ["knn", "species", frame["image_id"][i], frame["split"][i], "zero_vector"] for i in sorted([zero_train, zero_test])]


def test_knn_without_zero_vectors_is_unchanged_by_the_zero_vector_handling():
    frame, vectors = clustered_frame(seed=5)
    tables = knn_tables(frame, vectors, ["species"], ks=(1, 2), device="cpu")
    test_rows = np.flatnonzero(frame["split"] == "test")
    train_rows = np.flatnonzero(frame["split"] == "train")
    labels = frame["species"].to_numpy()
    ref = brute_force_labels(vectors[train_rows], list(labels[train_rows]), vectors[test_rows])
    for rule in RULES:
        assert metric(tables, rule) == np.mean(np.array(ref[rule]) == labels[test_rows])
    assert tables.exclusions_frame().empty and tables.frames()[2]["predicted_label"].notna().all()


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / math.sqrt(float(v @ v))


def prompts_for(classes, templates=("a photo of {}", "an image of {}")):
    return pd.DataFrame([{"level": "species", "class": c, "template": t} for c in classes for t in templates])


def zero_shot_reference(image_vectors, labels, classes, text, prompts, ks):
    """Plain loops: ranks classes by cosine to the first template / the normalised mean of the
    normalised prompts; None vectors are misses. Returns {(k, prompting): accuracy}."""
    by_class = {c: [unit(text[i]) for i in prompts.index[prompts["class"] == c]] for c in classes}
    centres = {"single_template": {c: v[0] for c, v in by_class.items()},
               "ensemble": {c: unit(np.mean(v, axis=0)) for c, v in by_class.items()}}
    out = {}
    for prompting, centre in centres.items():
        for k in ks:
            hits = 0
            for v, label in zip(image_vectors, labels):
                if not np.any(v):
                    continue
                ranked = sorted(classes, key=lambda c: -float(unit(v) @ centre[c]))
                hits += label in ranked[:k]
            out[(k, prompting)] = hits / len(labels)
    return out


def test_zero_shot_scores_a_zero_image_vector_wrong_and_retrieval_leaves_it_out():
    rng = np.random.default_rng(11)
    classes = SPECIES[:3]
    prompts = prompts_for(classes)
    text = rng.normal(size=(len(prompts), 5)).astype(np.float32)
    n = 24
    labels = np.array(classes)[np.arange(n) % 3]
    vectors = rng.normal(size=(n, 5)).astype(np.float32)
    vectors[[4, 9]] = 0.0
    frame = eval_frame(labels, ["test"] * n)
    tables = zero_shot_tables(frame, vectors, prompts, text, ["species"])  # failed: "zero norm"
    ref = zero_shot_reference(vectors, labels, classes, text, prompts, (1,))
    assert metric(tables, "top1_ensemble") == pytest.approx(ref[(1, "ensemble")], abs=1e-15)
    assert metric(tables, "top1_single_template") == pytest.approx(ref[(1, "single_template")], abs=1e-15)

    # retrieval, by loops: image→text P@1 over every image (a zero one misses), text→image over
    # the others only
    ensemble = {c: unit(np.mean([unit(text[i]) for i in prompts.index[prompts["class"] == c]], axis=0))
                for c in classes}
    i2t = [float(np.any(v) and max(classes, key=lambda c: float(unit(v) @ ensemble[c])) == lab)
           for v, lab in zip(vectors, labels)]
    scored = [i for i in range(n) if np.any(vectors[i])]
    t2i = [float(labels[max(scored, key=lambda i: float(unit(vectors[i]) @ ensemble[c]))] == c) for c in classes]
    m = tables.frames()[0]
    value = dict(zip(m["metric"], m["value"]))
    assert value["image_to_text_precision@1"] == pytest.approx(np.mean(i2t), abs=1e-15)
    assert value["text_to_image_precision@1"] == pytest.approx(np.mean(t2i), abs=1e-15)
    exclusions = tables.exclusions_frame()
    assert set(map(tuple, exclusions[["task", "image_id", "reason"]].values.tolist())) == {
        (task, f"img{i:03d}", "zero_vector") for task in ("zero_shot", "retrieval") for i in (4, 9)}


def test_probes_keep_a_zero_vector_as_an_ordinary_point():
    frame, vectors = clustered_frame(seed=2, n=40)
    vectors[np.flatnonzero(frame["split"] == "test")[0]] = 0.0
    vectors[np.flatnonzero(frame["split"] == "train")[0]] = 0.0
    tables = probe_tables(frame, vectors, ["species"])
    predictions = tables.frames()[2]
    assert predictions["predicted_label"].notna().all()
    assert len(predictions) == 2 * int((frame["split"] == "test").sum())
    assert tables.exclusions_frame().empty


# --- 11.6: top-k with k >= the number of classes ---------------------------------------------------

def test_knn_top_k_is_given_only_for_k_below_the_number_of_classes():
    frame, vectors = clustered_frame(seed=1, n_classes=3)
    metrics = set(knn_tables(frame, vectors, ["species"], ks=(1, 2, 3, 5), device="cpu").frames()[0]["metric"])
    assert {m.split("_")[0] for m in metrics if m.startswith("top") and not m.startswith("top1")} == {"top2"}

    frame, vectors = clustered_frame(seed=1, n_classes=4)
    tables = knn_tables(frame, vectors, ["species"], ks=(1, 3), device="cpu")
    train, test = (np.flatnonzero(frame["split"] == s) for s in ("train", "test"))
    labels = frame["species"].to_numpy()
    ranked = brute_force_rankings(vectors[train], list(labels[train]), vectors[test])
    for rule in RULES:
        ref = np.mean([labels[i] in ranked[rule][j][:3] for j, i in enumerate(test)])
        assert metric(tables, f"top3_{rule}") == pytest.approx(ref, abs=1e-15)


def test_zero_shot_top_k_is_omitted_when_k_reaches_the_number_of_classes():
    rng = np.random.default_rng(4)
    for n_classes, expect_top5 in ((3, False), (5, False), (6, True)):
        classes = [f"c{i}" for i in range(n_classes)]
        prompts = prompts_for(classes)
        text = rng.normal(size=(len(prompts), 8)).astype(np.float32)
        labels = np.array(classes)[np.arange(30) % n_classes]
        vectors = rng.normal(size=(30, 8)).astype(np.float32)
        tables = zero_shot_tables(eval_frame(labels, ["test"] * 30), vectors, prompts, text, ["species"])
        names = set(tables.frames()[0].query("task == 'zero_shot'")["metric"])
        assert ("top5_ensemble" in names) == expect_top5 and ("top5_single_template" in names) == expect_top5
        assert {"top1_ensemble", "top1_single_template"} <= names
        if expect_top5:
            ref = zero_shot_reference(vectors, labels, classes, text, prompts, (5,))
            assert metric(tables, "top5_ensemble") == pytest.approx(ref[(5, "ensemble")], abs=1e-15)


# --- 11.3: single-class reporting groups ---------------------------------------------------------

def test_per_group_knn_skips_groups_that_hold_a_single_class():
    # video v1 holds only Acer; v2 holds Betula and Carex
    species = ["Acer"] * 8 + ["Betula", "Carex"] * 4
    group = ["v1"] * 8 + ["v2"] * 8
    split = ["train", "train", "train", "test"] * 4
    frame = eval_frame(species, split, group=group, genus=["G1"] * 12 + ["G2"] * 4)
    vectors = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    tables = knn_tables(frame, vectors, ["species", "genus"], ks=(1,), device="cpu")
    rows = {(lvl, g) for lvl, g in tables.frames()[0][["level", "grp"]].itertuples(index=False)}
    # before: ('species', 'v1') read 1.0 for every rule
    assert rows == {("species", "all"), ("genus", "all"), ("species", "v2"), ("genus", "v2")}
    assert tables.single_class_groups == [("species", "v1", "Acer"), ("genus", "v1", "G1")]
    assert sum("v1" in s and "whatever the embedding" in s for s in tables.skipped) == 2


# --- 11.4: one transaction per asset --------------------------------------------------------------

def _provenance(run_id: str, split_id: str):
    from nfhm_pipeline.stages.base import Provenance

    return Provenance(run_id=run_id, stage="knn_metrics", embedding_fingerprint="f" * 64, split_id=split_id,
                      split_seed=0, stage_seed=None, device="cpu")


def test_store_tables_changes_no_table_when_a_later_table_write_fails(tmp_path):
    from nfhm_pipeline.stages.base import Paths, store_results

    paths = Paths.under(tmp_path)
    path = paths.warehouse
    frame, vectors = clustered_frame(seed=0, n=24)
    tables = knn_tables(frame, vectors, ["species"], ks=(1,), device="cpu")
    store_results(paths, "leaves", "m", ["knn"], tables, _provenance("run-1", "seed0-aaaaaaaaaaaa"))
    before = warehouse.read_table(path, "metrics", dataset="leaves")
    assert len(before) and set(before["split_id"]) == {"seed0-aaaaaaaaaaaa"}

    # A real write failure in the third table: predictions refuse these image ids.
    import duckdb

    con = duckdb.connect(str(path))
    old = con.execute("SELECT * FROM predictions").df()
    con.execute("DROP TABLE predictions")
    con.execute("CREATE TABLE predictions (dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, "
                "level VARCHAR, grp VARCHAR, rule VARCHAR, image_id VARCHAR NOT NULL CHECK (image_id NOT LIKE 'img%'), "
                "true_label VARCHAR, predicted_label VARCHAR, run_id VARCHAR, split_id VARCHAR)")
    con.close()
    with pytest.raises(StorageError, match="predictions"):
        store_results(paths, "leaves", "m", ["knn"], tables, _provenance("run-2", "seed1-bbbbbbbbbbbb"))
    after = warehouse.read_table(path, "metrics", dataset="leaves")
    # before: metrics and per_class_metrics were already committed with run-2
    assert set(after["run_id"]) == {"run-1"} and len(after) == len(before)
    assert set(warehouse.read_table(path, "per_class_metrics", dataset="leaves")["run_id"]) == {"run-1"}
    assert len(old)


# --- end to end through Dagster ------------------------------------------------------------------

def write_collection(root: Path, black: bool = True) -> Path:
    """A label_csv collection with an official split (so sides are known):

    - species Acer, Betula (genus Gx), Carex, Draba (genus Gy); two Carex rows have no genus;
    - videos: v1 = every Acer image (one species), v2 = Betula + Carex, v3 = every Draba image;
    - with ``black``, two all-black images (different sizes, so different files): an Acer in
      train, a Betula in test.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    genus = {"Acer": "Gx", "Betula": "Gx", "Carex": "Gy", "Draba": "Gy"}
    video = {"Acer": "v1", "Betula": "v2", "Carex": "v2", "Draba": "v3"}
    lines = ["path,species,genus,video,split"]
    for c, name in enumerate(SPECIES):
        for i in range(4):
            Image.new("RGB", (12, 12), (30 + 50 * c, 20 + 40 * i, 220 - 45 * c)).save(root / "images" / f"{name}_{i}.png")
            g = "" if name == "Carex" and i in (1, 3) else genus[name]
            lines.append(f"images/{name}_{i}.png,{name},{g},{video[name]},{'test' if i == 3 else 'train'}")
    for name, size, side in (("Acer", 12, "train"), ("Betula", 13, "test")) if black else ():
        Image.new("RGB", (size, size), (0, 0, 0)).save(root / "images" / f"black_{name}.png")
        lines.append(f"images/black_{name}.png,{name},{genus[name]},{video[name]},{side}")
    csv = root / "plants.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv


def write_plants_catalog(tmp_path: Path, seed: int = 0, name: str = "catalog.yaml", official: bool = True,
                         black: bool = True) -> Path:
    csv = tmp_path / "plants" / "plants.csv"
    if not csv.exists():
        write_collection(tmp_path / "plants", black)
    split_column = "    split_column: split\n" if official else ""
    text = textwrap.dedent(f"""\
        datasets:
          plants:
            reader: label_csv
            csv: {csv}
            path_column: path
            labels: [species, genus]
            group: video
            split: {{test_fraction: 0.25, seed: {seed}, folds: 2}}
        """) + split_column + textwrap.dedent("""\
        models:
          raw-pixels:
            loader: raw_pixels
            image_size: 8
          raw-pixels-4:
            loader: raw_pixels
            image_size: 4
        """)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(defs, instance, stages, partition=None):
    result = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["plants", s]) for s in stages],
                            instance=instance, resources=defs.resources, partition_key=partition, raise_on_error=False)
    assert result.success, [e.event_specific_data.error.message for e in result.all_events
                            if e.event_type_value == "STEP_FAILURE"]
    return result


def metadata(result, stage):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == stage]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_missing_genus_and_black_images_are_left_out_per_level_and_recorded(tmp_path):
    data = tmp_path / "data"
    defs = build_definitions(load_catalog(write_plants_catalog(tmp_path)), local_resources(data))
    with dg.instance_for_test() as instance:
        run(defs, instance, ["image_manifest", "splits"])
        # before: knn failed for the whole model ("train row .. is all zeros"); with the black
        # images left out, genus 'nan' was a class and the probe raised a TypeError
        result = run(defs, instance, ["image_embeddings", "knn_metrics", "linear_probe_metrics"], "raw-pixels")
    wh = data / "warehouse.duckdb"
    manifest = pd.read_parquet(data / "manifests" / "plants.parquet")
    by_uri = {Path(u).name: i for u, i in zip(manifest["uri"], manifest["image_id"])}
    no_genus = {by_uri["Carex_1.png"]: "train", by_uri["Carex_3.png"]: "test"}
    black = {by_uri["black_Acer.png"]: "train", by_uri["black_Betula.png"]: "test"}

    predictions = warehouse.read_table(wh, "predictions", dataset="plants")
    per_class = warehouse.read_table(wh, "per_class_metrics", dataset="plants")
    metrics = warehouse.read_table(wh, "metrics", dataset="plants")
    for values in (predictions["true_label"], predictions["predicted_label"], per_class["class"]):
        assert "nan" not in set(values.dropna())
    test_ids = set(warehouse.query(wh, "SELECT image_id FROM splits WHERE split = 'test'")["image_id"])
    for task in ("knn", "linear_probe", "logistic_probe"):
        genus_rows = predictions[(predictions["task"] == task) & (predictions["level"] == "genus")
                                 & (predictions["grp"] == "all")]
        species_rows = predictions[(predictions["task"] == task) & (predictions["level"] == "species")
                                   & (predictions["grp"] == "all")]
        for rule in genus_rows["rule"].unique():
            # a row without genus is out of genus, and kept for species
            assert set(genus_rows.loc[genus_rows["rule"] == rule, "image_id"]) == test_ids - set(no_genus)
            assert set(species_rows.loc[species_rows["rule"] == rule, "image_id"]) == test_ids
    assert {"test_accuracy", "cv_accuracy"} <= set(metrics.loc[(metrics["task"] == "linear_probe")
                                                               & (metrics["level"] == "genus"), "metric"])
    # the black test image: no prediction in kNN, scored wrong, still counted in n
    knn = predictions[predictions["task"] == "knn"]
    assert knn.loc[knn["image_id"] == by_uri["black_Betula.png"], "predicted_label"].isna().all()
    assert set(metrics.loc[(metrics["task"] == "knn") & (metrics["grp"] == "all") & (metrics["level"] == "species"),
                           "n"]) == {len(test_ids)}

    exclusions = warehouse.read_table(wh, "evaluation_exclusions", dataset="plants")
    got = set(map(tuple, exclusions[["task", "level", "image_id", "split", "reason"]].values.tolist()))
    expected = {(t, "genus", i, s, "no_label_at_level") for t in ("knn", "linear_probe", "logistic_probe")
                for i, s in no_genus.items()}
    expected |= {("knn", level, i, s, "zero_vector") for level in ("species", "genus") for i, s in black.items()}
    assert got == expected
    split_id = provenance.current_split_id(wh, "plants")
    assert split_id and split_id.startswith("seed0-")
    for table in ("metrics", "per_class_metrics", "predictions", "evaluation_exclusions"):
        assert set(warehouse.read_table(wh, table, dataset="plants")["split_id"]) == {split_id}, table

    meta = metadata(result, "knn_metrics")
    assert meta["exclusions"]["knn/genus/no_label_at_level/test"] == 1
    assert meta["exclusions"]["knn/species/zero_vector/test"] == 1
    assert meta["split_id"] == split_id
    # 11.3: v1 (only Acer) and v3 (only Draba) at both levels have no per-group rows
    assert meta["single_class_groups_skipped"] == 4
    assert set(metrics.loc[metrics["task"] == "knn", "grp"]) == {"all", "v2"}


def requested(result) -> set[tuple[str, str | None]]:
    return {(r.key.to_user_string(), p) for r in result.results if isinstance(r.key, dg.AssetKey)
            for p in result.get_requested_partitions(r.key)}


def test_a_new_split_makes_other_models_stale_and_the_automation_requests_their_metrics(tmp_path):
    data = tmp_path / "data"
    wh = data / "warehouse.duckdb"
    catalogs = [write_plants_catalog(tmp_path, seed=seed, name=f"seed{seed}.yaml", official=False, black=False)
                for seed in (0, 1)]
    seed0, seed1 = (build_definitions(load_catalog(c), local_resources(data)) for c in catalogs)
    models = ("raw-pixels", "raw-pixels-4")
    plants = dg.AssetSelection.groups("plants")
    with dg.instance_for_test() as instance:
        run(seed0, instance, ["image_manifest", "splits"])
        for model in models:
            run(seed0, instance, ["image_embeddings", "knn_metrics"], model)
        first_id = provenance.current_split_id(wh, "plants")
        assert provenance.stale_models(wh, "plants") == []
        evaluation = dg.evaluate_automation_conditions(defs=seed0, instance=instance, asset_selection=plants)
        evaluation = dg.evaluate_automation_conditions(defs=seed0, instance=instance, asset_selection=plants,
                                                       cursor=evaluation.cursor)

        # The seed changes and the split is materialized again (the code location reloads).
        run(seed1, instance, ["splits"])
        new_id = provenance.current_split_id(wh, "plants")
        assert new_id != first_id and new_id.startswith("seed1-")
        assert provenance.stale_models(wh, "plants") == list(models)
        # The metric assets depend on the split with an eager condition: every model's metrics
        # are requested again (and only metrics and maps, not embeddings).
        evaluation = dg.evaluate_automation_conditions(defs=seed1, instance=instance, asset_selection=plants,
                                                       cursor=evaluation.cursor)
        got = requested(evaluation)
        assert {("plants/knn_metrics", m) for m in models} <= got
        assert {("plants/linear_probe_metrics", m) for m in models} <= got
        assert not any(key.endswith("image_embeddings") for key, _ in got)

        run(seed1, instance, ["knn_metrics"], "raw-pixels")  # only one model re-run
    assert provenance.stale_models(wh, "plants") == ["raw-pixels-4"]
    current = provenance.current_rows(wh, "predictions", "plants")
    assert set(current["model"]) == {"raw-pixels"}
    stored = warehouse.read_table(wh, "predictions", dataset="plants")
    old = stored[stored["model"] == "raw-pixels-4"]
    assert set(old["split_id"]) == {first_id}  # kept, but named and left out of comparisons


def test_multilabel_zero_shot_scores_a_zero_vector_wrong_instead_of_failing():
    from nfhm_pipeline.evaluation.multilabel_tables import AucTargets, LabelTexts, multilabel_tables

    rng = np.random.default_rng(8)
    n, names = 40, ["Effusion", "Edema"]
    split = np.where(np.arange(n) % 2 == 0, "test", "train")
    frame = eval_frame(["x"] * n, split)
    vectors = rng.normal(size=(n, 6)).astype(np.float32)
    vectors[[0, 6]] = 0.0  # two test images
    y = (rng.random((n, 2)) < 0.5).astype(np.int8)
    y[0], y[6] = (1, 0), (0, 1)
    mask = np.ones((n, 2), bool)
    pos, neg = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    text = LabelTexts(names, ["no " + s for s in names], pos, neg)
    result = multilabel_tables(frame, vectors, AucTargets(names, y, mask, "findings", "multilabel"), seed=0,
                               text=text)  # failed: NaN cosine of the zero vectors
    table = result.per_label["multilabel_zero_shot"].set_index("label")
    test = np.flatnonzero(split == "test")
    for j, name in enumerate(names):
        scores = []
        for i in test:  # plain loops: cosine margin, and a zero vector wrong (below/above everything)
            if not np.any(vectors[i]):
                scores.append(-np.inf if y[i, j] == 1 else np.inf)
            else:
                scores.append(float(unit(vectors[i]) @ unit(pos[j]) - unit(vectors[i]) @ unit(neg[j])))
        p = [s for s, i in zip(scores, test) if y[i, j] == 1]
        q = [s for s, i in zip(scores, test) if y[i, j] == 0]
        ref = sum((a > b) + 0.5 * (a == b) for a in p for b in q) / (len(p) * len(q))
        assert table.loc[name, "auc"] == pytest.approx(ref, abs=1e-12)
    assert set(result.tables.exclusions_frame()["image_id"]) == {"img000", "img006"}


# --- issue 12: task and metric names declared once, and never changed -------------------------

def test_the_names_written_to_the_warehouse_are_the_declared_ones_and_unchanged():
    """Every task, rule and metric name the evaluation writes, spelt out: a rename in
    ``evaluation.names`` would orphan every stored result, so it must fail here first."""
    from nfhm_pipeline.evaluation import names

    frame, vectors = clustered_frame(seed=2, n=80, n_classes=6)
    knn = knn_tables(frame, vectors, ["species"], ks=(1, 3, 5), device="cpu")
    probe = probe_tables(frame, vectors, ["species"])
    classes = sorted(frame["species"].unique())
    text = np.random.default_rng(0).normal(size=(2 * len(classes), vectors.shape[1])).astype(np.float32)
    zero_shot = zero_shot_tables(frame, vectors, prompts_for(classes), text, ["species"])
    written = pd.concat([t.frames()[0] for t in (knn, probe, zero_shot)])
    by_task = {task: set(rows["metric"]) for task, rows in written.groupby("task")}

    rules = ["top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean", "top1_euclidean_l2",
             "mean_euclidean_l2"]
    assert by_task["knn"] == {f"{prefix}{rule}" for rule in rules
                              for prefix in ("", "balanced_accuracy_", "macro_f1_", "top3_", "top5_")}
    assert by_task["linear_probe"] == by_task["logistic_probe"] == {
        "cv_accuracy", "cv_macro_f1", "test_accuracy", "test_macro_f1"}
    assert by_task["zero_shot"] == {"top1_single_template", "top1_ensemble", "top5_single_template", "top5_ensemble"}
    assert by_task["retrieval"] == {f"{d}_{m}@{k}" for d in ("image_to_text", "text_to_image")
                                    for m in ("precision", "recall") for k in (1, 2, 5, 10)}
    assert set(knn.frames()[2]["rule"]) == set(rules)
    assert set(probe.frames()[2]["rule"]) == {"linear_svc", "logistic"}

    assert (names.KNN, names.LINEAR_PROBE, names.LOGISTIC_PROBE, names.ZERO_SHOT, names.RETRIEVAL,
            names.MULTILABEL_PROBE, names.MULTILABEL_ZERO_SHOT, names.ALIGNMENT_HEAD) == (
        "knn", "linear_probe", "logistic_probe", "zero_shot", "retrieval", "multilabel_probe",
        "multilabel_zero_shot", "alignment_head")
    assert names.KNN_RULES + names.KNN_L2_RULES == tuple(rules)
    assert names.HEADLINE_METRICS == {
        "knn": ("top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean"),
        "linear_probe": ("cv_accuracy", "cv_macro_f1", "test_accuracy", "test_macro_f1"),
        "logistic_probe": ("cv_accuracy", "cv_macro_f1", "test_accuracy", "test_macro_f1"),
        "zero_shot": ("top1_single_template", "top1_ensemble", "top5_ensemble"),
        "retrieval": (),
        "multilabel_probe": ("macro_auc", "micro_auc"),
        "multilabel_zero_shot": ("macro_auc", "micro_auc"),
        "alignment_head": ("macro_auc", "micro_auc"),
    }
    for task, headline in names.HEADLINE_METRICS.items():  # every headline is a name that is written
        assert set(headline) <= by_task.get(task, {"macro_auc", "micro_auc"}), task


def test_multilabel_rows_carry_the_declared_auc_names():
    from nfhm_pipeline.evaluation.multilabel_tables import AucTargets, LabelTexts, multilabel_tables

    rng = np.random.default_rng(4)
    frame, vectors = clustered_frame(seed=4, n=48)
    y = (rng.random((48, 2)) < 0.5).astype(np.int8)
    text = LabelTexts(["p1", "p2"], ["n1", "n2"], rng.normal(size=(2, 6)).astype(np.float32),
                      rng.normal(size=(2, 6)).astype(np.float32))
    result = multilabel_tables(frame, vectors, AucTargets(["Edema", "Effusion"], y, np.ones_like(y, bool), "lvl",
                                                          "multilabel"), seed=0, text=text)
    metrics = result.tables.frames()[0]
    per_label = {f"{kind}:{label}" for kind in ("auc", "n_pos", "n_neg") for label in ("Edema", "Effusion")}
    summary = {"macro_auc", "micro_auc", "n_labels_defined"}
    rows = metrics.groupby("task")["metric"].apply(set).to_dict()
    assert rows == {"multilabel_probe": per_label | {"n_train:Edema", "n_train:Effusion"} | summary,
                    "multilabel_zero_shot": per_label | summary}
