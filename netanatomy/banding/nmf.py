"""Batched non-negative matrix factorisation of conv kernels (the "posneg" trick).

For one neuron o of a conv layer, ``W[o]`` has shape ``(in, kh, kw)``. The
posneg trick makes it non-negative by stacking ``relu(W)`` and ``relu(-W)``
along the channel axis, giving a matrix ``X`` of ``kh*kw`` samples (spatial
positions) by ``2*in`` features. NMF with ``k`` components, ``X ~ A @ B`` with
``A >= 0`` of shape ``(kh*kw, k)`` and ``B >= 0`` of shape ``(k, 2*in)``, gives
per position ``k`` loadings: with ``k = 3`` they are the RGB picture of the
neuron.

Every neuron is an independent problem; here the neurons of a layer are solved
as batches of tensors ``(n, S, F)`` in torch (the whole layer at once on a GPU;
on the CPU in chunks of ~8 MB so that each chunk's sweeps read X from cache,
not from main memory, or, with several worker threads, in one or a few equal
chunks per thread: see :func:`_chunk_size` and :func:`_drive`). The solver is HALS (hierarchical alternating least
squares: exact coordinate descent, one component at a time, on the Frobenius
loss - the updates scikit-learn's ``solver="cd"`` makes), with several passes
over B per product ``A^T X`` (accelerated HALS, Gillis & Glineur 2012: the
extra passes use only the small products), started from NNDSVDa
(scikit-learn's default start). The leading singular vectors NNDSVDa needs come
from a batched randomized range finder (one power iteration) with an exact
Rayleigh-Ritz step on a small ``r x r`` matrix (r = k + 5), or from the exact
small Gram matrix when ``min(S, F)`` is small. When the range finder is used,
the sweeps fit the projection of X on its ``r``-dimensional basis, so that
each product reads ``r x F`` instead of ``S x F`` numbers per neuron (see
:func:`_start`); the error reported is always the true ``||X - AB||``. Each
neuron stops on its own when its error no longer decreases (relative
tolerance ``tol``); stopped neurons leave the batch, so a neuron's result does
not depend on which other neurons share its batch.

Benchmark: ``benchmarks/nmf_batched_vs_sklearn.py``, results in
``results/nmf_benchmark.md``.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

EPS = 1e-12
_OVERSAMPLE = 5  # extra random directions in the range finder
_POWER_ITERS = 1  # power iterations of the range finder
_COMPACT_AT = 4  # drop finished rows from a batch once 1/4 of it is finished
_SEED = 0  # fixed: the factorisation of a given input is deterministic
_DEFAULT_CHUNK_BYTES = 8 << 20  # CPU: X of one chunk stays in the last-level cache
_MAX_WORKER_CHUNK_BYTES = 64 << 20  # CPU, several worker threads: the largest chunk a thread takes


def posneg(weight: torch.Tensor) -> torch.Tensor:
    """``(N, in, kh, kw)`` kernels -> ``(N, kh*kw, 2*in)`` non-negative matrices."""
    if weight.dim() != 4:
        raise ValueError(f"posneg expects (out, in, kh, kw) kernels, got shape {tuple(weight.shape)}")
    n, c, kh, kw = weight.shape
    xt = torch.cat([weight.clamp(min=0), weight.neg().clamp_(min=0)], dim=1).reshape(n, 2 * c, kh * kw)
    return xt.transpose(1, 2)  # a view; the solver makes the layout it needs


@dataclass
class NMFResult:
    """``X[n] ~ A[n] @ B[n]``.

    A: ``(N, S, k)`` spatial loadings (the picture), B: ``(N, k, F)`` channel
    factors with unit-norm rows (so A carries the magnitudes), err: ``(N,)``
    Frobenius reconstruction error per neuron, iterations: the most sweeps any
    neuron made (``sweeps`` has the count per neuron).
    """

    A: torch.Tensor
    B: torch.Tensor
    err: torch.Tensor
    iterations: int
    sweeps: torch.Tensor | None = None

    @property
    def mean_error(self) -> float:
        return float(self.err.mean())


# -- start: NNDSVDa ------------------------------------------------------------


def nndsvda_init(X: torch.Tensor, k: int, G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD start (Boutsidis & Gallopoulos) with zeros filled by the mean of X, batched.
    ``G = X X^T`` may be passed when already computed (then the SVD is exact)."""
    if G is not None:
        U, S = _top_eig(G, k)
        Vh = (U.transpose(1, 2) @ X) / (S[:, :, None] + EPS)
    else:
        U, S, Vh = _top_svd(X, k)
    return _nndsvda_from_svd(U, S, Vh, X.mean(dim=(1, 2), keepdim=True), k)


def _nndsvda_from_svd(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, avg: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVDa from the leading singular triplets ``U (n,S,r), S (n,r), Vh (n,r,F)``
    (all components at once; component 0 from absolute values, each later one
    from the positive or the negative part of its singular vectors, whichever
    carries more; zeros and missing components filled with the mean ``avg``)."""
    n, s, f = U.shape[0], U.shape[1], Vh.shape[2]
    r = min(S.shape[1], k)
    U, S, Vh = U[:, :, :r], S[:, :r], Vh[:, :r, :]
    up, un = U.clamp(min=0), U.clamp(max=0).neg_()  # (n,S,r)
    vp, vn = Vh.clamp(min=0), Vh.clamp(max=0).neg_()  # (n,r,F)
    nup, nun = up.norm(dim=1), un.norm(dim=1)  # (n,r)
    nvp, nvn = vp.norm(dim=2), vn.norm(dim=2)
    mp, mn = nup * nvp, nun * nvn
    use_p = mp > mn
    lbd = (S * torch.where(use_p, mp, mn)).sqrt()  # (n,r)
    ca = lbd / torch.where(use_p, nup, nun).add_(EPS)
    cb = lbd / torch.where(use_p, nvp, nvn).add_(EPS)
    A = torch.where(use_p[:, None, :], up, un).mul_(ca[:, None, :])
    B = torch.where(use_p[:, :, None], vp, vn).mul_(cb[:, :, None])
    s0 = S[:, :1].sqrt()  # (n,1)
    A[:, :, 0] = U[:, :, 0].abs() * s0
    B[:, 0, :] = Vh[:, 0, :].abs() * s0
    if r < k:  # fewer singular directions than components (tiny S or F)
        A = torch.cat([A, A.new_zeros(n, s, k - r)], dim=2)
        B = torch.cat([B, B.new_zeros(n, k - r, f)], dim=1)
    A = torch.where(A < EPS, avg.expand_as(A), A)
    B = torch.where(B < EPS, avg.expand_as(B), B)
    return A, B


def _top_eig(G: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``min(k, S)`` eigenvectors of each Gram matrix ``G[n]`` and the
    square roots of their eigenvalues (the singular values of X)."""
    evals, evecs = torch.linalg.eigh(G.double())  # ascending
    r = min(k, G.shape[1])
    evals = evals.flip(-1)[:, :r].clamp(min=0)
    U = evecs.flip(-1)[:, :, :r].to(G.dtype)
    return U, evals.sqrt().to(G.dtype)


def _omega(f: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """The range finder's test matrix ``(r, F)``: Gaussian, fixed seed (deterministic)."""
    g = torch.Generator().manual_seed(_SEED)
    return torch.randn(r, f, generator=g, dtype=torch.float32).to(dtype=like.dtype, device=like.device)


def _top_svd(X: torch.Tensor, k: int, omega: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets ``U (n,S,k), S (n,k), Vh (n,k,F)`` of each ``X[n]``.

    When ``min(S, F)`` is at most ``k + oversampling`` the small Gram matrix of
    the short side is decomposed exactly. Otherwise (``S, F`` both larger) a
    randomized range finder (Halko, Martinsson & Tropp 2011) with one power
    iteration gives an ``r``-dimensional basis ``Q`` of the column space, and
    the exact SVD of ``Q^T X`` (from its ``r x r`` Gram) gives the triplets:
    four thin products with X instead of the ``S x S`` Gram matrix and an
    ``S x S`` eigendecomposition per neuron (both slow for many small matrices).
    """
    _, s, f = X.shape
    r = k + _OVERSAMPLE
    if f < s and f <= r:  # short-and-tall: exact from the F x F Gram
        U, S, Vh = _top_svd_gram(X.transpose(1, 2), k)
        return Vh.transpose(1, 2), S, U.transpose(1, 2)
    if s <= r:
        return _top_svd_gram(X, k)
    if f < s:  # tall and wide enough: range finder on the transpose
        U, S, Vh = _top_svd(X.transpose(1, 2), k, omega)
        return Vh.transpose(1, 2), S, U.transpose(1, 2)
    return _svd_from_basis(*_range_basis(X, r, omega), k)


def _range_basis(X: torch.Tensor, r: int, omega: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized range finder with one power iteration: ``Q (n,S,r)`` with
    orthonormal columns spanning (nearly) the leading column space of each
    ``X[n]``, and ``Y = Q^T X (n,r,F)``; four thin products with X."""
    f = X.shape[2]
    om = omega if omega is not None and omega.shape == (r, f) else _omega(f, r, X)  # (r, F)
    Xt = X.transpose(1, 2)
    Y = torch.matmul(om, Xt).transpose(1, 2)  # X @ om^T: (n,S,r)
    return _range_basis_from(X, Y)


def _range_basis_from(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_range_basis` given the first product ``Y = X @ om^T``."""
    Xt = X.transpose(1, 2)
    for _ in range(_POWER_ITERS):
        Q = torch.linalg.qr(Y).Q
        Z = torch.bmm(Q.transpose(1, 2), X)  # (n,r,F)
        Y = torch.bmm(Z, Xt).transpose(1, 2)  # X X^T Q
    Q = torch.linalg.qr(Y).Q  # (n,S,r)
    return Q, torch.bmm(Q.transpose(1, 2), X)


def _svd_from_basis(Q: torch.Tensor, Y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets of ``Q @ Y`` from the ``r x r`` Gram of ``Y``."""
    evals, evecs = torch.linalg.eigh(torch.bmm(Y, Y.transpose(1, 2)).double())
    evals = evals.flip(-1)[:, :k].clamp(min=0)
    V = evecs.flip(-1)[:, :, :k].to(Y.dtype)  # (n,r,k)
    S = evals.sqrt().to(Y.dtype)
    U = torch.bmm(Q, V)
    Vh = torch.bmm(V.transpose(1, 2), Y) / (S[:, :, None] + EPS)
    return U, S, Vh


def _top_svd_gram(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact leading triplets from the ``S x S`` Gram matrix (for small S)."""
    U, S = _top_eig(torch.bmm(X, X.transpose(1, 2)), k)
    Vh = torch.bmm(U.transpose(1, 2), X) / (S[:, :, None] + EPS)
    return U, S, Vh


# -- the solver ----------------------------------------------------------------


def _sq_error(
    XX: torch.Tensor, A: torch.Tensor, B: torch.Tensor, AtX: torch.Tensor, AtA: torch.Tensor | None = None
) -> torch.Tensor:
    """||X - AB||^2 per neuron (float64) from small products, never forming AB:
    ``||X||^2 - 2 <A^T X, B> + <A^T A, B B^T>``."""
    if AtA is None:
        AtA = torch.bmm(A.transpose(1, 2), A)
    BBt = torch.bmm(B, B.transpose(1, 2))
    cross = torch.linalg.vecdot(AtX.flatten(1), B.flatten(1)).double()
    quad = torch.linalg.vecdot(AtA.flatten(1), BBt.flatten(1)).double()
    return (XX - 2 * cross + quad).clamp(min=0)


@dataclass(frozen=True)
class _Settings:
    """The solver's settings, checked once."""

    k: int
    max_iter: int
    tol: float
    check_every: int
    inner_b: int
    inner_a: int

    def __post_init__(self) -> None:
        k, max_iter, tol, check_every, inner_b, inner_a = (self.k, self.max_iter, self.tol, self.check_every,
                                                            self.inner_b, self.inner_a)
        if k < 1 or max_iter < 0 or tol < 0 or check_every < 1 or inner_b < 1 or inner_a < 1:
            raise ValueError(
                "nmf: need k >= 1, max_iter >= 0, tol >= 0, check_every >= 1, inner_b >= 1, inner_a >= 1; got "
                f"k={k}, max_iter={max_iter}, tol={tol}, check_every={check_every}, inner_b={inner_b}, inner_a={inner_a}"
            )

    @property
    def sweeps(self) -> tuple[int, int, int, int]:
        """What :func:`_run` takes: max_iter, check_every, inner_b, inner_a."""
        return self.max_iter, self.check_every, self.inner_b, self.inner_a


class _Batch:
    """A batch of neurons being solved: their data, factors and progress.

    The sweeps work on ``Y (n, r, F)`` with ``X ~ Q @ Y`` (``Q (n, S, r)``
    orthonormal, the range finder's basis; see :func:`_start`) or, when
    ``Q`` is None, on ``Y = X`` itself. ``X`` holds the full matrices (rows
    ``xrow`` of it belong to this batch), used only for the true error of
    finished neurons. ``idx`` maps batch rows to neurons, ``its`` counts each
    neuron's sweeps, ``prev`` is each neuron's monitored squared error at its
    last check (``inf`` before the first), ``alive`` marks rows not yet
    finished (finished rows may stay in the batch for a while and are dropped
    at the next compaction). All rows are at the same sweep count modulo
    ``check_every`` (``phase``).
    """

    _ROWS = ("idx", "Q", "Y", "XX", "YY", "thr", "A", "B", "prev", "its", "xrow")

    def __init__(self, idx, X, xrow, Q, Y, XX, YY, thr, A, B, prev, its, phase=0):
        self.idx, self.X, self.xrow, self.Q, self.Y = idx, X, xrow, Q, Y
        self.XX, self.YY, self.thr, self.A, self.B = XX, YY, thr, A, B
        self.prev, self.its, self.phase = prev, its, phase
        self.alive = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
        self.n_alive = idx.shape[0]
        self.checked = False  # paused right after a check: do not check again on resuming

    def compact(self) -> None:
        if self.n_alive == self.idx.shape[0]:
            return
        keep = self.alive.nonzero().squeeze(1)
        for a in self._ROWS + ("alive",):
            v = getattr(self, a)
            if v is not None:
                setattr(self, a, v.index_select(0, keep))

    def detach_x(self) -> None:
        """Own copies of this batch's rows of X (before X's buffer is reused)."""
        self.X = self.X.index_select(0, self.xrow)
        self.xrow = torch.arange(self.X.shape[0], device=self.X.device)

    @staticmethod
    def merge(parts: list[_Batch]) -> _Batch:
        if len(parts) == 1:
            return parts[0]
        X = torch.cat([p.X for p in parts])
        f = {a: None if getattr(parts[0], a) is None else torch.cat([getattr(p, a) for p in parts]) for a in _Batch._ROWS}
        f["xrow"] = torch.arange(X.shape[0], device=X.device)
        merged = _Batch(X=X, phase=0, **f)
        merged.checked = True
        return merged


class _Out:
    """Where finished neurons' factors go."""

    def __init__(self, n: int, s: int, f: int, k: int, dtype: torch.dtype, device: torch.device):
        self.A = torch.zeros(n, s, k, dtype=dtype, device=device)
        self.B = torch.zeros(n, k, f, dtype=dtype, device=device)
        self.err2 = torch.zeros(n, dtype=torch.float64, device=device)
        self.sweeps = torch.zeros(n, dtype=torch.long, device=device)

    def result(self) -> NMFResult:
        # Unit-norm rows of B; the scale moves into A so the pictures carry magnitude.
        norms = self.B.norm(dim=2)  # (N,k)
        B = self.B / (norms[:, :, None] + EPS)
        A = self.A * norms[:, None, :]
        sw = self.sweeps
        return NMFResult(A=A, B=B, err=self.err2.sqrt().to(A.dtype), iterations=int(sw.max()) if sw.numel() else 0, sweeps=sw)


def _start(
    X: torch.Tensor, idx: torch.Tensor, k: int, tol: float, check_every: int, omega: torch.Tensor | None
) -> _Batch:
    """NNDSVDa start of a batch ``X (n, S, F)`` (dense, non-negative) of neurons ``idx``.

    When the range finder is used (``k + oversampling < S <= F``), its basis
    ``Q (n, S, r)`` and ``Y = Q^T X (n, r, F)`` are kept and the sweeps fit
    ``Q Y``, the projection of X on its leading ``r``-dimensional column space
    (r = 8 for k = 3): each product then reads ``r x F`` numbers per neuron
    instead of ``S x F`` (25 x F for 5x5 kernels). With 3 components the
    factorisation lives mostly in that leading subspace; measured against
    scikit-learn on the full X (5x5 and 7x7 kernels, structured and i.i.d.),
    the true reconstruction error of this fit is as close as that of the fit
    on X itself (see results/nmf_benchmark.md). The error reported is always
    the true one, ``||X - AB||``.
    """
    n, s, f = X.shape
    XX = torch.linalg.vector_norm(X, dim=(1, 2)).double().square()  # (n,)
    if not bool(torch.isfinite(XX).all()):
        raise ValueError("NMF needs finite input (NaN or Inf found)")
    r = k + _OVERSAMPLE
    Q = Y = None
    if r < s <= f:
        # the test matrix gets one more row of ones: the first product then also
        # gives X's row sums (for the mean NNDSVDa needs) without another pass
        om = omega if omega is not None and omega.shape == (r, f) else _omega(f, r, X)
        Y1 = torch.matmul(torch.cat([om, om.new_ones(1, f)]), X.transpose(1, 2))  # (n,r+1,S)
        total = Y1[:, r, :].sum(dim=1)
        Q, Y = _range_basis_from(X, Y1[:, :r, :].transpose(1, 2))
        U, S, Vh = _svd_from_basis(Q, Y, k)
    else:
        U, S, Vh = _top_svd(X, k, omega)
        total = X.sum(dim=(1, 2))
    avg = (total / max(1, s * f)).view(n, 1, 1)
    A, B = _nndsvda_from_svd(U, S, Vh, avg, k)
    YY = XX if Y is None else torch.linalg.vector_norm(Y, dim=(1, 2)).double().square()
    prev = torch.full((n,), float("inf"), dtype=torch.float64, device=X.device)
    its = torch.zeros(n, dtype=torch.long, device=X.device)
    xrow = torch.arange(n, device=X.device)
    return _Batch(idx, X, xrow, Q, X if Y is None else Y, XX, YY, tol * check_every * XX, A, B, prev, its)


def _true_sq_error(X: torch.Tensor, XX: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||X - AB||^2 per neuron: from one product with X, or from the residual
    itself where the fit is near-exact (there the sum of products cancels)."""
    AtX = torch.bmm(A.transpose(1, 2), X)
    e = _sq_error(XX, A, B, AtX)
    near = (e < 1e-2 * XX).nonzero().squeeze(1)
    if near.numel():
        res = torch.baddbmm(X.index_select(0, near), A.index_select(0, near), B.index_select(0, near), alpha=-1)
        e.index_copy_(0, near, torch.linalg.vector_norm(res, dim=(1, 2)).double().square())
    return e


def _run(
    b: _Batch,
    out: _Out,
    max_iter: int,
    check_every: int,
    inner_b: int,
    inner_a: int,
    pause_below: int = 0,
    defer_err: bool = False,
) -> _Batch | None:
    """HALS sweeps on a batch until every neuron is done (returns None) or, when
    ``pause_below > 0``, until fewer than ``pause_below`` neurons are left
    (returns the compacted batch, to be merged with other batches' stragglers).

    One sweep: ``inner_b`` passes over the rows of B per product ``A^T X``, then
    ``inner_a`` passes over the columns of A per product ``X B^T``. Every
    ``check_every`` sweeps each neuron's squared error (from the products the
    next sweep needs anyway) is compared with its value at the previous check;
    a neuron whose error fell by less than ``tol * check_every * ||X||^2``, or
    that has made ``max_iter`` sweeps, is done: its factors and true error are
    stored in ``out`` and it leaves the batch. Each neuron's trajectory depends
    on its own data only, never on the other rows of the batch. With
    ``defer_err`` the true errors of finished neurons are left to the caller.
    """
    it_hi = int(b.its.max())
    while True:
        A, B, Q, Y = b.A, b.B, b.Q, b.Y
        # AtX is the expensive product; all B passes of this sweep reuse it (accelerated HALS).
        At = A.transpose(1, 2)
        AtA = torch.bmm(At, A)  # (n,k,k)
        AtX = torch.bmm(At if Q is None else torch.bmm(At, Q), Y)  # (n,k,F)
        if b.checked:
            b.checked = False
        elif b.phase == 0 or it_hi >= max_iter:
            done = b.its >= max_iter
            if b.phase == 0:  # the tolerance test only at a neuron's own checks
                e = _sq_error(b.YY, A, B, AtX, AtA)
                done |= (b.prev - e) <= b.thr
                b.prev = e
            new = (done & b.alive).nonzero().squeeze(1)
            n_new = new.shape[0]
            if n_new:
                d = b.idx.index_select(0, new)
                Ad, Bd = A.index_select(0, new), B.index_select(0, new)
                if not defer_err:  # else the caller computes it for the whole chunk at once
                    Xd = b.X.index_select(0, b.xrow.index_select(0, new))
                    out.err2.index_copy_(0, d, _true_sq_error(Xd, b.XX.index_select(0, new), Ad, Bd))
                out.A.index_copy_(0, d, Ad)
                out.B.index_copy_(0, d, Bd)
                out.sweeps.index_copy_(0, d, b.its.index_select(0, new))
                b.alive &= ~done
                b.n_alive -= n_new
                if b.n_alive == 0:
                    return None
            n_rows = b.idx.shape[0]
            if pause_below and b.phase == 0 and b.n_alive < pause_below:
                b.compact()
                b.detach_x()
                b.checked = True
                return b
            if n_rows - b.n_alive >= max(1, n_rows // _COMPACT_AT):
                keep = b.alive.nonzero().squeeze(1)
                b.compact()
                A, B, Q, Y = b.A, b.B, b.Q, b.Y
                AtA, AtX = AtA.index_select(0, keep), AtX.index_select(0, keep)
        b.its += 1
        it_hi += 1
        b.phase = (b.phase + 1) % check_every
        # Row j: B_j <- max(0, (AtX_j - sum_{i != j} AtA_ji B_i) / AtA_jj), written in place.
        dA = AtA.diagonal(dim1=1, dim2=2).clamp(min=EPS)  # (n,k)
        cA = (AtA / dA[:, :, None]).unsqueeze(-1)  # row j scaled by 1/AtA_jj; (n,k,k,1)
        AtX.div_(dA[:, :, None])
        _hals_rows(B, AtX, cA, inner_b)
        # A given B: the subproblem is tiny (S x k), so several passes are cheap.
        BBt = torch.bmm(B, B.transpose(1, 2))  # (n,k,k)
        BXt = torch.bmm(B, Y.transpose(1, 2))  # (n,k,S) = (X B^T)^T, or (n,k,r) = (Y B^T)^T
        if Q is not None:
            BXt = torch.bmm(BXt, Q.transpose(1, 2))
        dB = BBt.diagonal(dim1=1, dim2=2).clamp(min=EPS)
        cB = (BBt / dB[:, :, None]).unsqueeze(-1)
        BXt.div_(dB[:, :, None])
        At = A.transpose(1, 2).contiguous()  # rows of A^T are A's columns
        _hals_rows(At, BXt, cB, inner_a)
        b.A = At.transpose(1, 2)


def _hals_rows(M: torch.Tensor, G: torch.Tensor, c: torch.Tensor, passes: int) -> None:
    """In place: ``passes`` rounds of exact coordinate minimisation over the rows
    of ``M`` (n,k,L) for ``min ||X - . M||`` given the scaled products
    ``G = (cross product) / diag`` (n,k,L) and ``c = Gram / diag`` (n,k,k,1).
    Row j: ``M_j <- max(0, G_j - sum_{i != j} c_ji M_i)``; all views are made
    once (the batch is small enough that per-call overhead counts)."""
    k = M.shape[1]
    rows, g = M.unbind(1), G.unbind(1)
    cr = [cj.unbind(1) for cj in c.unbind(1)]  # cr[j][i]: (n,1)
    plan = [(rows[j], g[j], [(cr[j][i], rows[i]) for i in range(k) if i != j]) for j in range(k)]
    for _ in range(passes):
        for row, gj, others in plan:
            if others:
                (c0, r0), rest = others[0], others[1:]
                torch.addcmul(gj, c0, r0, value=-1, out=row)
                for ci, ri in rest:
                    row.addcmul_(ci, ri, value=-1)
            else:
                row.copy_(gj)
            row.clamp_(min=0)


def _resolve_workers(workers: int | None, device: torch.device) -> int:
    if workers is None:
        return torch.get_num_threads() if device.type == "cpu" else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"nmf: workers must be at least 1, got {workers}")
    return int(workers)


def _chunk_size(n: int, per_neuron_bytes: int, device: torch.device, chunk_bytes: int | None, workers: int = 1) -> int:
    """Neurons per chunk, the chunks of a layer made equal in size. Default on
    the CPU: ~8 MB of input per chunk with one worker; with several, as many
    chunks as workers (or a multiple of it, so that none exceeds 64 MB; fewer
    chunks when the layer has less than 8 MB per worker): several threads
    contend for the Python interpreter between torch operations, so fewer,
    larger operations win there over cache locality (measured in
    results/nmf_benchmark.md). On a GPU: one chunk."""
    if n <= 0:
        return 1
    per = max(1, per_neuron_bytes)
    total = n * per
    if chunk_bytes is None and device.type == "cpu" and workers > 1:
        rounds = -(-total // (workers * _MAX_WORKER_CHUNK_BYTES))  # chunks per worker
        chunks = workers * rounds if total >= workers * _DEFAULT_CHUNK_BYTES else -(-total // _DEFAULT_CHUNK_BYTES)
    else:
        if chunk_bytes is None:
            chunk_bytes = _DEFAULT_CHUNK_BYTES if device.type == "cpu" else 0
        if chunk_bytes <= 0:
            return n
        chunks = -(-n // max(1, chunk_bytes // per))
    chunks = max(1, min(n, chunks))
    return -(-n // chunks)


def _solve_chunks(
    starts: list[int], n: int, step: int, chunk_x, out: _Out, om: torch.Tensor | None, cfg: _Settings
) -> None:
    """Solve the chunks of neurons starting at ``starts`` (each ``step`` long):
    ``chunk_x(i, j)`` gives the dense ``(j - i, S, F)`` posneg matrices of
    neurons ``i..j-1`` (it may reuse one buffer; rows that outlive their chunk
    are copied). A chunk runs until fewer than a quarter of its neurons are
    left; those stragglers are pooled with other chunks' stragglers and solved
    together, so that a few slow neurons do not cost many small sweeps."""
    pause = max(1, step // 4) if step < n else 0
    pool: list[_Batch] = []
    for pos, i in enumerate(starts):
        j = min(n, i + step)
        idx = torch.arange(i, j, device=out.A.device)
        xc = chunk_x(i, j)
        b = _start(xc, idx, cfg.k, cfg.tol, cfg.check_every, om)
        XX = b.XX
        rest = _run(b, out, *cfg.sweeps, pause, defer_err=True)
        # true errors of the chunk's finished neurons from one product with the chunk
        # (stragglers get theirs when they finish)
        out.err2[i:j] = _true_sq_error(xc, XX, out.A[i:j], out.B[i:j])
        if rest is not None:
            pool.append(rest)
        if sum(p.n_alive for p in pool) >= step and pos + 1 < len(starts):
            rest = _run(_Batch.merge(pool), out, *cfg.sweeps, pause)
            pool = [rest] if rest is not None else []
    if pool:
        _run(_Batch.merge(pool), out, *cfg.sweeps, 0)


def _drive(
    n: int,
    s: int,
    f: int,
    chunk_source,
    step: int,
    like: torch.Tensor,
    cfg: _Settings,
    workers: int | None = None,
) -> NMFResult:
    """Solve ``n`` neurons in chunks of ``step``. ``chunk_source()`` makes a
    chunk reader (see :func:`_solve_chunks`) with its own buffer.

    With ``workers > 1`` (default on the CPU: torch's thread count) the chunks
    are shared round-robin among that many Python threads, each solving its
    chunks as above with one torch thread: the operations on one chunk are too
    small to gain from torch's own threading, but whole chunks run in parallel
    (torch releases the GIL inside its operations). Every neuron is solved and
    stopped on its own, so the result does not depend on ``workers``.
    """
    out = _Out(n, s, f, cfg.k, like.dtype, like.device)
    if n == 0:
        return out.result()
    om = _omega(max(s, f), cfg.k + _OVERSAMPLE, like) if min(s, f) > cfg.k + _OVERSAMPLE else None
    starts = list(range(0, n, step))
    workers = min(_resolve_workers(workers, like.device), len(starts))
    if workers == 1:
        _solve_chunks(starts, n, step, chunk_source(), out, om, cfg)
        return out.result()
    inference = torch.is_inference_mode_enabled()

    def work(part: list[int], chunk_x) -> None:
        # grad and inference modes are per thread: the workers take the caller's
        with torch.inference_mode(inference), torch.no_grad():
            _solve_chunks(part, n, step, chunk_x, out, om, cfg)

    with _one_torch_thread():  # one torch thread per worker: no nested thread teams
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nmf") as ex:
            futures = [ex.submit(work, starts[w::workers], chunk_source()) for w in range(workers)]
            for fut in futures:
                fut.result()
    return out.result()


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "saved": 0}


@contextmanager
def _one_torch_thread():
    """torch's thread count is 1 inside; the first of several concurrent callers
    saves the count and the last one out restores it (the count is process-wide)."""
    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def nmf_batched(
    X: torch.Tensor,
    k: int = 3,
    max_iter: int = 200,
    tol: float = 1e-3,
    check_every: int = 3,
    inner_b: int = 2,
    inner_a: int = 2,
    check_input: bool = True,
    chunk_bytes: int | None = None,
    workers: int | None = None,
) -> NMFResult:
    """Factorise each ``X[n]`` (``(N, S, F)``, non-negative) as ``A[n] @ B[n]``.

    Neurons are processed in chunks of about ``chunk_bytes`` of input (default:
    8 MB on the CPU with one worker, so that every sweep reads from cache; with
    several, the layer split evenly among them, 8-64 MB each; all at once on a
    GPU; 0 = one chunk), shared among ``workers`` threads (default on the CPU:
    torch's thread count; see :func:`_drive`). Neither chunking nor threads
    change the result: every neuron is solved and stopped on its own (see
    :func:`_run`).
    """
    if X.dim() != 3:
        raise ValueError(f"expected a batch of matrices (N, S, F), got {tuple(X.shape)}")
    cfg = _Settings(k, max_iter, tol, check_every, inner_b, inner_a)
    X = X.detach()  # the solver is not differentiable (and writes into buffers in place)
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    if check_input and bool((X < 0).any()):
        raise ValueError("NMF needs non-negative input")
    n, s, f = X.shape
    workers = _resolve_workers(workers, X.device)
    step = _chunk_size(n, s * f * X.element_size(), X.device, chunk_bytes, workers)
    return _drive(n, s, f, lambda: lambda i, j: X[i:j].contiguous(), step, X, cfg, workers)


def reduce_kernels(
    weight: torch.Tensor,
    k: int = 3,
    max_iter: int = 200,
    tol: float = 1e-3,
    check_every: int = 3,
    inner_b: int = 2,
    inner_a: int = 2,
    chunk_bytes: int | None = None,
    workers: int | None = None,
) -> NMFResult:
    """Posneg NMF of every neuron of a conv layer; ``A`` reshaped to ``(N, kh, kw, k)``.

    Same result as ``nmf_batched(posneg(weight))``, but the posneg matrix of the
    whole layer is never built: each chunk's ``(n, kh*kw, 2*in)`` matrix is
    written into one reused buffer straight from the kernels (the layer's
    weights are read from main memory once, and no layer-sized array is
    allocated).
    """
    if weight.dim() != 4:
        raise ValueError(f"expected (out, in, kh, kw) kernels, got shape {tuple(weight.shape)}")
    cfg = _Settings(k, max_iter, tol, check_every, inner_b, inner_a)
    weight = weight.detach()  # the solver is not differentiable (and writes into buffers in place)
    if weight.dtype not in (torch.float32, torch.float64):
        weight = weight.float()
    n, c, kh, kw_ = weight.shape
    s, f = kh * kw_, 2 * c
    w = weight.reshape(n, c, s)
    workers = _resolve_workers(workers, w.device)
    step = _chunk_size(n, s * f * w.element_size(), w.device, chunk_bytes, workers)

    def chunk_source():
        buf = torch.empty(min(step, n), s, f, dtype=w.dtype, device=w.device)  # one per worker

        def chunk_x(i: int, j: int) -> torch.Tensor:
            wc = w[i:j].transpose(1, 2)  # (m,S,C) view
            xc = buf[: j - i]
            xc[:, :, :c].copy_(wc)
            torch.clamp(xc[:, :, :c], max=0, out=xc[:, :, c:]).neg_()
            xc[:, :, :c].clamp_(min=0)
            return xc

        return chunk_x

    res = _drive(n, s, f, chunk_source, step, w, cfg, workers)
    res.A = res.A.reshape(n, kh, kw_, k)
    return res
