"""Near-duplicate images across a split, found by the Hamming distance of perceptual hashes.

Exact byte copies are rejected at ingest (same ``image_id``). A re-encoded, resized or slightly
re-contrasted copy of a scan has other bytes but almost the same perceptual hash (the manifest's
``phash``: a difference hash as hexadecimal). When one copy is in train and the other in test, the
test image's nearest neighbour is itself, which inflates kNN and probe scores.

Hashes are compared as ``uint64`` words (any width that is a multiple of 64 bits), all pairs of
a block of rows against every column at once with ``np.bitwise_count``: 30 000 images against
each other is 4.5e8 pairs, a few seconds, with memory bounded by the block size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError

# Rows x columns x words compared per block: bounds memory (~8 bytes each) whatever the size.
BLOCK_ELEMENTS = 1 << 22

PAIR_COLUMNS = ["image_id_a", "image_id_b", "split_a", "split_b", "distance"]


def hash_matrix(hashes: Sequence[str], *, what: str = "phash") -> np.ndarray:
    """``(n, words)`` uint64 array of hexadecimal hashes (all the same length, 16 hex per word)."""
    values = [str(h).strip().lower() for h in hashes]
    if not values:
        return np.zeros((0, 1), dtype=np.uint64)
    width = len(values[0])
    bad = [v for v in values if len(v) != width]
    if width == 0 or width % 16 or bad:
        example = bad[0] if bad else values[0]
        raise EvaluationError(
            f"{what} values must be hexadecimal strings of one length, a multiple of 16 characters; "
            f"found {example!r} next to {values[0]!r}. Re-run image validation (image_manifest) to rehash."
        )
    try:
        raw = bytes.fromhex("".join(values))
    except ValueError:
        raise EvaluationError(f"{what} values must be hexadecimal; e.g. {values[0]!r} is not. "
                              "Re-run image validation (image_manifest) to rehash.") from None
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(values), width // 16)


def pairs_within(a: np.ndarray, b: np.ndarray | None, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``(i, j, distance)`` with Hamming distance ``<= max_distance`` between rows of
    ``a`` and rows of ``b``; with ``b=None``, pairs of rows of ``a`` with ``i < j``.

    Sorted by ``(i, j)``; arrays of int64, int64, int16.
    """
    same = b is None
    b = a if same else b
    if a.shape[1] != b.shape[1]:
        raise EvaluationError(f"Cannot compare hashes of {a.shape[1] * 64} and {b.shape[1] * 64} bits.")
    words = a.shape[1]
    found_i, found_j, found_d = [], [], []
    block = max(1, BLOCK_ELEMENTS // max(1, len(b) * words))
    for start in range(0, len(a), block):
        stop = min(start + block, len(a))
        # In the self case only columns from `start` on can hold a j > i.
        offset = start if same else 0
        cols = b[offset:]
        dist = np.zeros((stop - start, len(cols)), dtype=np.int16)
        for w in range(words):
            dist += np.bitwise_count(a[start:stop, w][:, None] ^ cols[None, :, w])
        hit = dist <= max_distance
        if same:
            hit &= np.arange(stop - start)[:, None] + start < np.arange(len(cols))[None, :] + offset
        i, j = np.nonzero(hit)
        found_i.append(i + start)
        found_j.append(j + offset)
        found_d.append(dist[i, j])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int16)
    return (np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64),
            np.concatenate(found_d).astype(np.int16))


def cross_split_pairs(assignments: pd.DataFrame, phash: pd.Series, max_distance: int) -> pd.DataFrame:
    """Train/test pairs of near-duplicates of a split.

    ``assignments``: ``image_id``, ``split`` ('train' | 'test'); ``phash``: image_id → hex hash
    (images without one are skipped). Returns :data:`PAIR_COLUMNS`, ``a`` the train image and
    ``b`` the test image, sorted by test image, distance, train image.
    """
    hashed = assignments[["image_id", "split"]].assign(phash=assignments["image_id"].map(phash))
    hashed = hashed[hashed["phash"].notna()]
    train = hashed[hashed["split"] == "train"].reset_index(drop=True)
    test = hashed[hashed["split"] == "test"].reset_index(drop=True)
    if train.empty or test.empty:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    hashes = hash_matrix(pd.concat([train["phash"], test["phash"]]).tolist())
    i, j, d = pairs_within(hashes[: len(train)], hashes[len(train):], max_distance)
    out = pd.DataFrame({"image_id_a": train["image_id"].to_numpy()[i], "image_id_b": test["image_id"].to_numpy()[j],
                        "split_a": "train", "split_b": "test", "distance": d.astype(np.int64)})
    return out.sort_values(["image_id_b", "distance", "image_id_a"], kind="mergesort").reset_index(drop=True)


def all_pairs(image_ids: Sequence[str], phash: Sequence, max_distance: int) -> pd.DataFrame:
    """Every pair of near-duplicates among ``image_ids`` (``image_id_a < image_id_b`` in input
    order; entries without a hash skipped): ``image_id_a``, ``image_id_b``, ``distance``."""
    ids = np.asarray(list(image_ids), dtype=object)
    hashes = pd.Series(list(phash), dtype=object)
    keep = hashes.notna().to_numpy()
    ids, hashes = ids[keep], hashes[keep]
    if len(ids) < 2:
        return pd.DataFrame(columns=["image_id_a", "image_id_b", "distance"])
    i, j, d = pairs_within(hash_matrix(hashes.tolist()), None, max_distance)
    return pd.DataFrame({"image_id_a": ids[i], "image_id_b": ids[j], "distance": d.astype(np.int64)})


def merge_units(units: pd.Series, pairs: pd.DataFrame) -> pd.Series:
    """Leakage units with every near-duplicate pair joined into one (union-find).

    ``units``: image_id → unit label (str); ``pairs``: ``image_id_a``, ``image_id_b``. A merged
    unit is named after the smallest of its units' labels, so the result does not depend on row
    order. Units without a near-duplicate keep their label.
    """
    labels = units.astype(str)
    names = np.unique(labels.to_numpy())
    parent = np.arange(len(names))
    code = pd.Series(np.arange(len(names)), index=names)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    a = code.reindex(labels.reindex(pairs["image_id_a"]).to_numpy()).to_numpy()
    b = code.reindex(labels.reindex(pairs["image_id_b"]).to_numpy()).to_numpy()
    for x, y in zip(a.tolist(), b.tolist()):
        if x != x or y != y:  # an id of a pair that is not in `units` (NaN)
            continue
        rx, ry = root(int(x)), root(int(y))
        if rx != ry:
            # `names` is sorted, so the smaller code is the smaller label: keep it as the root.
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([root(i) for i in range(len(names))])
    return pd.Series(names[roots[code[labels.to_numpy()].to_numpy()]], index=units.index)
