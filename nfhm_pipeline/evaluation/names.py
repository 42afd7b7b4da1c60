"""Task, rule and metric names written to the warehouse, declared once.

Every module that writes or reads these strings (``metrics.task``, ``metrics.metric``,
``predictions.rule``, ``per_class_metrics.rule``) takes them from here, so a name is spelt in one
place. They are stored values: changing one orphans every result already in a warehouse.

Metric names per task (``metrics.metric``):

* ``knn``: per rule ``<rule>`` (accuracy), ``balanced_accuracy_<rule>``, ``macro_f1_<rule>`` and
  ``top<k>_<rule>`` (:func:`knn_metric`), for the rules ``KNN_RULES + KNN_L2_RULES``;
* ``linear_probe`` / ``logistic_probe``: ``PROBE_METRICS``;
* ``zero_shot``: ``top<k>_<prompting>`` with prompting ``single_template`` or ``ensemble``
  (:func:`zero_shot_metric`);
* ``retrieval``: ``<direction>_<precision|recall>@<k>`` (:func:`retrieval_metric`);
* ``multilabel_probe`` / ``multilabel_zero_shot`` / ``alignment_head``: ``auc:<label>``,
  ``n_pos:<label>``, ``n_neg:<label>``, ``n_train:<label>`` (probe only; :func:`label_metric`),
  ``macro_auc``, ``micro_auc``, ``n_labels_defined``.
"""
from __future__ import annotations

from nfhm_pipeline.errors import EvaluationError

# --- tasks (metrics.task) ----------------------------------------------------------------------------
KNN = "knn"
LINEAR_PROBE = "linear_probe"
LOGISTIC_PROBE = "logistic_probe"
ZERO_SHOT = "zero_shot"
RETRIEVAL = "retrieval"
MULTILABEL_PROBE = "multilabel_probe"
MULTILABEL_ZERO_SHOT = "multilabel_zero_shot"
ALIGNMENT_HEAD = "alignment_head"
TASKS = (KNN, LINEAR_PROBE, LOGISTIC_PROBE, ZERO_SHOT, RETRIEVAL, MULTILABEL_PROBE, MULTILABEL_ZERO_SHOT,
         ALIGNMENT_HEAD)

# --- k-NN rules (metric names of their accuracy, and predictions.rule) ------------------------------
TOP1_COSINE = "top1_cosine"
MEAN_COSINE = "mean_cosine"
TOP1_EUCLIDEAN = "top1_euclidean"
MEAN_EUCLIDEAN = "mean_euclidean"
TOP1_EUCLIDEAN_L2 = "top1_euclidean_l2"  # the Euclidean rules on L2-normalised vectors
MEAN_EUCLIDEAN_L2 = "mean_euclidean_l2"
KNN_RULES = (TOP1_COSINE, MEAN_COSINE, TOP1_EUCLIDEAN, MEAN_EUCLIDEAN)
KNN_L2_RULES = (TOP1_EUCLIDEAN_L2, MEAN_EUCLIDEAN_L2)


def knn_metric(rule: str, score: str = "accuracy", k: int = 1) -> str:
    """The metric name of one k-NN score: ``score`` 'accuracy' (top-1 at k = 1, else top-k),
    'balanced_accuracy' or 'macro_f1' of ``rule``."""
    if score == "accuracy":
        return rule if k == 1 else f"top{k}_{rule}"
    if score in ("balanced_accuracy", "macro_f1"):
        return f"{score}_{rule}"
    raise EvaluationError(f"unknown k-NN score {score!r}: use 'accuracy', 'balanced_accuracy' or 'macro_f1'")


# --- linear / logistic probes --------------------------------------------------------------------------
CV_ACCURACY = "cv_accuracy"
CV_MACRO_F1 = "cv_macro_f1"
TEST_ACCURACY = "test_accuracy"
TEST_MACRO_F1 = "test_macro_f1"
PROBE_METRICS = (CV_ACCURACY, CV_MACRO_F1, TEST_ACCURACY, TEST_MACRO_F1)
# the classifier behind each probe task (predictions.rule, per_class_metrics.rule)
PROBE_CLASSIFIERS = {LINEAR_PROBE: "linear_svc", LOGISTIC_PROBE: "logistic"}

# --- zero-shot and retrieval ---------------------------------------------------------------------------
SINGLE_TEMPLATE = "single_template"
ENSEMBLE = "ensemble"


def zero_shot_metric(k: int, prompting: str) -> str:
    """``top<k>_<prompting>``: zero-shot top-k accuracy with the first template or the ensemble."""
    return f"top{int(k)}_{prompting}"


TOP1_SINGLE_TEMPLATE = zero_shot_metric(1, SINGLE_TEMPLATE)
TOP1_ENSEMBLE = zero_shot_metric(1, ENSEMBLE)
TOP5_ENSEMBLE = zero_shot_metric(5, ENSEMBLE)


IMAGE_TO_TEXT, TEXT_TO_IMAGE = "image_to_text", "text_to_image"  # retrieval directions
PRECISION, RECALL = "precision", "recall"  # retrieval measures (P@k, R@k)


def retrieval_metric(direction: str, measure: str, k: int) -> str:
    """``<direction>_<measure>@<k>``, e.g. ``image_to_text_recall@5``."""
    return f"{direction}_{measure}@{int(k)}"


# --- per-label AUC (multi-label and one-vs-rest) -------------------------------------------------------
MACRO_AUC = "macro_auc"
MICRO_AUC = "micro_auc"
N_LABELS_DEFINED = "n_labels_defined"
AUC, N_POS, N_NEG, N_TRAIN = "auc", "n_pos", "n_neg", "n_train"  # per-label metric kinds


def label_metric(kind: str, label: str) -> str:
    """``<kind>:<label>``, e.g. ``auc:Edema``; ``kind`` one of AUC, N_POS, N_NEG, N_TRAIN."""
    return f"{kind}:{label}"


# --- headline metrics per task: what a summary or asset metadata shows first ---------------------------
AUC_HEADLINE = (MACRO_AUC, MICRO_AUC)
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    KNN: KNN_RULES,
    LINEAR_PROBE: PROBE_METRICS,
    LOGISTIC_PROBE: PROBE_METRICS,
    ZERO_SHOT: (TOP1_SINGLE_TEMPLATE, TOP1_ENSEMBLE, TOP5_ENSEMBLE),
    RETRIEVAL: (),  # no headline: its rows are shown in the report's retrieval table
    MULTILABEL_PROBE: AUC_HEADLINE,
    MULTILABEL_ZERO_SHOT: AUC_HEADLINE,
    ALIGNMENT_HEAD: AUC_HEADLINE,
}
