"""Stage 3: stored embeddings + the shared split → metric tables.

Every function returns long tables shaped like the warehouse tables ``metrics``,
``per_class_metrics``, ``predictions`` and ``evaluation_exclusions`` (without
dataset/model/run/split columns, which the caller adds). Accuracies are fractions in [0, 1].

Rows that cannot take part are left out per label level and recorded (``exclusions``), never
turned into a class or an error for the whole dataset:

* ``no_label_at_level``: the image has no label at that level (a species without a genus). It
  is left out of that level's evaluation, train and test, and kept for the levels it has.
* ``zero_vector``: an all-zero embedding (a constant black image under raw pixels), whose cosine
  is undefined. In kNN a train one is left out of the neighbour search; a test one (kNN,
  zero-shot, retrieval) is "no prediction" (predicted_label NULL) and scored WRONG, so every
  model is judged on the same test images. The probes keep such vectors: a zero vector is an
  ordinary point for a standardised linear classifier, which predicts it like any other.

Per-group kNN rows of a reporting group whose train images hold a single class at a level (one
video = one species) are skipped: every prediction inside it is that class whatever the embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from nfhm_pipeline.evaluation.classification import per_class_report, summarize_predictions, topk_accuracy
from nfhm_pipeline.evaluation import names
from nfhm_pipeline.evaluation.knn import Rows, nearest_neighbour_scores
from nfhm_pipeline.evaluation.vectors import per_row
from nfhm_pipeline.store.embedding_store import EmbeddingTable

ALL = "all"


NO_LABEL = "no_label_at_level"
ZERO_VECTOR = "zero_vector"
EXCLUSION_COLUMNS = ["task", "level", "image_id", "split", "reason"]


@dataclass
class ItemScores:
    """The per-item scores a metric row is the mean of, for its bootstrap interval: ``ids`` [n]
    are image ids when ``images`` (resampled by the dataset's resample unit) or the names of
    text queries (each its own unit), ``scores`` [n] floats (a hit is 1.0)."""

    task: str
    level: str
    grp: str
    metric: str
    ids: np.ndarray
    scores: np.ndarray
    images: bool = True


@dataclass
class EvalTables:
    metrics: list[pd.DataFrame] = field(default_factory=list)
    per_class: list[pd.DataFrame] = field(default_factory=list)
    # one Arrow table per (task, level, grp, rule) block (:func:`prediction_part`): at a million test
    # images x levels x rules they are written one by one, never concatenated (issue 15)
    predictions: list[pa.Table] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one sentence per (level, group) left out
    # rows (task, level, image_id, split, reason) left out of a level's evaluation, or not predicted
    exclusions: list[pd.DataFrame] = field(default_factory=list)
    # per-group kNN rows skipped because the group holds a single class: (level, group, class)
    single_class_groups: list[tuple[str, str, str]] = field(default_factory=list)
    # metrics that are means over items without a row in `predictions` (zero-shot, retrieval)
    item_scores: list[ItemScores] = field(default_factory=list)

    def frames(self, *, predictions: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """metrics, per_class and (unless ``predictions`` is False: an empty frame) every prediction
        block in one pandas frame; fine for a test, not for a million images (see ``predictions``)."""
        def cat(parts):
            return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        preds = cat([prediction_frame(part) for part in self.predictions]) if predictions else pd.DataFrame()
        return cat(self.metrics), cat(self.per_class), preds

    def prediction_groups(self):
        """((task, level, grp, rule), pandas frame of its rows) per prediction block, one at a time."""
        for part in self.predictions:
            if part.num_rows:
                frame = prediction_frame(part)
                yield tuple(frame[c].iat[0] for c in PREDICTION_KEY), frame

    def exclusions_frame(self) -> pd.DataFrame:
        parts = [p for p in self.exclusions if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=EXCLUSION_COLUMNS)

    def exclude(self, tasks, level: str, frame: pd.DataFrame, rows: np.ndarray, reason: str) -> None:
        """Record the ``rows`` (bool mask over ``frame``) of ``level`` as left out for ``reason``."""
        if not rows.any():
            return
        for task in (tasks,) if isinstance(tasks, str) else tasks:
            self.exclusions.append(pd.DataFrame({
                "task": task, "level": level, "image_id": frame["image_id"].to_numpy()[rows],
                "split": frame["split"].to_numpy()[rows], "reason": reason}))

    def exclusion_summary(self) -> dict:
        """{"<task>/<level>/<reason>": count} and a few example image ids, for asset metadata."""
        frame = self.exclusions_frame()
        if frame.empty:
            return {}
        counts = frame.groupby(["task", "level", "reason", "split"], sort=True).size()
        summary = {f"{t}/{lvl}/{r}/{s}": int(n) for (t, lvl, r, s), n in counts.items()}
        examples = frame.drop_duplicates(["level", "reason", "image_id"]).head(10)
        return {"counts": summary, "examples": [f"{r.level}/{r.reason}: {r.image_id} ({r.split})"
                                                 for r in examples.itertuples()]}


PREDICTION_KEY = ("task", "level", "grp", "rule")


def _constant(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([value], pa.string()))


def prediction_part(task: str, level: str, grp: str, rule: str, image_ids, true, predicted) -> pa.Table:
    """One (task, level, grp, rule) block of ``predictions`` as an Arrow table. The key columns are
    one-entry dictionaries (1 byte a row) and the labels dictionary-encoded (4 bytes a row), and
    ``image_ids`` may be one Arrow array shared by every rule's block: a million rows cost ~14 bytes
    each beyond it, where a pandas frame of Python strings costs 8 bytes a cell and a copy at every
    concat. ``predicted`` may hold None (no prediction)."""
    ids = image_ids if isinstance(image_ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(image_ids).astype(str))
    n = len(ids)
    columns = {key: _constant(value, n) for key, value in zip(PREDICTION_KEY, (task, level, grp, rule))}
    columns["image_id"] = ids
    columns["true_label"] = pa.array(np.asarray(true, dtype=object), pa.string()).dictionary_encode()
    columns["predicted_label"] = pa.array(np.asarray(predicted, dtype=object), pa.string()).dictionary_encode()
    return pa.table(columns)


def part_task(part: pa.Table) -> str:
    """The task of a :func:`prediction_part` block (its one-entry dictionary, even with no rows)."""
    column = part.column("task")
    if pa.types.is_dictionary(column.type) and column.num_chunks:
        return column.chunk(0).dictionary[0].as_py()
    values = column.unique().to_pylist()
    return values[0] if values else ""


def with_constants(part: pa.Table, values: dict) -> pa.Table:
    """``part`` with a constant column per ``values`` item (name → str, or None: NULL)."""
    for name, value in values.items():
        column = pa.nulls(part.num_rows, pa.string()) if value is None else _constant(str(value), part.num_rows)
        part = part.append_column(name, column)
    return part


def decoded(table: pa.Table) -> pa.Table:
    """``table`` with its dictionary columns as plain strings (blocks concatenate, pandas gets str)."""
    return pa.table({name: col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col
                     for name, col in zip(table.column_names, table.columns)})


def prediction_frame(part: pa.Table) -> pd.DataFrame:
    return decoded(part).to_pandas()


def evaluation_frame(manifest: pd.DataFrame, splits: pd.DataFrame, table: EmbeddingTable, levels) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of the split with their labels, group and vectors (aligned by image_id).

    Raises a clear error when a split image has no stored vector (embeddings stale).
    """
    from nfhm_pipeline.errors import EvaluationError

    frame = splits[["image_id", "split", "fold"]].merge(
        manifest[["image_id", "group", *levels]], on="image_id", how="left")
    index = pd.Series(np.arange(len(table.image_ids)), index=pd.Index(table.image_ids))
    pos = index.reindex(frame["image_id"]).to_numpy()
    if np.isnan(pos.astype(float)).any():
        missing = int(np.isnan(pos.astype(float)).sum())
        raise EvaluationError(f"{missing} split image(s) have no stored embedding: materialize image_embeddings "
                              "for this model again (the manifest changed since)")
    pos = pos.astype(np.int64)
    if np.array_equal(pos, np.arange(len(pos))):  # the table was read in the split's order: no copy
        return frame.reset_index(drop=True), table.vectors[: len(pos)]
    return frame.reset_index(drop=True), table.vectors[pos]


def groups_of(frame: pd.DataFrame) -> list[str]:
    groups = sorted(frame["group"].dropna().astype(str).unique())
    return [ALL, *groups] if groups else [ALL]


def labelled(frame: pd.DataFrame, level: str) -> np.ndarray:
    """bool per row: the row has a label at ``level`` (not null, not blank)."""
    values = frame[level]
    return (values.notna() & (values.astype(str).str.strip() != "")).to_numpy()


def zero_vectors(vectors: np.ndarray) -> np.ndarray:
    """bool per row: the embedding is all zeros (its cosine to anything is undefined)."""
    return per_row(vectors, lambda block: ~np.any(block != 0, axis=1))  # a mapped table is never read whole


def _class_indices(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Index of each label in the sorted ``classes``, -1 for labels no train row has."""
    pos = np.searchsorted(classes, labels).clip(0, len(classes) - 1)
    return np.where(classes[pos] == labels, pos, -1).astype(np.int64)


def knn_tables(frame: pd.DataFrame, vectors: np.ndarray, levels, *, ks=(1, 3, 5), device=None) -> EvalTables:
    """The four nearest-neighbour rules (+ L2 Euclidean variants) per label level and group.

    Within a group, neighbours are searched among that group's train images only (as the seed
    did per taxon); ``all`` searches the whole train set. A (level, group) with no train or no
    test image is skipped and reported; so is a reporting group whose train images hold one
    class at the level (``single_class_groups``). top-k rows are given for 1 < k < the number of
    train classes: from k = n_classes on, every known class is in the top k. Rows without a
    label at a level and all-zero vectors: see the module docstring.
    """
    out = EvalTables()
    is_train = (frame["split"] == "train").to_numpy()
    zero = zero_vectors(vectors)
    has_label = {level: labelled(frame, level) for level in levels}
    for level in levels:
        out.exclude(names.KNN, level, frame, ~has_label[level], NO_LABEL)
        out.exclude(names.KNN, level, frame, has_label[level] & zero, ZERO_VECTOR)
    for grp in groups_of(frame):
        in_grp = np.ones(len(frame), bool) if grp == ALL else (frame["group"].astype(str) == grp).to_numpy()
        for level in levels:
            usable = in_grp & has_label[level]
            tr, te = np.flatnonzero(usable & is_train & ~zero), np.flatnonzero(usable & ~is_train)
            if len(tr) == 0 or len(te) == 0:
                out.skipped.append(f"{level}/{grp}: {len(tr)} usable train and {len(te)} test images")
                continue
            train_labels = frame[level].to_numpy()[tr].astype(str)
            true = frame[level].to_numpy()[te].astype(str)
            if grp != ALL and len(set(train_labels)) < 2:
                only = str(train_labels[0])
                out.single_class_groups.append((level, grp, only))
                out.skipped.append(f"{level}/{grp}: the group's train images are all {only!r}, so every "
                                   "prediction within it is that class whatever the embedding")
                continue
            _knn_level_group(out, frame, vectors, level, grp, tr, te, train_labels, true, zero[te], ks, device)
    return out


def _knn_level_group(out: EvalTables, frame, vectors, level, grp, tr, te, train_labels, true, no_vector, ks,
                     device) -> None:
    """Rows of one (level, group): ``tr``/``te`` row numbers, ``no_vector`` bool per test row."""
    scored = te[~no_vector]
    # views, not copies: the kNN reads its train and test rows block by block (a mapped table stays on disk)
    ranking = (nearest_neighbour_scores(Rows(vectors, tr), train_labels, Rows(vectors, scored), ks=ks, device=device)
               if len(scored) else None)
    classes = ranking.classes if ranking is not None else np.unique(train_labels)
    true_idx = ranking.class_indices(true) if ranking is not None and not no_vector.any() \
        else _class_indices(classes, true)
    width = min(max(ks), len(classes))
    test_ids = pa.array(frame["image_id"].to_numpy()[te].astype(str))  # shared by every rule's block
    rows = []
    for rule in (*names.KNN_RULES, *names.KNN_L2_RULES):
        if not no_vector.any():
            pred, ranks = ranking.labels(rule), ranking.rankings[rule]
        else:  # test rows without a vector: no prediction (NULL), and a ranking that never hits
            pred = np.full(len(te), None, dtype=object)
            ranks = np.full((len(te), width), -1, dtype=np.int64)
            if ranking is not None:
                pred[~no_vector] = ranking.labels(rule)
                ranks[~no_vector] = ranking.rankings[rule]
        s = summarize_predictions(true, pred)
        for score in ("accuracy", "balanced_accuracy", "macro_f1"):
            rows.append((names.knn_metric(rule, score), s[score]))
        for k in ks:
            if 1 < k < len(classes):
                rows.append((names.knn_metric(rule, k=k), topk_accuracy(true_idx, ranks, k)))
        report = per_class_report(true, pred).assign(task=names.KNN, level=level, grp=grp, rule=rule)
        out.per_class.append(report)
        out.predictions.append(prediction_part(names.KNN, level, grp, rule, test_ids, true, pred))
    m = pd.DataFrame(rows, columns=["metric", "value"])
    out.metrics.append(m.assign(task=names.KNN, level=level, grp=grp, std=np.nan, n=len(te)))


def probe_tables(frame: pd.DataFrame, vectors: np.ndarray, levels, *, seed: int = 0, n_jobs: int | None = None,
                 log=None) -> EvalTables:
    """Standardised LinearSVC (C = 100 / N) and logistic probes per level on the shared split:
    CV over the split's train folds (mean ± std), then refit on all train and scored on test.
    Metrics rows carry the fits' ``iterations`` and ``converged``. Every fit of every level runs
    in one pool (``n_jobs``: see ``linear_probe.run_probes``); ``log`` gets progress lines."""
    from nfhm_pipeline.evaluation.linear_probe import ProbeJob, run_probes

    out = EvalTables()
    is_train = (frame["split"] == "train").to_numpy()
    tasks = (names.LINEAR_PROBE, names.LOGISTIC_PROBE)
    jobs, where = [], []
    for level in levels:
        has = labelled(frame, level)
        out.exclude(tasks, level, frame, ~has, NO_LABEL)
        train, test = is_train & has, ~is_train & has
        y = frame[level].astype(str).to_numpy()
        folds = frame.loc[train, "fold"].to_numpy(dtype=np.int64)
        if len(np.unique(y[train])) < 2:
            out.skipped.append(f"{level}: fewer than two classes in train")
            continue
        for task in tasks:
            classifier = names.PROBE_CLASSIFIERS[task]
            jobs.append(ProbeJob(f"{task}/{level}", vectors[train], y[train], vectors[test], y[test], folds,
                                 classifier, seed))
            where.append((task, level, classifier, test, y))
    for (task, level, classifier, test, y), result in zip(where, run_probes(jobs, n_jobs=n_jobs, log=log)):
        if isinstance(result, Exception):
            out.skipped.append(f"{task}/{level}: {result}")
            continue
        out.metrics.append(result.metrics_frame().assign(task=task, level=level, grp=ALL))
        pred = np.asarray(result.test_predictions).astype(str)
        out.per_class.append(per_class_report(y[test], pred).assign(task=task, level=level, grp=ALL, rule=classifier))
        out.predictions.append(prediction_part(task, level, ALL, classifier, frame["image_id"].to_numpy()[test],
                                               y[test], pred))
    return out


def zero_shot_tables(frame: pd.DataFrame, vectors: np.ndarray, prompts: pd.DataFrame, text_vectors: np.ndarray,
                     levels) -> EvalTables:
    """Zero-shot top-1/top-5 (first template vs prompt ensemble) on the test images, and
    image↔text retrieval P@K / R@K with one ensembled text per class. top-k rows are given for
    k = 1 and for 1 < k < the number of prompted classes (from there on every class is in the
    top k). Rows without a label at a level and all-zero vectors: see the module docstring."""
    from nfhm_pipeline.evaluation.zero_shot import ensemble_class_embeddings, retrieval_metrics, zero_shot_accuracy

    out = EvalTables()
    zero = zero_vectors(vectors)
    tasks = (names.ZERO_SHOT, names.RETRIEVAL)
    for level in levels:
        has = labelled(frame, level)
        is_test = (frame["split"] == "test").to_numpy()
        out.exclude(tasks, level, frame, is_test & ~has, NO_LABEL)
        test = is_test & has
        p = prompts[prompts["level"] == level]
        if p.empty:
            out.skipped.append(f"{level}: no prompts")
            continue
        classes = sorted(p["class"].unique())
        templates = list(dict.fromkeys(p["template"]))
        order = {c: i for i, c in enumerate(classes)}
        tindex = {t: i for i, t in enumerate(templates)}
        emb = np.zeros((len(classes), len(templates), text_vectors.shape[1]), np.float32)
        for (cls, tpl), vec in zip(zip(p["class"], p["template"]), text_vectors[p.index.to_numpy()]):
            emb[order[cls], tindex[tpl]] = vec
        labels = frame[level].astype(str).to_numpy()[test]
        idx = np.array([order.get(c, -1) for c in labels])
        known = idx >= 0
        if not known.any():
            out.skipped.append(f"{level}: no test image has a prompted class")
            continue
        no_vector = zero[test][known]
        unpredicted = np.zeros(len(frame), bool)
        unpredicted[np.flatnonzero(test)[known][no_vector]] = True
        out.exclude(tasks, level, frame, unpredicted, ZERO_VECTOR)
        hits: dict = {}
        acc = zero_shot_accuracy(vectors[test][known], idx[known], emb, no_prediction=no_vector, per_query=hits)
        # top-k with k >= the number of classes holds every class: 100 % by construction
        acc = acc[(acc["k"] == 1) | (acc["k"] < len(classes))]
        acc = acc.assign(metric=[names.zero_shot_metric(k, p) for k, p in zip(acc["k"], acc["prompting"])])
        image_ids = frame["image_id"].astype(str).to_numpy()[test][known]
        out.item_scores += [ItemScores(names.ZERO_SHOT, level, ALL, metric, image_ids, hits[(p, k)].astype(np.float64))
                            for metric, p, k in zip(acc["metric"], acc["prompting"], acc["k"])]
        out.metrics.append(pd.DataFrame({"task": names.ZERO_SHOT, "level": level, "grp": ALL, "metric": acc["metric"],
                                         "value": acc["value"], "std": np.nan, "n": acc["n_images"]}))
        if no_vector.all():
            out.skipped.append(f"retrieval/{level}: every test image has an all-zero embedding")
            continue
        per_query: dict = {}
        ret = retrieval_metrics(vectors[test][known], idx[known], ensemble_class_embeddings(emb), np.arange(len(classes)),
                                no_prediction=no_vector, per_query=per_query)
        text_ids = np.array([f"text:{c}" for c in classes], dtype=object)
        out.item_scores += [
            ItemScores(names.RETRIEVAL, level, ALL, names.retrieval_metric(d, m, k),
                       image_ids if d == names.IMAGE_TO_TEXT else text_ids, per_query[(d, k, m)],
                       images=d == names.IMAGE_TO_TEXT)
            for d, m, k in zip(ret["direction"], ret["metric"], ret["k"])]
        out.metrics.append(pd.DataFrame({
            "task": names.RETRIEVAL, "level": level, "grp": ALL,
            "metric": [names.retrieval_metric(d, m, k) for d, m, k in zip(ret["direction"], ret["metric"], ret["k"])],
            "value": ret["value"], "std": np.nan, "n": int(known.sum())}))
    return out
