"""Multi-label AUC metrics and alignment heads, materialized through a real Dagster instance.

A synthetic CheXpert-style collection (80 PNGs, four findings with 1 / 0 / -1 / empty, colour
channels that follow the findings) is written once per module into tmp_path, and three catalog
datasets read the same CSV under the three uncertain-label policies. Expected counts are
recomputed from the CSV text with plain loops.
"""
import csv
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from conftest import local_resources
from helpers import TINY_CLIP_YAML, write_chexpert_collection
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.alignment import AlignmentHead
from nfhm_pipeline.evaluation.multilabel_tables import auc_difference_report, policy_level
from nfhm_pipeline.ingest.chexpert import first_positive_strata, parse_finding_values
from nfhm_pipeline.store import warehouse

FINDINGS = ["Cardiomegaly", "Edema", "Pleural Effusion", "Support Devices"]
POLICIES = {"chest_ignore": "ignore", "chest_positive": "positive", "chest_negative": "negative"}
N_IMAGES = 80
TINY_CLIP = TINY_CLIP_YAML


def write_collection(root: Path, seed: int = 7) -> Path:
    return write_chexpert_collection(root, FINDINGS, N_IMAGES, seed=seed, p=(0.3, 0.3, 0.2, 0.2))


def write_catalog(path: Path, csv_path: Path) -> Path:
    datasets = []
    for name, policy in POLICIES.items():
        models = "" if name == "chest_ignore" else "\n    models: [raw-pixels]"
        datasets.append(f"""
  {name}:
    reader: chexpert_csv
    csv: {csv_path}
    findings: {FINDINGS}
    labels: [label]
    uncertain_policy: {policy}
    split: {{test_fraction: 0.25, seed: 3, folds: 2}}{models}""")
    path.write_text("datasets:" + "".join(datasets) + f"""
models:
  raw-pixels:
    loader: raw_pixels
    image_size: 8
{TINY_CLIP}""")
    return path


def materialize(defs, instance, stages, dataset, partition_key=None):
    result = dg.materialize(list(defs.assets), selection=[dg.AssetKey([dataset, s]) for s in stages],
                            instance=instance, resources=defs.resources, partition_key=partition_key,
                            raise_on_error=False)
    assert result.success, [e.event_specific_data.error.message for e in result.all_events
                            if e.event_type_value == "STEP_FAILURE"]
    return result


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """(catalog, data_dir, csv_path, defs, instance, results) after materializing every dataset."""
    tmp = tmp_path_factory.mktemp("chest")
    csv_path = write_collection(tmp / "chest")
    catalog = load_catalog(write_catalog(tmp / "catalog.yaml", csv_path))
    data_dir = tmp / "data"
    defs = build_definitions(catalog, local_resources(data_dir))
    results = {}
    with dg.instance_for_test() as instance:
        for ds in catalog.datasets:
            for i, model in enumerate(catalog.models_for(ds)):
                # The first partition's run also builds the (unpartitioned) manifest and split.
                stages = ["image_manifest", "splits"] * (i == 0) + ["image_embeddings", "text_embeddings",
                                                                    "multilabel_metrics", "alignment_head"]
                results[ds, model.key] = materialize(defs, instance, stages, ds, model.key)
        yield catalog, data_dir, csv_path, defs, instance, results


def metrics_of(data_dir, dataset, model=None, task=None):
    m = warehouse.read_table(data_dir / "warehouse.duckdb", "metrics", dataset=dataset)
    if model is not None:
        m = m[m["model"] == model]
    if task is not None:
        m = m[m["task"] == task]
    return m


def test_test_split_counts_follow_each_uncertain_policy_exactly(chest):
    _, data_dir, csv_path, _, _, _ = chest
    rows = {str((csv_path.parent / r["Path"]).resolve()): r for r in csv.DictReader(open(csv_path))}
    for dataset, policy in POLICIES.items():
        manifest = pd.read_parquet(data_dir / "manifests" / f"{dataset}.parquet")
        splits = warehouse.read_table(data_dir / "warehouse.duckdb", "splits", dataset=dataset)
        test_ids = set(splits.loc[splits["split"] == "test", "image_id"])
        test_rows = [rows[u] for u, i in zip(manifest["uri"], manifest["image_id"]) if i in test_ids]
        m = metrics_of(data_dir, dataset, "raw-pixels", "multilabel_probe")
        got = dict(zip(m["metric"], m["value"]))
        for finding in FINDINGS:
            n_pos = n_neg = 0
            for r in test_rows:
                v = r[finding]
                if v == "1.0" or (v == "-1.0" and policy == "positive"):
                    n_pos += 1
                elif v in ("0.0", "") or (v == "-1.0" and policy == "negative"):
                    n_neg += 1
            assert (got[f"n_pos:{finding}"], got[f"n_neg:{finding}"]) == (n_pos, n_neg), (dataset, finding)


def test_policies_differ_only_by_the_uncertain_entries(chest):
    _, data_dir, _, _, _, _ = chest
    counts = {ds: metrics_of(data_dir, ds, "raw-pixels", "multilabel_probe").set_index("metric")["value"]
              for ds in POLICIES}
    for f in FINDINGS:
        ign, pos, neg = counts["chest_ignore"], counts["chest_positive"], counts["chest_negative"]
        uncertain = pos[f"n_pos:{f}"] - ign[f"n_pos:{f}"]
        assert uncertain == neg[f"n_neg:{f}"] - ign[f"n_neg:{f}"] > 0
        assert pos[f"n_neg:{f}"] == ign[f"n_neg:{f}"] and neg[f"n_pos:{f}"] == ign[f"n_pos:{f}"]


def test_every_auc_row_records_the_policy_in_its_level(chest):
    _, data_dir, _, _, _, _ = chest
    for dataset, policy in POLICIES.items():
        m = metrics_of(data_dir, dataset)
        auc_rows = m[m["task"].isin(["multilabel_probe", "multilabel_zero_shot", "alignment_head"])]
        assert len(auc_rows) and set(auc_rows["level"]) == {f"findings[uncertain={policy},missing=negative]"}
        assert set(auc_rows["level"]) == {policy_level(policy)}


def test_manifest_keeps_the_four_finding_states_as_written(chest):
    _, data_dir, csv_path, _, _, _ = chest
    manifest = pd.read_parquet(data_dir / "manifests" / "chest_ignore.parquet")
    by_uri = {str((csv_path.parent / r["Path"]).resolve()): r for r in csv.DictReader(open(csv_path))}
    assert len(manifest) == N_IMAGES
    values = parse_finding_values(manifest, FINDINGS)
    for i, uri in enumerate(manifest["uri"]):
        for j, f in enumerate(FINDINGS):
            written = by_uri[uri][f]
            assert (math.isnan(values[i, j]) if written == "" else values[i, j] == float(written))


def test_probe_auc_is_well_above_chance_where_findings_show_in_the_pixels(chest):
    _, data_dir, _, _, _, _ = chest
    m = metrics_of(data_dir, "chest_ignore", "raw-pixels", "multilabel_probe").set_index("metric")["value"]
    assert m["macro_auc"] > 0.75
    assert all(m[f"auc:{f}"] > 0.6 for f in FINDINGS)


def test_macro_auc_is_the_mean_of_the_per_finding_aucs(chest):
    _, data_dir, _, _, _, _ = chest
    for task in ("multilabel_probe", "multilabel_zero_shot", "alignment_head"):
        m = metrics_of(data_dir, "chest_ignore", "tiny-clip", task).set_index("metric")["value"]
        per = [m[f"auc:{f}"] for f in FINDINGS]
        assert m["macro_auc"] == pytest.approx(sum(per) / len(per), abs=1e-12)


def test_zero_shot_rows_exist_only_for_the_text_tower_model(chest):
    _, data_dir, _, _, _, _ = chest
    m = metrics_of(data_dir, "chest_ignore", task="multilabel_zero_shot")
    assert set(m["model"]) == {"tiny-clip"}


def pairwise_auc(y, s):
    """Brute force: share of (positive, negative) pairs ranked right, ties count 1/2."""
    pos = [si for yi, si in zip(y, s) if yi == 1]
    neg = [si for yi, si in zip(y, s) if yi == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_saved_alignment_head_loads_and_reproduces_the_stored_test_aucs(chest):
    _, data_dir, csv_path, _, _, _ = chest
    path = data_dir / "models" / "alignment" / "chest_ignore" / "tiny-clip.safetensors"
    head = AlignmentHead.load(path)
    assert head.label_names == FINDINGS
    manifest = pd.read_parquet(data_dir / "manifests" / "chest_ignore.parquet").set_index("image_id")
    splits = warehouse.read_table(data_dir / "warehouse.duckdb", "splits", dataset="chest_ignore")
    test_ids = sorted(splits.loc[splits["split"] == "test", "image_id"])
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    table = EmbeddingStore(str(data_dir / "lake")).read("chest_ignore", "tiny-clip")
    pos = {i: k for k, i in enumerate(table.image_ids)}
    scores = head.scores(table.vectors[[pos[i] for i in test_ids]])
    stored = metrics_of(data_dir, "chest_ignore", "tiny-clip", "alignment_head").set_index("metric")["value"]
    for j, f in enumerate(FINDINGS):
        states = manifest.loc[test_ids, f].tolist()  # ignore policy: '-1' is left out, empty is negative
        kept = [(1 if v == "1" else 0, s) for v, s in zip(states, scores[:, j]) if v != "-1"]
        assert stored[f"auc:{f}"] == pytest.approx(pairwise_auc(*zip(*kept)), abs=1e-9)


def test_alignment_head_is_skipped_without_failure_for_a_model_without_text_tower(chest):
    _, data_dir, _, _, _, results = chest
    meta = results["chest_ignore", "raw-pixels"].asset_materializations_for_node("chest_ignore__alignment_head")
    assert meta[0].metadata["text_tower"].value is False
    assert not (data_dir / "models" / "alignment" / "chest_ignore" / "raw-pixels.safetensors").exists()
    assert metrics_of(data_dir, "chest_ignore", "raw-pixels", "alignment_head").empty


def test_alignment_head_metadata_compares_every_finding_with_zero_shot(chest):
    _, data_dir, _, _, _, results = chest
    meta = results["chest_ignore", "tiny-clip"].asset_materializations_for_node("chest_ignore__alignment_head")[0].metadata
    table = meta["helps (vs zero-shot)"].value
    assert all(f in table for f in FINDINGS)
    better, worse = meta["labels_better"].value, meta["labels_worse"].value
    assert 0 <= better + worse <= len(FINDINGS)
    m = metrics_of(data_dir, "chest_ignore", "tiny-clip").set_index(["task", "metric"])["value"]
    diffs = [m["alignment_head", f"auc:{f}"] - m["multilabel_zero_shot", f"auc:{f}"] for f in FINDINGS]
    # better / worse: beyond half a point AND DeLong's paired p < 0.05 on the stored test entries
    from nfhm_pipeline.evaluation.confidence import delong_paired_test

    scores = warehouse.read_table(data_dir / "warehouse.duckdb", "auc_scores", dataset="chest_ignore",
                                  model="tiny-clip")
    p = []
    for f in FINDINGS:
        pair = [scores[(scores["task"] == t) & (scores["finding"] == f)].set_index("image_id")
                for t in ("alignment_head", "multilabel_zero_shot")]
        both = pair[0].join(pair[1], rsuffix="_zero_shot", how="inner")
        assert len(both) == len(pair[0]) == len(pair[1])
        p.append(delong_paired_test(both["target"].to_numpy(), both["score"].to_numpy(),
                                    both["score_zero_shot"].to_numpy())[1])
    assert better == sum(d > 0.005 and q < 0.05 for d, q in zip(diffs, p))
    assert worse == sum(d < -0.005 and q < 0.05 for d, q in zip(diffs, p))


def test_rerun_with_the_same_seed_gives_identical_numbers_and_head(chest):
    _, data_dir, _, defs, instance, _ = chest
    def snapshot():
        m = metrics_of(data_dir, "chest_ignore", "tiny-clip")
        return m.sort_values(["task", "metric"])[["task", "level", "metric", "value", "n"]].reset_index(drop=True)

    path = data_dir / "models" / "alignment" / "chest_ignore" / "tiny-clip.safetensors"
    before, head_before = snapshot(), AlignmentHead.load(path).state_dict()
    materialize(defs, instance, ["multilabel_metrics", "alignment_head"], "chest_ignore", "tiny-clip")
    after, head_after = snapshot(), AlignmentHead.load(path).state_dict()
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    assert all(np.array_equal(head_before[k], head_after[k]) for k in head_before)


def test_auc_difference_report_subtracts_and_marks_beyond_half_a_point():
    rows = []
    for model, aucs in (("a", [0.80, 0.70, 0.60, 0.55]), ("b", [0.82, 0.69, 0.605, float("nan")])):
        for label, auc in zip(["x", "y", "z", "w"], aucs):
            rows.append((model, "multilabel_probe", "lvl", f"auc:{label}", auc))
        rows += [(model, "multilabel_probe", "lvl", "macro_auc", float(np.nanmean(aucs))),
                 (model, "multilabel_probe", "lvl", "micro_auc", 0.5)]
    metrics = pd.DataFrame(rows, columns=["model", "task", "level", "metric", "value"])
    table, html = auc_difference_report(metrics, "a", "b")
    got = table.set_index("label")
    assert got.loc["x", "diff"] == pytest.approx(0.02) and got.loc["x", "mark"] == "better"
    assert got.loc["y", "mark"] == "worse" and got.loc["z", "mark"] == "same" and got.loc["w", "mark"] == "n/a"
    assert got.loc["macro_auc", "diff"] == pytest.approx((0.82 + 0.69 + 0.605) / 3 - 0.6625)
    assert html.count("#1a7f37") == 2 and html.count("#cf222e") == 1  # x and macro green, y red


def test_auc_difference_report_names_the_model_without_rows():
    metrics = pd.DataFrame({"model": ["a"], "task": ["multilabel_probe"], "level": ["l"], "metric": ["auc:x"],
                            "value": [0.7]})
    with pytest.raises(EvaluationError, match="'b'"):
        auc_difference_report(metrics, "a", "b")


def test_singleton_strata_merge_into_other_and_a_lone_other_joins_the_largest():
    nan = float("nan")
    values = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [nan, -1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 1]])
    assert first_positive_strata(values, ["a", "b", "c"]) == ["a", "a", "a", "none", "none", "c", "c"]
    values = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert first_positive_strata(values, ["a", "b", "c"]) == ["a", "a", "other", "other", "other"]


def test_auc_assets_exist_for_multilabel_and_medical_datasets_only():
    defs = build_definitions(load_catalog("shared"))
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for a in defs.assets for k in a.keys}
    assert {"brain_mri/multilabel_metrics", "pneumoniamnist/alignment_head"} <= keys
    assert "leeds_butterfly/multilabel_metrics" not in keys


def test_a_finding_named_like_a_manifest_column_is_refused_naming_the_dataset(tmp_path):
    from nfhm_pipeline.errors import CatalogError
    from nfhm_pipeline.evaluation.multilabel_tables import finding_columns

    path = tmp_path / "cat.yaml"
    path.write_text("datasets:\n  chest:\n    reader: chexpert_csv\n    csv: labels.csv\n    labels: [label]\n"
                    "    findings: [Edema, group]\nmodels:\n  raw-pixels: {loader: raw_pixels}\n")
    with pytest.raises(CatalogError, match="'chest'.*'group'"):
        finding_columns(load_catalog(path).datasets["chest"])


def test_model_comparison_shows_seed_003_auc_difference_tables(chest):
    _, data_dir, _, defs, instance, _ = chest
    materialize(defs, instance, ["model_comparison"], "chest_ignore")
    html = (data_dir / "reports" / "chest_ignore" / "chest_ignore_report.html").read_text(encoding="utf-8")
    assert "probe AUC difference: tiny-clip vs raw-pixels" in html
    assert "alignment head vs zero-shot AUC: tiny-clip" in html
