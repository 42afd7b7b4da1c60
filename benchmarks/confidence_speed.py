"""Cost of the confidence intervals (evaluation.confidence) next to the kNN evaluation they qualify.

A boolean matrix correct [n_items, models x rules] (items of shared difficulty, so models agree
often, as real ones do) gets: resample_counts (B resamples), accuracy_intervals for every column,
and paired_differences of every column against the best one, on those counts, plus Holm. The kNN
evaluation (nearest_neighbour_labels, the four rules of one model) at n_test = n_items against
--full-train train vectors is timed at --knn-test x --knn-train and scaled by
n_test * n_train (its cost is the test x train Gram product and reductions over it), unless the
two sizes are equal. Prints the seconds, the ratio and peak memory.

    python benchmarks/confidence_speed.py --n-items 100000 --models 10 --rules 4 --resamples 1000
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nfhm_pipeline.evaluation.confidence import (  # noqa: E402
    accuracy_intervals, holm, paired_differences, resample_counts,
)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_correct(n_items, n_columns, seed):
    """bool [n_items, n_columns]: item i is right for column j when its difficulty is below the
    column's skill, plus noise; accuracies spread over about 0.4-0.9."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(size=(n_items, 1))
    skill = np.linspace(-0.3, 1.3, n_columns)[None, :]
    return difficulty + 0.6 * rng.normal(size=(n_items, n_columns)) < skill


def time_intervals(correct, n_resamples, seed, repeats):
    """Best of ``repeats`` runs of each step (the first run also pays for first-touch page faults)."""
    t_intervals, t_counts, t_diffs = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        iv = accuracy_intervals(correct, n_resamples=n_resamples, seed=seed)
        t_intervals.append(time.perf_counter() - start)
        start = time.perf_counter()
        counts = resample_counts(correct.shape[0], n_resamples, seed)
        t_counts.append(time.perf_counter() - start)
        best = int(np.argmax(iv.estimate))
        start = time.perf_counter()
        diffs = paired_differences(correct, best, counts)
        holm([d.p_value for d in diffs])
        t_diffs.append(time.perf_counter() - start)
        del counts
    return iv, diffs, min(t_intervals), min(t_counts), min(t_diffs), t_intervals


def time_knn(n_test, n_train, dim, n_classes, seed):
    import torch

    from knn_vs_seed import make_data
    from nfhm_pipeline.evaluation.knn import nearest_neighbour_labels

    train, labels, test, _ = make_data(n_train, n_test, dim, n_classes, seed)
    nearest_neighbour_labels(train[:500], labels[:500], test[:50])  # torch start-up is not part of it
    start = time.perf_counter()
    nearest_neighbour_labels(train, labels, test)
    seconds = time.perf_counter() - start
    return seconds, ("cuda" if torch.cuda.is_available() else "cpu"), torch.get_num_threads()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-items", type=int, default=100_000, help="test items")
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--rules", type=int, default=4)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--full-train", type=int, default=100_000, help="train vectors of the kNN size compared with")
    parser.add_argument("--knn-test", type=int, default=2000, help="test vectors of the kNN actually run")
    parser.add_argument("--knn-train", type=int, default=100_000, help="train vectors of the kNN actually run")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the interval steps (best is reported)")
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))

    n_columns = args.models * args.rules
    correct = make_correct(args.n_items, n_columns, args.seed)
    print(f"correct: {correct.shape} bool ({args.models} models x {args.rules} rules), B = {args.resamples}, "
          f"accuracies {correct.mean(0).min():.2f}-{correct.mean(0).max():.2f}")
    rss0 = peak_rss_gb()
    iv, diffs, t_iv, t_counts, t_diffs, runs = time_intervals(correct, args.resamples, args.seed, args.repeats)
    t_ci = t_iv + t_counts + t_diffs
    print(f"best of {args.repeats}: accuracy_intervals ({n_columns} columns): {t_iv:.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in runs)}); resample_counts: {t_counts:.2f} s; "
          f"paired_differences vs the best ({len(diffs)} pairs) + holm: {t_diffs:.2f} s; total {t_ci:.2f} s")
    print(f"peak RSS {peak_rss_gb():.2f} GB (before: {rss0:.2f} GB; the int32 counts alone are "
          f"{args.resamples * args.n_items * 4 / 2**30:.2f} GB)")
    widths = iv.high - iv.low
    print(f"95 % interval width: {widths.min() * 100:.2f}-{widths.max() * 100:.2f} points; "
          f"smallest p of a difference: {min(d.p_value for d in diffs):.4f}")

    t_run, device, threads = time_knn(args.knn_test, args.knn_train, args.dim, args.classes, args.seed)
    scale = args.n_items * args.full_train / (args.knn_test * args.knn_train)
    t_knn = t_run * scale
    how = "measured" if scale == 1 else (f"{t_run:.2f} s measured at {args.knn_test} x {args.knn_train}, "
                                         f"scaled x{scale:g} by n_test * n_train")
    print(f"kNN nearest_neighbour_labels ({device}, {threads} threads), one model, 4 rules, "
          f"{args.n_items} test x {args.full_train} train, dim {args.dim}: {t_knn:.1f} s ({how}); "
          f"{args.models} models: {t_knn * args.models:.1f} s")
    print(f"intervals / kNN: {t_ci / t_knn:.4f} of one model's kNN, {t_ci / (t_knn * args.models):.5f} "
          f"of the {args.models} models' kNN")


if __name__ == "__main__":
    main()
