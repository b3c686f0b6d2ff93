"""The batched posneg NMF (netanatomy.banding.nmf): quality against scikit-learn,
constraints, determinism, batch independence, edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from netanatomy.banding.nmf import (
    NMFResult,
    _top_svd,
    nmf_batched,
    posneg,
    reduce_kernels,
)


def _kernels(n: int, c: int, k: int, seed: int = 0) -> torch.Tensor:
    """Kernels with some spatial structure (row patterns) plus noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, k, k, generator=g) + 0.8 * torch.randn(n, c, k, 1, generator=g)


def _direct_error(w: torch.Tensor, res: NMFResult) -> torch.Tensor:
    n = w.shape[0]
    X = posneg(w)
    return (X - res.A.reshape(n, X.shape[1], -1) @ res.B).flatten(1).norm(dim=1)


def _sklearn_errors(w: torch.Tensor) -> np.ndarray:
    sk = pytest.importorskip("sklearn.decomposition")
    X = posneg(w).numpy().astype(np.float64)
    errs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(X.shape[0]):
            m = sk.NMF(n_components=3, init="nndsvda", solver="cd")
            m.fit_transform(X[i])
            errs.append(m.reconstruction_err_)
    return np.array(errs)


@pytest.mark.parametrize(
    "n,c,k",
    [
        (16, 24, 5),  # S=25 < F=48: randomized range finder for the start
        (16, 24, 3),  # S=9
        (12, 2, 5),  # F=4 < S=25: tall, exact start from the F x F Gram
        (12, 40, 7),  # S=49 < F=80
    ],
)
def test_default_settings_match_sklearn_error(n, c, k):
    w = _kernels(n, c, k, seed=n + c + k)
    ours = reduce_kernels(w)
    theirs = _sklearn_errors(w)
    assert ours.mean_error <= 1.02 * float(theirs.mean())
    # and no single neuron is far off
    assert float((ours.err.numpy() / np.maximum(theirs, 1e-9)).max()) < 1.15


def test_factors_nonnegative_normalised_and_error_is_the_real_one():
    w = _kernels(10, 16, 5, seed=1)
    res = reduce_kernels(w)
    assert res.A.shape == (10, 5, 5, 3) and res.B.shape == (10, 3, 32) and res.err.shape == (10,)
    assert (res.A >= 0).all() and (res.B >= 0).all()
    assert torch.allclose(res.B.norm(dim=2), torch.ones(10, 3), atol=1e-4)
    assert torch.allclose(_direct_error(w, res), res.err, rtol=1e-3, atol=1e-4)
    assert res.sweeps is not None and int(res.sweeps.max()) == res.iterations <= 200


def test_deterministic_for_a_fixed_input():
    w = _kernels(20, 12, 3, seed=2)
    a, b = reduce_kernels(w), reduce_kernels(w.clone())
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.err, b.err)
    assert torch.equal(a.sweeps, b.sweeps)


def test_batch_result_equals_per_neuron_result():
    # each neuron is solved and stopped on its own: neither the other neurons of
    # the batch nor the chunking (which pools slow neurons of different chunks)
    # change its result
    w = _kernels(9, 20, 5, seed=3)
    whole = reduce_kernels(w, chunk_bytes=0)
    chunked = reduce_kernels(w, chunk_bytes=2 * 25 * 40 * 4)  # 2 neurons per chunk
    assert torch.allclose(whole.A, chunked.A, rtol=1e-4, atol=1e-5)
    assert torch.equal(whole.sweeps, chunked.sweeps)
    for i in range(w.shape[0]):
        one = reduce_kernels(w[i : i + 1])
        assert torch.allclose(one.A[0], whole.A[i], rtol=1e-4, atol=1e-5)
        assert torch.allclose(one.B[0], whole.B[i], rtol=1e-4, atol=1e-5)
        assert int(one.sweeps[0]) == int(whole.sweeps[i])


def test_reduce_kernels_equals_dense_nmf_batched():
    w = _kernels(7, 10, 3, seed=4)
    a = reduce_kernels(w)
    b = nmf_batched(posneg(w))
    assert torch.allclose(a.A.reshape(7, 9, 3), b.A, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a.err, b.err, rtol=1e-4, atol=1e-5)


def test_all_zero_neuron_gives_zero_factors_and_leaves_others_alone():
    w = _kernels(5, 8, 3, seed=5)
    w0 = w.clone()
    w0[2] = 0
    res = reduce_kernels(w0)
    assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
    assert float(res.A[2].abs().max()) == 0.0 and float(res.err[2]) == 0.0
    assert int(res.sweeps[2]) < 200  # it stops at once, not after max_iter
    ref = reduce_kernels(w[[0, 1, 3, 4]])
    assert torch.allclose(res.A[[0, 1, 3, 4]], ref.A, rtol=1e-4, atol=1e-5)


def test_one_by_one_kernels_are_handled():
    # one spatial position: X is a single row, rank 1; the picture is (1, 1, 3)
    w = _kernels(6, 8, 1, seed=6)
    res = reduce_kernels(w)
    assert res.A.shape == (6, 1, 1, 3) and torch.isfinite(res.A).all()
    assert (res.A >= 0).all() and (res.B >= 0).all()
    assert float(res.err.max()) < 1e-3 * float(w.flatten(1).norm(dim=1).min())  # rank 1 is exact


def test_single_neuron_and_empty_layer():
    w = _kernels(1, 6, 3, seed=7)
    one = reduce_kernels(w)
    assert one.A.shape == (1, 3, 3, 3) and one.err.shape == (1,)
    empty = reduce_kernels(torch.zeros(0, 6, 3, 3))
    assert empty.A.shape == (0, 3, 3, 3) and empty.err.shape == (0,) and empty.iterations == 0


def test_fewer_positions_or_channels_than_components():
    # S = 4 positions and k = 3 is fine; F = 2 (one input channel) < k too
    w = _kernels(3, 1, 2, seed=8)
    res = reduce_kernels(w)
    assert res.A.shape == (3, 2, 2, 3) and torch.isfinite(res.A).all()
    assert torch.allclose(_direct_error(w, res), res.err, rtol=1e-3, atol=1e-4)


def test_stopping_rule():
    w = _kernels(8, 16, 5, seed=9)
    fixed = reduce_kernels(w, tol=0, max_iter=5)
    assert (fixed.sweeps == 5).all() and fixed.iterations == 5
    loose = reduce_kernels(w, tol=1e-1)
    strict = reduce_kernels(w, tol=1e-6, max_iter=400)
    assert int(loose.sweeps.max()) < int(strict.sweeps.min())
    assert strict.mean_error <= loose.mean_error + 1e-6
    zero = reduce_kernels(w, max_iter=0)
    assert zero.iterations == 0 and torch.allclose(_direct_error(w, zero), zero.err, rtol=1e-3, atol=1e-4)


def test_randomized_start_finds_the_leading_singular_values():
    w = _kernels(6, 30, 5, seed=10)
    X = posneg(w).contiguous()
    U, S, _ = _top_svd(X, 3)
    exact = torch.linalg.svdvals(X.double())[:, :3].float()
    # Ritz values never exceed the true singular values; the leading one (the
    # non-negative matrix's mean direction) is found almost exactly, the next
    # ones of this flat noisy spectrum within a few percent
    assert (S <= exact * (1 + 1e-4)).all() and (S >= 0.9 * exact).all()
    assert torch.allclose(S[:, 0], exact[:, 0], rtol=1e-3)
    assert torch.allclose(U.transpose(1, 2) @ U, torch.eye(3).expand(6, 3, 3), atol=1e-4)
    # a matrix with a clear rank-3 structure: exact
    g = torch.Generator().manual_seed(11)
    L = torch.rand(6, 25, 3, generator=g) @ torch.rand(6, 3, 60, generator=g) + 0.01 * torch.rand(6, 25, 60, generator=g)
    _, S2, _ = _top_svd(L, 3)
    assert torch.allclose(S2, torch.linalg.svdvals(L.double())[:, :3].float(), rtol=1e-4)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        nmf_batched(-torch.ones(2, 4, 4), k=2)
    with pytest.raises(ValueError):
        reduce_kernels(torch.ones(2, 3, 3))  # not (out, in, kh, kw)
    bad = _kernels(3, 4, 3)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        reduce_kernels(bad)
    with pytest.raises(ValueError):
        reduce_kernels(_kernels(2, 4, 3), k=0)
    with pytest.raises(ValueError):
        reduce_kernels(_kernels(2, 4, 3), tol=-1)


def test_float64_and_integer_inputs():
    w = _kernels(4, 6, 3, seed=11)
    a = reduce_kernels(w.double())
    assert a.A.dtype == torch.float64
    b = reduce_kernels(w)
    assert torch.allclose(a.err.float(), b.err, rtol=1e-3)
    c = nmf_batched(torch.randint(0, 5, (3, 4, 6)))
    assert c.A.dtype == torch.float32 and (c.A >= 0).all()


def test_threaded_chunks_give_the_same_result_and_restore_torch_threads():
    # 150 neurons of very different scale in chunks of 12: slow neurons of several
    # chunks are pooled and solved together (the straggler pool), in every worker
    import netanatomy.banding.nmf as nmf_mod

    merges = []
    orig = nmf_mod._Batch.merge

    def counting_merge(parts):
        merges.append(len(parts))
        return orig(parts)

    w = torch.randn(150, 16, 5, 5, generator=torch.Generator().manual_seed(3))
    w = w * torch.rand(150, 1, 1, 1, generator=torch.Generator().manual_seed(4)) ** 3
    chunk = 12 * 25 * 32 * 4
    one = reduce_kernels(w, chunk_bytes=chunk, workers=1)
    before = torch.get_num_threads()
    nmf_mod._Batch.merge = staticmethod(counting_merge)
    try:
        for workers in (2, 3, 5):
            many = reduce_kernels(w, chunk_bytes=chunk, workers=workers)
            assert torch.equal(one.A, many.A) and torch.equal(one.B, many.B)
            assert torch.equal(one.err, many.err) and torch.equal(one.sweeps, many.sweeps)
    finally:
        nmf_mod._Batch.merge = orig
    assert any(m > 1 for m in merges)  # the pool was exercised
    assert torch.get_num_threads() == before
    dense = nmf_batched(posneg(w), chunk_bytes=chunk, workers=2)
    assert torch.allclose(dense.A.reshape(one.A.shape), one.A, rtol=1e-4, atol=1e-5)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="workers"):
            reduce_kernels(w, workers=bad)


def test_threaded_solver_runs_under_no_grad_inference_mode_and_on_parameters():
    conv = torch.nn.Conv2d(12, 40, 3)
    chunk = 8 * 9 * 24 * 4  # 5 chunks
    ref = reduce_kernels(conv.weight.detach(), chunk_bytes=chunk, workers=1)
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with ctx():
            res = reduce_kernels(conv.weight, chunk_bytes=chunk, workers=2)
        assert torch.equal(res.A, ref.A) and not res.A.requires_grad


def test_concurrent_callers_leave_torch_thread_count_as_it_was():
    import threading

    before = torch.get_num_threads()
    w = _kernels(30, 16, 3, seed=6)
    chunk = 4 * 9 * 32 * 4
    ref = reduce_kernels(w, chunk_bytes=chunk, workers=1)
    errors = []

    def call():
        for _ in range(3):
            r = reduce_kernels(w, chunk_bytes=chunk, workers=2)
            if not torch.equal(r.A, ref.A):
                errors.append("different result")

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.get_num_threads() == before
