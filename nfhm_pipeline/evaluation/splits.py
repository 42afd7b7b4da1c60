"""Train/test split and cross-validation folds shared by every evaluation of a dataset.

One split per dataset, computed once from the image manifest, so that every model is scored on
the same test images. Three modes:

* **stratified** (default): the NFHM week-7 rule. Classes with a single image are dropped (they
  cannot be in both train and test) and reported; the test fraction is
  ``max(requested, n_classes / n_images_kept)`` so the stratified draw has room for every class;
  the draw is stratified by the label and seeded.
* **grouped** (``group_column``, e.g. patient or slide): the test part is one fold of a seeded
  ``StratifiedGroupKFold`` with ``round(1 / effective_fraction)`` splits, so no group straddles
  train and test and the realised test fraction is close to, not exactly, the requested one.
* **official** (``official_split_column``, e.g. MedMNIST ``train``/``val``/``test``): ``test`` rows
  are the test part; ``train`` and ``val`` rows are both train (CV folds replace the validation
  set), their official split stays visible in the ``official_split`` column. No row is dropped:
  the dataset's authors decided the split.

Rows are sorted by ``image_id`` before any random draw, so identical input in any row order gives
identical output.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError

OFFICIAL_TRAIN_VALUES = ("train", "val")
OFFICIAL_TEST_VALUES = ("test",)


@dataclass(frozen=True)
class SplitResult:
    """A dataset split.

    ``assignments``: one row per kept image, sorted by ``image_id``; columns ``image_id``,
    ``split`` ('train' | 'test'), ``fold`` (Int64, 0..n_folds-1 for train rows, <NA> for test),
    plus ``official_split`` / ``group`` when those columns were given.
    ``dropped``: ``image_id``, ``label``, ``reason`` for images left out of the split.
    """

    assignments: pd.DataFrame
    dropped: pd.DataFrame
    effective_test_fraction: float
    requested_test_fraction: float
    seed: int
    mode: str  # 'stratified' | 'grouped' | 'official'
    n_folds: int  # folds actually used (may be below the requested number, see assign_cv_folds)
    fold_method: str
    n_classes: int
    classes_absent_from_test: list = field(default_factory=list)

    def summary(self) -> dict:
        """Plain-Python (JSON-ready) description, for asset metadata and logs."""
        split = self.assignments["split"]
        return {
            "mode": self.mode,
            "seed": int(self.seed),
            "n_images": int(len(self.assignments)),
            "n_train": int((split == "train").sum()),
            "n_test": int((split == "test").sum()),
            "n_dropped": int(len(self.dropped)),
            "n_classes": int(self.n_classes),
            "requested_test_fraction": float(self.requested_test_fraction),
            "effective_test_fraction": float(self.effective_test_fraction),
            "n_folds": int(self.n_folds),
            "fold_method": self.fold_method,
            "n_classes_absent_from_test": len(self.classes_absent_from_test),
        }


def make_split(
    frame: pd.DataFrame,
    *,
    label_column: str,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_folds: int = 5,
    group_column: str | None = None,
    official_split_column: str | None = None,
) -> SplitResult:
    """Split ``frame`` (one row per image: ``image_id``, the finest label, optional group and
    official-split columns) into train/test and assign CV folds to the train rows.

    ``effective_test_fraction`` is the fraction used for the draw in stratified mode and the
    realised fraction of test rows in grouped and official modes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise EvaluationError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}.")
    if n_folds < 2:
        raise EvaluationError(f"n_folds must be at least 2, got {n_folds}.")
    frame = _validated(frame, label_column, group_column, official_split_column)

    labels = frame[label_column]
    if official_split_column is not None:
        kept, dropped = frame, _dropped_frame([], [], "")
    else:
        counts = labels.value_counts()
        single = labels.map(counts) == 1
        kept = frame[~single].reset_index(drop=True)
        dropped = _dropped_frame(
            frame.loc[single, "image_id"], frame.loc[single, label_column], "single_image_class"
        )
    y = _codes(kept[label_column])
    n_classes = int(y.max()) + 1 if len(y) else 0
    if n_classes < 2:
        raise EvaluationError(
            f"Column {label_column!r} has {n_classes} usable class(es) ({len(dropped)} rows of "
            f"single-image classes dropped); a split needs at least 2 classes."
        )
    groups = _codes(kept[group_column]) if group_column else None

    if official_split_column is not None:
        mode = "official"
        is_test = kept[official_split_column].isin(OFFICIAL_TEST_VALUES).to_numpy()
        effective = float(is_test.mean())
    else:
        effective = max(test_fraction, n_classes / len(kept))
        if groups is None:
            mode = "stratified"
            is_test = _stratified_test_mask(y, effective, seed, label_column)
        else:
            mode = "grouped"
            is_test = _grouped_test_mask(y, groups, effective, seed, group_column)
            effective = float(is_test.mean())

    if not is_test.any():
        raise EvaluationError(
            f"The {mode} split put no image in test"
            + (f" (column {official_split_column!r} has no 'test' rows)." if mode == "official" else ".")
        )
    train = ~is_test
    if train.sum() < 2:
        raise EvaluationError(f"Only {int(train.sum())} training image(s); cross-validation needs at least 2.")
    folds_train, n_used, fold_method = assign_cv_folds(
        y[train], n_folds=n_folds, seed=seed, groups=None if groups is None else groups[train]
    )
    folds = pd.array([pd.NA] * len(kept), dtype="Int64")
    folds[np.flatnonzero(train)] = folds_train

    assignments = pd.DataFrame(
        {"image_id": kept["image_id"].to_numpy(), "split": np.where(is_test, "test", "train"), "fold": folds}
    )
    if official_split_column is not None:
        assignments["official_split"] = kept[official_split_column].to_numpy()
    if group_column is not None:
        assignments["group"] = kept[group_column].to_numpy()
    absent = sorted(set(kept[label_column]) - set(kept.loc[is_test, label_column]), key=str)
    return SplitResult(
        assignments=assignments,
        dropped=dropped,
        effective_test_fraction=float(effective),
        requested_test_fraction=float(test_fraction),
        seed=seed,
        mode=mode,
        n_folds=n_used,
        fold_method=fold_method,
        n_classes=n_classes,
        classes_absent_from_test=absent,
    )


def assign_cv_folds(
    y: np.ndarray, *, n_folds: int = 5, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[np.ndarray, int, str]:
    """Fold id (int64, 0..n_used-1) for each row of ``y``; returns (folds, n_used, method).

    Without groups: ``StratifiedKFold(n_used, shuffle=True, random_state=seed)`` with
    ``n_used = min(n_folds, largest class size)``; classes smaller than ``n_used`` are spread
    one image per fold and so are missing from some validation folds (sklearn's behaviour, its
    warning is silenced). If every class has a single image, stratification is meaningless and
    ``KFold(min(n_folds, n_rows))`` is used. With groups: ``StratifiedGroupKFold`` with
    ``n_used`` also capped by the number of groups (``GroupKFold`` when every class is a
    single image), so no group spans two folds.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    y = _codes(pd.Series(y))
    n = len(y)
    if n < 2:
        raise EvaluationError(f"Cross-validation needs at least 2 rows, got {n}.")
    largest = int(np.bincount(y).max())
    cap = n if groups is None else len(np.unique(groups))
    if cap < 2:
        raise EvaluationError("Cross-validation needs at least 2 groups; the training rows have one.")
    if largest >= 2:
        n_used = min(n_folds, largest, cap)
        if groups is None:
            splitter, method = StratifiedKFold(n_used, shuffle=True, random_state=seed), "StratifiedKFold"
        else:
            splitter, method = StratifiedGroupKFold(n_used, shuffle=True, random_state=seed), "StratifiedGroupKFold"
    else:
        n_used = min(n_folds, cap)
        if groups is None:
            splitter, method = KFold(n_used, shuffle=True, random_state=seed), "KFold"
        else:
            splitter, method = GroupKFold(n_used), "GroupKFold"
    folds = np.empty(n, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, val) in enumerate(splitter.split(np.zeros(n), y, groups)):
            folds[val] = fold
    return folds, n_used, method


def check_split(
    assignments: pd.DataFrame,
    labels: pd.Series,
    *,
    expected_test_fraction: float | None = None,
    tolerance: float = 0.02,
) -> list[str]:
    """Problems with a split, one sentence each (empty list: the split is sound).

    ``labels`` maps image_id → label (a Series indexed by image_id). Checks: every assigned image
    has a label; every class in test also appears in train; groups (when an ``group`` column is
    present) do not straddle train and test; and, when ``expected_test_fraction`` is given, the
    realised test fraction is within ``tolerance`` plus one image (rounding) of it.
    """
    problems: list[str] = []
    lab = assignments["image_id"].map(labels)
    missing = int(lab.isna().sum())
    if missing:
        problems.append(f"{missing} assigned image(s) have no label, e.g. {assignments['image_id'][lab.isna()].iloc[0]!r}.")
    is_test = assignments["split"].to_numpy() == "test"
    unseen = sorted(set(lab[is_test].dropna()) - set(lab[~is_test].dropna()), key=str)
    if unseen:
        problems.append(f"{len(unseen)} class(es) appear in test but not in train: {unseen[:10]}.")
    if "group" in assignments:
        straddling = set(assignments["group"][is_test]) & set(assignments["group"][~is_test])
        if straddling:
            problems.append(f"{len(straddling)} group(s) straddle train and test, e.g. {sorted(straddling, key=str)[:5]}.")
    n = len(assignments)
    if expected_test_fraction is not None and n:
        actual = float(is_test.mean())
        if abs(actual - expected_test_fraction) > tolerance + 1.0 / n:
            problems.append(
                f"Test fraction is {actual:.4f}, expected {expected_test_fraction:.4f} ± {tolerance} "
                f"(plus one image of rounding)."
            )
    return problems


# --- helpers -------------------------------------------------------------------------------------


def _validated(frame, label_column, group_column, official_split_column) -> pd.DataFrame:
    needed = ["image_id", label_column] + [c for c in (group_column, official_split_column) if c]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise EvaluationError(f"Split input lacks column(s) {missing}; it has {list(frame.columns)}.")
    if frame.empty:
        raise EvaluationError("Split input has no rows; there is nothing to split.")
    n_nan = int(frame[label_column].isna().sum())
    if n_nan:
        raise EvaluationError(
            f"{n_nan} row(s) have no value in label column {label_column!r}, e.g. image_id "
            f"{frame.loc[frame[label_column].isna(), 'image_id'].iloc[0]!r}; fix or drop them in the manifest."
        )
    dup = frame["image_id"].duplicated()
    if dup.any():
        raise EvaluationError(
            f"{int(dup.sum())} duplicate image_id value(s), e.g. {frame.loc[dup, 'image_id'].iloc[0]!r}; ids must be unique."
        )
    for column in (group_column, official_split_column):
        if column and frame[column].isna().any():
            raise EvaluationError(f"{int(frame[column].isna().sum())} row(s) have no value in column {column!r}.")
    if official_split_column:
        bad = sorted(set(frame[official_split_column]) - set(OFFICIAL_TRAIN_VALUES + OFFICIAL_TEST_VALUES), key=str)
        if bad:
            raise EvaluationError(
                f"Column {official_split_column!r} has value(s) {bad}; expected one of "
                f"{OFFICIAL_TRAIN_VALUES + OFFICIAL_TEST_VALUES}."
            )
    return frame.sort_values("image_id", kind="mergesort").reset_index(drop=True)


def _codes(values: pd.Series) -> np.ndarray:
    """Integer codes in sorted-value order (sklearn's splitters reject e.g. float-looking labels)."""
    return np.unique(np.asarray(values), return_inverse=True)[1].astype(np.int64).reshape(-1)


def _dropped_frame(image_ids, labels, reason) -> pd.DataFrame:
    ids = list(image_ids)
    return pd.DataFrame({"image_id": ids, "label": list(labels), "reason": [reason] * len(ids)})


def _stratified_test_mask(y: np.ndarray, fraction: float, seed: int, label_column: str) -> np.ndarray:
    from sklearn.model_selection import StratifiedShuffleSplit

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    try:
        _, test = next(splitter.split(np.zeros(len(y)), y))
    except ValueError as exc:
        raise EvaluationError(
            f"Cannot draw a stratified test set of fraction {fraction:.3f} by {label_column!r} "
            f"({len(y)} images, {int(y.max()) + 1} classes): {exc}. Lower test_fraction."
        ) from exc
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    return mask


def _grouped_test_mask(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int, group_column: str) -> np.ndarray:
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise EvaluationError(f"Column {group_column!r} has a single group; a grouped split needs at least 2.")
    # One fold of k is the test set: k = 1/fraction, rounded, kept within what the data allow.
    k = min(max(2, round(1.0 / fraction)), n_groups)
    folds, _, _ = assign_cv_folds(y, n_folds=k, seed=seed, groups=groups)
    return folds == 0
