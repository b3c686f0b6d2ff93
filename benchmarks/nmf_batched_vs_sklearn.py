"""Batched posneg NMF (netanatomy.banding) vs a per-neuron scikit-learn loop.

A conv layer of 512 neurons, 512 input channels, 5x5 kernels; 3 components.
Peer: ``sklearn.decomposition.NMF(3, init="nndsvda", solver="cd")`` fitted on
each neuron's posneg matrix in a Python loop (its defaults otherwise). Ours:
``netanatomy.banding.nmf.reduce_kernels`` on the whole layer at once.

Two kinds of kernels, both measured in the same run:
- ``structured``: kernels with spatial structure as trained layers have (a few
  smooth spatial patterns per neuron mixed over channels, plus noise);
- ``iid``: independent Gaussian weights (an untrained layer; hard for NMF).

Prints the speed ratio and both mean reconstruction errors (Frobenius norm of
X - AB per neuron, averaged). Usage::

    python benchmarks/nmf_batched_vs_sklearn.py [--neurons 512] [--threads 1] [--sk-sample 0]

``--sk-sample N`` times scikit-learn on N neurons only and extrapolates (its
error is then compared with ours on the same N neurons); 0 = all neurons.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


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


def run(kind: str, w: torch.Tensor, sk_sample: int) -> dict:
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    from netanatomy.banding.nmf import posneg, reduce_kernels

    reduce_kernels(w[:8])  # warm-up
    t0 = time.perf_counter()
    ours = reduce_kernels(w, k=3)
    t_ours = time.perf_counter() - t0

    X = posneg(w).numpy()
    idx = range(X.shape[0]) if sk_sample <= 0 else range(min(sk_sample, X.shape[0]))
    errs = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i in idx:
            m = NMF(n_components=3, init="nndsvda", solver="cd")
            m.fit_transform(X[i])
            errs.append(m.reconstruction_err_)
    t_sk = (time.perf_counter() - t0) * X.shape[0] / len(idx)
    ours_err = float(ours.err[: len(idx)].mean())
    sk_err = float(np.mean(errs))
    return {
        "kind": kind,
        "ours_s": t_ours,
        "sklearn_s": t_sk,
        "ratio": t_sk / t_ours,
        "ours_err": ours_err,
        "sklearn_err": sk_err,
        "err_diff_pct": 100 * (ours_err - sk_err) / sk_err,
        "ours_sweeps": ours.iterations,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=512)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sk-sample", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"layer: {a.neurons} neurons x {a.channels} input channels x {a.kernel}x{a.kernel}; "
          f"torch threads={a.threads}; float32 for both; machine shared, timings noisy")
    for kind in ("structured", "iid"):
        if kind == "iid":
            w = torch.randn(a.neurons, a.channels, a.kernel, a.kernel, generator=torch.Generator().manual_seed(1))
        else:
            w = structured_kernels(a.neurons, a.channels, a.kernel)
        r = run(kind, w, a.sk_sample)
        note = "" if a.sk_sample <= 0 else f" (sklearn timed on {a.sk_sample} neurons, extrapolated)"
        print(
            f"[{kind}] ours {r['ours_s']:.3f} s ({r['ours_sweeps']} sweeps), sklearn loop {r['sklearn_s']:.2f} s{note}: "
            f"speed ratio {r['ratio']:.1f}x | mean reconstruction error ours {r['ours_err']:.4f}, "
            f"sklearn {r['sklearn_err']:.4f} ({r['err_diff_pct']:+.2f}%)"
        )


if __name__ == "__main__":
    main()
