"""Zero-shot classification with prompt templates and ensembles, and image–text retrieval.

Similarity is cosine (rows L2-normalised, dot product in float64, rounded to 12 decimals so that
equal cosines tie whatever the floating-point noise). Rankings are deterministic: among equal
scores the lower index (class, or candidate row) ranks first.

Prompt ensembles (CLIP, MedCLIP): each prompt embedding is normalised, the prompts of a class are
averaged, and the mean is normalised again. "Single template" scores use the first template only.

Retrieval (MedCLIP Table 4, CLIP_benchmark), for image→text and text→image:

* ``precision`` (P@K): fraction of the top K candidates whose label equals the query's label,
  averaged over queries.
* ``recall`` (R@K, CLIP_benchmark convention): 1 if ANY candidate with the query's label is in the
  top K, else 0, averaged over queries.

When K exceeds the number of candidates it is clipped to that number (``k_effective``), so P@K
divides by the clipped K. Queries whose label no candidate has count as misses.

"No prediction" (``no_prediction``: e.g. all-zero image embeddings, whose cosine is undefined):
such an image is not ranked and counts as a miss, so every model is scored on the same images;
in retrieval it is a query that misses (P@K = R@K = 0) and never a candidate.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.vectors import unit_rows
from nfhm_pipeline.evaluation.names import ENSEMBLE, IMAGE_TO_TEXT, PRECISION, RECALL, SINGLE_TEMPLATE, TEXT_TO_IMAGE

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "an image of a {}.",
    "{}",
)
BIO_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a photo of the species {}.",
    "a field photo of {}.",
    "a close-up photo of {}.",
    "a museum specimen of {}.",
    "an image of {}, an organism.",
)
MEDICAL_TEMPLATES: tuple[str, ...] = (
    "a medical image showing {}.",
    "a radiograph showing {}.",
    "a microscopy image of {}.",
    "an image with findings of {}.",
    "a scan consistent with {}.",
    "{}",
)

PRECISION_CONVENTION = "fraction of top-K candidates sharing the query label, mean over queries"
RECALL_CONVENTION = "CLIP_benchmark: hit if any candidate sharing the query label is in top-K, mean over queries"
_CHUNK = 1024  # query rows scored at a time, bounds memory to CHUNK x n_candidates floats
_DECIMALS = 12  # cosine scores are compared at this precision


def ensemble_class_embeddings(text_emb: np.ndarray) -> np.ndarray:
    """Class embeddings [C, D] (float64, unit norm) from prompt embeddings [C, T, D]."""
    text_emb = np.asarray(text_emb, dtype=np.float64)
    if text_emb.ndim != 3 or 0 in text_emb.shape:
        raise EvaluationError(f"text embeddings must be [classes, templates, dim] and non-empty, got shape {text_emb.shape}.")
    c, t, d = text_emb.shape
    prompts = unit_rows(text_emb.reshape(c * t, d), "prompt embeddings").reshape(c, t, d)
    return unit_rows(prompts.mean(axis=1), "ensembled class embeddings (prompts cancel out)")


def zero_shot_predict(image_emb: np.ndarray, class_emb: np.ndarray, k: int = 5) -> np.ndarray:
    """Class indices [N, min(k, C)] (int64) by decreasing cosine; ties go to the lower index."""
    if k < 1:
        raise EvaluationError(f"k must be at least 1, got {k}.")
    return _top_k(unit_rows(image_emb, "image embeddings"), unit_rows(class_emb, "class embeddings"), k)


def zero_shot_accuracy(
    image_emb: np.ndarray,
    image_labels: np.ndarray,
    text_emb: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
    no_prediction: np.ndarray | None = None,
    per_query: dict | None = None,
) -> pd.DataFrame:
    """Top-k accuracy of zero-shot classification, single template vs prompt ensemble.

    ``image_labels``: class index (0..C-1) per image; ``text_emb``: prompt embeddings [C, T, D]
    with template 0 as the single template; ``no_prediction``: bool per image, True for images
    that get no prediction and count as misses (see the module docstring). Returns columns
    prompting ('single_template' | 'ensemble'), k, k_effective (= min(k, C)), metric
    ('top{k}_accuracy'), value, n_images (every image, misses included). ``per_query``: a dict
    to fill with (prompting, k) → bool [n_images], each image's hit (what a bootstrap resamples).
    """
    if min(ks, default=0) < 1:
        raise EvaluationError(f"Every k must be at least 1, got {list(ks)}.")
    text_emb = np.asarray(text_emb, dtype=np.float64)
    ensemble = ensemble_class_embeddings(text_emb)
    single = unit_rows(text_emb[:, 0, :], "first-template embeddings")
    labels = np.asarray(image_labels)
    n_classes = ensemble.shape[0]
    if labels.shape != (len(image_emb),) or not np.issubdtype(labels.dtype, np.integer):
        raise EvaluationError(f"image_labels must be one integer class index per image, got {labels.dtype} {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise EvaluationError(f"image_labels must lie in 0..{n_classes - 1} (one per text class); got {labels.min()}..{labels.max()}.")
    scored = _scored_rows(no_prediction, len(labels))
    rows = []
    for prompting, classes in ((SINGLE_TEMPLATE, single), (ENSEMBLE, ensemble)):
        if scored is None:
            ranking = zero_shot_predict(image_emb, classes, k=max(ks))
        else:  # rows without a prediction rank nothing (-1 is never a class index)
            ranking = np.full((len(labels), min(max(ks), n_classes)), -1, dtype=np.int64)
            if scored.any():
                ranking[scored] = zero_shot_predict(np.asarray(image_emb)[scored], classes, k=max(ks))
        for k in ks:
            hit = (ranking[:, :k] == labels[:, None]).any(axis=1)
            if per_query is not None:
                per_query[(prompting, k)] = hit
            rows.append((prompting, k, min(k, n_classes), f"top{k}_accuracy", float(hit.mean()), len(labels)))
    return pd.DataFrame(rows, columns=["prompting", "k", "k_effective", "metric", "value", "n_images"])


def retrieval_metrics(
    image_emb: np.ndarray,
    image_labels: np.ndarray,
    text_emb: np.ndarray,
    text_labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 5, 10),
    *,
    no_prediction: np.ndarray | None = None,
    per_query: dict | None = None,
) -> pd.DataFrame:
    """Image→text and text→image Precision@K and Recall@K (conventions in the module docstring).

    ``no_prediction``: bool per image, True for images that are neither ranked nor candidates
    (misses as queries). Returns columns direction ('image_to_text' | 'text_to_image'), k,
    k_effective, metric ('precision' | 'recall'), value, convention. ``per_query``: a dict to fill
    with (direction, k, metric) → float [n_queries], each query's score in input order (images for
    image→text, texts for text→image; a no-prediction image scores 0): what a bootstrap resamples.
    """
    scored = _scored_rows(no_prediction, len(np.asarray(image_emb)))
    if scored is not None:
        return _retrieval_with_misses(image_emb, image_labels, text_emb, text_labels, ks, scored, per_query)
    images, texts = unit_rows(image_emb, "image embeddings"), unit_rows(text_emb, "text embeddings")
    if images.shape[1] != texts.shape[1]:
        raise EvaluationError(f"Image embeddings have dim {images.shape[1]} but text embeddings have dim {texts.shape[1]}.")
    image_labels, text_labels = np.asarray(image_labels), np.asarray(text_labels)
    if image_labels.shape != (len(images),) or text_labels.shape != (len(texts),):
        raise EvaluationError(
            f"Need one label per row: {len(images)} images / {image_labels.shape} labels, "
            f"{len(texts)} texts / {text_labels.shape} labels."
        )
    if min(ks, default=0) < 1:
        raise EvaluationError(f"Every K must be at least 1, got {list(ks)}.")
    rows = []
    for direction, q, q_lab, c, c_lab in (
        (IMAGE_TO_TEXT, images, image_labels, texts, text_labels),
        (TEXT_TO_IMAGE, texts, text_labels, images, image_labels),
    ):
        hits = c_lab[_top_k(q, c, max(ks))] == q_lab[:, None]
        for k in ks:
            ke = min(k, len(c))
            if per_query is not None:
                per_query[(direction, k, PRECISION)] = hits[:, :ke].mean(axis=1)
                per_query[(direction, k, RECALL)] = hits[:, :ke].any(axis=1).astype(np.float64)
            rows.append((direction, k, ke, PRECISION, float(hits[:, :ke].mean(axis=1).mean()), PRECISION_CONVENTION))
            rows.append((direction, k, ke, RECALL, float(hits[:, :ke].any(axis=1).mean()), RECALL_CONVENTION))
    return pd.DataFrame(rows, columns=["direction", "k", "k_effective", "metric", "value", "convention"])


# --- helpers -------------------------------------------------------------------------------------


def _scored_rows(no_prediction, n: int) -> np.ndarray | None:
    """Rows that get a prediction (bool [n]), or None when every row does (the plain code path)."""
    if no_prediction is None:
        return None
    missing = np.asarray(no_prediction, dtype=bool)
    if missing.shape != (n,):
        raise EvaluationError(f"no_prediction must be one bool per image ({n}), got shape {missing.shape}.")
    return ~missing if missing.any() else None


def _retrieval_with_misses(image_emb, image_labels, text_emb, text_labels, ks, scored,
                           per_query: dict | None = None) -> pd.DataFrame:
    """`retrieval_metrics` where the images outside ``scored`` are misses as queries (P@K = R@K = 0)
    and never candidates."""
    image_emb, image_labels = np.asarray(image_emb), np.asarray(image_labels)
    if image_labels.shape != (len(image_emb),):
        raise EvaluationError(f"Need one label per row: {len(image_emb)} images / {image_labels.shape} labels.")
    if not scored.any():
        raise EvaluationError("every image is a no-prediction row (an all-zero embedding?): retrieval has no "
                              "image to rank.")
    images, texts = unit_rows(image_emb[scored], "image embeddings"), unit_rows(text_emb, "text embeddings")
    if images.shape[1] != texts.shape[1]:
        raise EvaluationError(f"Image embeddings have dim {images.shape[1]} but text embeddings have dim {texts.shape[1]}.")
    scored_labels, text_labels = image_labels[scored], np.asarray(text_labels)
    if text_labels.shape != (len(texts),):
        raise EvaluationError(f"Need one label per row: {len(texts)} texts / {text_labels.shape} labels.")
    if min(ks, default=0) < 1:
        raise EvaluationError(f"Every K must be at least 1, got {list(ks)}.")
    n_missed = int((~scored).sum())
    rows = []
    for direction, q, q_lab, c, c_lab, missed in (
        (IMAGE_TO_TEXT, images, scored_labels, texts, text_labels, n_missed),
        (TEXT_TO_IMAGE, texts, text_labels, images, scored_labels, 0),
    ):
        hits = c_lab[_top_k(q, c, max(ks))] == q_lab[:, None]
        for k in ks:
            ke = min(k, len(c))
            # a query without a prediction adds a row of misses
            precision = np.concatenate([hits[:, :ke].mean(axis=1), np.zeros(missed)]).mean()
            recall = np.concatenate([hits[:, :ke].any(axis=1), np.zeros(missed, bool)]).mean()
            if per_query is not None:  # in input order: the images' queries put back in their rows
                scores = {PRECISION: hits[:, :ke].mean(axis=1), RECALL: hits[:, :ke].any(axis=1).astype(np.float64)}
                for metric, values in scores.items():
                    if missed:
                        full = np.zeros(len(scored))
                        full[scored] = values
                        values = full
                    per_query[(direction, k, metric)] = values
            rows.append((direction, k, ke, PRECISION, float(precision), PRECISION_CONVENTION))
            rows.append((direction, k, ke, RECALL, float(recall), RECALL_CONVENTION))
    return pd.DataFrame(rows, columns=["direction", "k", "k_effective", "metric", "value", "convention"])


def _top_k(queries: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Indices [n_queries, min(k, n_candidates)] of the most similar unit-norm candidates."""
    if queries.shape[1] != candidates.shape[1]:
        raise EvaluationError(f"Query dim {queries.shape[1]} differs from candidate dim {candidates.shape[1]}.")
    k = min(k, len(candidates))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), _CHUNK):
        # Rounding makes mathematically equal cosines (parallel or orthogonal vectors) tie exactly
        # despite float noise, which would otherwise vary with BLAS and hardware; a stable sort
        # of the negated scores then keeps the lower index first among ties.
        sims = np.round(queries[start : start + _CHUNK] @ candidates.T, _DECIMALS)
        out[start : start + _CHUNK] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return out
