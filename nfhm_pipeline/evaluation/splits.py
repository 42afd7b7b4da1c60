"""Train/test split and cross-validation folds shared by every evaluation of a dataset.

One split per dataset, computed once from the image manifest, so that every model is scored on
the same test images. Three modes:

* **stratified** (default): the NFHM week-7 rule. Classes with a single image are dropped (they
  cannot be in both train and test) and reported; the test fraction is
  ``max(requested, n_classes / n_images_kept)`` so the stratified draw has room for every class;
  the draw is stratified by the label and seeded.
* **grouped** (``group_column``: the leakage unit, e.g. video, patient or slide): no group
  straddles train and test. Groups are assigned whole by a seeded, class-aware greedy search (see
  :func:`grouped_test_mask`) that aims at each class's share of the requested fraction and keeps
  any single group to at most ``max_group_share`` of a class's test images where the data allow
  it. The realised fraction is within ``fraction_tolerance`` of the target, else a warning says why.
* **official** (``official_split_column``, e.g. MedMNIST ``train``/``val``/``test``): ``test`` rows
  are the test part; ``train`` and ``val`` rows are both train (CV folds replace the validation
  set), their official split stays visible in the ``official_split`` column. No row is dropped:
  the dataset's authors decided the split.

Rows are sorted by ``image_id`` before any random draw, so identical input in any row order gives
identical output.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

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
    ``target_test_fraction``: the fraction the draw aimed at (``max(requested, n_classes / n)``;
    the realised one in official mode); ``fraction_tolerance``: how far the realised fraction may
    miss it (see :func:`make_split`). ``warnings``: sentences for a person (metadata, report).
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
    target_test_fraction: float | None = None
    fraction_tolerance: float = 0.02
    warnings: list = field(default_factory=list)
    # image_id -> label of every assigned image: group statistics and dropped rows need it.
    labels: pd.Series | None = field(default=None, repr=False, compare=False)

    @property
    def realised_test_fraction(self) -> float:
        n = len(self.assignments)
        return float((self.assignments["split"] == "test").sum() / n) if n else 0.0

    def group_stats(self) -> dict:
        """``n_groups_train``, ``n_groups_test``, ``largest_group_share`` (the largest share of one
        class's test images held by one group) and where it is; None values without a group column."""
        return _group_stats(self.assignments, self.labels)

    def summary(self) -> dict:
        """Plain-Python (JSON-ready) description, for asset metadata and logs."""
        split = self.assignments["split"]
        stats = self.group_stats()
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
            "realised_test_fraction": self.realised_test_fraction,
            "target_test_fraction": None if self.target_test_fraction is None else float(self.target_test_fraction),
            "fraction_tolerance": float(self.fraction_tolerance),
            "n_folds": int(self.n_folds),
            "fold_method": self.fold_method,
            "n_classes_absent_from_test": len(self.classes_absent_from_test),
            "n_groups_train": stats["n_groups_train"],
            "n_groups_test": stats["n_groups_test"],
            "largest_group_share": stats["largest_group_share"],
            "warnings": list(self.warnings),
        }

    def with_warnings(self, extra: list[str]) -> "SplitResult":
        return replace(self, warnings=[*self.warnings, *extra]) if extra else self

    def without(self, image_ids, reason: str) -> "SplitResult":
        """This split with ``image_ids`` taken out (into ``dropped`` with ``reason``); the other
        rows keep their side and fold, so a model's results on them stay comparable."""
        drop = self.assignments["image_id"].isin(set(image_ids))
        if not drop.any():
            return self
        gone = self.assignments.loc[drop, "image_id"]
        labels = self.labels.reindex(gone).to_numpy() if self.labels is not None else [None] * len(gone)
        kept = self.assignments[~drop].reset_index(drop=True)
        lab = kept["image_id"].map(self.labels) if self.labels is not None else None
        absent = self.classes_absent_from_test
        if lab is not None:
            absent = sorted(set(lab) - set(lab[kept["split"].to_numpy() == "test"]), key=str)
        dropped = pd.concat([self.dropped, _dropped_frame(gone, labels, reason)], ignore_index=True)
        return replace(self, assignments=kept, dropped=dropped, classes_absent_from_test=absent)


def make_split(
    frame: pd.DataFrame,
    *,
    label_column: str,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_folds: int = 5,
    group_column: str | None = None,
    official_split_column: str | None = None,
    max_group_share: float = 0.5,
) -> SplitResult:
    """Split ``frame`` (one row per image: ``image_id``, the finest label, optional group and
    official-split columns) into train/test and assign CV folds to the train rows.

    ``effective_test_fraction`` is the fraction used for the draw in stratified mode and the
    realised fraction of test rows in grouped and official modes.

    Grouped mode (``group_column``) promises: no group on both sides (nor in two CV folds), and a
    realised test fraction within ``fraction_tolerance = max(0.02, s / n)`` of the target
    ``max(test_fraction, n_classes / n)``, where ``s`` is the size of the largest group the split
    may put in test (groups holding more than ``max_group_share`` of their class's target count
    stay in train unless the class cannot fill its target without them) and ``n`` the number of
    images kept. That tolerance is what :func:`check_split_result` (the splits asset's blocking
    check) holds the split to; the greedy search meets it on every collection we know of, and
    ``warnings`` says so whenever the fraction misses by more than 0.02, or a group holds more
    than ``max_group_share`` of a class's test images.
    """
    if not 0.0 < test_fraction < 1.0:
        raise EvaluationError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}.")
    if n_folds < 2:
        raise EvaluationError(f"n_folds must be at least 2, got {n_folds}.")
    if not 0.0 < max_group_share <= 1.0:
        raise EvaluationError(f"max_group_share must be in (0, 1], got {max_group_share}.")
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

    tolerance, notes = 0.02, []
    if official_split_column is not None:
        mode = "official"
        is_test = kept[official_split_column].isin(OFFICIAL_TEST_VALUES).to_numpy()
        effective = float(is_test.mean())
        target = effective
    else:
        effective = max(test_fraction, n_classes / len(kept))
        target = effective
        if groups is None:
            mode = "stratified"
            is_test = _stratified_test_mask(y, effective, seed, label_column)
        else:
            mode = "grouped"
            is_test, tolerance, notes = grouped_test_mask(
                y, groups, effective, seed=seed, max_group_share=max_group_share, group_column=group_column,
                class_names=np.unique(np.asarray(kept[label_column])),
                group_names=np.unique(np.asarray(kept[group_column])),
            )
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
        target_test_fraction=float(target),
        fraction_tolerance=float(tolerance),
        warnings=list(notes),
        labels=pd.Series(kept[label_column].to_numpy(), index=kept["image_id"].to_numpy()),
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


# A grouped split's realised test fraction may miss its target by this much, or by one group
# (see make_split); a miss above it is always reported in the warnings.
FRACTION_TOLERANCE_FLOOR = 0.02
# Seeded candidate assignments tried per grouped split; the best is kept. More candidates hit the
# fraction more closely; the greedy pass is O(groups), so large collections get fewer.
GROUPED_CANDIDATES = 32
GROUPED_CANDIDATES_LARGE = 8
LARGE_GROUP_COUNT = 5000


def grouped_test_mask(
    y: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    *,
    seed: int = 0,
    max_group_share: float = 0.5,
    group_column: str = "group",
    class_names=None,
    group_names=None,
) -> tuple[np.ndarray, float, list[str]]:
    """Test mask of a grouped split, its fraction tolerance, and warnings.

    ``y``, ``groups``: integer codes (0..K-1, 0..G-1), one per image. Each class ``c`` aims at
    ``fraction * n_c`` test images. A candidate visits the groups in a seeded random order and
    puts a group in test when that brings its classes' test counts closer to their targets (L1)
    and leaves each of them at least one training image. Groups holding more than
    ``max_group_share`` of a class's target stay in train, unless the class's smaller groups
    cannot fill the target. Of several seeded candidates the one kept has, in order: fewest
    classes left out of test, realised fraction within tolerance, fewest classes where one group
    exceeds ``max_group_share`` of the class's test images, smallest fraction error, smallest
    per-class error. Every seed draws its own candidates, so large groups change side with it.

    Returns ``(mask, tolerance, warnings)``; ``tolerance = max(0.02, s / n)`` with ``s`` the size
    of the largest group allowed in test (see :func:`make_split`); a miss above 0.02 is warned of.
    """
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    n = len(y)
    n_groups = int(groups.max()) + 1 if n else 0
    if n_groups < 2:
        raise EvaluationError(f"Column {group_column!r} has a single group; a grouped split needs at least 2.")
    k = int(y.max()) + 1
    class_names = np.arange(k) if class_names is None else np.asarray(class_names)
    group_names = np.arange(n_groups) if group_names is None else np.asarray(group_names)

    # Sparse (group, class, count) entries, sorted by group: most groups hold one class.
    entry, count = np.unique(groups * k + y, return_counts=True)
    e_group, e_class = entry // k, entry % k
    class_n = np.bincount(y, minlength=k)
    target = fraction * class_n
    fits = count <= max_group_share * target[e_class]
    fillable = np.bincount(e_class, weights=count * fits, minlength=k) >= target
    allowed_entry = fits | ~fillable[e_class]
    allowed = np.bincount(e_group[~allowed_entry], minlength=n_groups) == 0
    group_size = np.bincount(groups, minlength=n_groups)
    largest_allowed = int(group_size[allowed].max()) if allowed.any() else int(group_size.max())
    tolerance = max(FRACTION_TOLERANCE_FLOOR, largest_allowed / n)

    bounds = np.searchsorted(e_group, np.arange(n_groups + 1))
    members = [list(zip(e_class[a:b].tolist(), count[a:b].tolist())) for a, b in zip(bounds[:-1], bounds[1:])]
    n_groups_of_class = np.bincount(e_class, minlength=k)
    # A class with one group cannot be on both sides; it is not counted as "left out of test".
    testable = (n_groups_of_class >= 2) & (target >= 0.5)

    n_candidates = GROUPED_CANDIDATES if n_groups <= LARGE_GROUP_COUNT else GROUPED_CANDIDATES_LARGE
    best_key, best = None, None
    for candidate in range(n_candidates):
        order = np.random.default_rng([int(seed), candidate]).permutation(n_groups)
        chosen = _greedy_groups(order, members, allowed, target.tolist(), class_n.tolist())
        if not chosen.any():
            chosen = _one_group_fallback(members, target, class_n)
        in_test = np.bincount(e_class, weights=count * chosen[e_group], minlength=k)
        share = _class_shares(e_group, e_class, count, chosen, in_test, k)
        realised = in_test.sum() / n
        key = (int((testable & (in_test == 0)).sum()), abs(realised - fraction) > tolerance,
               int((share > max_group_share + 1e-12).sum()), round(abs(realised - fraction), 12),
               float(np.abs(in_test - target).sum()))
        if best_key is None or key < best_key:
            best_key, best = key, (chosen, in_test, share)
    chosen, in_test, share = best
    mask = chosen[groups]

    notes = []
    realised = float(mask.mean())
    if abs(realised - fraction) > FRACTION_TOLERANCE_FLOOR:
        notes.append(
            f"The grouped split by {group_column!r} put {realised:.1%} of the images in test, not "
            f"{fraction:.1%} (tolerance {tolerance:.1%}): its {n_groups} groups are too few or too uneven "
            f"(the largest holds {int(group_size.max())} of {n} images) to come closer."
        )
    over = np.flatnonzero(share > max_group_share + 1e-12)
    if len(over):
        examples = []
        for c in over[np.argsort(-share[over], kind="stable")][:5]:
            rows = np.flatnonzero((e_class == c) & chosen[e_group])
            top = rows[np.argmax(count[rows])]
            examples.append(f"{class_names[c]!r}: {group_column} {group_names[e_group[top]]!r} holds "
                            f"{int(count[top])} of {int(in_test[c])}")
        notes.append(
            f"In {len(over)} class(es) one {group_column!r} group holds more than {max_group_share:.0%} of "
            f"the class's test images (split.max_group_share), so their test scores rest mostly on that "
            f"group; these classes have too few or too uneven groups to share out ("
            + "; ".join(examples) + ("; …" if len(over) > 5 else "") + ")."
        )
    return mask, float(tolerance), notes


def _greedy_groups(order, members, allowed, target: list, class_n: list) -> np.ndarray:
    """One candidate: visit groups in ``order``, keep those that bring test counts closer to target."""
    current = [0.0] * len(target)
    chosen = np.zeros(len(members), dtype=bool)
    for g in order.tolist():
        if not allowed[g]:
            continue
        delta = 0.0
        for c, v in members[g]:
            after = current[c] + v
            if after >= class_n[c]:  # the class would have no training image left
                delta = 1.0
                break
            delta += abs(after - target[c]) - abs(current[c] - target[c])
        if delta < 0:
            chosen[g] = True
            for c, v in members[g]:
                current[c] += v
    return chosen


def _one_group_fallback(members, target, class_n) -> np.ndarray:
    """When no group improves on an empty test set (every group is large), the one that misses
    the targets least, so that the split still has a test part (and a warning says how far off)."""
    chosen = np.zeros(len(members), dtype=bool)
    best, best_cost = None, None
    for g, entries in enumerate(members):
        if any(v >= class_n[c] for c, v in entries):
            continue
        cost = sum(abs(v - target[c]) - target[c] for c, v in entries)
        if best_cost is None or cost < best_cost:
            best, best_cost = g, cost
    if best is not None:
        chosen[best] = True
    return chosen


def _class_shares(e_group, e_class, count, chosen, in_test, k) -> np.ndarray:
    """Per class: the largest share of its test images held by one group (0 with no test image)."""
    share = np.zeros(k)
    sel = chosen[e_group]
    if sel.any():
        np.maximum.at(share, e_class[sel], count[sel] / np.maximum(in_test[e_class[sel]], 1))
    return share


def _group_stats(assignments: pd.DataFrame, labels: pd.Series | None) -> dict:
    none = {"n_groups_train": None, "n_groups_test": None, "largest_group_share": None,
            "largest_group": None, "largest_group_class": None}
    if "group" not in assignments or assignments.empty:
        return none
    is_test = assignments["split"].to_numpy() == "test"
    out = dict(none)
    out["n_groups_train"] = int(assignments.loc[~is_test, "group"].nunique())
    out["n_groups_test"] = int(assignments.loc[is_test, "group"].nunique())
    if labels is None or not is_test.any():
        return out
    test = pd.DataFrame({"label": assignments.loc[is_test, "image_id"].map(labels).to_numpy(),
                         "group": assignments.loc[is_test, "group"].to_numpy()})
    per = test.groupby(["label", "group"], sort=True).size()
    share = per / per.groupby(level="label").transform("sum")
    top = share.idxmax()
    out.update(largest_group_share=float(share.max()), largest_group=str(top[1]),
               largest_group_class=str(top[0]))
    return out


def check_split_result(result: SplitResult, labels: pd.Series) -> list[str]:
    """:func:`check_split` with the promise the split made: in stratified and grouped modes the
    realised test fraction is within ``result.fraction_tolerance`` of ``result.target_test_fraction``."""
    expected = None if result.mode == "official" else result.target_test_fraction
    return check_split(result.assignments, labels, expected_test_fraction=expected,
                       tolerance=result.fraction_tolerance)


# A reporting column "looks like a leakage unit" when it has at least this many groups (of 2+
# images), more groups than classes, and at least this share of those groups within one class.
LEAKAGE_MIN_GROUPS = 10
LEAKAGE_SINGLE_CLASS_SHARE = 0.9


def leakage_warnings(
    frame: pd.DataFrame,
    label_column: str,
    group_column: str,
    used_as_leakage_unit: bool,
    *,
    assignments: pd.DataFrame | None = None,
    leakage_column: str | None = None,
    group_label: str | None = None,
) -> list[str]:
    """A warning sentence when the reporting column ``group_column`` looks like a leakage unit
    (video, patient, specimen: many groups, nearly each inside one class) but the split does not
    keep its groups together; else an empty list.

    No warning when it is the split's leakage unit (``used_as_leakage_unit``), when each of its
    groups lies inside one value of ``leakage_column`` (the declared unit nests it), or when
    ``assignments`` (``image_id``, ``split``) show that no group has images on both sides.
    """
    if used_as_leakage_unit or group_column not in frame or label_column not in frame:
        return []
    cols = ["image_id", label_column, group_column] + ([leakage_column] if leakage_column in frame else [])
    f = frame[cols].dropna(subset=[label_column, group_column])
    sizes = f.groupby(group_column).size()
    multi = sizes.index[sizes >= 2]
    f = f[f[group_column].isin(multi)]
    n_classes = f[label_column].nunique()
    if len(multi) < LEAKAGE_MIN_GROUPS or len(multi) <= n_classes:
        return []
    single_class = float((f.groupby(group_column)[label_column].nunique() == 1).mean())
    if single_class < LEAKAGE_SINGLE_CLASS_SHARE:
        return []
    if leakage_column in f and f[leakage_column].notna().all():
        if (f.groupby(group_column)[leakage_column].nunique() == 1).all():
            return []
    straddle_text = ""
    if assignments is not None:
        sides = f[["image_id", group_column]].merge(assignments[["image_id", "split"]], on="image_id")
        straddling = int((sides.groupby(group_column)["split"].nunique() > 1).sum())
        if straddling == 0:
            return []
        straddle_text = f", and {straddling} of them have images in both train and test"
    name = group_label or group_column
    return [
        f"The reporting group {name!r} looks like a leakage unit: {len(multi)} groups, "
        f"{single_class:.0%} of them inside a single {label_column!r} class{straddle_text}. If a group is "
        f"one video, patient, specimen or slide, its near-identical images act as neighbours across "
        f"the split and inflate kNN and probe scores: set 'split.group_by: {name}' in the catalog so "
        f"that no group straddles train and test."
    ]


def split_identity(assignments: pd.DataFrame, seed: int) -> str:
    """``seed<seed>-<12 hex>``: the seed plus a hash of every (image_id, split, fold) assignment.

    Two splits with the same id put every image on the same side and in the same fold, so results
    computed on them are comparable; any change of seed, images or fractions changes the id.
    """
    import hashlib

    rows = assignments.sort_values("image_id", kind="mergesort")
    digest = hashlib.sha256()
    for image_id, side, fold in zip(rows["image_id"], rows["split"], rows["fold"]):
        digest.update(f"{image_id}\t{side}\t{'' if pd.isna(fold) else int(fold)}\n".encode())
    return f"seed{int(seed)}-{digest.hexdigest()[:12]}"
