"""Batched posneg NMF (netanatomy.banding) vs a per-neuron scikit-learn loop.

A conv layer of 512 neurons, 512 input channels, 5x5 kernels; 3 components.
Peer: ``sklearn.decomposition.NMF(3, init="nndsvda", solver="cd")`` fitted on
each neuron's posneg matrix in a Python loop (its defaults otherwise), with its
BLAS / OpenMP pools limited to one thread (threadpoolctl): one fit per neuron
on one core. Ours: ``netanatomy.banding.nmf.reduce_kernels`` on the whole layer
at once, timed with one torch thread and with all threads (its default: as many
worker threads as torch threads, each solving its share of the layer's chunks).

Two kinds of kernels, both measured in the same run:
- ``structured``: kernels with spatial structure as trained layers have (a few
  smooth spatial patterns per neuron mixed over channels, plus noise);
- ``iid``: independent Gaussian weights (an untrained layer).

Our time is the median of ``--repeats`` runs, half of them before and half
after the scikit-learn loop (the machine may be shared, so its load drifts).
Prints wall-clock speed ratios (the goal), the CPU-time ratio for one thread
(less sensitive to other processes), both mean reconstruction errors
(Frobenius norm of X - AB per neuron, averaged over the same neurons) and the
load average at start and end. Usage::

    python benchmarks/nmf_batched_vs_sklearn.py [--neurons 512] [--repeats 6] [--sk-sample 0]

``--sk-sample N`` times scikit-learn on the first N neurons only and scales its
time up to the whole layer (its error is then compared with ours on the same N
neurons); 0 = all neurons.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared, oversubscribed
# machine spinning threads steal the core from the thread they wait for (measured
# here under load ~7 on 2 cores: 2-thread runs 16 s spinning vs 0.4 s passive).
# Must be set before torch / numpy load their OpenMP runtimes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def structured_kernels(n: int, c: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, k), torch.linspace(-1, 1, k), indexing="ij")
    # per neuron 4 random smooth spatial patterns (low-frequency cosines)
    fy = torch.rand(n, 4, 1, 1, generator=g) * 3
    fx = torch.rand(n, 4, 1, 1, generator=g) * 3
    ph = torch.rand(n, 4, 1, 1, generator=g) * 6.283
    pats = torch.cos(fy * yy + fx * xx + ph)  # (n,4,k,k)
    mix = torch.randn(n, c, 4, generator=g)  # channel loadings
    w = torch.einsum("ncp,npyx->ncyx", mix, pats)
    return w + 0.3 * torch.randn(n, c, k, k, generator=g)


def _time_ours(w: torch.Tensor, threads: int, repeats: int) -> tuple[list[float], list[float], object]:
    from netanatomy.banding.nmf import reduce_kernels

    torch.set_num_threads(threads)
    reduce_kernels(w[:8])  # warm-up
    walls, cpus, res = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        res = reduce_kernels(w, k=3)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, res


def _time_sklearn(X: np.ndarray, idx: range) -> tuple[float, float, list[float]]:
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    errs = []
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        NMF(n_components=3, init="nndsvda", solver="cd").fit_transform(X[0])  # warm-up (imports, first call)
        c0, t0 = time.process_time(), time.perf_counter()
        for i in idx:
            m = NMF(n_components=3, init="nndsvda", solver="cd")
            m.fit_transform(X[i])
            errs.append(m.reconstruction_err_)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, errs


def run(kind: str, w: torch.Tensor, sk_sample: int, repeats: int, all_threads: int) -> dict:
    from netanatomy.banding.nmf import posneg

    X = posneg(w).contiguous().numpy()
    n = X.shape[0]
    idx = range(n) if sk_sample <= 0 else range(min(sk_sample, n))
    scale = n / len(idx)
    half = max(1, repeats // 2)
    w1a, c1a, ours = _time_ours(w, 1, half)
    wna, _, _ = _time_ours(w, all_threads, half) if all_threads > 1 else ([], [], None)
    sk_wall, sk_cpu, errs = _time_sklearn(X, idx)
    w1b, c1b, _ = _time_ours(w, 1, repeats - half)
    wnb, _, _ = _time_ours(w, all_threads, repeats - half) if all_threads > 1 else ([], [], None)
    t1, c1 = statistics.median(w1a + w1b), statistics.median(c1a + c1b)
    tn = statistics.median(wna + wnb) if all_threads > 1 else float("nan")
    sk_wall, sk_cpu = sk_wall * scale, sk_cpu * scale
    ours_err = float(ours.err[: len(idx)].mean())
    sk_err = float(np.mean(errs))
    return {
        "kind": kind,
        "ours_1t": t1,
        "ours_1t_all": sorted(w1a + w1b),
        "ours_cpu_1t": c1,
        "ours_nt": tn,
        "sk_wall": sk_wall,
        "sk_cpu": sk_cpu,
        "ratio_1t": sk_wall / t1,
        "ratio_nt": sk_wall / tn,
        "ratio_cpu": sk_cpu / c1,
        "ours_err": ours_err,
        "sk_err": sk_err,
        "err_diff_pct": 100 * (ours_err - sk_err) / sk_err,
        "sweeps_mean": float(ours.sweeps.float().mean()),
        "sweeps_max": ours.iterations,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=512)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=6, help="timed runs of ours per thread setting (median)")
    ap.add_argument("--threads", type=int, default=0, help="'all threads' setting for ours (0 = torch's default)")
    ap.add_argument("--sk-sample", type=int, default=0)
    a = ap.parse_args()
    all_threads = a.threads or torch.get_num_threads()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores; "
          f"machine shared, timings noisy); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"layer: {a.neurons} neurons x {a.channels} input channels x {a.kernel}x{a.kernel}, 3 components, float32 "
          f"both sides; ours: median of {a.repeats} runs with 1 torch thread and with {all_threads}; "
          "sklearn: 1 thread (BLAS/OpenMP limited by threadpoolctl), "
          + ("all neurons" if a.sk_sample <= 0 else f"first {a.sk_sample} neurons timed, scaled up to {a.neurons}"))
    for kind in ("structured", "iid"):
        if kind == "iid":
            w = torch.randn(a.neurons, a.channels, a.kernel, a.kernel, generator=torch.Generator().manual_seed(1))
        else:
            w = structured_kernels(a.neurons, a.channels, a.kernel)
        r = run(kind, w, a.sk_sample, a.repeats, all_threads)
        note = "" if a.sk_sample <= 0 else f" (timed on {a.sk_sample} neurons, scaled)"
        nt = (f"; {all_threads} threads {r['ours_nt']:.3f} s: speed ratio {r['ratio_nt']:.1f}x" if all_threads > 1 else "")
        print(
            f"[{kind}] sklearn loop {r['sk_wall']:.2f} s{note} | ours 1 thread {r['ours_1t']:.3f} s "
            f"(runs {', '.join(f'{t:.3f}' for t in r['ours_1t_all'])}): speed ratio {r['ratio_1t']:.1f}x{nt} | "
            f"CPU-time ratio (1 thread) {r['ratio_cpu']:.1f}x ({r['sk_cpu']:.2f} s / {r['ours_cpu_1t']:.3f} s) | "
            f"mean reconstruction error ours {r['ours_err']:.4f}, sklearn {r['sk_err']:.4f} ({r['err_diff_pct']:+.2f}%) | "
            f"sweeps per neuron mean {r['sweeps_mean']:.1f}, max {r['sweeps_max']}"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
