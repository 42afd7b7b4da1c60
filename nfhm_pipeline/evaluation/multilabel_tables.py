"""Stage 3b: per-label ROC AUC (multi-label findings, or one-vs-rest classes) and alignment heads.

Two kinds of dataset take this path (`evaluates_auc`):

* **multi-label** (reader ``chexpert_csv``): one manifest column per finding holding the strings
  ``'1'``, ``'0'``, ``'-1'`` or null (CheXpert's 1.0 / 0.0 / -1.0 / empty), turned into targets by
  the dataset's ``uncertain_policy`` (empty always counts as negative, the CheXpert convention);
* **one-vs-rest** (single-label datasets whose ``prompts`` is ``medical``): one binary target per
  class of the finest label level.

The label decision is recorded in every warehouse row through the ``level`` column:
``findings[uncertain=<policy>,missing=negative]`` or ``<label level>[one_vs_rest]``. Metric
names: ``auc:<label>``, ``n_pos:<label>``, ``n_neg:<label>`` (counted test entries),
``n_train:<label>`` (probe only), ``macro_auc``, ``micro_auc``, ``n_labels_defined``; ``grp`` is
``all``. Tasks: ``multilabel_probe``, ``multilabel_zero_shot``, ``alignment_head``.
Everything is scored on the test rows of the dataset's shared split. The entries each AUC counted,
with their target and score, are kept for table ``auc_scores`` (``AucResult.scores_frame``), from
which ``model_comparison`` pairs models on the same images (``evaluation.auc_differences``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nfhm_pipeline.catalog import DatasetSpec
from nfhm_pipeline.errors import EvaluationError, ManifestError
from nfhm_pipeline.ingest.chexpert import parse_finding_values
from nfhm_pipeline.evaluation.names import (ALIGNMENT_HEAD, AUC, MACRO_AUC, MICRO_AUC, MULTILABEL_PROBE,
                                           MULTILABEL_ZERO_SHOT, N_LABELS_DEFINED, N_NEG, N_POS, N_TRAIN,
                                           label_metric)
from nfhm_pipeline.evaluation.tables import ALL, ZERO_VECTOR, EvalTables, zero_vectors

# the task names (declared in evaluation.names) under the names this module's callers use
PROBE_TASK = MULTILABEL_PROBE
ZERO_SHOT_TASK = MULTILABEL_ZERO_SHOT
ALIGNMENT_TASK = ALIGNMENT_HEAD
MULTILABEL_TASKS = (PROBE_TASK, ZERO_SHOT_TASK)
MISSING_POLICY = "negative"  # CheXpert: a finding the report does not mention is absent


def evaluates_auc(spec: DatasetSpec) -> bool:
    """True for datasets that get ``multilabel_metrics`` and ``alignment_head``: multi-label ones and
    single-label ones with medical prompts (evaluated one-vs-rest)."""
    return spec.multilabel or spec.prompts == "medical"


def finding_columns(spec: DatasetSpec) -> list[str]:
    """The finding columns of a multi-label dataset (``spec.findings``: the catalog's ``findings``
    list, default the 14 CheXpert findings, validated when the catalog is loaded). Empty for
    single-label datasets."""
    return list(spec.findings)


def attach_findings(frame: pd.DataFrame, manifest: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """``frame`` (from `evaluation_frame`) with the manifest's finding columns added, row order kept."""
    findings = finding_columns(spec)
    if not findings:
        return frame
    missing = [f for f in findings if f not in manifest.columns]
    if missing:
        raise ManifestError(f"the manifest of {spec.name!r} has no finding column(s) {missing}: materialize "
                            f"{spec.name}/image_manifest again (the catalog's findings changed since)")
    return frame.drop(columns=[f for f in findings if f in frame.columns]).merge(
        manifest[["image_id", *findings]], on="image_id", how="left", validate="many_to_one")


# --- targets and label texts -----------------------------------------------------------------------

@dataclass
class AucTargets:
    """Binary targets for the rows of an evaluation frame.

    names: F label names (findings or classes); y int8 [N, F] in {0, 1}; mask bool [N, F] (True
    where the entry counts); level: the warehouse ``level`` value naming the label decision;
    kind: 'multilabel' | 'one_vs_rest'.
    """

    names: list[str]
    y: np.ndarray
    mask: np.ndarray
    level: str
    kind: str


def policy_level(policy: str) -> str:
    """The warehouse ``level`` of a multi-label result, e.g. ``findings[uncertain=ignore,missing=negative]``."""
    return f"findings[uncertain={policy},missing={MISSING_POLICY}]"


def auc_targets(spec: DatasetSpec, frame: pd.DataFrame) -> AucTargets:
    """Targets for ``frame`` (rows of the split, with the manifest's label/finding columns).

    Multi-label: `apply_uncertain_policy` with the dataset's ``uncertain_policy``. Single-label:
    one-vs-rest over the sorted classes of the finest level (`binary_targets_from_labels`).
    """
    from nfhm_pipeline.ingest.chexpert import apply_uncertain_policy, binary_targets_from_labels

    if spec.multilabel:
        findings = finding_columns(spec)
        y, mask = apply_uncertain_policy(parse_finding_values(frame, findings), spec.uncertain_policy, MISSING_POLICY)
        return AucTargets(findings, y, mask, policy_level(spec.uncertain_policy), "multilabel")
    labels = frame[spec.finest_label].astype(str).to_numpy()
    y, mask, classes = binary_targets_from_labels(labels)
    return AucTargets([str(c) for c in classes], y, mask, f"{spec.finest_label}[one_vs_rest]", "one_vs_rest")


def label_prompts(spec: DatasetSpec, targets: AucTargets) -> tuple[list[str], list[str] | None]:
    """(positive prompts [F], negative prompts [F] or None).

    Multi-label: `prompt_pair` per finding ("chest x-ray showing x" / "chest x-ray with no x").
    One-vs-rest: the first template of the dataset's prompt set per class, and None: the negative
    of a class is then the mean of the other classes' prompts (text towers handle "no x" poorly,
    and the other classes are exactly what the image is when it is not x).
    """
    from nfhm_pipeline.evaluation.multilabel import prompt_pair
    from nfhm_pipeline.evaluation.prompts import templates_for

    if targets.kind == "multilabel":
        pairs = [prompt_pair(name) for name in targets.names]
        return [p for p, _ in pairs], [n for _, n in pairs]
    template = templates_for(spec.prompts)[0]
    return [template.replace("{}", name) for name in targets.names], None


@dataclass
class LabelTexts:
    """Prompt texts and their text-tower embeddings: positive [F, D] and negative [F, D]."""

    positive: list[str]
    negative: list[str]  # for one-vs-rest: "mean of the other classes' prompts"
    positive_emb: np.ndarray
    negative_emb: np.ndarray


# The ``use`` of label-prompt rows in the text-embedding table (class prompts are "zero_shot").
POSITIVE_USE = "auc_positive"
NEGATIVE_USE = "auc_negative"


def label_prompt_table(spec: DatasetSpec, targets: AucTargets) -> pd.DataFrame:
    """The label prompts as text-table rows (level, class, template, prompt, use), positives first
    then negatives, in the order the text tower embeds them in one call (`label_texts_from_table`
    reads them back)."""
    positive, negative = label_prompts(spec, targets)
    rows = [(targets.level, name, "", text, POSITIVE_USE) for name, text in zip(targets.names, positive)]
    rows += [(targets.level, name, "", text, NEGATIVE_USE) for name, text in zip(targets.names, negative or [])]
    return pd.DataFrame(rows, columns=["level", "class", "template", "prompt", "use"])


def label_texts_from_table(spec: DatasetSpec, targets: AucTargets, prompts: pd.DataFrame,
                           vectors: np.ndarray) -> LabelTexts | None:
    """The label texts of ``targets`` from the stored text table (written by text_embeddings);
    None when the table is empty (a model without a text tower)."""
    if prompts.empty:
        return None
    use = prompts["use"].astype(str).to_numpy() if "use" in prompts else np.full(len(prompts), "zero_shot")
    level = prompts["level"].astype(str).to_numpy()
    names = prompts["class"].astype(str).to_numpy()

    def rows(kind: str) -> np.ndarray | None:
        picked = (use == kind) & (level == targets.level)
        index = pd.Series(np.flatnonzero(picked), index=names[picked])
        if index.index.has_duplicates or not set(targets.names) <= set(index.index):
            return None
        return index.reindex(targets.names).to_numpy()

    pos_rows = rows(POSITIVE_USE)
    if pos_rows is None:
        raise EvaluationError(f"dataset {spec.name!r}: the stored text embeddings hold no label prompts for "
                              f"{targets.level} {targets.names[:5]}; materialize {spec.name}/text_embeddings "
                              "again (the labels or the split changed since)")
    positive = prompts["prompt"].to_numpy()[pos_rows].tolist()
    pos = np.asarray(vectors[pos_rows], dtype=np.float64)
    if targets.kind == "multilabel":
        neg_rows = rows(NEGATIVE_USE)
        if neg_rows is None:
            raise EvaluationError(f"dataset {spec.name!r}: the stored text embeddings hold no negative label "
                                  f"prompts; materialize {spec.name}/text_embeddings again")
        negative = prompts["prompt"].to_numpy()[neg_rows].tolist()
        neg = np.asarray(vectors[neg_rows], dtype=np.float64)
    else:
        if len(positive) < 2:
            raise EvaluationError(f"dataset {spec.name!r}: one-vs-rest zero-shot needs at least two classes")
        unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
        neg = (unit.sum(axis=0, keepdims=True) - unit) / (len(positive) - 1)
        negative = [f"mean of the other {len(positive) - 1} class prompt(s)"] * len(positive)
    return LabelTexts(positive, negative, pos.astype(np.float32), neg.astype(np.float32))


def auc_summary(y, mask, scores) -> dict[str, float]:
    """macro_auc (mean of the defined per-label AUCs), micro_auc (pooled over labels with scores) and
    n_labels_defined; labels whose scores are NaN (a skipped probe) are left out of both."""
    from nfhm_pipeline.evaluation.multilabel import macro_micro_auc

    scores = np.asarray(scores, dtype=np.float64)
    scored = ~np.all(np.isnan(scores), axis=0)
    if not scored.any():
        return {MACRO_AUC: np.nan, MICRO_AUC: np.nan, N_LABELS_DEFINED: 0}
    return macro_micro_auc(np.asarray(y)[:, scored], np.asarray(mask)[:, scored], scores[:, scored])


def auc_metric_rows(table: pd.DataFrame, summary: dict, *, task: str, level: str, n_images: int) -> pd.DataFrame:
    """Long ``metrics`` rows (task, level, grp, metric, value, std, n) from a per-label AUC table
    (label, auc, n_pos, n_neg[, n_train]) and its `auc_summary`."""
    rows = []
    for r in table.itertuples(index=False):
        counted = int(r.n_pos + r.n_neg)
        rows += [(label_metric(AUC, r.label), r.auc, counted),
                 (label_metric(N_POS, r.label), float(r.n_pos), counted),
                 (label_metric(N_NEG, r.label), float(r.n_neg), counted)]
        if "n_train" in table.columns:
            rows.append((label_metric(N_TRAIN, r.label), float(r.n_train), int(r.n_train)))
    rows += [(MACRO_AUC, summary[MACRO_AUC], n_images), (MICRO_AUC, summary[MICRO_AUC], n_images),
             (N_LABELS_DEFINED, float(summary[N_LABELS_DEFINED]), n_images)]
    frame = pd.DataFrame(rows, columns=["metric", "value", "n"])
    return frame.assign(task=task, level=level, grp=ALL, std=np.nan)[
        ["task", "level", "grp", "metric", "value", "std", "n"]]


@dataclass
class AucResult:
    """What one AUC stage produced: warehouse tables plus the per-label AUC table of each task, and
    the per-image entries each AUC ranked (rows of table ``auc_scores``, for paired DeLong tests
    between models in ``model_comparison``)."""

    tables: EvalTables = field(default_factory=EvalTables)
    per_label: dict[str, pd.DataFrame] = field(default_factory=dict)  # task → label, auc, n_pos, n_neg, ...
    summary: dict[str, dict] = field(default_factory=dict)  # task → auc_summary
    scores: list[pd.DataFrame] = field(default_factory=list)  # auc_differences.score_rows per task

    def add(self, task: str, level: str, table: pd.DataFrame, summary: dict, n_images: int,
            y=None, mask=None, scores=None, image_ids=None) -> None:
        """Record one task's per-label table; with the test targets ``y`` / ``mask`` and ``scores``
        [n_test, F] (label order of ``table``), each ``auc:<label>`` row gets DeLong's 95 % interval,
        and with the test rows' ``image_ids`` [n_test] too, the counted entries are kept as
        ``auc_scores`` rows."""
        from nfhm_pipeline.evaluation.auc_differences import score_rows

        self.per_label[task] = table
        self.summary[task] = summary
        rows = auc_metric_rows(table, summary, task=task, level=level, n_images=n_images)
        if scores is not None:
            rows = _with_delong_intervals(rows, table, np.asarray(y), np.asarray(mask), np.asarray(scores, float))
            if image_ids is not None:
                self.scores.append(score_rows(task, level, image_ids, list(table["label"]), y, mask, scores))
        self.tables.metrics.append(rows)
        for r in table.itertuples(index=False):
            if r.reason is not None and not pd.isna(r.reason):
                self.tables.skipped.append(f"{task}/{r.label}: {r.reason}")

    def scores_frame(self) -> pd.DataFrame:
        """Every task's ``auc_scores`` rows in one frame (SCORE_COLUMNS; empty when none were kept)."""
        from nfhm_pipeline.evaluation.auc_differences import SCORE_COLUMNS

        parts = [p for p in self.scores if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SCORE_COLUMNS)


def _with_delong_intervals(rows: pd.DataFrame, table: pd.DataFrame, y, mask, scores) -> pd.DataFrame:
    from nfhm_pipeline.evaluation.confidence import delong_interval

    low = np.full(len(rows), np.nan)
    high = np.full(len(rows), np.nan)
    method = np.full(len(rows), None, dtype=object)
    position = {m: i for i, m in enumerate(rows["metric"])}
    for j, label in enumerate(table["label"]):
        i = position.get(label_metric(AUC, label))
        if i is None or j >= scores.shape[1]:
            continue
        counted = mask[:, j].astype(bool) & ~np.isnan(scores[:, j])
        if not counted.any():
            continue
        _, lo, hi = delong_interval(y[counted, j], scores[counted, j])
        if np.isfinite(lo) and np.isfinite(hi):
            low[i], high[i], method[i] = lo, hi, "delong"
    return rows.assign(ci_low=low, ci_high=high, ci_method=method)


def _split_rows(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    train = (frame["split"] == "train").to_numpy()
    test = (frame["split"] == "test").to_numpy()
    if not train.any() or not test.any():
        raise EvaluationError(f"the split has {int(train.sum())} train and {int(test.sum())} test images; "
                              "AUC needs both: check the dataset's split settings")
    return train, test


def multilabel_tables(frame: pd.DataFrame, vectors: np.ndarray, targets: AucTargets, *, seed: int,
                      text: LabelTexts | None = None) -> AucResult:
    """One-vs-rest logistic probe (fit on the split's train rows, each label on its counted rows)
    and, with `text`, zero-shot from the positive/negative prompt pair; both scored by ROC AUC per
    label on the test rows. ``frame`` rows align with ``vectors`` [N, D] and the targets."""
    from nfhm_pipeline.evaluation.multilabel import multilabel_probe

    train, test = _split_rows(frame)
    y, m, names = targets.y, targets.mask, targets.names
    out = AucResult()
    test_ids = frame["image_id"].to_numpy()[test]
    scores, table = multilabel_probe(vectors[train], y[train], m[train], vectors[test], y[test], m[test],
                                     label_names=names, seed=seed)
    out.add(PROBE_TASK, targets.level, table, auc_summary(y[test], m[test], scores), int(test.sum()),
            y[test], m[test], scores, test_ids)
    if text is not None:
        table, margin = _zero_shot_table(vectors[test], text, y[test], m[test], names)
        out.add(ZERO_SHOT_TASK, targets.level, table, auc_summary(y[test], m[test], margin), int(test.sum()),
                y[test], m[test], margin, test_ids)
        out.tables.exclude(ZERO_SHOT_TASK, targets.level, frame, test & zero_vectors(vectors), ZERO_VECTOR)
    else:
        out.tables.skipped.append(f"{ZERO_SHOT_TASK}: the model has no text tower")
    return out


def _zero_shot_table(image_emb, text: LabelTexts, y, mask, names) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-label zero-shot AUC table and the scores it ranks (cosine margin) of the test rows.

    An all-zero image vector has no cosine, so no zero-shot score: it is scored WRONG, i.e. placed
    below every positive score when the entry is positive and above every score when negative,
    so every model is judged on the same test entries (see ``stages.evaluation``).
    """
    from nfhm_pipeline.evaluation.multilabel import cosine_margin, roc_auc_per_label, zero_shot_auc

    zero = zero_vectors(image_emb)
    if not zero.any():
        return (zero_shot_auc(image_emb, text.positive_emb, text.negative_emb, y, mask, names),
                cosine_margin(image_emb, text.positive_emb, text.negative_emb))
    margin = np.zeros((len(image_emb), len(names)))
    if (~zero).any():
        margin[~zero] = cosine_margin(np.asarray(image_emb)[~zero], text.positive_emb, text.negative_emb)
    # below / above every score of every label, so pooled (micro) AUC counts them wrong too
    lo, hi = (margin[~zero].min() - 1, margin[~zero].max() + 1) if (~zero).any() else (0.0, 1.0)
    margin[zero] = np.where(np.asarray(y)[zero] == 1, lo, hi)
    return roc_auc_per_label(y, mask, margin, names), margin


@dataclass
class AlignmentResult:
    head: object  # nfhm_pipeline.evaluation.alignment.AlignmentHead
    auc: AucResult
    # auc_difference_table(zero-shot, alignment head) with DeLong's paired p per label:
    # label, auc_a, auc_b, diff, p_value, mark
    comparison: pd.DataFrame


def alignment_tables(frame: pd.DataFrame, vectors: np.ndarray, targets: AucTargets, text: LabelTexts, *,
                     seed: int, device: str = "cpu", epochs: int = 30) -> AlignmentResult:
    """Train an alignment head (semantic-matching loss) on the train rows' image embeddings against
    the positive label prompts, score the test rows by cosine to each label text, and compare the
    per-label AUC with the zero-shot AUC of the same prompts (diff = head − zero-shot; marked better
    or worse only beyond 0.5 points with DeLong's paired p < 0.05 on the same test entries)."""
    from nfhm_pipeline.evaluation.alignment import train_alignment_head
    from nfhm_pipeline.evaluation.confidence import delong_paired_test
    from nfhm_pipeline.evaluation.multilabel import auc_difference_table, roc_auc_per_label

    train, test = _split_rows(frame)
    y, m, names = targets.y, targets.mask, targets.names
    head = train_alignment_head(vectors[train], y[train], text.positive_emb, mask=m[train], label_names=names,
                                seed=seed, device=device, epochs=epochs)
    scores = head.scores(vectors[test]).astype(np.float64)
    out = AucResult()
    table = roc_auc_per_label(y[test], m[test], scores, names)
    out.add(ALIGNMENT_TASK, targets.level, table, auc_summary(y[test], m[test], scores), int(test.sum()),
            y[test], m[test], scores, frame["image_id"].to_numpy()[test])
    zero_shot, margin = _zero_shot_table(vectors[test], text, y[test], m[test], names)
    p_values = {}
    for j, name in enumerate(names):
        counted = m[test][:, j].astype(bool)
        _, p_values[name] = delong_paired_test(y[test][counted, j], scores[counted, j], margin[counted, j])
    comparison = auc_difference_table(zero_shot, table, "zero-shot", "alignment head", p_values=p_values)
    return AlignmentResult(head=head, auc=out, comparison=comparison)


def alignment_head_path(models_dir: Path, dataset: str, model: str) -> Path:
    """Where a dataset/model's head lives: ``<models_dir>/alignment/<dataset>/<model>.safetensors``."""
    return Path(models_dir) / "alignment" / dataset / f"{model}.safetensors"


# --- reports ---------------------------------------------------------------------------------------

def auc_table_from_metrics(metrics: pd.DataFrame, model: str, task: str = PROBE_TASK,
                           level: str | None = None) -> pd.DataFrame:
    """Per-label AUC table (label, auc, n_pos, n_neg) of one model and task from warehouse ``metrics``
    rows of one dataset, followed by the rows ``macro_auc`` and ``micro_auc``. ``level`` None takes
    the only level present and raises if there are several (two policies in one frame)."""
    rows = metrics[(metrics["model"] == model) & (metrics["task"] == task)]
    if rows.empty:
        raise EvaluationError(f"no {task!r} metrics for model {model!r}: materialize its multilabel_metrics "
                              "(or alignment_head) first")
    levels = sorted(rows["level"].dropna().unique())
    if level is None:
        if len(levels) != 1:
            raise EvaluationError(f"{task!r} metrics of {model!r} have levels {levels}; pass level= to choose one")
        level = levels[0]
    rows = rows[rows["level"] == level]
    value = dict(zip(rows["metric"], rows["value"].astype(float)))
    prefix = label_metric(AUC, "")
    labels = [m[len(prefix):] for m in rows["metric"] if m.startswith(prefix)]
    summaries = [MACRO_AUC, MICRO_AUC]
    table = pd.DataFrame({
        "label": labels + summaries,
        "auc": [value[label_metric(AUC, lab)] for lab in labels] + [value.get(s, np.nan) for s in summaries],
        "n_pos": [value.get(label_metric(N_POS, lab), np.nan) for lab in labels] + [np.nan, np.nan],
        "n_neg": [value.get(label_metric(N_NEG, lab), np.nan) for lab in labels] + [np.nan, np.nan],
    })
    table.attrs["level"] = level
    return table


def auc_difference_report(metrics: pd.DataFrame, model_a: str, model_b: str, *, task: str = PROBE_TASK,
                          task_b: str | None = None, level: str | None = None, threshold: float = 0.005,
                          differences: pd.DataFrame | None = None,
                          alpha: float = 0.05) -> tuple[pd.DataFrame, str]:
    """Seed 003's comparison: per-label AUC of ``model_b`` (task ``task_b``, default ``task``) minus
    ``model_a`` (task ``task``), plus the macro/micro rows, as a table (label, auc_a, auc_b, diff,
    p_value, mark) and an HTML table. ``metrics``: warehouse rows of one dataset.

    ``differences`` (``model_differences`` rows of the dataset's current split, None: no tests):
    a difference beyond ``threshold`` (0.005 = 0.5 points) is green (b better) or red (b worse)
    only when DeLong's paired p of that label (``test = 'delong'``) is below ``alpha``; the rest is
    grey, "no detectable difference" (see `auc_difference_table`). Without ``differences`` every
    difference beyond the threshold is coloured (the seed's own rule)."""
    from nfhm_pipeline.evaluation.auc_differences import significance_by_label
    from nfhm_pipeline.evaluation.multilabel import auc_difference_html, auc_difference_table

    a = auc_table_from_metrics(metrics, model_a, task, level)
    b = auc_table_from_metrics(metrics, model_b, task_b or task, level)
    name_a = model_a if (task_b or task) == task else f"{model_a} ({task})"
    name_b = model_b if (task_b or task) == task else f"{model_b} ({task_b})"
    p_values = None if differences is None else significance_by_label(
        differences, task=task, level=a.attrs["level"], model_a=model_a, model_b=model_b, task_b=task_b)
    table = auc_difference_table(a, b, name_a, name_b, threshold=threshold, p_values=p_values, alpha=alpha)
    return table, auc_difference_html(table)

