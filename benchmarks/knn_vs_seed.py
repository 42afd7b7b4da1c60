"""Nearest-neighbour evaluation: ours (nfhm_pipeline.evaluation.knn) against the seed notebook.

Generates clustered random embeddings, runs the seed's pandas approach (``seed_knn`` from
../shared/bench/seed_knn.py), the float64 numpy reference and ours, each in a fresh subprocess so
that its peak resident memory (ru_maxrss) is its own, and prints whether the labels are identical,
the seconds, the speed-up, peak memory and our time relative to the bare float32 product
test @ train.T (torch, same process, same threads).

    python benchmarks/knn_vs_seed.py --n-train 27000 --n-test 3000 --dim 512 --classes 400
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"
RULES = ("top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean")


def make_data(n_train, n_test, dim, n_classes, seed):
    """float32 embeddings like a vision model's: a shared offset, one centre per class, noise;
    class sizes uneven (Dirichlet). Labels are int64 class ids: with species-name strings the
    seed's flattened frames (n_test x n_train rows) need far more than 24 GB."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 0.3  # top-1 accuracy about 40 %, mean rules about 90 %
    offset = rng.normal(size=dim)
    p = rng.dirichlet(np.full(n_classes, 2.0))
    train_class = np.concatenate([np.arange(n_classes), rng.choice(n_classes, n_train - n_classes, p=p)])
    test_class = rng.choice(n_classes, n_test, p=p)
    train = (offset + centres[train_class] + rng.normal(size=(n_train, dim))).astype(np.float32)
    test = (offset + centres[test_class] + rng.normal(size=(n_test, dim))).astype(np.float32)
    return train, train_class.astype(np.int64), test, test_class.astype(np.int64)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(kind, folder: Path):
    data = np.load(folder / "data.npz")
    train, labels, test = data["train"], data["labels"], data["test"]
    report = {"rss_after_load_gb": peak_rss_gb()}
    if kind in ("seed", "reference"):
        sys.path.insert(0, str(SHARED_BENCH))
        import seed_knn

        fn = seed_knn.seed_knn if kind == "seed" else seed_knn.reference_knn
        start = time.perf_counter()
        out = fn(train, labels, test)
        report["seconds"] = [time.perf_counter() - start]
    else:
        import torch

        sys.path.insert(0, str(REPO))
        from nfhm_pipeline.evaluation.knn import nearest_neighbour_labels, nearest_neighbour_scores

        torch.zeros(1)  # import and thread pool start-up are not part of the evaluation
        report["rss_after_import_gb"] = peak_rss_gb()
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            out = nearest_neighbour_labels(train, labels, test)
            seconds.append(time.perf_counter() - start)
        report["seconds"] = seconds
        report["peak_labels_gb"] = peak_rss_gb()
        start = time.perf_counter()
        ranking = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5))
        report["scores_seconds"] = time.perf_counter() - start
        report["n_exact_rows"] = ranking.n_exact_rows
        report["peak_scores_gb"] = peak_rss_gb()
        report["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if report["device"] == "cuda":
            report["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        a, b = torch.from_numpy(test).to(report["device"]), torch.from_numpy(train).to(report["device"])
        matmul = []
        for _ in range(3):
            start = time.perf_counter()
            torch.matmul(a, b.T)
            if report["device"] == "cuda":
                torch.cuda.synchronize()
            matmul.append(time.perf_counter() - start)
        report["matmul_seconds"] = matmul
        report["torch_threads"] = torch.get_num_threads()
    report["peak_gb"] = peak_rss_gb()
    np.savez(folder / f"{kind}_labels.npz", **{rule: np.asarray(out[rule]) for rule in RULES})
    (folder / f"{kind}.json").write_text(json.dumps(report))


def run(kind, folder):
    subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", str(folder)], check=True)
    return json.loads((folder / f"{kind}.json").read_text()), np.load(folder / f"{kind}_labels.npz")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=27000)
    parser.add_argument("--n-test", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-seed", action="store_true", help="do not run the seed code (about a minute and 8-14 GB)")
    parser.add_argument("--worker", choices=["seed", "reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.folder)

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, labels, test, test_labels = make_data(args.n_train, args.n_test, args.dim, args.classes, args.seed)
        np.savez(folder / "data.npz", train=train, labels=labels, test=test)
        print(f"data: train {train.shape} test {test.shape} float32, {len(np.unique(labels))} classes")
        ours, ours_labels = run("ours", folder)
        best = min(ours["seconds"])
        matmul = min(ours["matmul_seconds"])
        print(f"ours ({ours['device']}, {ours['torch_threads']} threads): {best:.2f} s best of 3 "
              f"(runs {', '.join(f'{s:.2f}' for s in ours['seconds'])}); "
              f"nearest_neighbour_scores (6 rules, ks=1,3,5): {ours['scores_seconds']:.2f} s")
        print(f"ours peak RSS: {ours['peak_labels_gb']:.2f} GB (labels), {ours['peak_scores_gb']:.2f} GB (scores); "
              f"after import torch + data: {ours['rss_after_import_gb']:.2f} GB")
        if "gpu_peak_gb" in ours:
            print(f"ours peak GPU memory (torch.cuda.max_memory_allocated): {ours['gpu_peak_gb']:.2f} GB")
        print(f"bare float32 matmul test @ train.T ({ours['device']}): {matmul:.3f} s; "
              f"ours / matmul = {best / matmul:.2f}x")
        print(f"rows decided again in float64: {ours['n_exact_rows']}")
        print("accuracy of ours:", {r: round(float((ours_labels[r] == test_labels).mean()), 4) for r in RULES})
        if not (SHARED_BENCH / "seed_knn.py").is_file():
            print(f"seed and float64 reference: skipped, {SHARED_BENCH / 'seed_knn.py'} is absent")
            return
        if args.skip_seed:
            print("seed: skipped (--skip-seed)")
        for kind in ["reference"] + ([] if args.skip_seed else ["seed"]):
            report, their_labels = run(kind, folder)
            same = {r: "yes" if np.array_equal(ours_labels[r], their_labels[r]) else
                    f"NO ({int((ours_labels[r] != their_labels[r]).sum())} rows differ)" for r in RULES}
            print(f"{kind}: {report['seconds'][0]:.2f} s, peak RSS {report['peak_gb']:.2f} GB; "
                  f"speed-up of ours {report['seconds'][0] / best:.1f}x; identical labels: {same}")


if __name__ == "__main__":
    main()
