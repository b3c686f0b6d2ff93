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
computed from batched eigendecompositions of the small S x S Gram matrices.
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


class _Dense:
    """Products with a batch of dense non-negative matrices ``X`` (N, S, F); keeps
    both layouts so that every batched product reads contiguous memory."""

    def __init__(self, X: torch.Tensor):
        self.Xt = X.transpose(1, 2).contiguous()  # (N,F,S)
        self.X = self.Xt.transpose(1, 2).contiguous()  # (N,S,F)
        self.f = X.shape[2]

    def mean(self) -> torch.Tensor:
        return self.X.mean(dim=(1, 2), keepdim=True)

    def dense(self) -> torch.Tensor:
        return self.X

    def left(self, At: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``At @ X``: (N,k,S) -> (N,k,F)."""
        return torch.bmm(At, self.X, out=out)

    def right(self, B: torch.Tensor) -> torch.Tensor:
        """``B @ X^T``: (N,k,F) -> (N,k,S)."""
        return B @ self.Xt

    def gram(self) -> torch.Tensor:
        return self.X @ self.Xt


class _PosNeg:
    """Products with ``X = [relu(W)^T, relu(-W)^T]`` (N, S, 2C) without building X.

    With ``P = relu(W)`` and ``relu(-W) = P - W`` (W per neuron ``(C, S)``, the
    canonical kernel layout), every product splits into two half-width products
    with ``P`` and ``W`` (and their transposes): the same memory traffic per
    sweep as with X, but only ``P`` and two transposes are built up front
    instead of the concatenated matrix in both layouts.
    """

    def __init__(self, w: torch.Tensor):
        self.C = w.shape[1]
        self.f = 2 * self.C
        self.W = w  # (N,C,S), the kernels as they are
        self.WT = w.transpose(1, 2).contiguous()  # (N,S,C)
        self.P = w.clamp(min=0)
        self.PT = self.WT.clamp(min=0)
        self._bufs: dict[str, torch.Tensor] = {}

    def mean(self) -> torch.Tensor:
        n, c, s = self.W.shape
        return (torch.linalg.vector_norm(self.W, ord=1, dim=(1, 2)) / max(1, 2 * c * s)).view(n, 1, 1)

    def dense(self) -> torch.Tensor:
        return torch.cat([self.PT, self.PT - self.WT], dim=2)

    def _buf(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Work buffers reused across sweeps (fresh large allocations cost page faults)."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape != shape:
            buf = self._bufs[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def left(self, At: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``At @ X = [a, a - At @ W^T]`` with ``a = At @ P^T``: (N,k,S) -> (N,k,2C)."""
        n, k, c = At.shape[0], At.shape[1], self.C
        a = torch.bmm(At, self.PT, out=self._buf("a", (n, k, c), At))
        b = torch.baddbmm(a, At, self.WT, alpha=-1, out=self._buf("b", (n, k, c), At))
        if out is None:
            return torch.cat([a, b], dim=2)
        out[:, :, :c] = a
        out[:, :, c:] = b
        return out

    def right(self, B: torch.Tensor) -> torch.Tensor:
        """``B @ X^T = (Bp + Bn) @ P - Bn @ W``: (N,k,2C) -> (N,k,S)."""
        n, k, c = B.shape[0], B.shape[1], self.C
        Bn = B[:, :, c:]
        bs = torch.add(B[:, :, :c], Bn, out=self._buf("bs", (n, k, c), B))
        r = torch.bmm(bs, self.P)
        return torch.baddbmm(r, Bn, self.W, alpha=-1)

    def gram(self) -> torch.Tensor:
        # X X^T = P^T P + (P - W)^T (P - W) = 2 P^T P - P^T W - W^T P + W^T W
        pw = self.PT @ self.W
        return 2 * (self.PT @ self.P) - pw - pw.transpose(1, 2) + self.WT @ self.W


def nndsvda_init(X: torch.Tensor, k: int, G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD start (Boutsidis & Gallopoulos) with zeros filled by the mean of X, batched.
    ``G = X X^T`` may be passed when already computed."""
    U, S, Vh = _top_svd(X, k, G)
    return _nndsvda_from_svd(U, S, Vh, X.mean(dim=(1, 2), keepdim=True), k)


def _nndsvda_from_svd(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, avg: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    X = Vh
    n, s, f = U.shape[0], U.shape[1], Vh.shape[2]
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
    U, S = _top_eig(X @ X.transpose(1, 2) if G is None else G, k)
    Vh = (U.transpose(1, 2) @ X) / (S[:, :, None] + EPS)
    return U, S, Vh


def _top_eig(G: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``min(k, S)`` eigenvectors of each Gram matrix ``G[n]`` and the
    square roots of their eigenvalues (the singular values of X)."""
    evals, evecs = torch.linalg.eigh(G.double())  # ascending
    r = min(k, G.shape[1])
    evals = evals.flip(-1)[:, :r].clamp(min=0)
    U = evecs.flip(-1)[:, :, :r].to(G.dtype)
    return U, evals.sqrt().to(G.dtype)


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
    tol: float = 1e-3,
    check_every: int = 5,
    inner_b: int = 2,
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
    step = max(1, n) if (chunk_bytes <= 0 or X.device.type != "cpu") else max(1, chunk_bytes // per)
    args = (k, max_iter, tol, check_every, inner_b, inner_a)
    parts = [_nmf_chunk(_Dense(X[i : i + step]), *args) for i in range(0, max(n, 1), step)]
    return _join(parts)


def _join(parts: list[NMFResult]) -> NMFResult:
    if len(parts) == 1:
        return parts[0]
    return NMFResult(
        A=torch.cat([p.A for p in parts]),
        B=torch.cat([p.B for p in parts]),
        err=torch.cat([p.err for p in parts]),
        iterations=max(p.iterations for p in parts),
    )


def _nmf_chunk(
    op: _Dense | _PosNeg,
    k: int,
    max_iter: int,
    tol: float,
    check_every: int,
    inner_b: int,
    inner_a: int,
) -> NMFResult:
    """HALS sweeps (B rows, then A columns) from NNDSVDa, stopping when the mean
    relative decrease of the error over ``check_every`` sweeps falls below
    ``tol`` or after ``max_iter`` sweeps. Works in X's dtype and device; X is
    only touched through ``op`` (two products per sweep).
    """
    G = op.gram()  # (N,S,S)
    n, s = G.shape[0], G.shape[1]
    f = op.f
    if n == 0:
        z = G.new_zeros
        return NMFResult(z(0, s, k), z(0, k, f), z(0), 0)
    XX = G.diagonal(dim1=1, dim2=2).sum(-1)  # ||X||^2 per neuron
    if s <= f:
        U, S = _top_eig(G, k)
        Vh = op.left(U.transpose(1, 2)) / (S[:, :, None] + EPS)
        A, B = _nndsvda_from_svd(U, S, Vh, op.mean(), k)
    else:
        A, B = nndsvda_init(op.dense(), k)
    prev = None
    it = 0
    AtX_buf = torch.empty(n, k, f, dtype=B.dtype, device=B.device)
    for it in range(1, max_iter + 1):
        # B given A: HALS passes over the rows (each an exact coordinate minimisation).
        # AtX is the expensive product; extra passes reuse it (accelerated HALS).
        At = A.transpose(1, 2)
        AtA = At @ A  # (N,k,k)
        AtX = op.left(At, out=AtX_buf)  # (N,k,F)
        if it > 1 and (it - 1) % check_every == 0:  # error of the previous sweep, from products we have
            err = _sq_error(XX, A, B, AtX).mean()
            if prev is not None and (prev - err) / (XX.mean() + EPS) < tol * check_every:
                it -= 1  # this sweep was not made
                break
            prev = err
        # Row j: B_j <- max(0, (AtX_j - sum_{i != j} AtA_ji B_i) / AtA_jj), written in place
        # as a few fused element-wise passes (no batched products of tiny matrices).
        dA = AtA.diagonal(dim1=1, dim2=2).clamp(min=EPS)  # (N,k)
        cA = AtA / dA[:, :, None]  # row j scaled by 1/AtA_jj
        AtX.div_(dA[:, :, None])
        for _ in range(inner_b):
            for j in range(k):
                row = B[:, j, :]
                row.copy_(AtX[:, j, :])
                for i in range(k):
                    if i != j:
                        row.addcmul_(cA[:, j, i, None], B[:, i, :], value=-1)
                row.clamp_(min=0)
        # A given B: the subproblem is tiny (S x k), so many passes are cheap.
        BBt = B @ B.transpose(1, 2)  # (N,k,k)
        XBt = op.right(B).transpose(1, 2)  # (N,S,k)
        dB = BBt.diagonal(dim1=1, dim2=2).clamp(min=EPS)
        cB = BBt / dB[:, :, None]
        XBt = XBt / dB[:, None, :]
        for _ in range(inner_a):
            for j in range(k):
                col = XBt[:, :, j].clone()
                for i in range(k):
                    if i != j:
                        col.addcmul_(cB[:, j, i, None], A[:, :, i], value=-1)
                A[:, :, j] = col.clamp_(min=0)
    # Unit-norm rows of B; the scale moves into A so the pictures carry magnitude.
    norms = B.norm(dim=2)  # (N,k)
    B = B / (norms[:, :, None] + EPS)
    A = A * norms[:, None, :]
    err = _sq_error(XX, A, B, op.left(A.transpose(1, 2))).sqrt()
    return NMFResult(A=A, B=B, err=err, iterations=it)


def reduce_kernels(
    weight: torch.Tensor,
    k: int = 3,
    max_iter: int = 200,
    tol: float = 1e-3,
    check_every: int = 5,
    inner_b: int = 2,
    inner_a: int = 3,
    chunk_bytes: int = 0,
    check_input: bool = False,
) -> NMFResult:
    """Posneg NMF of every neuron of a conv layer; ``A`` reshaped to ``(N, kh, kw, k)``.

    Same result as ``nmf_batched(posneg(weight))``; the posneg matrix is never
    built (see :class:`_PosNeg`) unless the kernels have fewer than
    ``kh*kw/2`` input channels or ``chunk_bytes`` is set. ``check_input`` is
    accepted for symmetry: posneg output is non-negative by construction.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected (out, in, kh, kw) kernels, got shape {tuple(weight.shape)}")
    n, c, kh, kw_ = weight.shape
    args = (k, max_iter, tol, check_every, inner_b, inner_a)
    if 2 * c < kh * kw_ or chunk_bytes > 0:
        res = nmf_batched(posneg(weight), *args, check_input=False, chunk_bytes=chunk_bytes)
    else:
        res = _nmf_chunk(_PosNeg(weight.reshape(n, c, kh * kw_)), *args)
    res.A = res.A.reshape(n, kh, kw_, k)
    return res
