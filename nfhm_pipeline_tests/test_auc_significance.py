"""Paired DeLong tests between AUCs on the same test images (table ``auc_scores`` →
``model_differences`` rows with test 'delong'), and the seed-003 colouring rule they drive:
green / red only beyond 0.5 points AND significant, grey otherwise.

The reference below writes DeLong's structural components out pair by pair (O(n^2)), ties
counting one half, and takes the normal p-value with math.erfc."""
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from conftest import local_resources
from helpers import TINY_CLIP_YAML, write_chexpert_collection
from nfhm_pipeline.evaluation.auc_differences import delong_differences, score_rows
from nfhm_pipeline.evaluation.confidence import delong_paired_test
from nfhm_pipeline.evaluation.multilabel import roc_auc_per_label
from nfhm_pipeline.evaluation.multilabel_tables import AucResult, auc_difference_report, auc_summary

GREEN, RED, GREY = "#1a7f37", "#cf222e", "#6e7781"


# --- the plainly written reference ------------------------------------------------------------------

def psi(x, y):
    return 1.0 if x > y else 0.5 if x == y else 0.0


def reference_paired_delong(y, a, b):
    """(AUC_a - AUC_b, its DeLong variance, two-sided p) written out pair by pair."""
    pos = [i for i in range(len(y)) if y[i] == 1]
    neg = [i for i in range(len(y)) if y[i] == 0]
    m, n = len(pos), len(neg)
    v10 = {s: [sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in (tuple(a), tuple(b))}
    v01 = {s: [sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in (tuple(a), tuple(b))}
    auc = {s: sum(v10[s]) / m for s in v10}

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (y - mv) for x, y in zip(u, v)) / (len(u) - 1)

    A, B = tuple(a), tuple(b)
    s10 = [[cov(v10[p], v10[q]) for q in (A, B)] for p in (A, B)]
    s01 = [[cov(v01[p], v01[q]) for q in (A, B)] for p in (A, B)]
    var = (s10[0][0] + s10[1][1] - 2 * s10[0][1]) / m + (s01[0][0] + s01[1][1] - 2 * s01[0][1]) / n
    diff = auc[A] - auc[B]
    return diff, var, math.erfc(abs(diff) / math.sqrt(var) / math.sqrt(2))


def reference_holm(ps):
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def scores_of(model, task, y, mask, scores, names, level="lvl"):
    ids = [f"img{i:03d}" for i in range(len(y))]
    return score_rows(task, level, ids, names, y, mask, scores).assign(model=model)


# --- DeLong rows against the reference --------------------------------------------------------------

def tied_data():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0])
    # coarse scores: many ties within and across classes
    a = np.array([3, 2, 2, 1, 1, 0, 2, 1, 0, 3, 0, 1, 2, 0], float)
    b = np.array([2, 2, 1, 1, 1, 1, 0, 2, 0, 2, 1, 0, 1, 1], float)
    c = np.array([1, 3, 2, 2, 0, 0, 1, 0, 1, 3, 0, 2, 0, 1], float)
    return y, {"a": a, "b": b, "c": c}


def test_paired_delong_matches_the_pairwise_reference_with_ties_and_holm_within_model_a():
    y, models = tied_data()
    mask = np.ones((len(y), 1), bool)
    frame = pd.concat([scores_of(k, "multilabel_probe", y[:, None], mask, s[:, None], ["Edema"])
                       for k, s in models.items()])
    rows = delong_differences(frame)
    assert len(rows) == 6 and set(rows["test"]) == {"delong"} and set(rows["metric"]) == {"auc:Edema"}
    z = 1.959963984540054
    for r in rows.itertuples():
        diff, var, p = reference_paired_delong(y, models[r.model_a], models[r.model_b])
        assert r.difference == pytest.approx(diff, abs=1e-12)
        assert r.p_value == pytest.approx(p, rel=1e-9)
        assert (r.ci_low, r.ci_high) == pytest.approx((diff - z * math.sqrt(var), diff + z * math.sqrt(var)), abs=1e-9)
        assert r.n == len(y) and r.grp == "all" and math.isnan(r.p_mcnemar)
        assert (r.difference, r.p_value) == pytest.approx(
            delong_paired_test(y, models[r.model_a], models[r.model_b]), abs=1e-12)
    for model_a, family in rows.groupby("model_a"):
        assert family["p_holm"].tolist() == pytest.approx(reference_holm(family["p_value"].tolist()), abs=1e-12)
    mirror = rows.set_index(["model_a", "model_b"])
    assert mirror.loc[("a", "b"), "difference"] == pytest.approx(-mirror.loc[("b", "a"), "difference"])
    assert mirror.loc[("a", "b"), "p_value"] == pytest.approx(mirror.loc[("b", "a"), "p_value"])


def test_only_counted_scored_entries_are_stored_and_models_are_compared_on_images_both_scored():
    y, models = tied_data()
    y2 = np.stack([y, y[::-1]], axis=1)
    mask = np.ones_like(y2, bool)
    mask[0, 0] = mask[5, 1] = False  # uncertain entries the policy leaves out
    a, b = np.stack([models["a"], models["b"]], 1), np.stack([models["b"], models["c"]], 1)
    b[3, 0] = np.nan  # b did not score image 3 for label x (a skipped probe label would be all NaN)
    stored_a = scores_of("a", "multilabel_probe", y2, mask, a, ["x", "w"])
    stored_b = scores_of("b", "multilabel_probe", y2, mask, b, ["x", "w"])
    assert len(stored_a) == 2 * len(y) - 2 and len(stored_b) == 2 * len(y) - 3
    assert "img000" not in set(stored_a.loc[stored_a["finding"] == "x", "image_id"])
    rows = delong_differences(pd.concat([stored_a, stored_b])).set_index(["metric", "model_a"])
    keep = [i for i in range(len(y)) if i not in (0, 3)]
    diff, _, p = reference_paired_delong(y[keep], a[keep, 0], b[keep, 0])
    assert rows.loc[("auc:x", "a"), "n"] == len(keep)
    assert rows.loc[("auc:x", "a"), "difference"] == pytest.approx(diff, abs=1e-12)
    assert rows.loc[("auc:x", "a"), "p_value"] == pytest.approx(p, rel=1e-9)
    assert rows.loc[("auc:w", "a"), "n"] == len(y) - 1


def test_alignment_head_is_paired_with_the_same_models_zero_shot_only():
    y, models = tied_data()
    mask = np.ones((len(y), 1), bool)
    frame = pd.concat([
        scores_of("clip", "alignment_head", y[:, None], mask, models["a"][:, None], ["Edema"]),
        scores_of("clip", "multilabel_zero_shot", y[:, None], mask, models["b"][:, None], ["Edema"]),
        scores_of("other", "multilabel_zero_shot", y[:, None], mask, models["c"][:, None], ["Edema"])])
    rows = delong_differences(frame)
    head = rows[rows["task"] == "alignment_head"]
    assert head[["model_a", "model_b"]].values.tolist() == [["clip", "clip"]]
    diff, _, p = reference_paired_delong(y, models["a"], models["b"])
    assert head["difference"].iloc[0] == pytest.approx(diff, abs=1e-12)
    assert head["p_value"].iloc[0] == pytest.approx(p, rel=1e-9) and head["p_holm"].iloc[0] == head["p_value"].iloc[0]
    zero_shot = rows[rows["task"] == "multilabel_zero_shot"]
    assert sorted(map(tuple, zero_shot[["model_a", "model_b"]].values)) == [("clip", "other"), ("other", "clip")]


def test_a_single_positive_gives_a_difference_without_p_and_one_class_gives_no_row():
    y = np.array([1, 0, 0, 0, 0])
    s = np.array([[0.9, 0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.5, 0.3, 0.4]]).T
    y2, mask = np.stack([y, np.zeros_like(y)], 1), np.ones((5, 2), bool)
    frame = pd.concat([scores_of(m, "multilabel_probe", y2, mask, np.stack([s[:, k]] * 2, 1), ["one", "none"])
                       for k, m in enumerate("ab")])
    rows = delong_differences(frame)
    assert set(rows["metric"]) == {"auc:one"}
    r = rows[rows["model_a"] == "a"].iloc[0]
    assert r.difference == pytest.approx(1.0 - 0.25) and math.isnan(r.p_value) and math.isnan(r.p_holm)


# --- the colouring rule -------------------------------------------------------------------------------

def html_row(page, label):
    return next(line for line in page.splitlines() if line.startswith(f"<tr><td>{label}</td>"))


def test_a_big_difference_on_tiny_data_is_grey_and_a_significant_one_is_coloured():
    rng = np.random.default_rng(0)
    # tiny: 4 images per class; b ranks all but one pair right, a ranks at chance
    y_tiny = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    tiny_a = np.array([0.2, 0.6, 0.4, 0.8, 0.5, 0.3, 0.7, 0.1])
    tiny_b = np.array([0.9, 0.6, 0.8, 0.7, 0.65, 0.2, 0.3, 0.1])
    # large: 300 images, b's score follows the target closely, a's barely
    y_big = rng.integers(0, 2, 300)
    big_b, big_a = y_big + rng.normal(0, 0.5, 300), y_big + rng.normal(0, 3.0, 300)
    n = 300
    y = np.zeros((n, 2), int)
    y[:8, 0], y[8:, 0] = y_tiny, 0  # label 'tiny' counts the first 8 images only (mask below)
    y[:, 1] = y_big
    a = np.stack([np.r_[tiny_a, np.zeros(n - 8)], big_a], 1)
    b = np.stack([np.r_[tiny_b, np.zeros(n - 8)], big_b], 1)
    mask = np.ones_like(y, bool)
    mask[8:, 0] = False
    ids = [f"img{i:04d}" for i in range(n)]
    metrics, scores = [], []
    for model, s in (("a", a), ("b", b)):
        result = AucResult()
        result.add("multilabel_probe", "lvl", roc_auc_per_label(y, mask, s, ["tiny", "big"]),
                   auc_summary(y, mask, s), n, y, mask, s, ids)
        metrics.append(result.tables.frames()[0].assign(model=model))
        scores.append(result.scores_frame().assign(model=model))
    metrics = pd.concat(metrics, ignore_index=True)
    differences = delong_differences(pd.concat(scores, ignore_index=True))

    table, page = auc_difference_report(metrics, "a", "b", differences=differences)
    got = table.set_index("label")
    assert got.loc["tiny", "diff"] > 0.2 and got.loc["tiny", "p_value"] > 0.05
    assert got.loc["tiny", "mark"] == "not significant"
    assert GREY in html_row(page, "tiny") and GREEN not in html_row(page, "tiny")
    assert got.loc["big", "diff"] > 0.005 and got.loc["big", "p_value"] < 0.05 and got.loc["big", "mark"] == "better"
    assert GREEN in html_row(page, "big")
    assert got.loc["macro_auc", "mark"] == "untested" and GREY in html_row(page, "macro_auc")
    reverse, page = auc_difference_report(metrics, "b", "a", differences=differences)
    assert reverse.set_index("label").loc["big", "mark"] == "worse" and RED in html_row(page, "big")
    assert "DeLong" in page
    # without the tests: the seed's own rule colours every difference beyond half a point
    seed_rule, _ = auc_difference_report(metrics, "a", "b")
    assert seed_rule.set_index("label").loc["tiny", "mark"] == "better"


# --- a real pipeline run --------------------------------------------------------------------------------

FINDINGS = ["Edema", "Pleural Effusion", "Support Devices"]
N_IMAGES = 64


def write_collection(root: Path, seed: int = 11) -> Path:
    return write_chexpert_collection(root, FINDINGS, N_IMAGES, seed=seed, p=(0.35, 0.35, 0.15, 0.15))


def write_catalog(path: Path, csv_path: Path) -> Path:
    path.write_text(f"""datasets:
  chest:
    reader: chexpert_csv
    csv: {csv_path}
    findings: {FINDINGS}
    labels: [label]
    uncertain_policy: ignore
    split: {{test_fraction: 0.3, seed: 3, folds: 2}}
models:
  raw-pixels:
    loader: raw_pixels
    image_size: 8
{TINY_CLIP_YAML}""")
    return path


def materialize(defs, instance, stages, partition_key=None):
    result = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["chest", s]) for s in stages],
                            instance=instance, resources=defs.resources, partition_key=partition_key,
                            raise_on_error=False)
    assert result.success, [e.event_specific_data.error.message for e in result.all_events
                            if e.event_type_value == "STEP_FAILURE"]
    return result


def test_the_pipeline_stores_auc_scores_and_model_comparison_writes_delong_rows(tmp_path):
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.definitions import build_definitions
    from nfhm_pipeline.reports.comparison import ComparisonReport, add_auc_comparisons
    from nfhm_pipeline.store import warehouse

    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", write_collection(tmp_path / "chest")))
    data_dir = tmp_path / "data"
    defs = build_definitions(catalog, local_resources(data_dir))
    with dg.instance_for_test() as instance:
        for i, model in enumerate(["raw-pixels", "tiny-clip"]):
            materialize(defs, instance, ["image_manifest", "splits"] * (i == 0) + [
                "image_embeddings", "text_embeddings", "multilabel_metrics", "alignment_head"], model)
        comparison = materialize(defs, instance, ["model_comparison"])
    db = data_dir / "warehouse.duckdb"
    metrics = warehouse.read_table(db, "metrics", dataset="chest")
    value = metrics.set_index(["model", "task", "metric"])["value"]
    scores = warehouse.read_table(db, "auc_scores", dataset="chest")
    assert set(map(tuple, scores[["model", "task"]].drop_duplicates().values)) == {
        ("raw-pixels", "multilabel_probe"), ("tiny-clip", "multilabel_probe"),
        ("tiny-clip", "multilabel_zero_shot"), ("tiny-clip", "alignment_head")}
    counted = scores.groupby(["model", "task", "finding"]).size()
    for (model, task, finding), n in counted.items():  # exactly the entries each stored AUC counted
        assert n == value[model, task, f"n_pos:{finding}"] + value[model, task, f"n_neg:{finding}"]
    splits = warehouse.read_table(db, "splits", dataset="chest")
    assert set(scores["image_id"]) <= set(splits.loc[splits["split"] == "test", "image_id"])

    differences = warehouse.read_table(db, "model_differences", dataset="chest")
    delong = differences[differences["test"] == "delong"]
    probe = delong[delong["task"] == "multilabel_probe"].set_index(["metric", "model_a", "model_b"])
    for f in FINDINGS:
        metric = f"auc:{f}"
        forward, backward = probe.loc[(metric, "tiny-clip", "raw-pixels")], probe.loc[(metric, "raw-pixels", "tiny-clip")]
        assert forward["difference"] == pytest.approx(
            value["tiny-clip", "multilabel_probe", metric] - value["raw-pixels", "multilabel_probe", metric], abs=1e-9)
        assert backward["difference"] == pytest.approx(-forward["difference"], abs=1e-12)
        assert forward["p_value"] == pytest.approx(backward["p_value"]) and 0 <= forward["p_value"] <= 1
        assert forward["ci_low"] <= forward["difference"] <= forward["ci_high"]
        assert forward["n"] == value["raw-pixels", "multilabel_probe", f"n_pos:{f}"] + \
            value["raw-pixels", "multilabel_probe", f"n_neg:{f}"]
    head = delong[delong["task"] == "alignment_head"].set_index("metric")
    assert set(head.index) == {f"auc:{f}" for f in FINDINGS}
    assert (head["model_a"] == "tiny-clip").all() and (head["model_b"] == "tiny-clip").all()
    for f in FINDINGS:
        assert head.loc[f"auc:{f}", "difference"] == pytest.approx(
            value["tiny-clip", "alignment_head", f"auc:{f}"] - value["tiny-clip", "multilabel_zero_shot", f"auc:{f}"],
            abs=1e-9)
    assert set(delong["split_id"]) == set(splits["split_id"])
    meta = comparison.asset_materializations_for_node("chest__model_comparison")[0].metadata
    assert meta["AUC differences (DeLong)"].value == len(delong)

    # the report's seed-003 tables colour exactly the significant differences beyond half a point
    report = ComparisonReport(summary_markdown="")
    add_auc_comparisons(report, metrics, differences)
    for name, table in report.extra_tables.items():
        coloured = table["mark"].isin(["better", "worse"])
        assert (table.loc[coloured, "p_value"] < 0.05).all() and (table.loc[coloured, "diff"].abs() > 0.005).all()
        shown = table[table["label"].isin([f for f in FINDINGS])]
        assert shown["p_value"].notna().all(), name
        beyond = shown["diff"].abs() > 0.005
        assert (coloured[shown.index] == (beyond & (shown["p_value"] < 0.05))).all(), name


# --- macro / micro AUC: the paired bootstrap over test images ----------------------------------------

def pairwise_auc(y, s):
    """AUC written out over every (positive, negative) pair, ties one half; None for one class."""
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def reference_summary(entries, drawn):
    """(macro, micro) of one scorer's auc_scores rows on one resample: ``drawn`` [n] is how many
    times each image position was drawn; every entry is written out that many times, then the
    AUCs are taken pairwise over the written-out sample."""
    repeated = np.repeat(np.arange(len(entries)), drawn[entries["position"].to_numpy(dtype=int)])
    finding = entries["finding"].to_numpy()[repeated]
    target, score = entries["target"].to_numpy()[repeated], entries["score"].to_numpy()[repeated]
    aucs = [pairwise_auc(target[finding == f], score[finding == f]) for f in sorted(set(finding))]
    aucs = [a for a in aucs if a is not None]
    macro = sum(aucs) / len(aucs) if aucs else None
    return macro, pairwise_auc(target, score)


def synthetic_scores(n=1000, n_labels=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, n_labels))
    mask = rng.random((n, n_labels)) > 0.1
    ids = [f"img{i:04d}" for i in range(n)]
    names = [f"f{j}" for j in range(n_labels)]
    random = rng.normal(size=(n, n_labels))
    scorers = {"good": y + rng.normal(0, 0.5, (n, n_labels)), "random": random, "copy": random.copy()}
    metrics, scores = [], []
    for model, s in scorers.items():
        result = AucResult()
        result.add("multilabel_probe", "lvl", roc_auc_per_label(y, mask, s, names), auc_summary(y, mask, s), n,
                   y, mask, s, ids)
        metrics.append(result.tables.frames()[0].assign(model=model))
        scores.append(result.scores_frame().assign(model=model))
    return pd.concat(metrics, ignore_index=True), pd.concat(scores, ignore_index=True)


def test_macro_micro_bootstrap_separates_a_clearly_better_model_and_ties_an_identical_copy():
    import time

    from nfhm_pipeline.evaluation.auc_differences import bootstrap_summary_differences

    metrics, scores = synthetic_scores()
    start = time.perf_counter()
    rows = bootstrap_summary_differences(scores, seed=5, n_resamples=1000)
    print(f"\nmacro/micro paired bootstrap, 1000 images x 5 labels x 3 models, B = 1000: "
          f"{time.perf_counter() - start:.2f} s")
    assert set(rows["test"]) == {"bootstrap-paired"} and set(rows["metric"]) == {"macro_auc", "micro_auc"}
    assert len(rows) == 2 * 3 * 2 and (rows["n"] == 1000).all() and rows["p_mcnemar"].isna().all()
    value = metrics.set_index(["model", "metric"])["value"]
    got = rows.set_index(["metric", "model_a", "model_b"])
    for metric in ("macro_auc", "micro_auc"):
        for (a, b) in (("good", "random"), ("random", "good"), ("copy", "random"), ("good", "copy")):
            assert got.loc[(metric, a, b), "difference"] == pytest.approx(value[a, metric] - value[b, metric],
                                                                          abs=1e-12)
        better = got.loc[(metric, "good", "random")]
        assert better["difference"] > 0.3 and better["p_holm"] < 0.05 and better["ci_low"] > 0.3
        copy = got.loc[(metric, "copy", "random")]
        assert copy["difference"] == 0 and copy["p_value"] == 1 and copy["p_holm"] == 1
        assert copy["ci_low"] == copy["ci_high"] == 0
        # Holm within (metric, model_a): 'random' against good and copy
        family = rows[(rows["metric"] == metric) & (rows["model_a"] == "random")]
        assert family["p_holm"].tolist() == pytest.approx(reference_holm(family["p_value"].tolist()), abs=1e-15)


def test_a_label_with_one_class_in_the_test_images_is_left_out_of_macro_as_in_the_metric():
    from nfhm_pipeline.evaluation.auc_differences import bootstrap_summary_differences

    rng = np.random.default_rng(3)
    n = 40
    y = rng.integers(0, 2, (n, 3))
    y[:, 2] = 0  # 'none': every counted test image negative
    mask = np.ones_like(y, bool)
    ids = [f"img{i:03d}" for i in range(n)]
    metrics, scores = [], []
    for model in ("a", "b"):
        s = y + rng.normal(0, 1.0 if model == "a" else 2.0, y.shape)
        result = AucResult()
        result.add("multilabel_probe", "lvl", roc_auc_per_label(y, mask, s, ["x", "w", "none"]),
                   auc_summary(y, mask, s), n, y, mask, s, ids)
        metrics.append(result.tables.frames()[0].assign(model=model))
        scores.append(result.scores_frame().assign(model=model))
    metrics = pd.concat(metrics).set_index(["model", "metric"])["value"]
    scores = pd.concat(scores, ignore_index=True)
    assert (scores["finding"] == "none").sum() == 2 * n  # its entries are stored (and count in micro)
    assert metrics["a", "n_labels_defined"] == 2
    rows = bootstrap_summary_differences(scores, seed=0, n_resamples=200).set_index(["metric", "model_a"])
    macro = rows.loc[("macro_auc", "a"), "difference"]
    assert macro == pytest.approx(metrics["a", "macro_auc"] - metrics["b", "macro_auc"], abs=1e-12)
    two_labels = {m: (metrics[m, "auc:x"] + metrics[m, "auc:w"]) / 2 for m in "ab"}
    assert macro == pytest.approx(two_labels["a"] - two_labels["b"], abs=1e-12)
    assert rows.loc[("micro_auc", "a"), "difference"] == pytest.approx(
        metrics["a", "micro_auc"] - metrics["b", "micro_auc"], abs=1e-12)


GROUPED_FINDINGS = [*FINDINGS, "Fracture"]  # Fracture: negative in every image, so one class in the test images
GROUPED_RESAMPLES = 300


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """A pipeline run on the chest collection with a patient column (two images each, resampled as
    one unit), an all-negative finding, and three models: raw-pixels, an identical copy of it, and
    tiny-clip (zero-shot and alignment head). Yields (warehouse path, catalog)."""
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.definitions import build_definitions

    root = tmp_path_factory.mktemp("grouped")
    csv_path = write_collection(root / "chest")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    table["Fracture"] = "0.0"
    table["Patient"] = [f"p{i // 2:02d}" for i in range(len(table))]
    table.to_csv(csv_path, index=False)
    catalog_path = root / "catalog.yaml"
    catalog_path.write_text(f"""datasets:
  chest:
    reader: chexpert_csv
    csv: {csv_path}
    findings: {GROUPED_FINDINGS}
    labels: [label]
    group: Patient
    resample_by: Patient
    resamples: {GROUPED_RESAMPLES}
    uncertain_policy: ignore
    split: {{test_fraction: 0.3, seed: 3, folds: 2}}
models:
  raw-pixels:
    loader: raw_pixels
    image_size: 8
  raw-pixels-copy:
    loader: raw_pixels
    image_size: 8
{TINY_CLIP_YAML}""")
    catalog = load_catalog(catalog_path)
    data_dir = root / "data"
    defs = build_definitions(catalog, local_resources(data_dir))
    with dg.instance_for_test() as instance:
        for i, model in enumerate(["raw-pixels", "raw-pixels-copy", "tiny-clip"]):
            stages = ["image_embeddings", "text_embeddings", "multilabel_metrics"] + ["alignment_head"] * (
                model == "tiny-clip")
            materialize(defs, instance, ["image_manifest", "splits"] * (i == 0) + stages, model)
        materialize(defs, instance, ["model_comparison"])
    yield data_dir / "warehouse.duckdb", catalog


def summary_rows(db):
    from nfhm_pipeline.store import warehouse

    differences = warehouse.read_table(db, "model_differences", dataset="chest")
    return differences[differences["metric"].isin(["macro_auc", "micro_auc"])]


def test_pipeline_macro_micro_differences_equal_the_stored_metric_differences(grouped_run):
    from nfhm_pipeline.store import warehouse

    db, _ = grouped_run
    metrics = warehouse.read_table(db, "metrics", dataset="chest")
    value = metrics.set_index(["model", "task", "metric"])["value"]
    rows = summary_rows(db)
    assert set(rows["test"]) == {"bootstrap-paired"} and (rows["grp"] == "all").all()
    probe = rows[rows["task"] == "multilabel_probe"].set_index(["metric", "model_a", "model_b"])
    models = ["raw-pixels", "raw-pixels-copy", "tiny-clip"]
    assert len(probe) == 2 * 3 * 2
    for metric in ("macro_auc", "micro_auc"):
        for a in models:
            for b in (m for m in models if m != a):
                assert probe.loc[(metric, a, b), "difference"] == pytest.approx(
                    value[a, "multilabel_probe", metric] - value[b, "multilabel_probe", metric], abs=1e-12)
        copy = probe.loc[(metric, "raw-pixels-copy", "raw-pixels")]
        assert copy["difference"] == 0 and copy["p_value"] == 1 and copy["p_holm"] >= 0.05
    head = rows[rows["task"] == "alignment_head"].set_index("metric")
    assert sorted(head.index) == ["macro_auc", "micro_auc"]
    assert (head["model_a"] == "tiny-clip").all() and (head["model_b"] == "tiny-clip").all()
    assert (head["p_holm"] == head["p_value"]).all()  # a family of one
    for metric in ("macro_auc", "micro_auc"):
        assert head.loc[metric, "difference"] == pytest.approx(
            value["tiny-clip", "alignment_head", metric] - value["tiny-clip", "multilabel_zero_shot", metric],
            abs=1e-12)
    # Fracture (one class among the test images) is stored for zero-shot and left out of its macro
    scores = warehouse.read_table(db, "auc_scores", dataset="chest")
    assert ((scores["finding"] == "Fracture") & (scores["task"] == "multilabel_zero_shot")).any()
    assert value["tiny-clip", "multilabel_zero_shot", "n_labels_defined"] == len(FINDINGS)
    # n: the test images with a counted entry (an image whose findings the policy all leaves out has none)
    splits = warehouse.read_table(db, "splits", dataset="chest")
    tested = set(splits.loc[splits["split"] == "test", "image_id"])
    for task, part in rows.groupby("task"):
        compared = {"alignment_head": ["alignment_head", "multilabel_zero_shot"]}.get(task, [task])
        images = set(scores.loc[scores["task"].isin(compared), "image_id"])
        assert images <= tested and (part["n"] == len(images)).all(), task


def test_pipeline_macro_micro_intervals_and_p_match_a_plain_bootstrap_loop_over_patients(grouped_run):
    from nfhm_pipeline.evaluation.confidence import resample_counts
    from nfhm_pipeline.store import warehouse

    db, catalog = grouped_run
    spec = catalog.datasets["chest"]
    scores = warehouse.read_table(db, "auc_scores", dataset="chest")
    images = warehouse.read_table(db, "images", dataset="chest").set_index("image_id")
    rows = summary_rows(db).set_index(["task", "metric", "model_a", "model_b"])
    cases = [("multilabel_probe", "tiny-clip", "multilabel_probe", "raw-pixels", "multilabel_probe", "tiny-clip"),
             ("alignment_head", "tiny-clip", "alignment_head", "tiny-clip", "multilabel_zero_shot", "tiny-clip")]
    for task, model_a, task_a, model_b, task_b, row_a in cases:
        a = scores[(scores["model"] == model_a) & (scores["task"] == task_a)]
        b = scores[(scores["model"] == model_b) & (scores["task"] == task_b)]
        ids = sorted(set(a["image_id"]) & set(b["image_id"]))
        position = {image: i for i, image in enumerate(ids)}
        a, b = (s.assign(position=s["image_id"].map(position)).dropna(subset=["position"]) for s in (a, b))
        patients = ("group:" + images.loc[ids, "grp"].astype(str)).to_numpy()
        assert len(set(patients)) < len(ids)  # the resample draws patients, not images
        counts = resample_counts(len(ids), GROUPED_RESAMPLES, int(spec.seed), groups=patients)
        drawn = {"macro_auc": [], "micro_auc": []}
        for row in counts:
            (macro_a, micro_a), (macro_b, micro_b) = reference_summary(a, row), reference_summary(b, row)
            for metric, x, y in (("macro_auc", macro_a, macro_b), ("micro_auc", micro_a, micro_b)):
                if x is not None and y is not None:
                    drawn[metric].append(x - y)
        for metric, d in drawn.items():
            stored = rows.loc[(task, metric, row_a, model_b if task != "alignment_head" else row_a)]
            low, high = np.percentile(d, [2.5, 97.5])
            tail = min(sum(x <= 0 for x in d), sum(x >= 0 for x in d))
            assert (stored["ci_low"], stored["ci_high"]) == pytest.approx((low, high), abs=1e-12), (task, metric)
            assert stored["p_value"] == pytest.approx(min(1.0, 2 * (tail + 1) / (len(d) + 1)), abs=1e-15)
            assert stored["n"] == len(ids)


def test_the_report_tests_macro_and_micro_rows_with_the_bootstrap_p(grouped_run):
    from nfhm_pipeline.reports.comparison import ComparisonReport, add_auc_comparisons, current_differences
    from nfhm_pipeline.store import provenance

    db, _ = grouped_run
    metrics = provenance.current_rows(db, "metrics", "chest")
    differences = current_differences(db, "chest")
    report = ComparisonReport(summary_markdown="")
    add_auc_comparisons(report, metrics, differences)
    stored = differences[differences["test"] == "bootstrap-paired"].set_index(["task", "metric", "model_a", "model_b"])
    table = report.extra_tables["probe AUC: tiny-clip vs raw-pixels"].set_index("label")
    head = report.extra_tables["alignment head vs zero-shot AUC: tiny-clip"].set_index("label")
    for metric in ("macro_auc", "micro_auc"):
        assert table.loc[metric, "p_value"] == stored.loc[("multilabel_probe", metric, "tiny-clip", "raw-pixels"),
                                                          "p_value"]
        assert head.loc[metric, "p_value"] == stored.loc[("alignment_head", metric, "tiny-clip", "tiny-clip"),
                                                         "p_value"]
        for t in (table, head):
            assert t.loc[metric, "mark"] != "untested"
            beyond, significant = abs(t.loc[metric, "diff"]) > 0.005, t.loc[metric, "p_value"] < 0.05
            assert (t.loc[metric, "mark"] in ("better", "worse")) == (beyond and significant)
    assert "paired bootstrap" in report.html_sections["probe AUC difference: tiny-clip vs raw-pixels"]
