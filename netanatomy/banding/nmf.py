"""Batched non-negative matrix factorisation of conv kernels (the "posneg" trick).

For one neuron o of a conv layer, ``W[o]`` has shape ``(in, kh, kw)``. The
posneg trick makes it non-negative by stacking ``relu(W)`` and ``relu(-W)``
along the channel axis, giving a matrix ``X`` of ``kh*kw`` samples (spatial
positions) by ``2*in`` features. NMF with ``k`` components, ``X ~ A @ B`` with
``A >= 0`` of shape ``(kh*kw, k)`` and ``B >= 0`` of shape ``(k, 2*in)``, gives
per position ``k`` loadings: with ``k = 3`` they are the RGB picture of the
neuron.

Every neuron is an independent problem; here all neurons of a layer are
solved at once as one batch of tensors ``(N, S, F)`` in torch (on the GPU when
one is available), instead of one scikit-learn fit per neuron. The solver is
HALS (hierarchical alternating least squares: exact coordinate descent, one
component at a time, on the Frobenius loss - the same updates scikit-learn's
``solver="cd"`` makes) started from NNDSVDa (scikit-learn's default start),
computed from a batched SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12


def posneg(weight: torch.Tensor) -> torch.Tensor:
    """``(N, in, kh, kw)`` kernels -> ``(N, kh*kw, 2*in)`` non-negative matrices."""
    if weight.dim() != 4:
        raise ValueError(f"posneg expects (out, in, kh, kw) kernels, got shape {tuple(weight.shape)}")
    n, c, kh, kw = weight.shape
    xt = torch.cat([weight.clamp(min=0), weight.neg().clamp_(min=0)], dim=1).reshape(n, 2 * c, kh * kw)
    return xt.transpose(1, 2)  # a view; nmf_batched makes the layouts it needs


@dataclass
class NMFResult:
    """``X[n] ~ A[n] @ B[n]``.

    A: ``(N, S, k)`` spatial loadings (the picture), B: ``(N, k, F)`` channel
    factors with unit-norm rows (so A carries the magnitudes), err: ``(N,)``
    Frobenius reconstruction error per neuron, iterations: sweeps made.
    """

    A: torch.Tensor
    B: torch.Tensor
    err: torch.Tensor
    iterations: int

    @property
    def mean_error(self) -> float:
        return float(self.err.mean())


def nndsvda_init(X: torch.Tensor, k: int, G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD start (Boutsidis & Gallopoulos) with zeros filled by the mean of X, batched.
    ``G = X X^T`` may be passed when already computed."""
    n, s, f = X.shape
    U, S, Vh = _top_svd(X, k, G)
    r = S.shape[1]
    A = torch.zeros(n, s, k, dtype=X.dtype, device=X.device)
    B = torch.zeros(n, k, f, dtype=X.dtype, device=X.device)
    A[:, :, 0] = S[:, 0, None].sqrt() * U[:, :, 0].abs()
    B[:, 0, :] = S[:, 0, None].sqrt() * Vh[:, 0, :].abs()
    for j in range(1, r):
        x, y = U[:, :, j], Vh[:, j, :]
        xp, xn, yp, yn = x.clamp(min=0), (-x).clamp(min=0), y.clamp(min=0), (-y).clamp(min=0)
        nxp, nxn = xp.norm(dim=1), xn.norm(dim=1)
        nyp, nyn = yp.norm(dim=1), yn.norm(dim=1)
        mp, mn = nxp * nyp, nxn * nyn
        use_p = (mp > mn)[:, None]
        u = torch.where(use_p, xp / (nxp[:, None] + EPS), xn / (nxn[:, None] + EPS))
        v = torch.where(use_p, yp / (nyp[:, None] + EPS), yn / (nyn[:, None] + EPS))
        lbd = (S[:, j] * torch.where(use_p[:, 0], mp, mn)).sqrt()[:, None]
        A[:, :, j] = lbd * u
        B[:, j, :] = lbd * v
    avg = X.mean(dim=(1, 2), keepdim=True)
    A = torch.where(A < EPS, avg.expand_as(A), A)
    B = torch.where(B < EPS, avg.expand_as(B), B)
    return A, B


def _top_svd(X: torch.Tensor, k: int, G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets of each short-and-wide ``X[n]`` from the small
    Gram matrix ``X X^T`` (S x S); much cheaper than a full SVD when S << F."""
    s, f = X.shape[1], X.shape[2]
    if s > f:  # tall: work on the transpose
        U, S, Vh = _top_svd(X.transpose(1, 2), k)
        return Vh.transpose(1, 2), S, U.transpose(1, 2)
    G = (X @ X.transpose(1, 2) if G is None else G).double()
    evals, evecs = torch.linalg.eigh(G)  # ascending
    r = min(k, s)
    evals = evals.flip(-1)[:, :r].clamp(min=0)
    U = evecs.flip(-1)[:, :, :r]
    U = U.to(X.dtype)
    S = evals.sqrt().to(X.dtype)
    Vh = (U.transpose(1, 2) @ X) / (S[:, :, None] + EPS)
    return U, S, Vh


def _sq_error(XX: torch.Tensor, A: torch.Tensor, B: torch.Tensor, AtX: torch.Tensor) -> torch.Tensor:
    """||X - AB||^2 per neuron from small products (never forms AB)."""
    AtA = A.transpose(1, 2) @ A
    BBt = B @ B.transpose(1, 2)
    cross = (AtX * B).sum(dim=(1, 2))
    quad = (AtA * BBt).sum(dim=(1, 2))
    return (XX - 2 * cross + quad).clamp(min=0)


def nmf_batched(
    X: torch.Tensor,
    k: int = 3,
    max_iter: int = 200,
    tol: float = 3e-4,
    check_every: int = 5,
    inner_b: int = 1,
    inner_a: int = 3,
    check_input: bool = True,
    chunk_bytes: int = 0,
) -> NMFResult:
    """Factorise each ``X[n]`` (``(N, S, F)``, non-negative) as ``A[n] @ B[n]``.

    Neurons are processed in chunks of about ``chunk_bytes`` of input on the CPU
    (so that every sweep runs in cache, not from main memory; 0 = one chunk),
    all at once on a GPU. See :func:`_nmf_chunk` for the solver.
    """
    if X.dim() != 3:
        raise ValueError(f"expected a batch of matrices (N, S, F), got {tuple(X.shape)}")
    if check_input and bool((X < 0).any()):
        raise ValueError("NMF needs non-negative input")
    n = X.shape[0]
    per = max(1, X.shape[1] * X.shape[2] * X.element_size())
    step = n if (chunk_bytes <= 0 or X.device.type != "cpu") else max(1, chunk_bytes // per)
    if step >= n:
        return _nmf_chunk(X, k, max_iter, tol, check_every, inner_b, inner_a)
    parts = [_nmf_chunk(X[i : i + step], k, max_iter, tol, check_every, inner_b, inner_a) for i in range(0, n, step)]
    return NMFResult(
        A=torch.cat([p.A for p in parts]),
        B=torch.cat([p.B for p in parts]),
        err=torch.cat([p.err for p in parts]),
        iterations=max(p.iterations for p in parts),
    )


def _nmf_chunk(
    X: torch.Tensor,
    k: int,
    max_iter: int,
    tol: float,
    check_every: int,
    inner_b: int,
    inner_a: int,
) -> NMFResult:
    """HALS sweeps (B rows, then A columns) from NNDSVDa, stopping when the mean
    relative decrease of the error over ``check_every`` sweeps falls below
    ``tol`` or after ``max_iter`` sweeps. Works in X's dtype and device.
    """
    n = X.shape[0]
    if n == 0:
        z = X.new_zeros
        return NMFResult(z(0, X.shape[1], k), z(0, k, X.shape[2]), z(0), 0)
    Xt = X.transpose(1, 2).contiguous()  # (N,F,S)
    X = Xt.transpose(1, 2).contiguous()  # (N,S,F)
    G = X @ Xt  # (N,S,S)
    XX = G.diagonal(dim1=1, dim2=2).sum(-1)  # ||X||^2 per neuron
    A, B = nndsvda_init(X, k, G)
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        # B given A: HALS passes over the rows (each an exact coordinate minimisation).
        # AtX is the expensive product; extra passes reuse it (accelerated HALS).
        At = A.transpose(1, 2)
        AtA = At @ A  # (N,k,k)
        AtX = At @ X  # (N,k,F)
        if it > 1 and (it - 1) % check_every == 0:  # error of the previous sweep, from products we have
            err = _sq_error(XX, A, B, AtX).mean()
            if prev is not None and (prev - err) / (XX.mean() + EPS) < tol * check_every:
                it -= 1  # this sweep was not made
                break
            prev = err
        dA = AtA.diagonal(dim1=1, dim2=2).clamp(min=EPS)  # (N,k)
        for _ in range(inner_b):
            for j in range(k):
                num = AtX[:, j, :] - (AtA[:, j : j + 1, :] @ B)[:, 0, :]
                row = B[:, j, :]
                row.addcdiv_(num, dA[:, j, None]).clamp_(min=0)
        # A given B: the subproblem is tiny (S x k), so many passes are cheap.
        BBt = B @ B.transpose(1, 2)  # (N,k,k)
        XBt = (B @ Xt).transpose(1, 2)  # (N,S,k)
        dB = BBt.diagonal(dim1=1, dim2=2).clamp(min=EPS)
        for _ in range(inner_a):
            for j in range(k):
                num = XBt[:, :, j] - (A @ BBt[:, :, j : j + 1])[:, :, 0]
                A[:, :, j] = (A[:, :, j] + num / dB[:, j, None]).clamp(min=0)
    # Unit-norm rows of B; the scale moves into A so the pictures carry magnitude.
    norms = B.norm(dim=2)  # (N,k)
    B = B / (norms[:, :, None] + EPS)
    A = A * norms[:, None, :]
    err = _sq_error(XX, A, B, A.transpose(1, 2) @ X).sqrt()
    return NMFResult(A=A, B=B, err=err, iterations=it)


def reduce_kernels(weight: torch.Tensor, k: int = 3, **kw) -> NMFResult:
    """Posneg NMF of every neuron of a conv layer; ``A`` reshaped to ``(N, kh, kw, k)``."""
    n, _, kh, kw_ = weight.shape
    kw.setdefault("check_input", False)  # posneg output is non-negative by construction
    res = nmf_batched(posneg(weight), k=k, **kw)
    res.A = res.A.reshape(n, kh, kw_, k)
    return res
