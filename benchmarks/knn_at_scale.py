"""kNN evaluation at a million-image proxy: peak memory and time against the bare Gram products.

    .venv/bin/python benchmarks/knn_at_scale.py                 # 300,000 train x 30,000 test x 512, 2,000 classes
    .venv/bin/python benchmarks/knn_at_scale.py --scale 0.1     # 30,000 x 3,000 x 512, 2,000 classes
    .venv/bin/python benchmarks/knn_at_scale.py --train-block-size 16384 --block-size 1024

Runs ``nearest_neighbour_scores`` (the six rules, ks = 1, 3, 5; exact answers) on clustered
random float32 vectors and prints its time and peak resident memory, then the time of the bare
float32 Gram products of the same blocks (test block x train block x dim, every pair, nothing
else; in both orientations, the faster one counts) measured in the same process, and their ratio. Targets at full scale: peak RSS <= 4 GB,
time <= 1.3 x the products. Last, the arithmetic for 900,000 train x 100,000 test x 768 from
FLOP counts, on this machine at the measured rate and on H100/H200-class GPUs at an assumed rate.

Peak RSS is sampled from /proc/self/statm every 20 ms while the kNN runs (``during kNN``) and
read from getrusage (``process lifetime``, which includes making the data).
"""
from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Assumed sustained FP32 (not TF32: the kNN's error bounds need true float32 products) GEMM rate
# of one H100 SXM / H200 (peak 67 TFLOP/s on both; large SGEMMs reach about 75% of it).
GPU_FP32_TFLOPS = 50.0
GPU_HBM_TBPS = {"H100 SXM": 3.35, "H200": 4.8}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRss:
    """Highest resident set size seen while the block runs, sampled on a thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def clustered(n_train: int, n_test: int, dim: int, n_classes: int, seed: int):
    """float32 train [n_train, dim], int labels [n_train], test [n_test, dim]; made in chunks so
    making them needs little more memory than holding them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    labels = rng.integers(0, n_classes, n_train)

    def draw(cls):
        out = np.empty((len(cls), dim), dtype=np.float32)
        for a in range(0, len(cls), 65536):
            part = out[a : a + 65536]
            rng.standard_normal(part.shape, dtype=np.float32, out=part)
            part *= 1.5
            part += centres[cls[a : a + 65536]]
        return out

    return draw(labels), labels, draw(rng.integers(0, n_classes, n_test))


def bare_gemm_seconds(train, test, block_size: int, train_block: int, device,
                      transposed: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of the float32 products q_block @ t_block.T over every (test block, train block)
    pair, into one reused output buffer; nothing else (no gathering, no reductions). ``transposed``:
    t_block @ q_block.T instead, the [train, test] orientation the CPU kNN uses (on some BLAS builds
    the faster of the two, so both are measured and the kNN is compared with the faster)."""
    import torch

    torch.set_float32_matmul_precision("highest")
    T = torch.from_numpy(train)
    blocks = [T[a : a + train_block].to(device) for a in range(0, len(train), train_block)]
    out = torch.empty(block_size * train_block, dtype=torch.float32, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for a in range(0, len(test), block_size):
        q = torch.from_numpy(test[a : a + block_size]).to(device)
        for t in blocks:
            if transposed:
                torch.matmul(t, q.T, out=out[: len(q) * len(t)].view(len(t), len(q)))
            else:
                torch.matmul(q, t.T, out=out[: len(q) * len(t)].view(len(q), len(t)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply train and test rows (default 1: 300,000 x 30,000)")
    p.add_argument("--n-train", type=int, default=300_000)
    p.add_argument("--n-test", type=int, default=30_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=2_000)
    p.add_argument("--block-size", type=int, default=None, help="test rows per block (default: the library's)")
    p.add_argument("--train-block-size", type=int, default=None, help="train rows per block (default: the library's)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from nfhm_pipeline.evaluation.knn import block_sizes, nearest_neighbour_scores

    n_train, n_test = int(args.n_train * args.scale), int(args.n_test * args.scale)
    dim, n_classes = args.dim, min(args.classes, n_train)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    train, labels, test = clustered(n_train, n_test, dim, n_classes, args.seed)
    data_gb = (train.nbytes + test.nbytes + labels.nbytes) / 1e9
    print(f"data: {n_train:,} train x {n_test:,} test x {dim} dims, {n_classes:,} classes, "
          f"{data_gb:.2f} GB in memory (made in {time.perf_counter() - t0:.1f} s)")
    b, bt = block_sizes(n_train, n_test, n_classes, device.type, args.block_size, args.train_block_size)
    print(f"blocks: {b:,} test rows x {bt:,} train rows "
          f"({-(-n_test // b)} x {-(-n_train // bt)} pairs, {b * bt * 4 / 2**20:.0f} MiB per buffer)")

    last = [0.0]

    def progress(done, total):
        if time.perf_counter() - last[0] > 30 or done == total:
            last[0] = time.perf_counter()
            print(f"  kNN: {done}/{total} block pairs, {last[0] - t_knn:.0f} s", flush=True)

    rss_before = rss_bytes()
    with PeakRss() as peak:
        t_knn, c_knn = time.perf_counter(), time.process_time()
        ranking = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5), block_size=args.block_size,
                                           train_block_size=args.train_block_size, device=device,
                                           progress=progress)
        knn_s, knn_cpu = time.perf_counter() - t_knn, time.process_time() - c_knn
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plain = bare_gemm_seconds(train, test, b, bt, device)
    flipped = bare_gemm_seconds(train, test, b, bt, device, transposed=True)
    gemm_s, gemm_cpu = min(plain, flipped)
    flop = 2.0 * n_train * n_test * dim
    exact = sum(ranking.n_exact_rows.values())

    print(f"kNN (6 rules, ks 1,3,5): {knn_s:.1f} s wall, {knn_cpu:.1f} s CPU; rows ranked again in float64: {exact:,} of "
          f"{6 * n_test:,} (rule x row)")
    print(f"peak RSS: during kNN {peak.peak / 1e9:.2f} GB (before it {rss_before / 1e9:.2f} GB, data "
          f"{data_gb:.2f} GB, so kNN added {(peak.peak - rss_before) / 1e9:.2f} GB); process lifetime "
          f"{lifetime / 1e9:.2f} GB   [target <= 4 GB]")
    print(f"bare products, test x train: {plain[0]:.1f} s wall; train x test (the CPU kNN's orientation): "
          f"{flipped[0]:.1f} s wall")
    print(f"bare float32 products of the same blocks, the faster: {gemm_s:.1f} s wall ({flop / gemm_s / 1e9:.0f} GFLOP/s), "
          f"{gemm_cpu:.1f} s CPU; kNN / products = {knn_s / gemm_s:.2f}x wall, {knn_cpu / gemm_cpu:.2f}x CPU time"
          "   [target <= 1.3x]")
    # On a shared machine wall time follows the other tenants; CPU time (all threads) does less.

    big = dict(n_train=900_000, n_test=100_000, dim=768)
    big_flop = 2.0 * big["n_train"] * big["n_test"] * big["dim"]
    print(f"\narithmetic for {big['n_train']:,} train x {big['n_test']:,} test x {big['dim']} "
          f"(one (dataset, model, level, group)): 2 x n_train x n_test x dim = {big_flop / 1e12:.0f} TFLOP")
    here = big_flop / (flop / gemm_s)
    print(f"  this machine ({device}, {flop / gemm_s / 1e9:.0f} GFLOP/s measured): products {here / 60:.0f} min, "
          f"kNN ~{here * knn_s / gemm_s / 60:.0f} min at the ratio measured above")
    one = big_flop / (GPU_FP32_TFLOPS * 1e12)
    # the elementwise passes after each product: about 12 reads or writes of 4 bytes per
    # (test, train) pair, plus the segment reductions reading 3 of them again
    passes_bytes = 15 * 4 * big["n_train"] * big["n_test"]
    print(f"  one H100/H200 at an assumed {GPU_FP32_TFLOPS:.0f} TFLOP/s sustained FP32: products {one:.1f} s; "
          f"elementwise passes ~{passes_bytes / 1e12:.1f} TB of memory traffic = "
          + ", ".join(f"{passes_bytes / (bw * 1e12):.1f} s on {name} ({bw} TB/s)" for name, bw in GPU_HBM_TBPS.items())
          + f"; so about {one + passes_bytes / (GPU_HBM_TBPS['H100 SXM'] * 1e12):.0f} s on one H100 if nothing overlaps")
    per = one + passes_bytes / (GPU_HBM_TBPS["H100 SXM"] * 1e12)
    upload = big["n_train"] * big["dim"] * 4 / 25e9  # train copied once to each GPU at ~25 GB/s
    for n in (2, 4, 8):
        print(f"  {n} GPUs, test rows split evenly (each GPU all train rows): ~{per / n + upload:.1f} s each "
              f"(+{upload:.2f} s to copy {big['n_train'] * big['dim'] * 4 / 1e9:.1f} GB of train vectors to it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
