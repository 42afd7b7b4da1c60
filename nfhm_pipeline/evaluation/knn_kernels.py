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
import threading
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


# -- float64 repair: the dot products of one test row with gathered train rows -------------------
#
# knn.py's float64 repair scores (test row, train row) pairs as numpy does, ``(X[items] * q).sum(axis=1)``:
# each product rounded to float64, then each row summed by numpy's pairwise summation. Written in
# numpy that gathers and writes float64 temporaries of [pairs, dim] and is memory-bound; the loop
# below gathers one train row at a time into a dim-long buffer and sums it with the same pairwise
# algorithm (numpy's ``pairwise_sum``: 8 running sums over blocks of at most 128 terms, halved at
# multiples of 8 above that), so every value is bit-identical to numpy's (no fastmath here:
# ``test_knn_kernels`` checks equality over many lengths). Equal vectors keep equal values, so exact
# ties stay ties.

def _pairwise_plan(n: int, lo: int = 0, plan=None) -> list:
    """numpy's pairwise summation of n terms as a postfix program: (0, lo, m) sums the block of m
    terms at lo (m <= 128: eight running sums), (1, 0, 0) adds the last two results. (numba cannot
    cache a recursive function, so the recursion is unrolled here, once per dim.)"""
    plan = [] if plan is None else plan
    if n <= 128:
        plan.append((0, lo, n))
    else:
        n2 = n // 2
        n2 -= n2 % 8
        _pairwise_plan(n2, lo, plan)
        _pairwise_plan(n - n2, lo + n2, plan)
        plan.append((1, 0, 0))
    return plan


def _gathered_dots(base, rows, q, plan, out):
    """out[i] = numpy's (base[rows[i]] * q).sum() in float64, for every i (``plan``: _pairwise_plan)."""
    dim = base.shape[1]
    buf = np.empty(dim)
    stack = np.empty(plan.shape[0])
    for i in range(rows.shape[0]):
        x = base[rows[i]]
        for j in range(dim):
            buf[j] = np.float64(x[j]) * q[j]
        sp = 0
        for t in range(plan.shape[0]):
            if plan[t, 0] == 1:
                stack[sp - 2] = stack[sp - 2] + stack[sp - 1]
                sp -= 1
                continue
            lo, n = plan[t, 1], plan[t, 2]
            if n < 8:
                res = 0.0
                for k in range(n):
                    res += buf[lo + k]
            else:
                r0, r1, r2, r3 = buf[lo], buf[lo + 1], buf[lo + 2], buf[lo + 3]
                r4, r5, r6, r7 = buf[lo + 4], buf[lo + 5], buf[lo + 6], buf[lo + 7]
                k, m = 8, n - n % 8
                while k < m:
                    r0 += buf[lo + k]
                    r1 += buf[lo + k + 1]
                    r2 += buf[lo + k + 2]
                    r3 += buf[lo + k + 3]
                    r4 += buf[lo + k + 4]
                    r5 += buf[lo + k + 5]
                    r6 += buf[lo + k + 6]
                    r7 += buf[lo + k + 7]
                    k += 8
                res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
                while k < n:
                    res += buf[lo + k]
                    k += 1
            stack[sp] = res
            sp += 1
        out[i] = 0.0 + stack[0]


_compiled_dots = None
_plans: dict[int, np.ndarray] = {}
_compile_lock = threading.Lock()  # the repair runs on a thread per rule: compile once


def gathered_dots(base: np.ndarray, rows: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` [m] float64 with ``(base[rows] * q).sum(axis=1)`` exactly as numpy computes it,
    without the [m, dim] temporaries. ``base`` [n, dim] C-contiguous float32 or float64 (a mapped
    table too), ``rows`` [m] int64 (each < n: not checked here), ``q`` [dim] float64. Releases the GIL."""
    global _compiled_dots
    dim = base.shape[1]
    with _compile_lock:
        if _compiled_dots is None:
            import numba

            _compiled_dots = numba.njit(nogil=True, cache=True)(_gathered_dots)
        if dim not in _plans:
            _plans[dim] = np.array(_pairwise_plan(dim), dtype=np.int64)
    _compiled_dots(np.asarray(base), rows, q, _plans[dim], out)  # (a memmap as the plain array it is)


def dots_usable(base) -> bool:
    """Whether ``gathered_dots`` takes ``base`` as it is (else knn.py keeps its numpy expression)."""
    return (available() and isinstance(base, np.ndarray) and base.ndim == 2 and base.flags.c_contiguous
            and base.dtype in (np.float32, np.float64) and base.shape[1] > 0)
