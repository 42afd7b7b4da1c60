"""Unit-length rows, the one helper every cosine in the evaluation goes through; and row-wise checks
that read a (possibly memory-mapped) table a block of rows at a time."""
from __future__ import annotations

import numpy as np

from nfhm_pipeline.errors import EvaluationError


def unit_rows(x, name: str = "embeddings", *, dtype=np.float64, checked: bool = True,
              non_empty: bool = True) -> np.ndarray:
    """``x`` with each vector (last axis) divided by its Euclidean norm.

    dtype: the precision of the division (None keeps ``x``'s own). checked: refuse NaN/inf and
    all-zero vectors with an EvaluationError naming ``name`` (cosine is undefined there); off only
    where the caller has already checked its inputs. non_empty: require a non-empty 2-D array.
    """
    x = np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    if non_empty and (x.ndim != 2 or 0 in x.shape):
        raise EvaluationError(f"{name} must be a non-empty 2-D array [rows, dim], got shape {x.shape}.")
    if checked and not np.isfinite(x).all():
        bad = (~np.isfinite(x)).reshape(-1, x.shape[-1]).any(axis=1).sum() if x.ndim else 1
        raise EvaluationError(f"{name}: {int(bad)} row(s) hold NaN or inf; cosine is undefined.")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if checked:
        zero = np.flatnonzero(norms.reshape(-1) == 0)
        if len(zero):
            raise EvaluationError(f"{name}: {len(zero)} row(s) have zero norm (first at row {zero[0]}); "
                                  "cosine is undefined.")
    return x / norms


ROW_BLOCK = 8192  # rows read at once by `per_row`


def per_row(x, test) -> np.ndarray:
    """bool [rows]: ``test(block)`` (a bool per row of an in-memory block) over ``x`` a block of
    ``ROW_BLOCK`` rows at a time, so that neither a memory-mapped table nor a view of one
    (``knn.Rows``) is read or copied whole."""
    out = np.empty(len(x), dtype=bool)
    for a in range(0, len(x), ROW_BLOCK):
        out[a:a + ROW_BLOCK] = test(np.asarray(x[a:a + ROW_BLOCK]))
    return out


def finite_rows(x) -> np.ndarray:
    """bool [rows]: the row holds no NaN or infinity."""
    return per_row(x, lambda block: np.isfinite(block).all(axis=1))
