"""The passes after each kNN Gram product on CPU, fused into one compiled loop (numba).

For one (test block, train block) pair, ``knn.py`` needs four per-class reductions of the
product (|q| cos of every test row against the block's unit train vectors, the train rows grouped
by class): the max of S, the min of |t|^2 - 2|t| S, the sum of the distances
sqrt(max(|q|^2 + |t|^2 - 2|t| S, 0)) and the sum of the unit-vector distances
sqrt(max(2 - 2 S/|q|, 0)). Written as numpy passes they read and write product-sized arrays about
fifteen times, on one core, and at 512 dims cost twice the product itself.

Here the product is taken transposed, ``St`` [train rows, test rows], so a class is a run of
consecutive rows of ``St`` and each reduction is an elementwise update of a [test rows] vector by
one row after another: long, contiguous, vectorised loops over the test rows, every element of the
product read once, the accumulators in L1. The test rows are shared among threads (the compiled
loop releases the GIL).

Rounding: the same float32 operations as the numpy passes, a class's terms summed in train order;
the compiler may fuse a multiply and an add (one rounding instead of two). That stays inside the
error bounds of ``knn.py``, so its float64 repair gives the same answers. Without numba (it comes
with umap-learn), or with ``NFHM_KNN_NUMPY_PASSES=1``, ``knn.py`` runs its numpy passes.
"""
from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# numba is a dependency of umap-learn; the numpy passes stand in without it. It is imported on
# first use, not here: importing it takes a second, and loading the Dagster code must stay quick.
HAS_NUMBA = importlib.util.find_spec("numba") is not None

DISABLE_ENV = "NFHM_KNN_NUMPY_PASSES"  # "1": the numpy passes instead (a cross-check)

# Inputs are finite (knn.py refuses NaN / inf), so no-NaN / no-inf let max and min vectorise; no
# "afn" (approximate sqrt) and no "arcp" (approximate reciprocals): those would break the bounds.
_FASTMATH = {"contract", "reassoc", "nsz", "nnan", "ninf"}
_ALIGN = 16  # test rows per thread are cut at multiples of one AVX-512 register of float32


def _kernel(St, r0, r1, starts, ends, tt, m2tn, qq, m2qn, raw, l2, max_s, min_e, sum_d, sum_l2):
    """Columns r0..r1 (test rows) of the per-class reductions of ``St`` [w, b]; outputs [n, b].
    (Every loop runs over slices from 0: numba then knows no index is negative and vectorises.)"""
    zero, two = np.float32(0.0), np.float32(2.0)
    m = r1 - r0
    q2, mq = qq[r0:r1], m2qn[r0:r1]
    for j in range(starts.shape[0]):
        a, e = starts[j], ends[j]
        mx, s0, mt, t2 = max_s[j, r0:r1], St[a, r0:r1], m2tn[a], tt[a]
        for r in range(m):
            mx[r] = s0[r]
        if raw:
            mn, sd = min_e[j, r0:r1], sum_d[j, r0:r1]
            for r in range(m):
                v = s0[r] * mt + t2
                mn[r] = v
                sd[r] = np.sqrt(max(v + q2[r], zero))
        if l2:
            sl = sum_l2[j, r0:r1]
            for r in range(m):
                sl[r] = np.sqrt(max(s0[r] * mq[r] + two, zero))
        for c in range(a + 1, e):
            s, mt, t2 = St[c, r0:r1], m2tn[c], tt[c]
            for r in range(m):
                mx[r] = max(mx[r], s[r])
            if raw:
                for r in range(m):
                    v = s[r] * mt + t2
                    mn[r] = min(mn[r], v)
                    sd[r] += np.sqrt(max(v + q2[r], zero))
            if l2:
                for r in range(m):
                    sl[r] += np.sqrt(max(s[r] * mq[r] + two, zero))


_compiled = None


def _compiled_kernel():
    global _compiled
    if _compiled is None:  # compiled on first use; numba's on-disk cache keeps it between processes
        import numba

        _compiled = numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)(_kernel)
    return _compiled


def available() -> bool:
    """Whether the fused passes are used (numba importable and not switched off)."""
    return HAS_NUMBA and os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")


_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def fused_reduce(St: np.ndarray, starts: np.ndarray, tt: np.ndarray, m2tn: np.ndarray, qq: np.ndarray,
                 m2qn: np.ndarray, raw: bool, l2: bool):
    """Per-class reductions of ``St`` [w, b] float32 (train rows x test rows) over the row groups
    that begin at ``starts`` [n] (ascending, starts[0] = 0): ``(max St, min (St m2tn + tt),
    sum sqrt(max(St m2tn + tt + qq, 0)), sum sqrt(max(St m2qn + 2, 0)))``, each float32 [n, b]
    (m2tn, tt per train row; qq, m2qn per test row); the second and third are None unless ``raw``,
    the last None unless ``l2``. ``tt``, ``m2tn`` [w]: |t|^2 and -2|t|; ``qq``, ``m2qn`` [b]:
    |q|^2 and -2/|q|."""
    global _pool, _pool_size
    kernel = _compiled_kernel()
    w, b = St.shape
    n = len(starts)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], w).astype(np.int64)
    St, tt, m2tn, qq, m2qn = (np.ascontiguousarray(x, dtype=np.float32) for x in (St, tt, m2tn, qq, m2qn))
    unused = np.empty((n, 1), dtype=np.float32)  # the kernel never touches an output it is not asked for
    max_s = np.empty((n, b), dtype=np.float32)
    min_e, sum_d = (np.empty((n, b), dtype=np.float32) for _ in range(2)) if raw else (unused, unused)
    sum_l2 = np.empty((n, b), dtype=np.float32) if l2 else unused
    args = (starts, ends, tt, m2tn, qq, m2qn, raw, l2, max_s, min_e, sum_d, sum_l2)
    threads = min(_threads(), max(1, b // _ALIGN))
    if threads <= 1:
        kernel(St, 0, b, *args)
    else:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="nfhm-knn"), threads
        cuts = [min(b, -(-b * i // threads // _ALIGN) * _ALIGN) for i in range(threads)] + [b]
        list(_pool.map(lambda ab: kernel(St, ab[0], ab[1], *args), zip(cuts[:-1], cuts[1:])))
    return max_s, (min_e if raw else None), (sum_d if raw else None), (sum_l2 if l2 else None)
