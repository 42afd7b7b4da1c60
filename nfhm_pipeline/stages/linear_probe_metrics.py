"""``<dataset>/linear_probe_metrics``, per model: standardised LinearSVC (C = 100 / N) and
logistic-regression probes on the shared split: CV accuracy and macro-F1 (mean ± std over the
split's folds) and held-out test scores, each metrics row with its fits' ``iterations`` and
``converged`` and the train images fitted (``train_n``) out of those there were
(``train_available``). Seeded by the dataset's ``seed``.

With the catalog's ``probe_max_train`` and a larger train split, the probes of every level and
both classifiers are fitted (CV folds and refit) on ONE stratified subsample of that many train
images (:func:`probe_subsample`); the test images are never subsampled."""
from __future__ import annotations

import numpy as np

from nfhm_pipeline.evaluation import names
from nfhm_pipeline.stages.base import (
    Device, Log, Paths, StageResult, headline_metadata, load_evaluation_inputs, provenance_of, quiet, stage_seed,
    store_results, with_intervals,
)

TASKS = (names.LINEAR_PROBE, names.LOGISTIC_PROBE)
DESCRIPTION = ("Standardised LinearSVC (C = 100 / N) and logistic-regression probes: CV accuracy and macro-F1 "
               "(mean ± std over the split's folds) and held-out test scores.")


def run(dataset, model, paths: Paths, device: Device | None = None, *, run_id: str | None = None,
        log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.tables import probe_tables

    inputs = load_evaluation_inputs(paths, dataset, model.key)
    seed = stage_seed(dataset)
    keep = probe_subsample(inputs.frame, dataset.finest_label, getattr(dataset, "probe_max_train", None), seed)
    frame, vectors = inputs.frame, inputs.vectors
    if keep is not None:
        frame, vectors = frame[keep].reset_index(drop=True), vectors[keep]
        log(f"probes: fitted on a stratified subsample of {int((frame['split'] == 'train').sum())} of "
            f"{int((inputs.frame['split'] == 'train').sum())} train images (probe_max_train); every test image")
    # every fold and refit of every level in one pool of CPU workers; a progress line per finished
    # fit once the stage has run a few seconds (a 30k-image collection takes minutes)
    tables = probe_tables(frame, vectors, dataset.labels, seed=seed, log=log)
    if keep is not None:
        _state_full_train(tables, inputs.frame, ~keep, dataset.labels)
    tables = with_intervals(tables, dataset, inputs)
    metrics = store_results(paths, dataset.name, model.key, TASKS, tables,
                            provenance_of("linear_probe_metrics", dataset, inputs, Device("cpu"), run_id,
                                          seeded=True, intervals=True), log)
    shown = metrics[metrics["task"] == names.LINEAR_PROBE] if len(metrics) else metrics
    meta = headline_metadata(shown, tables, names.HEADLINE_METRICS[names.LINEAR_PROBE], inputs.split_id)
    if keep is not None:
        meta["probe train subsample"] = (f"{int((frame['split'] == 'train').sum())} of "
                                         f"{int((inputs.frame['split'] == 'train').sum())} train images "
                                         f"(probe_max_train, stratified by {dataset.finest_label}, seed {seed})")
    return StageResult(metadata=meta)


def probe_subsample(frame, label: str, max_train: int | None, seed: int) -> np.ndarray | None:
    """bool mask over ``frame`` (the evaluation frame: image_id, split, fold, labels): every test
    row and at most ``max_train`` train rows, or None when there is no limit or the train split
    is no larger (then the probes are seed 001's protocol, unchanged).

    The train rows are drawn by :func:`~nfhm_pipeline.evaluation.linear_probe.stratified_subsample`
    with ``seed``: stratified by the finest ``label`` (so every class of every coarser level
    stays too; rows without a finest label are one stratum of their own), and within a class
    spread over the split's CV folds, which the probes keep (a grouped split's units stay whole
    within a fold). The draw is over the rows in image_id order, so every model of a dataset is
    fitted on the same images."""
    from nfhm_pipeline.evaluation.linear_probe import stratified_subsample
    from nfhm_pipeline.evaluation.tables import labelled

    if max_train is None:
        return None
    train = np.flatnonzero((frame["split"] == "train").to_numpy())
    if len(train) <= max_train:
        return None
    train = train[np.argsort(frame["image_id"].astype(str).to_numpy()[train], kind="stable")]
    strata = np.where(labelled(frame, label), frame[label].astype(str).to_numpy(), "")[train]
    picked = stratified_subsample(strata, max_train, seed=seed, spread=frame["fold"].to_numpy()[train],
                                  level=label)
    keep = (frame["split"] != "train").to_numpy().copy()
    keep[train[picked]] = True
    return keep


def _state_full_train(tables, full_frame, left_out: np.ndarray, levels) -> None:
    """After a subsampled probe: each probe row's ``train_available`` becomes the train images
    that level has in the whole split, and the train images left out of the subsample that have
    no label at a level are recorded as excluded, as a full run records them."""
    from nfhm_pipeline.evaluation.tables import NO_LABEL, labelled

    is_train = (full_frame["split"] == "train").to_numpy()
    available = {level: int((is_train & labelled(full_frame, level)).sum()) for level in levels}
    for part in tables.metrics:
        part["train_available"] = part["level"].map(available).astype("Int64")
    for level in levels:
        tables.exclude(TASKS, level, full_frame, left_out & ~labelled(full_frame, level), NO_LABEL)
