"""CheXpert-style multi-label manifests and label policies.

A CheXpert CSV has one row per image, a path column and one column per finding
holding 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or empty (not
mentioned in the report). `read_chexpert_csv` keeps those four states as
1.0 / 0.0 / -1.0 / NaN; `apply_uncertain_policy` turns them into binary targets
plus a mask of the entries that count, so every metric sees the same decision.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import ManifestError, NfhmError

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

UNCERTAIN_POLICIES = ("ignore", "positive", "negative")
MISSING_POLICIES = ("negative", "ignore")


class LabelPolicyError(NfhmError, ValueError):
    """An unknown uncertain/missing-label policy, or label values it cannot handle."""


def read_chexpert_csv(
    csv_path: str | os.PathLike,
    *,
    path_column: str = "Path",
    findings: Sequence[str] | None = None,
    image_root: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Read a CheXpert-style label CSV into candidate manifest rows.

    Returns one row per CSV data row with columns `uri` (absolute path, str),
    `source_row` (1-based data row; the header is not counted, so the file line
    is `source_row + 1`) and one float64 column per finding, in `findings`
    order (default `CHEXPERT_FINDINGS`), holding 1.0, 0.0, -1.0 or NaN (empty).
    Relative paths are resolved against `image_root`, default the CSV's folder.
    Raises ManifestError naming the file, row, column and value for anything else.
    """
    csv_path = Path(csv_path)
    findings = list(CHEXPERT_FINDINGS if findings is None else findings)
    root = Path(image_root) if image_root is not None else csv_path.parent
    try:
        # Read everything as text so "1", "1.0" and "" are seen exactly as written.
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ManifestError(f"{csv_path}: CheXpert CSV not found; check the dataset's csv path") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{csv_path}: cannot be parsed as CSV ({exc})") from exc

    absent = [c for c in [path_column, *findings] if c not in raw.columns]
    if absent:
        raise ManifestError(
            f"{csv_path}: missing column(s) {absent}; the file has {list(raw.columns)}. "
            "Rename them in the CSV or pass path_column=/findings= to match."
        )

    out = pd.DataFrame({"source_row": np.arange(1, len(raw) + 1, dtype=np.int64)})
    uris = []
    for row, p in zip(out["source_row"], raw[path_column]):
        if not p.strip():
            raise ManifestError(f"{csv_path}: row {row} (line {row + 1}) has an empty {path_column!r}")
        uris.append(os.path.abspath(root / p.strip()))
    out.insert(0, "uri", uris)

    for col in findings:
        out[col] = [_parse_label(v, csv_path, row, col) for row, v in zip(out["source_row"], raw[col])]
        out[col] = out[col].astype(np.float64)
    return out


def _parse_label(text: str, csv_path: Path, row: int, column: str) -> float:
    text = text.strip()
    if text == "":
        return np.nan
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (1.0, 0.0, -1.0):
        raise ManifestError(
            f"{csv_path}: row {row} (line {row + 1}), column {column!r} has value {text!r}; "
            "CheXpert labels must be 1.0, 0.0, -1.0 or empty"
        )
    return value


def apply_uncertain_policy(
    values: np.ndarray,
    policy: Literal["ignore", "positive", "negative"],
    missing: Literal["negative", "ignore"] = "negative",
) -> tuple[np.ndarray, np.ndarray]:
    """Turn CheXpert label states [N, F] (1, 0, -1, NaN) into binary targets and a mask.

    policy for uncertain (-1): 'ignore' masks it out, 'positive' maps it to 1
    (U-Ones), 'negative' maps it to 0 (U-Zeros). missing for empty (NaN):
    'negative' maps it to 0 (CheXpert convention: not mentioned means absent),
    'ignore' masks it out. Returns y int8 [N, F] in {0, 1} (0 where masked) and
    mask bool [N, F], True where the entry counts.
    """
    if policy not in UNCERTAIN_POLICIES:
        raise LabelPolicyError(f"unknown uncertain-label policy {policy!r}; choose one of {list(UNCERTAIN_POLICIES)}")
    if missing not in MISSING_POLICIES:
        raise LabelPolicyError(f"unknown missing-label policy {missing!r}; choose one of {list(MISSING_POLICIES)}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise LabelPolicyError(f"label values must be 2-D [images, findings], got shape {values.shape}")
    empty = np.isnan(values)
    known = np.isin(values, (1.0, 0.0, -1.0))
    if not np.all(known | empty):
        bad = values[~(known | empty)][:5].tolist()
        raise LabelPolicyError(f"label values must be 1, 0, -1 or NaN; found e.g. {bad}")

    uncertain = values == -1.0
    y = (values == 1.0) | (uncertain & (policy == "positive"))
    mask = np.ones(values.shape, dtype=bool)
    if policy == "ignore":
        mask &= ~uncertain
    if missing == "ignore":
        mask &= ~empty
    return y.astype(np.int8), mask


def binary_targets_from_labels(
    labels: Sequence, classes: Sequence | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
    """One-vs-rest targets for single-label multi-class data.

    Returns y int8 [N, C] (1 where the image's label is class c), mask bool
    [N, C] (all True: every image is a known positive or negative for every
    class) and the class list (default: sorted unique labels). There is always
    one column per class, also for C = 2 (e.g. PneumoniaMNIST 0/1): callers who
    want the single "positive class" AUC take that class's column.
    Raises LabelPolicyError if a label is not among `classes`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise LabelPolicyError(f"labels must be 1-D (one class per image), got shape {labels.shape}")
    classes = np.unique(labels).tolist() if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in labels.tolist() if v not in index})
    if unknown:
        raise LabelPolicyError(f"labels {unknown[:10]} are not among the classes {classes}")
    y = np.zeros((len(labels), len(classes)), dtype=np.int8)
    y[np.arange(len(labels)), [index[v] for v in labels.tolist()]] = 1
    return y, np.ones_like(y, dtype=bool), classes


# --- CheXpert CSV → manifest candidates ----------------------------------------------------------

NO_POSITIVE_STRATUM = "none"
RARE_STRATUM = "other"
_FINDING_VALUES = {"1": 1.0, "0": 0.0, "-1": -1.0}


def first_positive_strata(values: np.ndarray, findings: Sequence[str]) -> list[str]:
    """A stratum per image for the split: the first finding (catalog order) marked 1.0, else
    ``'none'``. Strata holding one image are merged into ``'other'``; if ``'other'`` then holds one
    image it joins the most frequent stratum (ties: the name that sorts first). Uncertain labels
    do not count, so the split does not depend on the uncertain-label policy.

    values float [N, F] in {1, 0, -1, NaN}. Returns N strings.
    """
    values = np.asarray(values, dtype=np.float64)
    strata = []
    for row in values:
        hits = np.flatnonzero(row == 1.0)
        strata.append(str(findings[hits[0]]) if len(hits) else NO_POSITIVE_STRATUM)
    counts = pd.Series(strata).value_counts()
    strata = [RARE_STRATUM if counts[s] == 1 else s for s in strata]
    counts = pd.Series(strata).value_counts()
    if counts.get(RARE_STRATUM, 0) == 1:
        largest = counts.drop(RARE_STRATUM)
        if len(largest):
            top = sorted(largest[largest == largest.max()].index)[0]
            strata = [top if s == RARE_STRATUM else s for s in strata]
    return strata


def chexpert_candidates(
    csv_path, *, label_columns: Sequence[str], findings: Sequence[str] | None = None, path_column: str = "Path",
    image_root=None, group_column: str | None = None,
) -> pd.DataFrame:
    """Candidates (see ``nfhm_pipeline.ingest.readers``) from a CheXpert-style CSV.

    ``label_columns`` must be one name: that column holds `first_positive_strata` (the split is
    stratified by it). Each finding becomes a column of strings ``'1'``, ``'0'``, ``'-1'`` or None
    (empty), which ``validate_images`` keeps as they are. ``group_column`` (e.g. a patient id)
    is read from the same CSV. ``source_row`` is the CSV line (header = line 1).
    """
    label_columns = list(label_columns)
    if len(label_columns) != 1:
        raise ManifestError(f"{csv_path}: a chexpert_csv dataset takes one entry in 'labels' (the derived "
                            f"stratum column, e.g. [label]), got {label_columns}")
    findings = list(CHEXPERT_FINDINGS if findings is None else findings)
    rows = read_chexpert_csv(csv_path, path_column=path_column, findings=findings, image_root=image_root)
    values = rows[findings].to_numpy(dtype=np.float64)
    out = pd.DataFrame({"uri": rows["uri"], label_columns[0]: first_positive_strata(values, findings)})
    for j, name in enumerate(findings):
        out[name] = [None if np.isnan(v) else str(int(v)) for v in values[:, j]]
    out["group"] = None
    if group_column:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        if group_column not in raw.columns:
            raise ManifestError(f"{csv_path}: group column {group_column!r} is missing (columns present: "
                                f"{', '.join(raw.columns)}); fix the dataset's 'group' field")
        out["group"] = [g.strip() or None for g in raw[group_column]]
    out["official_split"] = None
    out["source_row"] = rows["source_row"].to_numpy() + 1
    out["reject_reason"] = None
    return out


def parse_finding_values(frame: pd.DataFrame, findings: Sequence[str]) -> np.ndarray:
    """Manifest finding columns (strings '1', '0', '-1', null) → float64 [N, F] in {1, 0, -1, NaN}."""
    out = np.full((len(frame), len(findings)), np.nan)
    for j, name in enumerate(findings):
        if name not in frame.columns:
            raise ManifestError(f"manifest has no finding column {name!r}: materialize image_manifest again "
                                "(the catalog's findings changed since)")
        column = frame[name].astype(object)
        bad = ~(column.isna() | column.isin(list(_FINDING_VALUES)))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ManifestError(f"manifest row {i}, finding {name!r}: value {column.iloc[i]!r} is not '1', '0', "
                                "'-1' or empty; materialize image_manifest again")
        out[:, j] = column.map(_FINDING_VALUES).to_numpy(dtype=np.float64, na_value=np.nan)
    return out
