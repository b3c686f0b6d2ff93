"""Eigenvalues of layer correlation matrices.

Normalisation: for a matrix W with N >= M (N the larger side) the empirical
spectral density (ESD) is the set of eigenvalues of ``X = W^T W / N`` (M
values; equivalently ``sigma_i^2 / N`` for the singular values of W). With this
scale an i.i.d. matrix with entry variance ``s^2`` has its Marchenko-Pastur
bulk on ``s^2 (1 -+ sqrt(M/N))^2``. Power-law exponents do not depend on the
scale; the norm metrics are computed from the unnormalised ``sigma_i^2`` (see
``metrics``).

How a layer becomes matrices:

* linear / attention / embedding: the (out, in) weight, one matrix; a fused
  projection (``layer.fused > 1``) is split into its parts, one ESD each;
* conv (out, in/groups, *kernel): ``conv_mode="slices"`` (default) takes each
  kernel position as its own (out x in/groups) matrix and pools the
  eigenvalues of all positions into one layer ESD (the kernel size is never a
  matrix dimension, for conv1d as for conv2d/3d); ``"reshape"`` uses the
  (out x in/groups * prod(kernel)) matrix instead. Depthwise convs (in/groups = 1,
  so each position would be a single vector) always use the reshaped matrix.

Computation: Gram matrix (the smaller side) and ``torch.linalg.eigvalsh``,
batched over kernel positions, on ``default_device()``. ``precision="auto"``
uses float64 for small matrices (cheap) and float32 for large ones; callers
re-run in float64 when the float32 resolution could move the fit (see
:func:`resolution_floor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import CONV_KINDS, Layer

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
# below this many multiply-adds in the Gram product, float64 costs nothing worth saving
SMALL_FLOPS = 2.0**31
# what an ``accept`` callback of :func:`partial_spectrum_of` returns to stop extending
# the top part and compute the whole spectrum at once
WHOLE = "whole"


@dataclass
class Spectrum:
    """The ESD of one matrix or of a pooled group of equally shaped matrices."""

    evals: np.ndarray  # ascending, normalised: sigma^2 / N, float64, all matrices pooled
    N: int  # larger side of each matrix
    M: int  # smaller side (eigenvalues per matrix)
    count: int  # number of matrices pooled
    fro2: float  # sum of sigma^2 (= squared Frobenius norm of all matrices)
    precision: str  # "float32" | "float64"
    per_matrix: np.ndarray | None = field(default=None, repr=False)  # (count, M) normalised
    # partial spectra (``spectrum="partial"``): the top ``computed`` eigenvalues of
    # each matrix only; eigenvalues below ``boundary`` (normalised) are incomplete
    computed: int | None = None
    boundary: float = 0.0
    extensions: int = 0
    # partial spectra: at and above ``settled_above`` every value has converged to
    # the tight tolerance; between ``boundary`` and it, to the looser one only
    settled_above: float = 0.0

    @property
    def partial(self) -> bool:
        return self.computed is not None and self.computed < self.M

    @property
    def raw_evals(self) -> np.ndarray:
        """Unnormalised squared singular values."""
        return self.evals * self.N

    @property
    def lambda_max(self) -> float:
        return float(self.evals[-1]) if self.evals.size else math.nan

    @property
    def floor(self) -> float:
        """Eigenvalues below this (normalised units) are not resolved."""
        return resolution_floor(self.lambda_max, self.M, self.precision)


def resolution_floor(lambda_max: float, M: int, precision: str) -> float:
    """Absolute error scale of Gram + eigvalsh eigenvalues: about sqrt(M) * eps *
    lambda_max (measured: 3e-6 * lambda_max for M = 1024 in float32); times 4 for
    safety."""
    eps = EPS32 if precision == "float32" else EPS64
    return 4.0 * math.sqrt(max(M, 1)) * eps * max(lambda_max, 0.0)


def matrix_stack(w: torch.Tensor, conv: bool, conv_mode: str = "slices") -> torch.Tensor:
    """A weight in canonical layout -> a (count, rows, cols) batch of matrices."""
    if w.dim() == 1:
        return w.reshape(1, 1, -1)
    if w.dim() == 2:
        return w.unsqueeze(0)
    if not conv or conv_mode == "reshape":
        return w.reshape(1, w.shape[0], -1)
    if conv_mode != "slices":
        raise ValueError(f"conv_mode must be 'slices' or 'reshape', not {conv_mode!r}")
    out, inn = w.shape[0], w.shape[1]
    k = int(np.prod(w.shape[2:]))
    # (out, in, *k) -> (k, out, in): every kernel position is its own matrix
    return w.reshape(out, inn, k).permute(2, 0, 1)


def layer_matrices(
    layer: Layer, weight: torch.Tensor | None = None, conv_mode: str = "slices"
) -> list[tuple[str, torch.Tensor]]:
    """``[(row name, (count, rows, cols) batch)]`` for one layer (fused parts split)."""
    w = layer.weight() if weight is None else weight
    parts = layer.split_fused(w) if layer.fused > 1 else [(layer.name, w)]
    conv = layer.kind in CONV_KINDS
    if conv and conv_mode == "slices" and w.dim() > 2 and min(w.shape[0] // max(layer.fused, 1), w.shape[1]) == 1:
        # depthwise (or single-channel) conv: every kernel position is a vector with
        # one singular value; the (out x prod(kernel)) matrix is the meaningful one
        conv_mode = "reshape"
    return [(name, matrix_stack(p, conv, conv_mode)) for name, p in parts]


def choose_precision(batch_shape: tuple[int, ...], precision: str) -> str:
    if precision in ("float32", "float64"):
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be auto, float32 or float64, not {precision!r}")
    count, a, b = batch_shape
    flops = float(count) * max(a, b) * min(a, b) ** 2
    return "float64" if flops <= SMALL_FLOPS else "float32"


def gram_eigvalsh(batch: torch.Tensor, dtype: torch.dtype, device=None, block_elems: int = 1 << 24) -> torch.Tensor:
    """Squared singular values (ascending, clamped at 0) of each matrix in a
    (count, rows, cols) batch, via the Gram matrix of the smaller side.

    The Gram matrix is accumulated over slabs of the long side, each converted to
    ``dtype`` on its own, so a bf16 layer never exists whole in float32/float64."""
    count, a, b = batch.shape
    small, long_ = min(a, b), max(a, b)
    out = []
    # matrices per step: a few at a time so that huge conv layers stay within memory
    per = max(1, block_elems // max(1, small * small))
    slab = max(1, block_elems // max(1, small * min(per, count)))
    for s in range(0, count, per):
        part = batch[s : s + per]
        if _use_syrk(small, dtype, device):
            ev = torch.stack([torch.linalg.eigvalsh(_syrk_gram(part[i], dtype, slab)) for i in range(part.shape[0])])
            out.append(ev.clamp_min_(0))
            continue
        g = torch.zeros(part.shape[0], small, small, dtype=dtype, device=device)
        for r in range(0, long_, slab):
            if a >= b:
                x = part[:, r : r + slab, :].to(device=device, dtype=dtype)
                g.baddbmm_(x.transpose(1, 2), x)
            else:
                x = part[:, :, r : r + slab].to(device=device, dtype=dtype)
                g.baddbmm_(x, x.transpose(1, 2))
            del x
        ev = torch.linalg.eigvalsh(g)
        del g
        out.append(ev.clamp_min_(0).cpu())
    return torch.cat(out, 0)


# on the CPU, Gram matrices at least this wide use BLAS syrk (one triangle: half
# the multiply-adds of a general matrix product); smaller ones stay batched
SYRK_MIN = 512


def _use_syrk(small: int, dtype: torch.dtype, device) -> bool:
    if small < SYRK_MIN or dtype not in (torch.float32, torch.float64):
        return False
    return device is None or torch.device(device).type == "cpu"


def _syrk_gram(mat: torch.Tensor, dtype: torch.dtype, slab: int) -> torch.Tensor:
    """Lower triangle of the Gram matrix of the smaller side of one (rows, cols)
    matrix by BLAS syrk, accumulated over slabs of the long side (each converted to
    ``dtype`` on its own). Only the lower triangle is filled: read it with
    ``eigvalsh(..., UPLO="L")`` (the default)."""
    from scipy.linalg import blas

    syrk = blas.ssyrk if dtype == torch.float32 else blas.dsyrk
    a, b = mat.shape
    g = None
    for r in range(0, max(a, b), slab):
        if a >= b:
            # rows slab x (r, b): G += x^T x; x^T of a C-ordered x is Fortran-ordered
            x = mat[r : r + slab, :].to(dtype=dtype).contiguous().numpy().T
        else:
            x = mat[:, r : r + slab].to(dtype=dtype).contiguous().numpy()
            x = np.asfortranarray(x)
        if g is None:
            g = syrk(1.0, x, trans=0, lower=1)
        else:
            g = syrk(1.0, x, beta=1.0, c=g, trans=0, lower=1, overwrite_c=1)
        del x
    return torch.from_numpy(g)


def spectrum_of(
    batch: torch.Tensor, precision: str = "auto", device=None, keep_per_matrix: bool = False
) -> Spectrum:
    """The pooled ESD of a (count, rows, cols) batch of matrices."""
    count, a, b = batch.shape
    N, M = max(a, b), min(a, b)
    prec = choose_precision(tuple(batch.shape), precision)
    dtype = torch.float32 if prec == "float32" else torch.float64
    sq = gram_eigvalsh(batch, dtype, device).to(torch.float64)  # (count, M)
    # the squared Frobenius norm from the weights themselves (exact, any precision)
    fro2 = frobenius2(batch)
    ev = (sq / N).numpy()
    pooled = np.sort(ev.reshape(-1))
    return Spectrum(
        evals=pooled,
        N=N,
        M=M,
        count=count,
        fro2=fro2,
        precision=prec,
        per_matrix=ev if keep_per_matrix else None,
    )


# ---------------------------------------------------------------------------
# partial spectra: the top of the spectrum by randomized block subspace iteration


def gram_matrix(mat: torch.Tensor, dtype: torch.dtype, device=None, block_elems: int = 1 << 24) -> torch.Tensor:
    """The full (symmetric) Gram matrix of the smaller side of one (rows, cols) matrix."""
    a, b = mat.shape
    small = min(a, b)
    slab = max(1, block_elems // max(1, small))
    if _use_syrk(small, dtype, device):
        g = _syrk_gram(mat, dtype, slab)
        return g.tril() + g.tril(-1).T
    g = torch.zeros(small, small, dtype=dtype, device=device)
    for r in range(0, max(a, b), slab):
        x = (mat[r : r + slab, :] if a >= b else mat[:, r : r + slab].T).to(device=device, dtype=dtype)
        g.addmm_(x.T, x)
    return g


class BlockKrylov:
    """Randomized block Krylov iteration for the top squared singular values of
    one (rows, cols) matrix, on the matrix itself, with no Gram matrix (Musco &
    Musco 2015; block Lanczos with full reorthogonalisation).

    The basis ``Q = [Q_0, Q_1, ...]`` of the Krylov space of ``W^T W`` grows by one
    block of ``block`` orthonormal vectors each :meth:`step`; the products
    ``Y_j = W Q_j`` are kept, so ``W Q = [Y_0, Y_1, ...]`` and the Ritz values (the
    squared singular values of ``W Q``, descending: the eigenvalues of the small
    matrix ``(W Q)^T (W Q)``, kept in float64 and grown by one block row a step)
    come without another product with W. They only grow towards the true values as the space grows; the
    leading ones whose relative change from one step to the next is at most
    ``tol`` count as converged. A step costs two products with W (4 N M b flops),
    the new block row of ``(W Q)^T (W Q)`` and its eigenvalues; the exact spectrum costs the
    Gram matrix (N M^2) plus a full eigendecomposition."""

    def __init__(self, mat: torch.Tensor, block: int, dtype: torch.dtype = torch.float32, device=None,
                 seed: int = 0, tol: float = 1e-5, loose_tol: float | None = None):
        w = mat.to(device=device, dtype=dtype)
        self.w = w.T if w.shape[0] < w.shape[1] else w  # (N, M): the Krylov space lives on the smaller side
        M = self.w.shape[1]
        self.block = max(1, min(block, M))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(M, self.block, generator=gen, dtype=dtype).to(self.w.device)
        self._next, _ = torch.linalg.qr(x)
        self._q: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []  # float64 copies of W Q_j
        self._gram = torch.zeros(0, 0, dtype=torch.float64, device=self.w.device)  # (W Q)^T (W Q)
        self.tol = tol
        self.loose_tol = tol if loose_tol is None else max(tol, loose_tol)
        self.values: torch.Tensor | None = None  # Ritz values, descending (float64, CPU)
        self.converged = 0
        self.loosely = 0  # leading values converged to ``loose_tol`` (>= ``converged``)

    @property
    def dim(self) -> int:
        """Dimension of the Krylov space so far."""
        return len(self._q) * self.block

    def step(self) -> int:
        """Add one block to the space; returns the converged prefix length."""
        q = self._next
        y = self.w @ q
        y64 = y.to(torch.float64)
        cross = torch.cat(self._y, 1).T @ y64 if self._y else y64[:, :0].T @ y64
        d = self._gram.shape[0]
        g = torch.zeros(d + y.shape[1], d + y.shape[1], dtype=torch.float64, device=y.device)
        g[:d, :d] = self._gram
        g[:d, d:] = cross
        g[d:, :d] = cross.T
        g[d:, d:] = y64.T @ y64
        self._gram = g
        self._q.append(q)
        self._y.append(y64)
        vals = torch.linalg.eigvalsh(g).flip(0).clamp_min(0).cpu()
        if self.values is not None:
            old = self.values
            n = old.numel()
            rel = (vals[:n] - old).abs() / vals[:n].clamp_min(torch.finfo(torch.float64).tiny)
            self.converged = int((rel <= self.tol).to(torch.int64).cumprod(0).sum())
            self.loosely = int((rel <= self.loose_tol).to(torch.int64).cumprod(0).sum())
        self.values = vals
        z = self.w.T @ y
        basis = torch.cat(self._q, 1)
        for _ in range(2):  # classical Gram-Schmidt, twice, against the whole basis
            z = z - basis @ (basis.T @ z)
        self._next, _ = torch.linalg.qr(z)
        return self.converged


def top_sq_singular_values(mat: torch.Tensor, k: int, dtype: torch.dtype = torch.float32, device=None,
                           seed: int = 0, tol: float = 1e-5, block: int = 32, max_dim: int | None = None) -> BlockKrylov:
    """Run :class:`BlockKrylov` until the top ``k`` have converged (or the space
    reaches ``max_dim``, default a third of the smaller side)."""
    it = BlockKrylov(mat, block, dtype, device, seed, tol)
    cap = max_dim if max_dim is not None else max(it.block, min(mat.shape) // 3)
    while it.step() < k and it.dim + it.block <= cap:
        pass
    return it


def partial_spectrum_of(
    batch: torch.Tensor,
    accept,
    precision: str = "auto",
    device=None,
    block: int = 32,
    tol: float = 1e-4,
    loose_tol: float = 1e-4,
    min_ready: int = 16,
    max_fraction: float = 1.0 / 8.0,
) -> Spectrum:
    """The top of the pooled ESD of a (count, rows, cols) batch, extended until
    ``accept(spectrum)`` is true (the caller checks that its fit's xmin lies well
    inside the computed part) or the whole spectrum is computed: after the budget
    below, or at once when ``accept`` returns ``WHOLE``.

    One :class:`BlockKrylov` per matrix (``block`` vectors a step, at least
    M / 128); after each step, once every matrix has at least ``min_ready``
    values converged to ``loose_tol``, those prefixes form the spectrum offered
    to ``accept``. Two tolerances, because the two parts of the top serve
    different ends: the fitted tail (the values a power law's alpha is computed
    from) must be converged tightly (``tol``; ``settled_above`` marks where that
    holds), while the values just below xmin only show that the fit would not
    move lower, and those, at the dense edge of the bulk, converge slowest. When
    the space would exceed ``max_fraction`` of the smaller side the whole
    spectrum is computed instead (Gram + eigvalsh): at M / 8 the steps so far
    have cost about half the exact computation (4 N M^2 / 8 flops against N M^2
    for the Gram matrix plus the eigendecomposition), so a layer that needs its
    whole spectrum costs at most about 1.5x exact. ``boundary`` is the largest
    of the matrices' smallest computed values: at and above it the pooled
    spectrum is complete. ``extensions`` counts the steps. The squared Frobenius
    norm comes from the weights, so trace-like sums stay exact."""
    count, a, b = batch.shape
    N, M = max(a, b), min(a, b)
    prec = choose_precision(tuple(batch.shape), precision)
    dtype = torch.float32 if prec == "float32" else torch.float64
    fro2 = frobenius2(batch)
    blk = max(int(block), int(math.ceil(M / 128)))
    cap = max_fraction * M
    its = ([BlockKrylov(batch[i], blk, dtype, device, seed=i, tol=tol, loose_tol=loose_tol) for i in range(count)]
           if 2 * blk <= cap else [])
    steps = 0
    last = (-1, -1)
    while its and its[0].dim + blk <= cap:
        for it in its:
            it.step()
        steps += 1
        done = min(it.loosely for it in its)
        tight = min(it.converged for it in its)
        if done >= min(min_ready, M) and (done, tight) != last:
            last = (done, tight)
            per = [it.values[:done].numpy() / N for it in its]
            above = max(float(it.values[tight - 1]) / N for it in its) if tight > 0 else math.inf
            sp = Spectrum(evals=np.sort(np.concatenate(per)), N=N, M=M, count=count, fro2=fro2,
                          precision=prec, computed=done, boundary=float(max(p[-1] for p in per)),
                          extensions=steps, settled_above=above)
            verdict = accept(sp)
            if isinstance(verdict, str):
                if verdict != WHOLE:
                    raise ValueError(f"accept returned {verdict!r}; it returns a bool or WHOLE")
                break
            if verdict:
                return sp
    del its
    ev = gram_eigvalsh(batch, dtype, device).to(torch.float64)
    return Spectrum(evals=np.sort((ev / N).numpy().reshape(-1)), N=N, M=M, count=count, fro2=fro2,
                    precision=prec, computed=M, boundary=0.0, extensions=steps)


def frobenius2(batch: torch.Tensor, chunk_elems: int = 1 << 22) -> float:
    """Squared Frobenius norm accumulated in float64, a slab at a time. Each slab
    is squared in place: squaring into a second fresh slab cost its page faults,
    five times the arithmetic (same sum, same order)."""
    flat = batch.reshape(-1)
    total = 0.0
    for s in range(0, flat.numel(), chunk_elems):
        # copy=True: float64 weights must not be squared in place
        total += float(flat[s : s + chunk_elems].to(torch.float64, copy=True).square_().sum())
    return total


def entry_variance(batch: torch.Tensor, chunk_elems: int = 1 << 22) -> float:
    """Mean over the matrices of each one's entry variance, summed in float64 by slabs."""
    count = batch.shape[0]
    flat = batch.reshape(count, -1)
    n = flat.shape[1]
    vs = []
    for i in range(count):
        s1 = s2 = 0.0
        for s in range(0, n, chunk_elems):
            x = flat[i, s : s + chunk_elems].to(torch.float64)
            s1 += float(x.sum())
            s2 += float(x.square().sum())
        mean = s1 / n
        vs.append(max(s2 / n - mean * mean, 0.0))
    return float(np.mean(vs))


def shuffled(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each matrix of the batch with its entries randomly permuted (seeded)."""
    count, a, b = batch.shape
    flat = batch.reshape(count, a * b)
    out = torch.empty_like(flat)
    idx = torch.int32 if a * b < 2**31 else torch.int64  # half the memory of the permutation
    for i in range(count):
        perm = torch.randperm(a * b, generator=generator, dtype=idx)
        out[i] = flat[i, perm]
        del perm
    return out.reshape(count, a, b)
