"""Embedding maps: the old way (every UMAP fit finds its own neighbours) against the new one (one exact
cosine kNN graph at the largest n_neighbors, given to every fit through ``precomputed_knn``).

Makes a synthetic clustered collection (default 30 000 x 512, 100 classes of uneven size), draws the
stratified subsample the stage would (``max_points``, default 3000), then times on that subsample:

* old: ``umap.UMAP(n_neighbors=k, min_dist=d, metric="cosine", random_state=seed, n_jobs=1)`` per grid
  cell, as ``reports/maps.py`` did before (umap-learn builds its kNN per fit: a full pairwise cosine
  matrix below 4096 points, NN-descent above);
* new: :func:`nfhm_pipeline.reports.maps.project_grid` (the graph once, then the fits).

Both paths are compiled by one tiny fit first (timed and printed separately), so the figures are
the per-map cost in a process whose numba code is ready. Drawing the figures is not timed (same in both).
Process start (import + compile, cold and warm cache) is measured by ``--startup``: two fresh
processes drawing a 40-image map with an empty ``NUMBA_CACHE_DIR``.

    python benchmarks/maps_speed.py                       # 30k x 512, default grid (3 x 2)
    python benchmarks/maps_speed.py --n 5000 --grid seed  # seed 001's 10 x 5 grid
    python benchmarks/maps_speed.py --startup
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nfhm_pipeline.reports.maps import (  # noqa: E402
    DEFAULT_MAX_POINTS, GRIDS, METRIC, exact_knn_graph, import_umap, project_grid, stratified_subsample,
)

STARTUP_SCRIPT = """
import time
t0 = time.perf_counter()
import numpy as np
from nfhm_pipeline.reports.maps import umap_grid
x = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
umap_grid(x, {"species": (np.arange(40) % 4).astype(str)})
print(time.perf_counter() - t0)
"""


def make_data(n: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 vectors like a vision model's (shared offset, one centre per class, noise), uneven class sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 0.3
    offset = rng.normal(size=dim)
    p = rng.dirichlet(np.full(n_classes, 2.0))
    classes = np.concatenate([np.arange(n_classes), rng.choice(n_classes, n - n_classes, p=p)])
    x = (offset + centres[classes] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, np.array([f"class {c:03d}" for c in classes], dtype=object)


def old_grid(umap, x: np.ndarray, neighbors, dists, seed: int) -> tuple[dict, dict]:
    """The maps as reports/maps.py drew them before: umap-learn finds the neighbours in every fit."""
    projections, seconds = {}, {}
    for k in neighbors:
        for d in dists:
            t = time.perf_counter()
            reducer = umap.UMAP(n_neighbors=k, min_dist=d, metric=METRIC, random_state=seed, n_jobs=1)
            projections[k, d] = reducer.fit_transform(x)
            seconds[k, d] = time.perf_counter() - t
    return projections, seconds


def startup(repeats: int = 2) -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONWARNINGS": "ignore"}
        for i in range(repeats):
            out = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT], env=env, cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            print(f"process {i + 1} ({'cold' if i == 0 else 'warm'} numba cache): 40-image map, default grid, "
                  f"import + compile + 6 fits = {float(out):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-old", action="store_true", help="time only the new path")
    parser.add_argument("--startup", action="store_true", help="only time two fresh processes (cold, warm cache)")
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    if args.startup:
        startup()
        return
    warnings.filterwarnings("ignore")  # umap's n_jobs / precomputed_knn notes

    t = time.perf_counter()
    umap = import_umap()
    tiny = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    project_grid(tiny, [5], [0.1], 0)
    old_grid(umap, tiny, [5], [0.1], 0)
    print(f"import + compile (one tiny fit of each path): {time.perf_counter() - t:.1f} s")

    x, labels = make_data(args.n, args.dim, args.classes, args.seed)
    t = time.perf_counter()
    keep = stratified_subsample(labels, args.max_points, args.seed)
    xs = x[keep]
    print(f"collection {args.n} x {args.dim}, {args.classes} classes; stratified subsample {len(keep)} "
          f"({len(set(labels[keep]))} classes kept) in {time.perf_counter() - t:.2f} s")
    neighbors = list(dict.fromkeys(min(k, len(xs) - 1) for k in GRIDS[args.grid]["n_neighbors"]))
    dists = list(dict.fromkeys(float(d) for d in GRIDS[args.grid]["min_dist"]))
    print(f"grid {args.grid!r}: n_neighbors {neighbors} x min_dist {dists} = {len(neighbors) * len(dists)} fits")

    t = time.perf_counter()
    exact_knn_graph(xs, max(neighbors))
    graph_s = time.perf_counter() - t
    t = time.perf_counter()
    project_grid(xs, neighbors, dists, args.seed)
    new_s = time.perf_counter() - t
    print(f"new: one exact cosine kNN graph (k={max(neighbors)}) {graph_s:.1f} s; whole grid incl. graph "
          f"{new_s:.1f} s ({new_s / (len(neighbors) * len(dists)):.1f} s per fit)")
    if args.skip_old:
        return
    t = time.perf_counter()
    _, per_fit = old_grid(umap, xs, neighbors, dists, args.seed)
    old_s = time.perf_counter() - t
    print(f"old: umap-learn's own kNN in every fit: whole grid {old_s:.1f} s "
          f"({old_s / len(per_fit):.1f} s per fit)")
    for (k, d), s in per_fit.items():
        print(f"    old fit n_neighbors={k}, min_dist={d:g}: {s:.1f} s")
    print(f"speed-up (old / new): {old_s / new_s:.2f}x")


if __name__ == "__main__":
    main()
