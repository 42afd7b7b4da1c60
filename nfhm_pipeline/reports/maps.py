"""UMAP grids of an embedding, one picture per label level (seed 001's feature-distribution plots).

How a grid is computed (what makes it cheap):

* **Subsample.** Above ``max_points`` rows, a stratified subsample by the first (finest) label level:
  every class keeps at least one point (while there are no more classes than ``max_points``), the rest
  is shared in proportion to class size (largest remainders, ties in sorted class order), and the
  points of each class are drawn with ``numpy.random.default_rng(seed)``. Same points for every level.
* **One neighbour graph.** The exact cosine k-nearest-neighbour graph of the (subsampled) points is
  computed once, at the largest n_neighbors of the grid, in float64 (:func:`exact_knn_graph`), and
  every fit gets its first k columns through umap-learn's ``precomputed_knn``: a smaller n_neighbors
  reuses the same graph, every min_dist reuses it too. Before, every fit redid the kNN itself
  (a full pairwise matrix below 4096 points, NN-descent above).
* **Compiled once per machine, not per process.** :func:`use_numba_cache` points numba's on-disk cache
  at the data dir and :func:`import_umap` turns on caching for the umap-learn functions a map compiles
  (umap-learn does not cache them itself), so only the first process on a machine pays the compile.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError, StorageError
from nfhm_pipeline.evaluation.vectors import finite_rows
from nfhm_pipeline.reports.plots import new_figure, wrap_title

# The default grid: 3 x 2 = 6 fits, one shared neighbour graph.
DEFAULT_GRID = {"n_neighbors": (5, 15, 50), "min_dist": (0.1, 0.5)}
# The grid of seed 001 (Takeda et al.): 10 x 5 = 50 UMAP fits; catalog `umap: {grid: seed}`,
# or umap_grid(..., **SEED_001_GRID).
SEED_001_GRID = {
    "n_neighbors": (3, 5, 10, 15, 25, 50, 100, 200, 500, 1000),
    "min_dist": (0.1, 0.25, 0.5, 0.75, 1.0),
}
GRIDS = {"default": DEFAULT_GRID, "seed": SEED_001_GRID}  # names the catalog's `umap.grid` accepts
DEFAULT_MAX_POINTS = 3000
METRIC = "cosine"  # the maps' distance; exact_knn_graph computes this one
MAX_LEGEND_CLASSES = 20
# The numba functions a map compiles that umap-learn 0.5 declares without cache=True (found by
# listing the compiled dispatchers after one fit); names missing in another version are skipped.
_UNCACHED_UMAP_JIT = {
    "umap.umap_": ("smooth_knn_dist", "compute_membership_strengths"),
    "umap.layouts": ("clip", "_nb_optimize_layout_euclidean_single_epoch"),
    "umap.utils": ("tau_rand_int", "tau_rand", "fast_knn_indices"),
    "umap.distances": ("cosine",),
}


def use_numba_cache(cache_dir: str | os.PathLike) -> Path:
    """Keep numba's compiled code in ``cache_dir`` (e.g. ``<data_dir>/cache/numba``) unless the user
    chose a folder with ``NUMBA_CACHE_DIR``; returns the folder in use.

    Call it before umap is first imported: pynndescent binds its cache folder when it is imported.
    Without it numba writes beside the installed package when that folder is writable and recompiles
    in every process when it is not (a read-only image, a shared venv).
    """
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if chosen:
        return Path(chosen)
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create numba's cache folder {cache_dir}: {exc.strerror}; point NFHM_DATA_DIR "
                           "at a writable folder or NUMBA_CACHE_DIR at another one") from None
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir)
    if "numba" in sys.modules:  # numba reads the variable when it is imported; tell it now as well
        sys.modules["numba"].config.CACHE_DIR = str(cache_dir)
    return cache_dir


def import_umap():
    """``import umap``, with numba's on-disk cache turned on for the umap-learn functions a map
    compiles (see ``_UNCACHED_UMAP_JIT``): a second process loads them instead of compiling them
    (about 9 s on an idle core, minutes on a busy machine). Imported here, not at module import:
    the import itself takes seconds (numba)."""
    import umap

    for module_name, names in _UNCACHED_UMAP_JIT.items():
        module = sys.modules.get(module_name)
        for name in names:
            dispatcher = getattr(module, name, None)
            # enable_caching is what numba's own cache=True calls; a dispatcher that already has a
            # cache, or a numba without the method, is left as it is (it only compiles more often).
            if type(getattr(dispatcher, "_cache", None)).__name__ == "NullCache" \
                    and hasattr(dispatcher, "enable_caching"):
                dispatcher.enable_caching()
    return umap


def distinct_unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (float64) of the distinct rows of ``x`` and, per row of ``x``, its distinct row.

    Identical rows of ``x`` share one distinct row, so their distances to anything are bit-identical
    and ties between duplicates are exact. A zero row stays zero: cosine distance 1 to every other
    row (umap-learn's convention), 0 to itself and its copies.
    """
    distinct, inverse = np.unique(np.asarray(x, dtype=np.float32), axis=0, return_inverse=True)
    unit = distinct.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
    return unit, inverse.reshape(-1)


def exact_knn_graph(x, k: int, *, block_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The exact cosine k-nearest-neighbour graph of the rows of ``x`` [N, D], as umap-learn's
    ``precomputed_knn`` takes it.

    Returns ``indices`` int64 [N, k] and ``distances`` float32 [N, k]. Row i lists i itself first
    (distance 0), then the other rows by increasing cosine distance ``1 - cos`` (computed in float64,
    clipped to [0, 2]); ties go to the lower row index. Copies of row i are at distance exactly 0.
    The first j columns are the j-neighbour graph, for every j ≤ k. Memory: ``block_rows`` x N
    float64 distances at a time, plus the unit rows.
    """
    x = np.asarray(x)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise EvaluationError(f"exact_knn_graph needs finite vectors of shape [N, D]; got shape {x.shape}"
                              + (" with NaN or inf" if x.ndim == 2 else ""))
    n = x.shape[0]
    if not 1 <= k <= n:
        raise EvaluationError(f"exact_knn_graph needs 1 <= k <= {n} rows; got k={k}")
    unit, inverse = distinct_unit_rows(x)
    m = unit.shape[0]
    members = np.argsort(inverse, kind="stable")  # original rows grouped by distinct row, ascending
    starts = np.searchsorted(inverse[members], np.arange(m + 1))
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    for lo in range(0, m, block_rows):
        hi = min(lo + block_rows, m)
        block = 1.0 - unit[lo:hi] @ unit.T  # [distinct rows of the block, distinct rows]
        block[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # a row and its copies: distance exactly 0
        np.clip(block, 0.0, 2.0, out=block)
        for a in range(lo, hi):
            row = block[a - lo][inverse]  # distance from distinct row a to every original row
            # the k smallest, then every row tied with the k-th, so the tie-break below sees them all
            cut = np.partition(row, k - 1)[k - 1]
            candidates = np.flatnonzero(row <= cut)  # ascending row index
            ranked = candidates[np.argsort(row[candidates], kind="stable")]  # by distance, then index
            for i in members[starts[a]:starts[a + 1]]:
                own = np.concatenate(([i], ranked[ranked != i]))[:k]
                indices[i] = own
                distances[i] = row[own]
    return indices, distances


def stratified_subsample(labels, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices of a subsample of at most ``max_points`` rows, stratified by ``labels``
    (missing labels are one more class).

    Every class keeps at least one row while the classes number at most ``max_points``; with more
    classes, ``max_points`` classes drawn with the seed keep one row each. The rest is shared in
    proportion to class size (largest remainders; equal remainders: sorted class order). Rows of a
    class are drawn with ``numpy.random.default_rng(seed)``, classes in sorted order: the same labels,
    size and seed give the same rows.
    """
    codes, classes = pd.factorize(pd.Series(np.asarray(labels, dtype=object)), sort=True, use_na_sentinel=False)
    n = len(codes)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes, minlength=len(classes))
    if len(classes) >= max_points:
        take = np.zeros(len(classes), dtype=np.int64)
        take[np.sort(rng.choice(len(classes), size=max_points, replace=False))] = 1
    else:
        spare = sizes - 1  # rows left in each class once it has its one
        # quota_c = rest * spare_c / sum(spare), in integers: floors and remainders are exact
        extra, remainder = np.divmod((max_points - len(classes)) * spare, spare.sum())
        short = max_points - len(classes) - int(extra.sum())
        # largest remainders first; np.lexsort's last key is the primary one, stable on class order
        extra[np.lexsort((np.arange(len(classes)), -remainder))[:short]] += 1
        take = 1 + extra
    by_class = np.argsort(codes, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    chosen = [rng.choice(by_class[bounds[c]:bounds[c + 1]], size=int(take[c]), replace=False)
              for c in range(len(classes)) if take[c]]
    return np.sort(np.concatenate(chosen))


def umap_grid(
    embeddings: np.ndarray,
    labels_by_level: Mapping[str, Sequence],
    *,
    n_neighbors: Sequence[int] = DEFAULT_GRID["n_neighbors"],
    min_dist: Sequence[float] = DEFAULT_GRID["min_dist"],
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
    title_prefix: str = "",
) -> dict:
    """UMAP (metric 'cosine', random_state=seed) of `embeddings` [N, D] on the grid
    n_neighbors (rows) x min_dist (columns); returns {level: Figure} coloured by that level.

    One exact cosine kNN graph at the largest n_neighbors feeds every fit (see the module docstring);
    each (n_neighbors, min_dist) projection is computed once and drawn for every level.
    n_neighbors values are clipped to (points - 1) and duplicates after clipping are dropped.
    With N > max_points a seeded subsample stratified by the first level (same points for every
    level) is drawn and the figure title says 'subsample <max_points> of <N>, seed <seed>, stratified
    by <level>'. Levels with at most 20 classes get a legend beside the grid, clear of the title; more
    classes are coloured without one and the title says so. Missing labels are grey. Points are
    rasterized, so an SVG stays small.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise EvaluationError(f"umap_grid needs embeddings of shape [N >= 3, D]; got {x.shape}")
    n_total = x.shape[0]
    labels = {lvl: pd.Series(np.asarray(v, dtype=object)) for lvl, v in labels_by_level.items()}
    for lvl, values in labels.items():
        if len(values) != n_total:
            raise EvaluationError(f"labels for level {lvl!r} have {len(values)} entries, embeddings {n_total} rows")
    # block by block: a memory-mapped table (the stage's) is subsampled below, never read whole
    if not finite_rows(x).all():
        raise EvaluationError("embeddings contain NaN or inf; re-embed the affected images first")

    note = ""
    if n_total > max_points:
        strata = next(iter(labels), None)
        keep = (stratified_subsample(labels[strata], max_points, seed) if strata is not None
                else np.sort(np.random.default_rng(seed).choice(n_total, size=max_points, replace=False)))
        x = x[keep]
        labels = {lvl: v.iloc[keep].reset_index(drop=True) for lvl, v in labels.items()}
        note = f"subsample {len(keep)} of {n_total}, seed {seed}" + (f", stratified by {strata}" if strata else "")
    n = x.shape[0]
    neighbors = list(dict.fromkeys(min(int(k), n - 1) for k in n_neighbors))
    dists = list(dict.fromkeys(float(d) for d in min_dist))
    projections = project_grid(x, neighbors, dists, seed)
    return _draw(projections, labels, neighbors, dists, n, note, title_prefix)


def project_grid(x: np.ndarray, neighbors: Sequence[int], dists: Sequence[float], seed: int) -> dict:
    """{(k, min_dist): [N, 2] float32 UMAP projection} of ``x`` [N, D] for every k in ``neighbors``
    (each < N) and every min_dist in ``dists``, all from one :func:`exact_knn_graph` at max(neighbors)."""
    umap = import_umap()
    indices, distances = exact_knn_graph(x, max(neighbors))
    projections = {}
    for k in neighbors:
        for d in dists:
            # n_jobs=1 is what random_state implies anyway; saying so silences umap's warning.
            # The first k columns, cut here: below 4096 points umap-learn 0.5 uses every column it is
            # given whatever n_neighbors says. Copies: it writes -1 into the graph where points are too far apart.
            reducer = umap.UMAP(n_neighbors=k, min_dist=d, metric=METRIC, random_state=seed, n_jobs=1,
                                precomputed_knn=(indices[:, :k].copy(), distances[:, :k].copy(), None))
            with warnings.catch_warnings():
                # no NNDescent index: only transform() of new points needs one, and maps never call it
                warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
                projections[k, d] = reducer.fit_transform(x)
    return projections


def _draw(projections: dict, labels: dict, neighbors, dists, n: int, note: str, title_prefix: str) -> dict:
    figures = {}
    for lvl, values in labels.items():
        codes, classes = pd.factorize(values, sort=True)  # NaN/None -> code -1
        few = len(classes) <= MAX_LEGEND_CLASSES
        cmap = _class_colours(len(classes))
        colours = np.where(codes[:, None] >= 0, cmap[np.maximum(codes, 0)], np.array([0.6, 0.6, 0.6, 1.0]))
        entries = len(classes) + int((codes < 0).any())
        width = 2.6 * len(dists) + (2.2 if few else 0.3)
        heading = f"{title_prefix} UMAP (cosine) coloured by {lvl}".strip()
        details = ([note] if note else []) + ([] if few else [f"{len(classes)} classes, colours not labelled"])
        title = wrap_title(heading + ("\n" + "; ".join(details) if details else ""), width_in=width, fontsize=12)
        # A legend beside the grid, vertically centred, stays clear of the title strip when the
        # figure is at least its height plus twice the title's (about 0.2 in per entry at 8 pt,
        # 0.25 in per title line at 12 pt plus 0.1 in of padding).
        height = 2.5 * len(neighbors) + 0.9
        if few:
            height = max(height, 0.2 * (entries + 1) + 2 * (0.1 + 0.25 * (title.count("\n") + 1)) + 0.4)
        fig = new_figure(width, height)
        axes = fig.subplots(len(neighbors), len(dists), squeeze=False)
        size = float(np.clip(3000 / n, 2, 20))
        for (i, k), (j, d) in ((a, b) for a in enumerate(neighbors) for b in enumerate(dists)):
            ax = axes[i, j]
            xy = projections[k, d]
            # rasterized: in an SVG the points are one image, the titles and legend stay text
            ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=size, linewidths=0, rasterized=True)
            ax.set_title(f"n_neighbors={k}, min_dist={d:g}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if few:
            from matplotlib.lines import Line2D

            # long class or level names are wrapped: a legend wider than the figure collapses the grid
            handles = [Line2D([], [], marker="o", linestyle="", color=cmap[c],
                              label=wrap_title(str(name), width_in=1.6, fontsize=8))
                       for c, name in enumerate(classes)]
            if (codes < 0).any():
                handles.append(Line2D([], [], marker="o", linestyle="", color="0.6", label="(missing)"))
            fig.legend(handles=handles, loc="outside right center", fontsize=8,
                       title=wrap_title(str(lvl), width_in=1.6, fontsize=8), frameon=False)
        fig.suptitle(title, fontsize=12)
        figures[lvl] = fig
    return figures


def _class_colours(k: int) -> np.ndarray:
    """k RGBA colours: tab10/tab20 when they suffice, else evenly spaced on 'turbo'."""
    from matplotlib import colormaps

    if k <= 10:
        return colormaps["tab10"](np.arange(max(k, 1)))
    if k <= 20:
        return colormaps["tab20"](np.arange(k))
    return colormaps["turbo"](np.linspace(0, 1, k))
