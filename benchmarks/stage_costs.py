"""What each evaluation stage costs on one large collection, next to the kNN evaluation.

A synthetic collection of --n images x --dim features (embeddings made directly, no images):
class-structured Gaussian vectors (a shared offset, one centre per genus, one per species around
its genus, unit noise; uneven class sizes), two label levels (species, genus) and --groups
reporting groups (taxa), split 80/20 with 5 CV folds by the project's own ``make_split``. Then,
at the library level, on the same frame and vectors:

  knn      evaluation.tables.knn_tables (4 rules + L2 variants, per level and per group)
  probes   evaluation.tables.probe_tables (LinearSVC C = 100/N and logistic, 5-fold CV + refit)
  maps     reports.comparison.draw_maps (the default UMAP grid on a 3,000-point subsample), when
           umap-learn is importable (--skip-maps to leave it out)

and prints each stage's seconds and its ratio to kNN (target for the probes: <= 3x), plus every
probe's solver, iterations and convergence. Never part of the tests.

    python benchmarks/stage_costs.py                 # 30,000 x 512, 27 species in 9 genera
    python benchmarks/stage_costs.py --n 3000        # a quick run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nfhm_pipeline.evaluation.splits import make_split  # noqa: E402
from nfhm_pipeline.evaluation.tables import knn_tables, probe_tables  # noqa: E402

LEVELS = ("species", "genus")


def make_collection(n: int, dim: int, n_species: int, n_genera: int, n_groups: int, seed: int):
    """(frame with image_id, split, fold, group, species, genus; float32 vectors [n, dim])."""
    rng = np.random.default_rng(seed)
    genus_of = np.arange(n_species) % n_genera
    genus_centres = rng.normal(size=(n_genera, dim)) * 0.25
    species_centres = genus_centres[genus_of] + rng.normal(size=(n_species, dim)) * 0.15
    p = rng.dirichlet(np.full(n_species, 4.0))
    species = np.concatenate([np.arange(n_species), rng.choice(n_species, n - n_species, p=p)])
    vectors = (rng.normal(size=dim) + species_centres[species] + rng.normal(size=(n, dim))).astype(np.float32)
    frame = pd.DataFrame({
        "image_id": [f"img{i:06d}" for i in range(n)],
        "species": [f"species_{s:03d}" for s in species],
        "genus": [f"genus_{g:03d}" for g in genus_of[species]],
        "group": [f"taxon_{g % n_groups}" for g in genus_of[species]],
    })
    split = make_split(frame, label_column="species", test_fraction=0.2, seed=seed, n_folds=5).assignments
    frame["row"] = np.arange(n)
    frame = frame.merge(split[["image_id", "split", "fold"]], on="image_id", how="inner")  # single-image species drop
    return frame.drop(columns="row"), vectors[frame["row"].to_numpy()]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000, help="images (default 30000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--species", type=int, default=27)
    ap.add_argument("--genera", type=int, default=9)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-jobs", type=int, default=None, help="probe worker processes (default: every usable CPU)")
    ap.add_argument("--skip-maps", action="store_true")
    args = ap.parse_args()

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    print(f"machine: {cpus} usable CPUs, load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg")
          else f"machine: {cpus} usable CPUs")
    frame, vectors = make_collection(args.n, args.dim, args.species, args.genera, args.groups, args.seed)
    print(f"collection: {len(frame)} images x {vectors.shape[1]} dims, {frame['species'].nunique()} species, "
          f"{frame['genus'].nunique()} genera, {frame['group'].nunique()} groups, "
          f"{int((frame['split'] == 'train').sum())} train / {int((frame['split'] == 'test').sum())} test")

    seconds: dict[str, float] = {}
    seconds["knn"], knn = timed(lambda: knn_tables(frame, vectors, LEVELS))
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"  [{time.perf_counter() - start:7.1f} s] {line}", flush=True)

    seconds["probes"], probes = timed(lambda: probe_tables(frame, vectors, LEVELS, seed=args.seed,
                                                          n_jobs=args.n_jobs, log=progress))
    if not args.skip_maps:
        try:
            import umap  # noqa: F401
        except ImportError:
            print("maps: umap-learn is not importable, skipped")
        else:
            from nfhm_pipeline.catalog import DEFAULT_UMAP
            from nfhm_pipeline.reports.comparison import draw_maps

            labels = {level: frame[level].to_numpy() for level in LEVELS}
            with tempfile.TemporaryDirectory() as reports:
                seconds["maps"], _ = timed(lambda: draw_maps("synthetic", "synthetic", vectors, labels,
                                                             dict(DEFAULT_UMAP), args.seed, reports))

    metrics = pd.concat(probes.metrics, ignore_index=True)
    shown = metrics[metrics["metric"].isin(["cv_accuracy", "test_accuracy"])]
    print("\nprobe results (iterations: the slowest fit; converged: every fit):")
    print(shown[["task", "level", "metric", "value", "std", "iterations", "converged"]].to_string(index=False))
    knn_metrics = pd.concat(knn.metrics, ignore_index=True)
    top1 = knn_metrics[(knn_metrics["grp"] == "all") & (knn_metrics["metric"] == "top1_cosine_accuracy")]
    if len(top1):
        print("knn top1_cosine accuracy (grp=all):", ", ".join(f"{r.level} {r.value:.3f}" for r in top1.itertuples()))
    print("\nstage     seconds   x kNN")
    for stage, s in seconds.items():
        print(f"{stage:8s} {s:8.1f} {s / seconds['knn']:7.2f}")
    ratio = seconds["probes"] / seconds["knn"]
    print(f"probes / kNN = {ratio:.2f} (target <= 3): {'met' if ratio <= 3 else 'NOT met'}")


if __name__ == "__main__":  # loky workers re-import this module: no work at import time
    main()
