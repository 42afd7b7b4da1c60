"""UMAP grids of an embedding, one picture per label level (seed 001's feature-distribution plots)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.reports.plots import new_figure, wrap_title

# The grid of seed 001 (Takeda et al.): 10 x 5 = 50 UMAP fits, pass as umap_grid(..., **SEED_001_GRID).
SEED_001_GRID = {
    "n_neighbors": (3, 5, 10, 15, 25, 50, 100, 200, 500, 1000),
    "min_dist": (0.1, 0.25, 0.5, 0.75, 1.0),
}
MAX_LEGEND_CLASSES = 20


def umap_grid(
    embeddings: np.ndarray,
    labels_by_level: Mapping[str, Sequence],
    *,
    n_neighbors: Sequence[int] = (5, 15, 50),
    min_dist: Sequence[float] = (0.1, 0.5),
    max_points: int = 3000,
    seed: int = 0,
    title_prefix: str = "",
) -> dict:
    """UMAP (metric 'cosine', random_state=seed) of `embeddings` [N, D] on the grid
    n_neighbors (rows) x min_dist (columns); returns {level: Figure} coloured by that level.

    Each (n_neighbors, min_dist) projection is computed once and drawn for every level.
    n_neighbors values are clipped to (points - 1) and duplicates after clipping are dropped.
    With N > max_points a seeded subsample (same points for every level) is drawn and the figure
    title says 'subsample <max_points> of <N>, seed <seed>'. Levels with at most 20 classes get a
    legend beside the grid, clear of the title; more classes are coloured without one and the
    title says so. Missing labels are grey. Points are rasterized, so an SVG stays small.
    """
    import umap  # slow import (numba): keep it out of module import time

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise EvaluationError(f"umap_grid needs embeddings of shape [N >= 3, D]; got {x.shape}")
    n_total = x.shape[0]
    labels = {lvl: pd.Series(np.asarray(v, dtype=object)) for lvl, v in labels_by_level.items()}
    for lvl, values in labels.items():
        if len(values) != n_total:
            raise EvaluationError(f"labels for level {lvl!r} have {len(values)} entries, embeddings {n_total} rows")
    if not np.isfinite(x).all():
        raise EvaluationError("embeddings contain NaN or inf; re-embed the affected images first")

    note = ""
    if n_total > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n_total, size=max_points, replace=False))
        x = x[keep]
        labels = {lvl: v.iloc[keep].reset_index(drop=True) for lvl, v in labels.items()}
        note = f"subsample {max_points} of {n_total}, seed {seed}"
    n = x.shape[0]
    neighbors = list(dict.fromkeys(min(int(k), n - 1) for k in n_neighbors))
    dists = list(dict.fromkeys(float(d) for d in min_dist))

    projections = {}
    for k in neighbors:
        for d in dists:
            # n_jobs=1 is what random_state implies anyway; saying so silences umap's warning.
            reducer = umap.UMAP(n_neighbors=k, min_dist=d, metric="cosine", random_state=seed, n_jobs=1)
            projections[k, d] = reducer.fit_transform(x)

    figures = {}
    for lvl, values in labels.items():
        codes, classes = pd.factorize(values, sort=True)  # NaN/None -> code -1
        few = len(classes) <= MAX_LEGEND_CLASSES
        cmap = _class_colours(len(classes))
        colours = np.where(codes[:, None] >= 0, cmap[np.maximum(codes, 0)], np.array([0.6, 0.6, 0.6, 1.0]))
        entries = len(classes) + int((codes < 0).any())
        # A legend beside the grid, vertically centred, stays clear of the title strip when the
        # figure is at least its height plus twice the title's (about 0.2 in per entry at 8 pt).
        height = 2.5 * len(neighbors) + 0.9
        if few:
            height = max(height, 0.2 * (entries + 1) + 2 * (0.35 + 0.25 * bool(note)) + 0.4)
        fig = new_figure(2.6 * len(dists) + (2.2 if few else 0.3), height)
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
        heading = f"{title_prefix} UMAP (cosine) coloured by {lvl}".strip()
        details = [note] if note else []
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
        else:
            details.append(f"{len(classes)} classes, colours not labelled")
        fig.suptitle(wrap_title(heading + ("\n" + "; ".join(details) if details else ""),
                                width_in=fig.get_figwidth(), fontsize=12), fontsize=12)
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
