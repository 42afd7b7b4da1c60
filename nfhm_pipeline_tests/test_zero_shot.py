"""Specification of zero-shot classification, prompt ensembles and retrieval P@K / R@K."""
import math

import numpy as np
import pytest

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation import zero_shot
from nfhm_pipeline.evaluation.zero_shot import (
    BIO_TEMPLATES,
    DEFAULT_TEMPLATES,
    MEDICAL_TEMPLATES,
    ensemble_class_embeddings,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_predict,
)


def cosine(u, v) -> float:
    dot = math.fsum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(math.fsum(a * a for a in u)) * math.sqrt(math.fsum(b * b for b in v)))


def reference_ranking(query, candidates) -> list[int]:
    """Candidate indices by decreasing cosine, lower index first among (rounded) equal scores."""
    scored = [(-round(cosine(query, c), 9), j) for j, c in enumerate(candidates)]
    return [j for _, j in sorted(scored)]


def reference_retrieval(queries, q_labels, candidates, c_labels, k):
    precision, recall = 0.0, 0.0
    for q, label in zip(queries, q_labels):
        top = reference_ranking(q, candidates)[:k]
        correct = [c_labels[j] == label for j in top]
        precision += sum(correct) / len(top)
        recall += 1.0 if any(correct) else 0.0
    return precision / len(queries), recall / len(queries)


def tied_embeddings(rng, n, dim, n_distinct):
    """Rows drawn from a few distinct vectors, so many cosine scores tie exactly."""
    distinct = rng.integers(-2, 3, size=(n_distinct, dim)).astype(float)
    distinct[np.all(distinct == 0, axis=1), 0] = 1.0
    return distinct[rng.integers(0, n_distinct, size=n)]


def test_template_sets_each_hold_one_placeholder_per_template():
    for templates in (DEFAULT_TEMPLATES, BIO_TEMPLATES, MEDICAL_TEMPLATES):
        assert len(templates) >= 3 and all(t.count("{}") == 1 for t in templates)


def test_ensemble_normalises_each_prompt_then_the_mean():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(4, 3, 5)) * rng.uniform(0.1, 10, size=(4, 3, 1))
    result = ensemble_class_embeddings(text)
    for c in range(4):
        units = [[x / math.sqrt(sum(v * v for v in p)) for x in p] for p in text[c]]
        mean = [sum(u[d] for u in units) / 3 for d in range(5)]
        norm = math.sqrt(sum(m * m for m in mean))
        assert result[c] == pytest.approx([m / norm for m in mean])


def test_ensemble_rejects_zero_norm_prompt():
    text = np.ones((2, 2, 3))
    text[1, 0] = 0.0
    with pytest.raises(EvaluationError, match="zero norm"):
        ensemble_class_embeddings(text)


def test_predict_ranks_classes_by_cosine_with_lower_index_winning_ties():
    rng = np.random.default_rng(1)
    images = tied_embeddings(rng, 25, 4, 5)
    classes = tied_embeddings(rng, 7, 4, 3)  # duplicated class vectors tie exactly
    ranking = zero_shot_predict(images, classes, k=5)
    assert ranking.shape == (25, 5) and ranking.dtype == np.int64
    for i, image in enumerate(images):
        assert list(ranking[i]) == reference_ranking(image, classes)[:5]


def test_predict_clips_k_to_the_number_of_classes():
    ranking = zero_shot_predict(np.eye(3), np.eye(3), k=5)
    assert ranking.shape == (3, 3) and list(ranking[:, 0]) == [0, 1, 2]


def test_identical_classes_resolve_to_the_lower_index():
    classes = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])  # classes 1 and 2 point the same way
    assert list(zero_shot_predict(np.array([[3.0, 0.1]]), classes, k=3)[0]) == [1, 2, 0]


def test_zero_shot_accuracy_reports_single_template_and_ensemble_against_reference():
    rng = np.random.default_rng(2)
    text = rng.normal(size=(6, 4, 8))
    labels = rng.integers(0, 6, size=40)
    images = text[labels, 0] + rng.normal(scale=1.5, size=(40, 8))
    table = zero_shot_accuracy(images, labels, text, ks=(1, 5)).set_index(["prompting", "k"])

    units = text / np.linalg.norm(text, axis=2, keepdims=True)
    heads = {"single_template": [list(text[c, 0]) for c in range(6)], "ensemble": [list(units[c].mean(axis=0)) for c in range(6)]}
    for prompting, classes in heads.items():
        for k in (1, 5):
            hits = [labels[i] in reference_ranking(images[i], classes)[:k] for i in range(40)]
            assert table.loc[(prompting, k), "value"] == pytest.approx(sum(hits) / 40)
            assert table.loc[(prompting, k), "metric"] == f"top{k}_accuracy"


def test_zero_shot_accuracy_rejects_labels_outside_the_classes():
    with pytest.raises(EvaluationError, match="0..2"):
        zero_shot_accuracy(np.ones((2, 4)), np.array([0, 3]), np.ones((3, 2, 4)))


@pytest.mark.parametrize("chunk", [1024, 3])
def test_retrieval_matches_brute_force_with_ties(monkeypatch, chunk):
    monkeypatch.setattr(zero_shot, "_CHUNK", chunk)  # exercises the chunked scoring path
    rng = np.random.default_rng(3)
    images, texts = tied_embeddings(rng, 14, 3, 6), tied_embeddings(rng, 9, 3, 4)
    image_labels, text_labels = rng.integers(0, 3, 14), rng.integers(0, 4, 9)  # label 3: no image has it
    table = retrieval_metrics(images, image_labels, texts, text_labels, ks=(1, 2, 5, 10)).set_index(["direction", "k", "metric"])
    for direction, q, ql, c, cl in (
        ("image_to_text", images, image_labels, texts, text_labels),
        ("text_to_image", texts, text_labels, images, image_labels),
    ):
        for k in (1, 2, 5, 10):
            precision, recall = reference_retrieval(q, ql, c, cl, min(k, len(c)))
            assert table.loc[(direction, k, "precision"), "value"] == pytest.approx(precision)
            assert table.loc[(direction, k, "recall"), "value"] == pytest.approx(recall)


def test_retrieval_clips_k_to_the_number_of_candidates():
    images, texts = np.eye(3), np.eye(3)[:2]
    table = retrieval_metrics(images, np.array([0, 1, 0]), texts, np.array([0, 1]), ks=(1, 10))
    row = table[(table["direction"] == "image_to_text") & (table["k"] == 10) & (table["metric"] == "precision")]
    assert int(row["k_effective"].iloc[0]) == 2
    assert float(row["value"].iloc[0]) == pytest.approx(0.5)  # every query: 1 correct of the 2 texts


def test_recall_counts_a_hit_if_any_correct_item_is_in_top_k():
    # query 0's label-matching text ranks second, query 1 has none: R@2 = 1/2, P@2 = (1/2 + 0) / 2
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    texts = np.array([[1.0, 0.1], [1.0, 0.2], [-1.0, 0.0]])
    table = retrieval_metrics(images, np.array(["a", "b"]), texts, np.array(["x", "a", "x"]), ks=(1, 2))
    values = table[table["direction"] == "image_to_text"].set_index(["k", "metric"])["value"]
    assert values[(1, "recall")] == 0.0 and values[(2, "recall")] == 0.5
    assert values[(2, "precision")] == 0.25
    assert set(table["convention"]) == {zero_shot.PRECISION_CONVENTION, zero_shot.RECALL_CONVENTION}
    assert "any" in zero_shot.RECALL_CONVENTION


def test_retrieval_rejects_dimension_mismatch():
    with pytest.raises(EvaluationError, match="dim"):
        retrieval_metrics(np.ones((2, 3)), np.array([0, 1]), np.ones((2, 4)), np.array([0, 1]))


def test_retrieval_rejects_empty_inputs():
    with pytest.raises(EvaluationError, match="non-empty"):
        retrieval_metrics(np.ones((0, 3)), np.array([]), np.ones((2, 3)), np.array([0, 1]))


def test_predict_rejects_zero_norm_image():
    images = np.ones((3, 2))
    images[2] = 0.0
    with pytest.raises(EvaluationError, match="row 2"):
        zero_shot_predict(images, np.eye(2))
