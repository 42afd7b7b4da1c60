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

How: float32 torch (GPU when there is one), blocked over test rows and over train rows. Train
rows are taken in class order, ``train_block_size`` at a time; for every (test block, train
block) pair one Gram product (test rows against unit train vectors) gives cosine and, through
|q|^2 + |t|^2 - 2|t| (q.t/|t|), squared distances; class scores are segment reductions over the
block's train rows grouped by class, carried across train blocks as running per-class max, min
and sum (a class may span blocks). Mean cosine is one small product with the class means of the
unit train vectors, by linearity. Memory: one [test block, train block] float32 buffer (and a
second one, on CPU only a cache-sized chunk of it), four [test block, n_classes] accumulators,
the n_classes x dim class means and a few floats per train and test row; neither the train nor
the test vectors are copied whole (with one train block, the default up to ``_TRAIN_BLOCK``
train rows, that block is kept for the call; on CUDA the unit train vectors stay on the device
when they fit in ``_DEVICE_TRAIN_CACHE_BYTES``, on CPU in ``_CPU_TRAIN_CACHE_BYTES`` of host memory;
past that each train block is gathered again for every test block). On CPU the product is taken
transposed, [train block, test block], and the passes after it run in one compiled loop
(``knn_kernels``, numba) on every core, or, without numba, as numpy passes over a few rows at a
time in cache. The per-rule ranking and float64 repair of a test block run on a thread per rule.

float32 may reorder nearly tied classes, so each row whose top k+1 class scores lie closer than a
proven float32 error bound is ranked again in float64 over the classes that could still be in
its top k (every train vector of those classes scored in float64): answers equal a float64
computation, whatever the block sizes. (The float32 values themselves depend in their last bits
on the shape of each product, so the order between two requested ks, and ``n_exact_rows``, may
differ between block sizes and devices; the top-k set at every requested k does not.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation import knn_kernels
from nfhm_pipeline.evaluation.names import (KNN_L2_RULES, KNN_RULES, MEAN_COSINE, MEAN_EUCLIDEAN,
                                           MEAN_EUCLIDEAN_L2, TOP1_COSINE, TOP1_EUCLIDEAN, TOP1_EUCLIDEAN_L2)
from nfhm_pipeline.evaluation.vectors import finite_rows

RULES = KNN_RULES  # the names are declared in evaluation.names
L2_RULES = KNN_L2_RULES
_U = 2.0**-24  # unit roundoff of float32
# float64 repair: (test row, train vector) pairs ranked at once, and train rows gathered at once
_REPAIR_PAIRS = 1 << 21
_REPAIR_GATHER = 1 << 8
_TRAIN_BLOCK = 1 << 16  # default train rows per block: up to this many, one block (the unblocked computation)
_CPU_TRAIN_BLOCK = 1 << 14  # default train rows per block on CPU past _TRAIN_BLOCK
_DEVICE_TRAIN_CACHE_BYTES = 8 << 30  # CUDA: unit train vectors kept on the device up to this size
# CPU: unit train vectors kept between test blocks up to this size (else gathered again per test
# block: at 300k x 512 that gathering cost a tenth of the kNN time)
_CPU_TRAIN_CACHE_BYTES = 1 << 30
_CPU_CHUNK = 1 << 18  # CPU: elements of one chunk of the passes after a product (1 MiB of float32: in L2)


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
    train, train_labels, test, *, normalize_euclidean: bool = False, block_size: int | None = None,
    train_block_size: int | None = None, device=None, progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Predicted label of every test vector under the four rules.

    ``train`` [n_train, dim] and ``test`` [n_test, dim]: numeric arrays (float32 or float64),
    finite, no all-zero row. ``train_labels`` [n_train]: any sortable labels. Returns
    {rule: labels [n_test]} for the rules in ``RULES``, dtype of ``train_labels``. The Euclidean
    rules use the vectors as given, or L2-normalised ones with ``normalize_euclidean=True``.
    ``device``: torch device; None picks CUDA when available. ``block_size``: test rows per block;
    ``train_block_size``: train rows per block (None: all of them up to 65,536 rows, else blocks of
    65,536, of 16,384 on CPU);
    together they set the memory used (module docstring), not the answers. ``progress``: called
    as ``progress(done, total)`` after every (test block, train block) pair.
    Ties: see the module docstring. Raises EvaluationError on unusable inputs.
    """
    variant = "l2" if normalize_euclidean else "raw"
    ranking = _rank_classes(train, train_labels, test, (1,), (variant,), block_size, train_block_size, device,
                            progress)
    suffix = "_l2" if normalize_euclidean else ""
    return {rule: ranking.labels(rule + suffix if "euclidean" in rule else rule) for rule in RULES}


def nearest_neighbour_scores(
    train, train_labels, test, *, ks=(1, 3, 5), block_size: int | None = None, train_block_size: int | None = None,
    device=None, progress: Callable[[int, int], None] | None = None,
) -> ClassRanking:
    """Class rankings of every test vector under the four rules and the two L2 variants, exact
    for top-k accuracy at every k in ``ks`` (each >= 1; clipped to the number of classes).

    Inputs as for ``nearest_neighbour_labels``. Rules: ``RULES + L2_RULES``. Column 0 of each
    ranking equals the label ``nearest_neighbour_labels`` gives (top1 rules rank classes by
    their best single vector). See ``ClassRanking``.
    """
    return _rank_classes(train, train_labels, test, ks, ("raw", "l2"), block_size, train_block_size, device, progress)


class Rows:
    """Rows ``rows`` of a 2-D array ``base`` (an in-memory or memory-mapped table), read only when a
    block asks for them: the train and test sides of a (level, group) are never copied whole.
    Indexing (an int, a slice or an int array over the view's rows) returns an in-memory array."""

    def __init__(self, base, rows):
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *np.shape(base)[1:])
        self.dtype, self.ndim = base.dtype, len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        return np.asarray(self.base[self.rows[key]])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def _as_matrix(x, name: str):
    x = x if isinstance(x, Rows) else np.asarray(x)
    if x.ndim != 2:
        raise EvaluationError(f"{name} must be a 2-D array [rows, dim] of embeddings, got shape {x.shape}.")
    if x.dtype.kind not in "fiu":
        raise EvaluationError(f"{name} must hold numbers, got dtype {x.dtype}.")
    if x.shape[0] == 0:
        raise EvaluationError(f"{name} has no rows: nearest-neighbour evaluation needs train and test vectors.")
    bad = np.flatnonzero(~finite_rows(x))  # block by block: neither a view nor a large array is copied whole
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


def _positive_or_none(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EvaluationError(f"{name} must be a whole number >= 1 (or None for the default), got {value!r}.")
    return int(value)


def block_sizes(n_train: int, n_test: int, n_classes: int, device_type: str, block_size: int | None = None,
                train_block_size: int | None = None) -> tuple[int, int]:
    """(test rows, train rows) per block that the functions above use for these sizes; None
    picks the default: every train row in one block up to ``_TRAIN_BLOCK`` rows, else blocks of
    ``_TRAIN_BLOCK`` (CPU: ``_CPU_TRAIN_BLOCK``), and as many test rows as keep one [test block,
    train block] buffer and the [test block, n_classes] accumulators near 2^24 elements (2^26 on
    CUDA), 16 to 8192 rows. (Each test block reads every train block once, so on CPU, where the
    blocks are gathered again for each test block, smaller train blocks buy bigger test blocks.)"""
    if train_block_size is None:
        train_block_size = _TRAIN_BLOCK if n_train <= _TRAIN_BLOCK or device_type != "cpu" else _CPU_TRAIN_BLOCK
    train_block = min(train_block_size, n_train)
    budget = 1 << (26 if device_type == "cuda" else 24)
    if block_size is None:  # bigger blocks amortise overheads
        block_size = min(int(np.clip(budget // train_block, 16, 8192)), max(16, budget // n_classes))
    return min(block_size, n_test), train_block


def _rank_classes_fp32(train, train_labels, test, ks, variants, block_size, train_block_size, device,
                       progress) -> ClassRanking:
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
    block_size = _positive_or_none(block_size, "block_size")
    train_block_size = _positive_or_none(train_block_size, "train_block_size")
    ks = tuple(sorted({min(int(k), len(classes)) for k in ks}))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = _Exact(X, Q, inv, len(classes), ks[-1], dev)
    k, (n_train, dim), n_classes = ks[-1], X.shape, len(classes)

    block_size, train_block = block_sizes(n_train, Q.shape[0], n_classes, dev.type, block_size, train_block_size)
    n_test_blocks = -(-Q.shape[0] // block_size)
    cache = n_test_blocks > 1 and (train_block == n_train or n_train * dim * 4 <= (
        _DEVICE_TRAIN_CACHE_BYTES if dev.type == "cuda" else _CPU_TRAIN_CACHE_BYTES))
    blocks = _TrainBlocks(X, ctx, train_block, dev, cache)
    centroids = blocks.centroids()
    counts = ctx.counts.astype(np.float64)
    class_tmax = np.maximum.reduceat(blocks.tnorm, ctx.starts)
    all_qn = np.sqrt(ctx.qq)

    # Proven bounds on float32 errors. A dot product of length dim is off by at most dim*u times
    # |q| |t|; a few u more cover rounding inputs, norms and centroids (eps_cos, for cosines).
    # Squared distances add one rounding per elementwise operation (12u (|q|+|t|)^2), and the sum
    # of a class's distances n_class*u relative (eps_rel_mean): a class's sum is a sum of its
    # n_class terms in some order whichever train blocks it spans.
    eps_cos = (dim + 16) * _U
    eps_rel_mean = (counts + 3) * _U

    S_buf = torch.empty(block_size * train_block, dtype=torch.float32, device=dev)
    fused = dev.type == "cpu" and knn_kernels.available()  # the passes after each product in one loop
    E_buf = torch.empty(train_block * (block_size if dev.type != "cpu" else max(1, _CPU_CHUNK // train_block)),
                        dtype=torch.float32, device=dev)

    rules = [TOP1_COSINE, MEAN_COSINE]
    rules += [r for v in variants for r in ((TOP1_EUCLIDEAN, MEAN_EUCLIDEAN) if v == "raw" else L2_RULES)]
    rankings = {r: np.empty((Q.shape[0], k), dtype=np.int64) for r in rules}
    n_exact = dict.fromkeys(rules, 0)
    done, total = 0, n_test_blocks * len(blocks)

    for start in range(0, Q.shape[0], block_size):
        rows = np.arange(start, min(start + block_size, Q.shape[0]))
        b = len(rows)
        qn = all_qn[rows][:, None]
        qn_t = torch.from_numpy(qn).to(dev)
        q = torch.as_tensor(Q[rows]).to(device=dev, dtype=torch.float32)
        # per class: max of |q| cos, min of |t|^2 - 2|t| |q| cos, sums of distances; the fused
        # passes fill them class-major ([n_classes, b]: a block's classes are whole rows) and they
        # are turned once per test block, not once per (test block, train block) pair
        shape = (n_classes, b) if fused else (b, n_classes)
        acc = {"max_s": np.empty(shape, dtype=np.float32)}
        if "raw" in variants:
            acc["min_e"], acc["sum_d"] = np.empty(shape, dtype=np.float32), np.empty(shape)
        if "l2" in variants:
            acc["sum_d_l2"] = np.empty(shape)
        for i in range(len(blocks)):
            T, tn, tt = blocks.unit(i)
            if fused:  # transposed, [w, b]: a class is a run of rows, reduced along test rows
                St = torch.matmul(T, q.T, out=S_buf[: b * len(tn)].view(len(tn), b))
                blocks.reduce_fused(i, St.numpy(), qn, acc)
            else:  # the one Gram product of the pair: |q| cos against the unit train vectors [b, w]
                S = torch.matmul(q, T.T, out=S_buf[: b * len(tn)].view(b, len(tn)))
                blocks.reduce(i, S, qn, qn_t, acc, E_buf)
            done += 1
            if progress is not None:
                progress(done, total)
        if fused:
            acc = {name: _transposed(a) for name, a in acc.items()}
        best_s = acc["max_s"]

        # (rule, its float32 class scores (larger is better) [b, C] or how to make them, the error
        # bound of the scores at (rows, classes) where _settle looks, top-1 rule?). The bounds are
        # only evaluated at each row's k + 1 best classes and on the rows float32 cannot decide:
        # elementwise, so the same values as over the whole [b, C] array, at a fraction of the cost.
        jobs = []
        best_cos = best_s / qn
        cos_bound = _Bound(lambda p: eps_cos)
        jobs.append((TOP1_COSINE, best_cos, cos_bound, True))
        if "l2" in variants:  # unit vectors' distance falls as their cosine rises: same float32 order
            jobs.append((TOP1_EUCLIDEAN_L2, best_cos, cos_bound, True))
        jobs.append((MEAN_COSINE, ((q / qn_t.float()) @ centroids.T).cpu().numpy(), cos_bound, False))
        if "raw" in variants:
            def e2_raw(p):
                return 2 * p(qn) * p(class_tmax) * eps_cos + 12 * _U * (p(qn) + p(class_tmax)) ** 2

            def min_d2(p, min_e=acc["min_e"]):
                return np.maximum(p(min_e) + p(qn) ** 2, 0)

            # the score is min_d2 over the whole [b, C] array (every operand as it is)
            jobs.append((TOP1_EUCLIDEAN, lambda: -min_d2(_whole), _Bound(e2_raw), True))
            jobs.append((MEAN_EUCLIDEAN, lambda sum_d=acc["sum_d"]: -(sum_d / counts),
                         _Bound(lambda p, sum_d=acc["sum_d"]: _distance_error(min_d2(p), e2_raw(p))
                                + p(eps_rel_mean) * (p(sum_d) / p(counts))), False))
        if "l2" in variants:
            e2_l2 = 2 * eps_cos + 48 * _U
            jobs.append((MEAN_EUCLIDEAN_L2, lambda sum_d=acc["sum_d_l2"]: -(sum_d / counts),
                         _Bound(lambda p, sum_d=acc["sum_d_l2"]: _distance_error(
                             np.maximum(2 - 2 * p(best_cos), 0), e2_l2) + p(eps_rel_mean) * (p(sum_d) / p(counts))),
                         False))

        def settle(job):
            """Rank by float32 class scores (each off by at most err); rank again in float64 the
            rows float32 cannot decide, over their candidate classes."""
            rule, score, err, top1 = job
            ranking, flagged, mask = _settle(score() if callable(score) else score, err, ks)
            if len(flagged):  # rows are ranked independently: in chunks of about _REPAIR_PAIRS train vectors
                rank = ctx.top1 if top1 else ctx.mean
                for a, e in _row_chunks((mask * ctx.counts).sum(axis=1), _REPAIR_PAIRS):
                    ranking[flagged[a:e]] = rank(rule, rows[flagged[a:e]], mask[a:e])
            return rule, ranking, len(flagged)

        # the rules are independent and numpy lets go of the GIL in their sorts and sums
        for rule, ranking, n_flagged in _map_threads(settle, jobs):
            rankings[rule][rows] = ranking
            n_exact[rule] += n_flagged
    return ClassRanking(classes=classes, rankings=rankings, ks=ks, n_exact_rows=n_exact)


def _transposed(a: np.ndarray) -> np.ndarray:
    """A C-ordered copy of a.T (torch's blocked copy: numpy's strided one is several times slower)."""
    import torch

    return torch.from_numpy(a).T.contiguous().numpy()


def _row_chunks(sizes: np.ndarray, limit: int):
    """(start, end) runs of consecutive rows whose ``sizes`` add up to at most ``limit`` (a row
    larger than that alone): the float64 repair's memory is set by ``limit``, not by the classes."""
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        base = ends[start - 1] if start else 0
        end = max(start + 1, int(np.searchsorted(ends, base + limit, side="right")))
        yield start, end
        start = end


def _map_threads(fn, items):
    """``map(fn, items)`` on up to torch's thread count of threads (in order)."""
    import torch

    threads = min(len(items), torch.get_num_threads())
    if threads <= 1:
        return list(map(fn, items))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="nfhm-knn-settle") as pool:
        return list(pool.map(fn, items))


class _TrainBlocks:
    """The train vectors in class order (``ctx.order``), as unit float32 vectors in blocks of
    ``train_block`` rows, and per-class reductions carried across blocks."""

    def __init__(self, X, ctx, train_block: int, device, cache: bool):
        import torch

        self.X, self.ctx, self.device = X, ctx, device
        n_train = X.shape[0]
        self.tnorm = np.sqrt(ctx.tt[ctx.order])
        self.bounds = list(range(0, n_train, train_block))
        ends = self.bounds[1:] + [n_train]
        self.spans = list(zip(self.bounds, ends))
        class_of = ctx.sorted_class
        # classes met by each block: a block's first class may have begun in an earlier block
        self.first_class = [int(class_of[a]) for a, _ in self.spans]
        self.continues = [bool(ctx.starts[class_of[a]] < a) for a, _ in self.spans]
        self.local_starts = []
        for (a, e), c0 in zip(self.spans, self.first_class):
            c1 = int(class_of[e - 1])
            self.local_starts.append(np.maximum(ctx.starts[c0 : c1 + 1] - a, 0))
        if device.type != "cpu":
            self.lengths = [torch.from_numpy(np.diff(np.append(ls, e - a))).to(device)
                            for ls, (a, e) in zip(self.local_starts, self.spans)]
        self.tn_all = torch.from_numpy(self.tnorm).to(device=device, dtype=torch.float32)
        # one block is kept for the whole call, as the unblocked computation keeps its train matrix
        self._cache = {} if cache or len(self.spans) == 1 else None

    def __len__(self) -> int:
        return len(self.spans)

    def _host_unit(self, i: int):
        """float32 unit train vectors of block i (a CPU tensor)."""
        import torch

        a, e = self.spans[i]
        T = torch.from_numpy(np.ascontiguousarray(self.X[self.ctx.order[a:e]])).to(torch.float32)
        return T.div_(torch.from_numpy(self.tnorm[a:e]).to(torch.float32)[:, None])

    def unit(self, i: int):
        """(unit vectors [w, dim], |t| [w], |t|^2 [w]) of block i, float32 on the device."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        a, e = self.spans[i]
        tn = self.tn_all[a:e]
        out = (self._host_unit(i).to(self.device), tn, tn**2)
        if self._cache is not None:
            self._cache[i] = out
        return out

    def centroids(self):
        """float32 [n_classes, dim] on the device: each class's mean unit train vector, summed in
        float64 row after row (a class spanning blocks continues its running sum)."""
        import torch

        sums = []
        for i, (a, e) in enumerate(self.spans):
            T = self._host_unit(i).numpy()
            if self._cache is not None:
                self._cache[i] = (torch.from_numpy(T).to(self.device), self.tn_all[a:e], self.tn_all[a:e] ** 2)
            for j, part in enumerate(np.split(T, self.local_starts[i][1:])):
                if j == 0 and self.continues[i]:  # the same row-after-row sum as in one piece
                    sums[-1] = np.vstack([sums[-1][None], part]).sum(axis=0)
                else:
                    sums.append(part.sum(axis=0, dtype=np.float64))
        return torch.from_numpy(np.stack(sums) / self.ctx.counts[:, None]).to(device=self.device, dtype=torch.float32)

    def reduce(self, i: int, S, qn: np.ndarray, qn_t, acc: dict, E_buf) -> None:
        """Fold block i's Gram product ``S`` [b, w] (|q| cos) into the per-class accumulators
        ``acc`` ([b, n_classes] each): ``max_s`` max |q| cos, ``min_e`` min |t|^2 - 2|t| |q| cos
        (the squared distance less |q|^2), ``sum_d`` sum of distances, ``sum_d_l2`` sum of the
        distances of the unit vectors. ``qn`` [b, 1] float64 |q| (``qn_t`` on the device)."""
        import torch

        a, e = self.spans[i]
        if S.device.type == "cpu":
            # a few rows at a time, so that the passes run in cache rather than at memory speed;
            # numpy's single-threaded loops, as torch's thread pool would wake up for every pass.
            # (numpy rounds the product before the sum, where torch fuses them, and its square
            # root is correctly rounded: last-bit differences, inside the error bounds.)
            step = max(1, _CPU_CHUNK // S.shape[1])
            Sn, scratch = S.numpy(), E_buf.numpy()
            tn = self.tn_all[a:e].numpy()
            tt, m2tn = tn * tn, tn * np.float32(-2)
            qn32 = qn.astype(np.float32)
            qq32, m2qn = qn32 * qn32, np.float32(-2) / qn32
            starts = self.local_starts[i]
            for r0 in range(0, S.shape[0], step):
                r = slice(r0, r0 + step)
                s = Sn[r]
                E = scratch[: s.size].reshape(s.shape)
                self.carry(i, acc["max_s"][r], np.maximum.reduceat(s, starts, axis=1), np.maximum)
                if "min_e" in acc:
                    # |t|^2 - 2|t| (|q| cos); the row constant |q|^2 and the clamp at 0 (as the
                    # reference does) commute with a class minimum, so they go on the [b, C] result
                    np.add(np.multiply(s, m2tn, out=E), tt, out=E)
                    self.carry(i, acc["min_e"][r], np.minimum.reduceat(E, starts, axis=1), np.minimum)
                    np.sqrt(np.maximum(np.add(E, qq32[r], out=E), 0, out=E), out=E)
                    self.carry(i, acc["sum_d"][r], np.add.reduceat(E, starts, axis=1), np.add)
                if "sum_d_l2" in acc:
                    np.sqrt(np.maximum(np.add(np.multiply(s, m2qn[r], out=E), 2, out=E), 0, out=E), out=E)
                    self.carry(i, acc["sum_d_l2"][r], np.add.reduceat(E, starts, axis=1), np.add)
            return
        tn, tt = self.tn_all[a:e], self.tn_all[a:e] ** 2
        lengths = self.lengths[i].expand(S.shape[0], -1)

        def segment(x, op):
            return torch.segment_reduce(x, op, lengths=lengths, axis=1).cpu().numpy()

        E = E_buf[: S.numel()].view(S.shape)
        self.carry(i, acc["max_s"], segment(S, "max"), np.maximum)
        if "min_e" in acc:
            torch.addcmul(tt, S, tn, value=-2, out=E)
            self.carry(i, acc["min_e"], segment(E, "min"), np.minimum)
            self.carry(i, acc["sum_d"], segment(E.add_(qn_t.float() ** 2).clamp_(min=0).sqrt_(), "sum"), np.add)
        if "sum_d_l2" in acc:
            d = torch.mul(S, -2 / qn_t.float(), out=E).add_(2).clamp_(min=0).sqrt_()
            self.carry(i, acc["sum_d_l2"], segment(d, "sum"), np.add)

    def reduce_fused(self, i: int, St: np.ndarray, qn: np.ndarray, acc: dict) -> None:
        """``reduce`` for the transposed product ``St`` [w, b] of block i, on CPU through the
        compiled loop of ``knn_kernels`` (same values, inside the same error bounds)."""
        a, e = self.spans[i]
        tn = self.tn_all[a:e].numpy()
        qn32 = qn[:, 0].astype(np.float32)
        mx, mn, sd, sl = knn_kernels.fused_reduce(St, self.local_starts[i], tn * tn, tn * np.float32(-2),
                                                  qn32 * qn32, np.float32(-2) / qn32, "min_e" in acc,
                                                  "sum_d_l2" in acc)
        # the accumulators are class-major here, [n_classes, b]: whole rows are copied
        self.carry(i, acc["max_s"].T, mx.T, np.maximum)
        if mn is not None:
            self.carry(i, acc["min_e"].T, mn.T, np.minimum)
            self.carry(i, acc["sum_d"].T, sd.T, np.add)
        if sl is not None:
            self.carry(i, acc["sum_d_l2"].T, sl.T, np.add)

    def carry(self, i: int, acc: np.ndarray, part: np.ndarray, combine) -> None:
        """Write block i's per-class reduction ``part`` into ``acc`` [b, n_classes], combining the
        first class with what earlier blocks gave it when it began there."""
        c0 = self.first_class[i]
        if self.continues[i]:
            acc[:, c0] = combine(acc[:, c0], part[:, 0])
            acc[:, c0 + 1 : c0 + part.shape[1]] = part[:, 1:]
        else:
            acc[:, c0 : c0 + part.shape[1]] = part


def _distance_error(min_d2, e2):
    """Bound [b, C] on the error of every distance of a class, given the bound e2 on its squared
    distances and the class's smallest squared distance min_d2 [b, C].

    |d - d'| = |d^2 - d'^2| / (d + d') <= e2 / (d + sqrt(max(d^2 - e2, 0))), and never more than
    sqrt(e2); the bound falls as d grows, so the class's smallest distance gives the worst case.
    """
    with np.errstate(divide="ignore"):
        bound = e2 / (np.sqrt(min_d2) + np.sqrt(np.maximum(min_d2 - e2, 0)))
    return np.minimum(bound, np.sqrt(e2))


class _Bound:
    """The error bound of a rule's class scores, evaluated only where ``_settle`` asks.

    ``formula(p)`` writes the bound with every operand passed through ``p``: a scalar as it is,
    a per-row column [b, 1], a per-class vector [C] or a full [b, C] array, each gathered at the
    asked (rows, classes). The operations are elementwise, so each value is the one the formula
    gives over the whole [b, C] array."""

    def __init__(self, formula):
        self.formula = formula

    def at(self, rows: np.ndarray, cols: np.ndarray | None, shape) -> np.ndarray:
        """The bound at classes ``cols`` [m, j] of rows ``rows`` [m] (``cols`` None: every class),
        as an array of ``shape``."""
        def p(x):
            x = np.asarray(x)
            if x.ndim == 0:
                return x
            if x.ndim == 1:  # per class
                return x[None, :] if cols is None else x[cols]
            x = x[rows]
            return x if cols is None or x.shape[1] == 1 else np.take_along_axis(x, cols, 1)

        return np.broadcast_to(self.formula(p), shape)


def _whole(x):
    """A formula's operand as it is: the formula over the whole [b, C] array (see ``_Bound``)."""
    return x


def _settle(s, err: _Bound, ks):
    """Top-k classes by float32 scores, and the rows where float32 cannot be trusted.

    ``s`` [b, C], larger is better, each off by at most ``err`` (a ``_Bound``); ``ks`` ascending,
    <= C. Returns (ranking int64 [b, max(ks)], flagged row numbers, candidate mask [n_flagged, C]).
    A row is flagged when its k-th and (k+1)-th scores, for some k in ks, lie within their
    combined error; its candidates are every class whose true score may reach the max(ks)-th
    best, so the true top max(ks) is among them.
    """
    k, C = ks[-1], s.shape[1]
    kk = min(k + 1, C)
    idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(s, idx, 1), axis=1), 1)
    v, e = np.take_along_axis(s, idx, 1), err.at(np.arange(len(s)), idx, idx.shape)
    gap = [j - 1 for j in ks if j < C]
    after = [j + 1 for j in gap]
    rows = np.flatnonzero(((v[:, gap] - v[:, after]) <= e[:, gap] + e[:, after]).any(axis=1))
    mask = s[rows] + err.at(rows, None, (len(rows), C)) >= (v[rows, k - 1] - e[rows, k - 1])[:, None]
    return idx[:, :k].astype(np.int64), rows, mask


class _Exact:
    """Float64 class rankings of test rows over candidate classes, with the documented tie rules.

    Values are computed from the caller's arrays with row-wise sums (numpy on CPU, or with numba
    ``knn_kernels.gathered_dots``, which gives numpy's very values without its temporaries; torch on
    other devices; never BLAS), so identical vectors get bit-identical values and exact ties stay ties.
    """

    def __init__(self, X, Q, inv, n_classes, k, device):
        self.X, self.Q, self.k, self.device = X, Q, k, device
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
            # the compiled loop computes numpy's very values (knn_kernels), gathering row by row
            base, base_rows = (self.X.base, self.X.rows) if isinstance(self.X, Rows) else (self.X, None)
            compiled = knn_kernels.dots_usable(base)
            for a, b in zip(bounds[:-1], bounds[1:]):
                q = np.asarray(self.Q[queries[a]], dtype=np.float64)
                if compiled:
                    rows = items[a:b] if base_rows is None else base_rows[items[a:b]]
                    knn_kernels.gathered_dots(base, np.ascontiguousarray(rows, dtype=np.int64), q, dot[a:b])
                    continue
                for c in range(a, b, _REPAIR_GATHER):  # each pair's sum is its own row's: chunks change nothing
                    d = min(c + _REPAIR_GATHER, b)
                    dot[c:d] = (self.X[items[c:d]] * q).sum(axis=1)
        else:
            import torch

            per, a = max(1, (1 << 25) // self.X.shape[1]), 0
            while a < len(items):  # chunks of whole test rows, about 2^25 products each
                b = max(bounds[np.searchsorted(bounds, a + per, side="right") - 1],  # whole rows up to a + per
                        bounds[np.searchsorted(bounds, a, side="right")])  # or one whole row
                # rows gathered on the host: neither matrix is copied whole to the device
                x, q = (torch.as_tensor(M[v[a:b]]).to(self.device) for M, v in ((self.X, items), (self.Q, queries)))
                dot[a:b] = (x.double() * q.double()).sum(dim=1).cpu().numpy()
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

    def _class_values(self, rule, rows, mask):
        """float64 score of every train vector of every candidate class: (r, c, n, group, items,
        value), pairs grouped by row, then class (ascending), then train order; group: the first
        pair of each (row, class), n its number of train vectors."""
        r, c = np.nonzero(mask)  # by row, classes ascending
        n = self.counts[c]
        group = np.cumsum(n) - n
        items = self.order[np.repeat(self.starts[c] - group, n) + np.arange(n.sum())]
        return r, c, n, group, items, self._values(rule, np.repeat(rows[r], n), items)

    def top1(self, rule, rows, mask):
        """Rank candidate classes by their best train vector (ties: lowest train index).

        Every train vector of a candidate class is scored in float64 (as ``mean`` does): no float32
        score, and so no pass over the train blocks, is needed to find the best ones."""
        r, c, n, group, items, value = self._class_values(rule, rows, mask)
        best = np.maximum.reduceat(value, group)
        first = np.minimum.reduceat(np.where(value == np.repeat(best, n), items, len(self.order)), group)
        return self._rank(r, c, best, first, len(rows))

    def mean(self, rule, rows, mask):
        """Rank candidate classes by their mean score over all their train vectors (ties: sorted
        label order)."""
        if rule == MEAN_COSINE:
            r, c = np.nonzero(mask)  # by row, classes ascending
            q = self.Q[rows[r]].astype(np.float64)
            centroids = np.stack([self.centroid(ci) for ci in c])
            score = (q * centroids).sum(axis=1) / np.sqrt(self.qq[rows[r]])
            return self._rank(r, c, score, c, len(rows))
        r, c, n, group, _, value = self._class_values(rule, rows, mask)
        return self._rank(r, c, np.add.reduceat(value, group) / n, c, len(rows))
