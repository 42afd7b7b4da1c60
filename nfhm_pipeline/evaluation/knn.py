"""Nearest-neighbour evaluation of embeddings (the four rules of seed 000_566dbed8f272b7fc).

Each test vector is given the label of the train vectors it is closest to, by one of:

* ``top1_cosine``: the single train vector with the highest cosine similarity;
* ``mean_cosine``: the class whose train vectors have the highest MEAN cosine similarity;
* ``top1_euclidean``: the single train vector at the lowest Euclidean distance;
* ``mean_euclidean``: the class with the lowest MEAN Euclidean distance (mean of distances, not
  of squared distances).

``*_euclidean_l2`` are the Euclidean rules on L2-normalised vectors.

Ties (exact equality in float64) are broken deterministically: the ``top1`` rules pick the train
vector with the lowest index in ``train`` (numpy's argmax/argmin convention), the ``mean`` rules
the class that comes first in sorted label order (``np.unique`` order, as pandas' groupby). When
a ranking is asked for, top1 rules rank classes by their best single vector (ties: lowest train
index of that vector), mean rules by their mean (ties: sorted label order).

How: float32 torch (GPU when there is one), blocked over test rows: memory ~ 2 x block x n_train
+ n_train x dim floats. One Gram product per block (test rows against unit train vectors) gives
cosine and, through |q|^2 + |t|^2 - 2|t| (q.t/|t|), squared distances; class scores are segment
reductions over train rows grouped by class (mean cosine is one small product with the class
means of the unit train vectors, by linearity). float32 may reorder nearly tied classes, so each
row whose top k+1 class scores lie closer than a proven float32 error bound is ranked again in
float64 over the classes that could still be in its top k: answers equal a float64 computation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.names import (KNN_L2_RULES, KNN_RULES, MEAN_COSINE, MEAN_EUCLIDEAN,
                                           MEAN_EUCLIDEAN_L2, TOP1_COSINE, TOP1_EUCLIDEAN, TOP1_EUCLIDEAN_L2)

RULES = KNN_RULES  # the names are declared in evaluation.names
L2_RULES = KNN_L2_RULES
_U = 2.0**-24  # unit roundoff of float32


@dataclass(frozen=True)
class ClassRanking:
    """Per-rule class rankings of test vectors.

    ``classes``: the sorted distinct train labels, shape [n_classes], dtype of the train labels.
    ``rankings``: rule name -> int64 array [n_test, max(ks)] of indices into ``classes``, best
    first. For every k in ``ks`` the first k columns are exactly the k best classes; column 0 is
    the rule's predicted class. Between two such boundaries, classes whose scores differ by less
    than float32 resolution may appear in float32 order.
    ``ks``: the requested ks clipped to n_classes, ascending, without duplicates.
    ``n_exact_rows``: rule name -> number of test rows ranked again in float64 (diagnostic).
    """

    classes: np.ndarray
    rankings: dict[str, np.ndarray]
    ks: tuple[int, ...]
    n_exact_rows: dict[str, int]

    def labels(self, rule: str) -> np.ndarray:
        """Predicted label per test row for ``rule``, shape [n_test], dtype of ``classes``."""
        return self.classes[self.rankings[rule][:, 0]]

    def class_indices(self, labels) -> np.ndarray:
        """Index into ``classes`` of each label (int64), -1 for labels that no train row has."""
        labels = np.asarray(labels)
        pos = np.searchsorted(self.classes, labels).clip(0, len(self.classes) - 1)
        return np.where(self.classes[pos] == labels, pos, -1).astype(np.int64)


def nearest_neighbour_labels(
    train, train_labels, test, *, normalize_euclidean: bool = False, block_size: int | None = None, device=None
) -> dict[str, np.ndarray]:
    """Predicted label of every test vector under the four rules.

    ``train`` [n_train, dim] and ``test`` [n_test, dim]: numeric arrays (float32 or float64),
    finite, no all-zero row. ``train_labels`` [n_train]: any sortable labels. Returns
    {rule: labels [n_test]} for the rules in ``RULES``, dtype of ``train_labels``. The Euclidean
    rules use the vectors as given, or L2-normalised ones with ``normalize_euclidean=True``.
    ``device``: torch device; None picks CUDA when available. ``block_size``: test rows per block.
    Ties: see the module docstring. Raises EvaluationError on unusable inputs.
    """
    variant = "l2" if normalize_euclidean else "raw"
    ranking = _rank_classes(train, train_labels, test, (1,), (variant,), block_size, device)
    suffix = "_l2" if normalize_euclidean else ""
    return {rule: ranking.labels(rule + suffix if "euclidean" in rule else rule) for rule in RULES}


def nearest_neighbour_scores(
    train, train_labels, test, *, ks=(1, 3, 5), block_size: int | None = None, device=None
) -> ClassRanking:
    """Class rankings of every test vector under the four rules and the two L2 variants, exact
    for top-k accuracy at every k in ``ks`` (each >= 1; clipped to the number of classes).

    Inputs as for ``nearest_neighbour_labels``. Rules: ``RULES + L2_RULES``. Column 0 of each
    ranking equals the label ``nearest_neighbour_labels`` gives (top1 rules rank classes by
    their best single vector). See ``ClassRanking``.
    """
    return _rank_classes(train, train_labels, test, ks, ("raw", "l2"), block_size, device)


def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise EvaluationError(f"{name} must be a 2-D array [rows, dim] of embeddings, got shape {x.shape}.")
    if x.dtype.kind not in "fiu":
        raise EvaluationError(f"{name} must hold numbers, got dtype {x.dtype}.")
    if x.shape[0] == 0:
        raise EvaluationError(f"{name} has no rows: nearest-neighbour evaluation needs train and test vectors.")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise EvaluationError(
            f"{name} row {bad[0]} (and {bad.size - 1} more) holds NaN or infinite values; "
            "re-embed those images or drop them before evaluating."
        )
    return x


def _squared_norms(x: np.ndarray, name: str, chunk: int = 4096) -> np.ndarray:
    """float64 |row|^2 [rows]; row-wise numpy sums so identical rows get bit-identical values."""
    out = np.empty(x.shape[0])
    for a in range(0, x.shape[0], chunk):
        rows = x[a : a + chunk].astype(np.float64)
        out[a : a + chunk] = (rows * rows).sum(axis=1)
    zero = np.flatnonzero(out == 0)
    if zero.size:
        raise EvaluationError(
            f"{name} row {zero[0]} is all zeros, so its cosine similarity is undefined; "
            "drop all-zero embeddings (often an image that failed to decode) before evaluating."
        )
    return out


def _rank_classes(*args) -> ClassRanking:
    import torch

    # The error bounds assume true float32 products; TF32/bfloat16 matmuls would break them.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _rank_classes_fp32(*args)
    finally:
        torch.set_float32_matmul_precision(previous)


def _rank_classes_fp32(train, train_labels, test, ks, variants, block_size, device) -> ClassRanking:
    import torch

    X, Q = _as_matrix(train, "train"), _as_matrix(test, "test")
    if X.shape[1] != Q.shape[1]:
        raise EvaluationError(
            f"train vectors have dim {X.shape[1]} but test vectors dim {Q.shape[1]}; use one model's embeddings for both."
        )
    y = np.asarray(train_labels)
    if y.shape != (X.shape[0],):
        raise EvaluationError(
            f"train_labels has shape {y.shape} but train has {X.shape[0]} rows; give one label per train row."
        )
    try:
        classes, inv = np.unique(y, return_inverse=True)
    except TypeError as e:
        raise EvaluationError(f"train_labels cannot be sorted ({e}); use labels of one type, e.g. all strings.") from e
    if not len(ks) or min(ks) < 1:
        raise EvaluationError(f"ks must be one or more k >= 1, got {ks}.")
    ks = tuple(sorted({min(int(k), len(classes)) for k in ks}))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = _Exact(X, Q, inv, len(classes), ks[-1], dev)
    k, (n_train, dim) = ks[-1], X.shape

    # Train rows grouped by class (ctx.order) make every class a contiguous column range of a
    # block, so per-class max/min/sum are segment reductions.
    tnorm = np.sqrt(ctx.tt[ctx.order])
    T = torch.as_tensor(X).index_select(0, torch.from_numpy(ctx.order)).to(torch.float32)
    T = T.div_(torch.from_numpy(tnorm).to(torch.float32)[:, None])
    # class means of the unit train vectors, summed in float64
    centroids = torch.from_numpy(np.stack([
        part.sum(axis=0, dtype=np.float64) / len(part) for part in np.split(T.numpy(), ctx.starts[1:])
    ])).to(device=dev, dtype=torch.float32)
    T, tn = T.to(dev), torch.from_numpy(tnorm).to(device=dev, dtype=torch.float32)
    tt = tn**2
    lengths = torch.from_numpy(ctx.counts).to(dev)
    counts = ctx.counts.astype(np.float64)
    class_tmax = np.maximum.reduceat(tnorm, ctx.starts)
    all_qn = np.sqrt(ctx.qq)

    def segment(x, op):
        """[b, n_train] -> [b, n_classes] numpy, reducing each class's column range."""
        if x.device.type == "cpu":  # numpy's reduceat is several times faster than torch's here
            return {"max": np.maximum, "min": np.minimum, "sum": np.add}[op].reduceat(x.numpy(), ctx.starts, axis=1)
        return torch.segment_reduce(x, op, lengths=lengths.expand(x.shape[0], -1), axis=1).cpu().numpy()

    # Proven bounds on float32 errors. A dot product of length dim is off by at most dim*u times
    # |q| |t|; a few u more cover rounding inputs, norms and centroids (eps_cos, for cosines).
    # Squared distances add one rounding per elementwise operation (12u (|q|+|t|)^2), and the sum
    # of a class's distances n_class*u relative (eps_rel_mean).
    eps_cos = (dim + 16) * _U
    eps_rel_mean = (counts + 3) * _U

    if block_size is None:  # elements in one [block, n_train] buffer; bigger blocks amortise overheads
        block_size = int(np.clip((1 << (26 if dev.type == "cuda" else 24)) // n_train, 16, 8192))
    block_size = max(1, min(int(block_size), Q.shape[0]))
    S_buf = torch.empty(block_size, n_train, dtype=torch.float32, device=dev)
    E_buf = torch.empty_like(S_buf)

    rules = [TOP1_COSINE, MEAN_COSINE]
    rules += [r for v in variants for r in ((TOP1_EUCLIDEAN, MEAN_EUCLIDEAN) if v == "raw" else L2_RULES)]
    rankings = {r: np.empty((Q.shape[0], k), dtype=np.int64) for r in rules}
    n_exact = dict.fromkeys(rules, 0)

    def settle(rule, rows, score, err, item_scores=None):
        """Rank by float32 class scores (larger is better, each off by at most err); rank again in
        float64 the rows float32 cannot decide. top1 rules give item_scores(f): the float32 score
        of every train vector (tensor, in ctx.order) for the flagged block rows f (tensor)."""
        ranking, flagged, mask = _settle(score, np.broadcast_to(err, score.shape), ks)
        if len(flagged):
            if rule.startswith("top1"):
                floor = score[flagged] - 2 * np.broadcast_to(err, score.shape)[flagged]
                scores_f = item_scores(torch.from_numpy(flagged).to(dev))
                ranking[flagged] = ctx.top1(rule, rows[flagged], mask, scores_f, floor)
            else:
                ranking[flagged] = ctx.mean(rule, rows[flagged], mask)
        rankings[rule][rows] = ranking
        n_exact[rule] += len(flagged)

    for start in range(0, Q.shape[0], block_size):
        rows = np.arange(start, min(start + block_size, Q.shape[0]))
        qn = all_qn[rows][:, None]
        qn_t = torch.from_numpy(qn).to(dev)
        q = torch.as_tensor(Q[rows]).to(device=dev, dtype=torch.float32)
        # the one Gram product of the block: |q| cos against the unit train vectors [b, n_train]
        S = torch.matmul(q, T.T, out=S_buf[: len(rows)])

        def cosines(f):
            return S[f] / qn_t[f]

        best_cos = segment(S, "max") / qn
        settle(TOP1_COSINE, rows, best_cos, eps_cos, cosines)
        if "l2" in variants:  # unit vectors' distance falls as their cosine rises: same float32 order
            settle(TOP1_EUCLIDEAN_L2, rows, best_cos, eps_cos, cosines)
        settle(MEAN_COSINE, rows, ((q / qn_t.float()) @ centroids.T).cpu().numpy(), eps_cos)
        E = E_buf[: len(rows)]
        if "raw" in variants:
            # |t|^2 - 2|t| (|q| cos); the row constant |q|^2 and the clamp at 0 (as the reference
            # does) commute with a class minimum, so they are applied to the [b, C] result
            torch.addcmul(tt, S, tn, value=-2, out=E)
            min_d2 = np.maximum(segment(E, "min") + qn**2, 0)
            e2 = 2 * qn * class_tmax * eps_cos + 12 * _U * (qn + class_tmax) ** 2
            settle(TOP1_EUCLIDEAN, rows, -min_d2, e2, lambda f: -(E[f] + qn_t[f] ** 2).clamp_(min=0))
            mean_d = segment(E.add_(qn_t.float() ** 2).clamp_(min=0).sqrt_(), "sum") / counts
            settle(MEAN_EUCLIDEAN, rows, -mean_d, _distance_error(min_d2, e2) + eps_rel_mean * mean_d)
        if "l2" in variants:
            mean_d = segment(torch.mul(S, -2 / qn_t.float(), out=E).add_(2).clamp_(min=0).sqrt_(), "sum") / counts
            e2 = 2 * eps_cos + 48 * _U
            err = _distance_error(np.maximum(2 - 2 * best_cos, 0), e2) + eps_rel_mean * mean_d
            settle(MEAN_EUCLIDEAN_L2, rows, -mean_d, err)
    return ClassRanking(classes=classes, rankings=rankings, ks=ks, n_exact_rows=n_exact)


def _distance_error(min_d2, e2):
    """Bound [b, C] on the error of every distance of a class, given the bound e2 on its squared
    distances and the class's smallest squared distance min_d2 [b, C].

    |d - d'| = |d^2 - d'^2| / (d + d') <= e2 / (d + sqrt(max(d^2 - e2, 0))), and never more than
    sqrt(e2); the bound falls as d grows, so the class's smallest distance gives the worst case.
    """
    with np.errstate(divide="ignore"):
        bound = e2 / (np.sqrt(min_d2) + np.sqrt(np.maximum(min_d2 - e2, 0)))
    return np.minimum(bound, np.sqrt(e2))


def _settle(s, err, ks):
    """Top-k classes by float32 scores, and the rows where float32 cannot be trusted.

    ``s`` [b, C], larger is better, each off by at most ``err`` [b, C]; ``ks`` ascending, <= C.
    Returns (ranking int64 [b, max(ks)], flagged row numbers, candidate mask [n_flagged, C]).
    A row is flagged when its k-th and (k+1)-th scores, for some k in ks, lie within their
    combined error; its candidates are every class whose true score may reach the max(ks)-th
    best, so the true top max(ks) is among them.
    """
    k, C = ks[-1], s.shape[1]
    kk = min(k + 1, C)
    idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(s, idx, 1), axis=1), 1)
    v, e = np.take_along_axis(s, idx, 1), np.take_along_axis(err, idx, 1)
    gap = [j - 1 for j in ks if j < C]
    after = [j + 1 for j in gap]
    rows = np.flatnonzero(((v[:, gap] - v[:, after]) <= e[:, gap] + e[:, after]).any(axis=1))
    mask = s[rows] + err[rows] >= (v[rows, k - 1] - e[rows, k - 1])[:, None]
    return idx[:, :k].astype(np.int64), rows, mask


class _Exact:
    """Float64 class rankings of test rows over candidate classes, with the documented tie rules.

    Values are computed from the caller's arrays with row-wise sums (numpy on CPU, torch on other
    devices; never BLAS), so identical vectors get bit-identical values and exact ties stay ties.
    """

    def __init__(self, X, Q, inv, n_classes, k, device):
        import torch

        self.X, self.Q, self.k, self.device = X, Q, k, device
        if device.type != "cpu":
            self.X_dev, self.Q_dev = torch.as_tensor(X).to(device), torch.as_tensor(Q).to(device)
        self.order = np.argsort(inv, kind="stable")
        self.counts = np.bincount(inv, minlength=n_classes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.sorted_class = inv[self.order]
        self.tt, self.qq = _squared_norms(X, "train"), _squared_norms(Q, "test")
        self._centroids = {}

    def centroid(self, c: int) -> np.ndarray:
        """float64 mean unit train vector of class c: mean cosine to c = its dot with q/|q|."""
        if c not in self._centroids:
            idx = self.order[self.starts[c] : self.starts[c] + self.counts[c]]
            unit = self.X[idx].astype(np.float64) / np.sqrt(self.tt[idx])[:, None]
            self._centroids[c] = unit.sum(axis=0) / len(idx)
        return self._centroids[c]

    def _values(self, rule, queries, items):
        """float64 score per (test row, train row) pair, larger is better; pairs grouped by row.
        A test row's pairs are summed in one call, so equal vectors get equal values."""
        dot = np.empty(len(items))
        bounds = np.flatnonzero(np.diff(queries, prepend=-1, append=-1))
        if self.device.type == "cpu":
            for a, b in zip(bounds[:-1], bounds[1:]):
                dot[a:b] = (self.X[items[a:b]] * self.Q[queries[a]].astype(np.float64)).sum(axis=1)
        else:
            import torch

            per, a = max(1, (1 << 25) // self.X.shape[1]), 0
            while a < len(items):  # chunks of whole test rows, about 2^25 products each
                b = max(bounds[np.searchsorted(bounds, a + per, side="right") - 1],  # whole rows up to a + per
                        bounds[np.searchsorted(bounds, a, side="right")])  # or one whole row
                i, q = (torch.from_numpy(v[a:b]).to(self.device) for v in (items, queries))
                dot[a:b] = (self.X_dev[i].double() * self.Q_dev[q].double()).sum(dim=1).cpu().numpy()
                a = b
        qq, tt = self.qq[queries], self.tt[items]
        if rule.endswith("cosine"):
            return dot / (np.sqrt(qq) * np.sqrt(tt))
        if rule.endswith("_l2"):
            return -np.sqrt(np.maximum(2 - 2 * dot / (np.sqrt(qq) * np.sqrt(tt)), 0))
        return -np.sqrt(np.maximum(qq + tt - 2 * dot, 0))

    def _rank(self, group_row, group_class, score, tiebreak, n_rows):
        """Top-k group_class per row [n_rows, k]: by score descending, then tiebreak ascending."""
        pick = np.lexsort((tiebreak, -score, group_row))
        row_start = np.searchsorted(group_row[pick], np.arange(n_rows))
        return group_class[pick][row_start[:, None] + np.arange(self.k)]

    def top1(self, rule, rows, mask, item_scores, floor):
        """Rank candidate classes by their best train vector (ties: lowest train index).

        Only train vectors that may be their class's best are scored in float64: those whose
        float32 score (``item_scores``, tensor [n, n_train]) reaches ``floor`` [n, C], the class's
        float32 best minus twice its error.
        """
        import torch

        floor = np.where(mask, floor, np.inf)  # non-candidate classes take no part
        if item_scores.device.type == "cpu":  # numpy: no thread-pool round trips for small arrays
            r, j = np.nonzero(item_scores.numpy() >= floor[:, self.sorted_class])
        else:
            cls = torch.from_numpy(self.sorted_class).to(item_scores.device)
            band = item_scores >= torch.from_numpy(floor).to(item_scores.device)[:, cls]
            r, j = (v.cpu().numpy() for v in torch.nonzero(band, as_tuple=True))
        # by row, then class, then train order
        items, c = self.order[j], self.sorted_class[j]
        value = self._values(rule, rows[r], items)
        group = np.flatnonzero(np.diff(r * len(self.counts) + c, prepend=-1))
        size = np.diff(np.append(group, len(r)))
        best = np.maximum.reduceat(value, group)
        first = np.minimum.reduceat(np.where(value == np.repeat(best, size), items, len(self.order)), group)
        return self._rank(r[group], c[group], best, first, len(rows))

    def mean(self, rule, rows, mask):
        """Rank candidate classes by their mean score over all their train vectors (ties: sorted
        label order)."""
        r, c = np.nonzero(mask)  # by row, classes ascending
        if rule == MEAN_COSINE:
            q = self.Q[rows[r]].astype(np.float64)
            centroids = np.stack([self.centroid(ci) for ci in c])
            score = (q * centroids).sum(axis=1) / np.sqrt(self.qq[rows[r]])
            return self._rank(r, c, score, c, len(rows))
        n = self.counts[c]
        group = np.cumsum(n) - n
        items = self.order[np.repeat(self.starts[c] - group, n) + np.arange(n.sum())]
        value = self._values(rule, np.repeat(rows[r], n), items)
        return self._rank(r, c, np.add.reduceat(value, group) / n, c, len(rows))
