import math

import numpy as np
import pandas as pd
import pytest

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.multilabel import (
    auc_difference_html,
    auc_difference_table,
    macro_micro_auc,
    multilabel_probe,
    prompt_pair,
    roc_auc_per_label,
    zero_shot_auc,
    zero_shot_scores,
)


def pairwise_auc(y, s):
    """Brute force: share of (positive, negative) pairs ranked right, ties count 1/2."""
    pos = [si for yi, si in zip(y, s) if yi == 1]
    neg = [si for yi, si in zip(y, s) if yi == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tied_random_problem(seed=0, n=40, f=5):
    """Integer scores (many ties), a random mask, label 3 without positives, label 4 with one."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, f)) < 0.4).astype(np.int8)
    y[:, 3] = 0
    y[:, 4] = 0
    y[7, 4] = 1
    mask = rng.random((n, f)) < 0.8
    mask[7, 4] = True
    scores = rng.integers(0, 4, size=(n, f)).astype(float) + 0.5 * y * rng.integers(0, 2, size=(n, f))
    return y, mask, scores


def test_per_label_auc_matches_brute_force_pair_count_with_ties():
    y, mask, s = tied_random_problem()
    table = roc_auc_per_label(y, mask, s, list("ABCDE"))
    for j in (0, 1, 2, 4):
        expected = pairwise_auc(y[mask[:, j], j], s[mask[:, j], j])
        assert table.loc[j, "auc"] == pytest.approx(expected, abs=1e-12)
        assert table.loc[j, "n_pos"] == y[mask[:, j], j].sum()
        assert table.loc[j, "n_neg"] == (y[mask[:, j], j] == 0).sum()
    assert table["label"].tolist() == list("ABCDE")


def test_label_without_positives_gets_nan_and_a_reason():
    y, mask, s = tied_random_problem()
    row = roc_auc_per_label(y, mask, s).loc[3]
    assert math.isnan(row["auc"]) and row["n_pos"] == 0 and "no positive" in row["reason"]


def test_masked_entries_do_not_change_the_auc():
    y, mask, s = tied_random_problem()
    wild = s.copy()
    wild[~mask] = np.where(y[~mask] == 1, -100.0, 100.0)  # would ruin the AUC if counted
    pd.testing.assert_frame_equal(roc_auc_per_label(y, mask, s), roc_auc_per_label(y, mask, wild))


def test_macro_is_mean_of_defined_labels_and_micro_pools_all_counted_entries():
    y, mask, s = tied_random_problem(seed=1)
    per_label = [pairwise_auc(y[mask[:, j], j], s[mask[:, j], j]) for j in range(y.shape[1])]
    defined = [a for a in per_label if not math.isnan(a)]
    got = macro_micro_auc(y, mask, s)
    assert got["macro_auc"] == pytest.approx(sum(defined) / len(defined), abs=1e-12)
    assert got["micro_auc"] == pytest.approx(pairwise_auc(y[mask], s[mask]), abs=1e-12)
    assert got["n_labels_defined"] == len(defined) == 4


def test_nan_score_at_a_counted_entry_is_an_evaluation_error():
    y, mask, s = tied_random_problem()
    s[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1]] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        roc_auc_per_label(y, mask, s)


def probe_data(separable, seed=0, n=300, d=16, f=3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, f)) < 0.4).astype(np.int8)
    x = rng.normal(size=(n, d))
    if separable:
        x += 3.0 * y @ rng.normal(size=(f, d))
    mask = rng.random((n, f)) < 0.9
    return x, y, mask


def test_probe_separates_linearly_separable_labels():
    x, y, m = probe_data(separable=True)
    scores, table = multilabel_probe(x[:200], y[:200], m[:200], x[200:], y[200:], m[200:], label_names=["a", "b", "c"])
    assert scores.shape == (100, 3)
    assert (table["auc"] > 0.9).all()
    assert table["n_train"].tolist() == m[:200].sum(axis=0).tolist()


def test_probe_on_random_features_is_near_chance():
    x, y, m = probe_data(separable=False, n=1200)
    _, table = multilabel_probe(x[:600], y[:600], m[:600], x[600:], y[600:], m[600:])
    assert (table["auc"] - 0.5).abs().max() < 0.08


def test_probe_skips_a_label_with_one_training_class():
    x, y, m = probe_data(separable=True)
    y[:200, 1] = 0
    scores, table = multilabel_probe(x[:200], y[:200], m[:200], x[200:], y[200:], m[200:])
    assert np.isnan(scores[:, 1]).all() and not np.isnan(scores[:, [0, 2]]).any()
    assert math.isnan(table.loc[1, "auc"]) and "one class" in table.loc[1, "reason"]
    assert table.loc[0, "auc"] > 0.9


def test_prompt_pair_names_the_finding_positively_and_negatively():
    assert prompt_pair("Pleural Effusion") == ("chest x-ray showing pleural effusion", "chest x-ray with no pleural effusion")
    pos, neg = prompt_pair("No Finding")
    assert "no findings" in pos and "no" not in neg.split()


def constructed_zero_shot(noise, seed=0, n=60, f=3):
    """Images lie near the positive prompt of each finding they have, else near its negative prompt."""
    rng = np.random.default_rng(seed)
    eye = np.eye(2 * f)
    pos, neg = eye[0::2], eye[1::2]
    y = (rng.random((n, f)) < 0.5).astype(np.int8)
    images = y @ pos + (1 - y) @ neg + noise * rng.normal(size=(n, 2 * f))
    return images, pos, neg, y


def test_zero_shot_auc_is_perfect_when_images_sit_on_their_prompts():
    images, pos, neg, y = constructed_zero_shot(noise=0.05)
    table = zero_shot_auc(images, pos, neg, y, np.ones_like(y, bool), ["a", "b", "c"])
    assert (table["auc"] == 1.0).all()
    flipped = zero_shot_auc(images, neg, pos, y, np.ones_like(y, bool), ["a", "b", "c"])
    assert (flipped["auc"] == 0.0).all()


def test_zero_shot_auc_ranks_by_two_way_softmax_even_where_it_saturates():
    images, pos, neg, y = constructed_zero_shot(noise=0.8, seed=3)
    mask = np.ones_like(y, bool)
    table = zero_shot_auc(images, pos, neg, y, mask, temperature=100.0)
    for j in range(3):
        unit = images / np.linalg.norm(images, axis=1, keepdims=True)
        # Plain 2-way softmax at a low temperature has the same order without saturating.
        p = np.array([math.exp(2 * u @ pos[j]) / (math.exp(2 * u @ pos[j]) + math.exp(2 * u @ neg[j])) for u in unit])
        assert table.loc[j, "auc"] == pytest.approx(pairwise_auc(y[:, j], p), abs=1e-12)
        assert 0.5 < table.loc[j, "auc"] < 1.0


def test_zero_shot_scores_are_the_two_way_softmax_probability():
    images, pos, neg, _ = constructed_zero_shot(noise=0.5, seed=4, n=5)
    got = zero_shot_scores(images, pos, neg, temperature=3.0)
    for i, v in enumerate(images / np.linalg.norm(images, axis=1, keepdims=True)):
        for j in range(3):
            a, b = math.exp(3.0 * v @ pos[j]), math.exp(3.0 * v @ neg[j])
            assert got[i, j] == pytest.approx(a / (a + b), rel=1e-12)


def auc_tables():
    a = pd.DataFrame({"label": ["up", "down", "small", "edge", "gone"], "auc": [0.70, 0.80, 0.90, 0.800, 0.60]})
    b = pd.DataFrame({"label": ["new", "gone", "edge", "small", "down", "up"], "auc": [0.5, np.nan, 0.805, 0.904, 0.79, 0.71]})
    return a, b


def test_difference_table_marks_changes_beyond_half_a_percent():
    table = auc_difference_table(*auc_tables(), "visual", "visual+text")
    assert table["label"].tolist() == ["up", "down", "small", "edge", "gone", "new"]
    assert table["mark"].tolist() == ["better", "worse", "same", "same", "n/a", "n/a"]
    assert table.loc[0, "diff"] == pytest.approx(0.01)
    assert table.loc[0, ["auc_a", "auc_b"]].tolist() == [0.70, 0.71]


def test_difference_html_colours_improvement_green_and_degradation_red():
    page = auc_difference_html(auc_difference_table(*auc_tables(), "visual", "visual+<text>"))
    rows = {line.split("</td>")[0].removeprefix("<tr><td>"): line for line in page.splitlines() if line.startswith("<tr><td>")}
    assert "#1a7f37" in rows["up"] and "+0.0100" in rows["up"]
    assert "#cf222e" in rows["down"] and "-0.0100" in rows["down"]
    assert "color" not in rows["small"] and "color" not in rows["edge"]
    assert "visual+&lt;text&gt;" in page
