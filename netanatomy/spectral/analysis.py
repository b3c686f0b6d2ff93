"""Spectral health (analysis ``esd``): heavy-tailed self-regularisation metrics
per layer, from the eigenvalue spectrum of each weight matrix.

One row per matrix-bearing layer (fused q/k/v projections give one row per part,
conv layers one pooled row plus, with ``per_slice``, one row per kernel
position). Layers run in parallel threads (one BLAS thread each) on CPU, on the
GPU when ``default_device()`` is CUDA. A layer that fails yields one row with
its reason; a fit that fails or means nothing yields NaN and a reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .._util import default_device
from ..analysis import Analysis, AnalysisResult, register_analysis
from ..errors import LayerError, UserError
from ..model import CONV_KINDS, Layer, LayerKind, Model
from .esd import (
    WHOLE,
    Spectrum,
    choose_precision,
    entry_variance,
    layer_matrices,
    partial_spectrum_of,
    resolution_floor,
    shuffled,
    spectrum_of,
)
from .metrics import mp_fit, norm_metrics, randomization_metrics
from .powerlaw import PowerLawFit, compare_tail, fit_power_law, hill_alpha

SPECTRAL_KINDS = frozenset(
    {LayerKind.LINEAR, LayerKind.ATTENTION, LayerKind.EMBEDDING, LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.CONV3D}
)
# layers with at least this many weights run one at a time (memory, not speed)
BIG_LAYER = 64 * 2**20
OVER_TRAINED = 2.0
UNDER_TRAINED = 6.0

# the columns of a row, in order (MP and randomisation columns only when asked for)
COLUMNS = [
    "layer", "kind", "N", "M", "slices", "num_evals", "alpha", "alpha_hill", "alpha_weighted", "D", "xmin", "xmax",
    "sigma", "num_pl_spikes", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
    "matrix_rank", "entropy", "lambda_max", "best_fit", "lr_pl_tpl", "p_pl_tpl", "lr_pl_exp",
    "p_pl_exp", "warning", "fit_reason", "precision", "spectrum", "evals_computed",
]
MP_COLUMNS = ["sigma_mp", "mp_lambda_minus", "mp_lambda_plus", "num_spikes", "mp_softrank"]
RAND_COLUMNS = ["rand_lambda_max", "rand_mp_lambda_plus", "rand_distance", "rand_softrank", "num_traps"]
SUMMARY_METRICS = ["log_norm", "alpha", "alpha_hill", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
                   "mp_softrank", "rand_distance"]


@dataclass
class SpectralOptions:
    conv_mode: Literal["slices", "reshape"] = "slices"  # conv: kernel positions pooled, or one reshaped matrix
    per_slice: bool = False  # conv: also one row per kernel position
    min_tail: int = 5  # fewest eigenvalues in a fitted tail
    ks: Literal["plfit", "sup"] = "plfit"  # KS distance variant (see powerlaw.py)
    compare: bool = True  # likelihood ratios PL vs truncated PL vs exponential
    mp_fit: bool = False  # Marchenko-Pastur bulk fit
    randomize: bool = False  # ESD of the entry-shuffled matrix, correlation traps
    seed: int = 0  # for randomize
    precision: Literal["auto", "float32", "float64"] = "auto"
    alpha_tol: float = 1e-3  # auto precision: redo in float64 if float32 could move alpha by more
    # (or by more than 5% of the fit's standard error sigma, if that is larger)
    workers: int = 0  # layers in parallel; 0 = one per CPU core (1 on GPU)
    base: str | None = None  # path of a base model: analyse W - W_base, layers matched by name
    keep_spectra: bool = True  # keep eigenvalues in result.extras for pictures
    # "full": every eigenvalue (Gram + eigvalsh); "partial": the top of the spectrum
    # only (randomized block Krylov iteration), extended until the fit's xmin lies well inside it
    spectrum: Literal["full", "partial"] = "full"
    partial_margin: float = 0.2  # partial: xmin must lie above this fraction of the computed part
    partial_min_size: int = 1024  # partial: matrices with a smaller side up to this get every eigenvalue
    partial_alpha_max: float = UNDER_TRAINED  # partial: a lighter tail than this needs the whole spectrum
    partial_min_computed: int = 28  # partial: never accept a top part of fewer eigenvalues than this
    # partial: relative step-to-step change at which values below the fitted tail count as
    # computed (the tail itself is held to 1e-4)
    partial_margin_tol: float = 1e-2
    # partial: a top part (of at least partial_min_computed values) fitted with a tail lighter
    # than this stops the iteration at once: the whole spectrum is computed
    partial_give_up_alpha: float = 12.0
    # partial: the top must reach down to this many times the Marchenko-Pastur edge of the
    # energy not yet computed (below it, more of the tail may lie)
    partial_edge_factor: float = 1.5
    hill_xmin_pos: float = 2.0  # PL_Alpha_Hill: the tail is the top n - floor(n / hill_xmin_pos) values


def _warning(alpha: float, reason: str | None) -> str:
    if reason is not None or not math.isfinite(alpha):
        return "failed fit"
    if alpha < OVER_TRAINED:
        return "over-trained"
    if alpha > UNDER_TRAINED:
        return "under-trained"
    return ""


def _fit_values(sp: Spectrum, options: SpectralOptions) -> tuple[PowerLawFit, np.ndarray]:
    lmax = sp.lambda_max
    if not (lmax > 0):
        return PowerLawFit(reason="all eigenvalues are zero (zero matrix)"), sp.evals[:0]
    # drop eigenvalues that are zero within the resolution of the computation
    thr = max(4.0 * resolution_floor(lmax, sp.M, sp.precision), 0.0)
    ev = sp.evals[sp.evals > thr]
    if sp.partial:
        ev = ev[ev >= sp.boundary]  # below the boundary the pooled spectrum is incomplete
    fit = fit_power_law(ev, min_tail=options.min_tail, ks=options.ks)
    if fit.reason and ev.size < sp.evals.size and ev.size < options.min_tail:
        fit.reason += f"; {sp.evals.size - ev.size} of {sp.evals.size} eigenvalues are numerically zero"
    return fit, ev


def _alpha_error_bound(sp: Spectrum, fit: PowerLawFit) -> float:
    """How far eigenvalue errors of the size measured for the precision used
    (about sqrt(M) eps lambda_max, a quarter of the resolution floor) could move
    alpha if they all pushed the same way."""
    if not fit.ok:
        return 0.0
    err = sp.floor / 4.0
    tail = sp.evals[sp.evals >= fit.xmin]
    denom = float(np.log(tail / fit.xmin).sum())
    if denom <= 0 or fit.xmin <= err:
        return math.inf
    spread = float((err / tail).sum()) + tail.size * err / (fit.xmin - err)
    return (fit.alpha - 1.0) * spread / denom


def spectral_row(
    name: str,
    kind: str,
    batch: torch.Tensor,
    options: SpectralOptions,
    device=None,
    seed_key: str | None = None,
) -> tuple[dict, dict]:
    """Metrics of one (count, rows, cols) batch of matrices -> (row, extras)."""
    t0 = time.perf_counter()
    partial = options.spectrum == "partial"
    if partial:
        sp = _partial(batch, options, options.precision, device)
    else:
        sp = spectrum_of(batch, options.precision, device, keep_per_matrix=options.per_slice and batch.shape[0] > 1)
    fit, ev = _fit_values(sp, options)
    # float32 is kept when its eigenvalue errors cannot move alpha by more than
    # alpha_tol or 5% of the fit's own standard error, whichever is larger
    tol = max(options.alpha_tol, 0.05 * fit.sigma) if fit.ok else options.alpha_tol
    if sp.precision == "float32" and options.precision == "auto" and _alpha_error_bound(sp, fit) > tol:
        if partial and sp.partial:
            sp = _partial(batch, options, "float64", device)
        else:  # exact mode, or partial mode that ended with the whole spectrum
            sp = spectrum_of(batch, "float64", device, keep_per_matrix=sp.per_matrix is not None)
        fit, ev = _fit_values(sp, options)
    if sp.partial:
        a_hill, _ = hill_alpha(ev, options.hill_xmin_pos, n_total=sp.count * sp.M)
    else:
        a_hill, _ = hill_alpha(ev, options.hill_xmin_pos)
    row: dict[str, Any] = {
        "layer": name,
        "kind": kind,
        "N": sp.N,
        "M": sp.M,
        "slices": sp.count,
        "num_evals": int(sp.evals.size),
        "alpha": fit.alpha,
        "alpha_hill": a_hill,
        "D": fit.D,
        "xmin": fit.xmin,
        "xmax": fit.xmax,
        "sigma": fit.sigma,
        "num_pl_spikes": fit.n_tail,
    }
    row.update(norm_metrics(sp, fit.alpha))
    row["lambda_max"] = sp.lambda_max
    if options.compare and fit.ok:
        cmp = compare_tail(ev, fit)
        row.update(best_fit=cmp.best, lr_pl_tpl=cmp.R_tpl, p_pl_tpl=cmp.p_tpl, lr_pl_exp=cmp.R_exp, p_pl_exp=cmp.p_exp)
    row["warning"] = _warning(fit.alpha, fit.reason)
    row["fit_reason"] = fit.reason
    row["precision"] = sp.precision
    row["spectrum"] = "partial" if sp.partial else "full"
    row["evals_computed"] = int(sp.evals.size)
    extras: dict[str, Any] = {"evals": sp.evals, "fit": (fit.alpha, fit.xmin, fit.xmax, fit.n_tail)}
    if options.mp_fit:
        mp = mp_fit(sp)
        row.update(mp)
        extras["mp"] = (mp["mp_lambda_minus"], mp["mp_lambda_plus"], mp["sigma_mp"])
    if options.randomize:
        gen = torch.Generator().manual_seed(int(options.seed) * 1_000_003 + zlib.crc32((seed_key or name).encode()))
        shuf = shuffled(batch, gen)
        rsp = spectrum_of(shuf, sp.precision, device)
        var = entry_variance(batch)
        row.update(randomization_metrics(sp, rsp, var))
        extras["rand_evals"] = rsp.evals
    row["seconds"] = time.perf_counter() - t0
    if sp.per_matrix is not None:
        extras["per_matrix"] = sp.per_matrix
    return row, extras


def partial_verdict(sp: Spectrum, options: SpectralOptions) -> bool | str:
    """What a partial spectrum is good for: True when it is enough for the
    power-law fit (see :func:`partial_accepts`), ``WHOLE`` when its fit says to stop
    extending it and compute the whole spectrum, False when it should be extended.

    ``WHOLE`` is for a top of at least ``partial_min_computed`` values whose fitted
    tail is lighter than ``partial_give_up_alpha`` (12): the top of a bulk without a
    power law. Such a top is not accepted (alpha above ``partial_alpha_max``) and, in
    what we have seen, neither is a longer one, so extending the top to the budget
    would only add its cost to the exact computation
    (on random weights: x1.65 the dense floor, the Llama-shaped run). On the
    benchmark's layers the two kinds were far apart at every step: fits of 16-92
    top values gave alpha 1.7-3.0 on heavy tails and 20-85 on Gaussian matrices."""
    fit, ev = _fit_values(sp, options)
    if ev.size < options.partial_min_computed:
        return False
    if fit.ok and fit.alpha > options.partial_give_up_alpha:
        return WHOLE
    if not (fit.ok and fit.n_tail <= (1.0 - options.partial_margin) * ev.size):
        return False
    if not fit.xmin >= sp.settled_above:  # the fitted tail must be tightly converged
        return False
    if not sp.boundary <= options.partial_edge_factor * rest_edge(sp):
        return False
    if not fit.alpha <= options.partial_alpha_max:
        return False
    half = fit_power_law(ev[ev.size // 2 :], min_tail=options.min_tail, ks=options.ks)
    return half.ok and math.isclose(half.xmin, fit.xmin, rel_tol=1e-6)


def rest_edge(sp: Spectrum) -> float:
    """Where the bulk of the eigenvalues not yet computed would end if they were a
    Marchenko-Pastur bulk: their mean (the squared Frobenius norm, which the weights
    give exactly, less the computed values) times (1 + sqrt(M / N))^2. A top whose
    smallest value lies far above it has not reached the bulk: more of the tail may
    lie below, and a fit over the top alone can settle on a wrong xmin."""
    missing = sp.count * sp.M - sp.evals.size
    if missing <= 0:
        return math.inf
    rest_mean = (sp.fro2 / sp.N - float(sp.evals.sum())) / missing
    return max(rest_mean, 0.0) * (1.0 + math.sqrt(sp.M / sp.N)) ** 2


def partial_accepts(sp: Spectrum, options: SpectralOptions) -> bool:
    """Whether a partial spectrum is enough for the power-law fit, by every rule of
    :func:`partial_verdict`: at least ``partial_min_computed`` values; the fit's
    xmin above the lowest ``partial_margin`` of the computed part and its tail
    tightly converged (at or above ``settled_above``); the top reaching the bulk
    (``rest_edge``); a heavy tail (alpha at most ``partial_alpha_max``: on random
    matrices a fit over the top 20 eigenvalues settles on 5-10 of them with alpha
    near 100, where the whole spectrum gives 15-25); and the fit on the top half of
    the computed part picking the same xmin (a lower xmin, outside the computed
    part, would have shown up as a change between the two)."""
    return partial_verdict(sp, options) is True


def _partial(batch: torch.Tensor, options: SpectralOptions, precision: str, device) -> Spectrum:
    """The top of the spectrum, extended until ``partial_accepts`` holds. Matrices
    whose smaller side is at most ``partial_min_size`` get the whole spectrum: it
    costs little there, and on small matrices the tail is often most of the
    spectrum, where a top-only fit can settle on a wrong xmin."""
    if min(batch.shape[1:]) <= options.partial_min_size:
        return spectrum_of(batch, precision, device)
    return partial_spectrum_of(batch, lambda sp: partial_verdict(sp, options), precision, device,
                               loose_tol=options.partial_margin_tol)


def _slice_labels(kernel: tuple[int, ...]) -> list[str]:
    return [",".join(map(str, idx)) for idx in np.ndindex(*kernel)]


@dataclass
class SpectralRun:
    """Per-run state of ``esd``: the device, the base model (for ``base``), and
    a lock that keeps at most one very large layer in memory at a time."""

    model: Model
    device: Any
    base: Model | None = None
    big: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))


@register_analysis("esd")
class SpectralAnalysis(Analysis):
    title = "Spectral health (ESD)"
    description = (
        "Eigenvalue spectrum of each layer's correlation matrix W^T W / N and a power-law fit of its "
        "tail (Clauset-Shalizi-Newman). alpha in [2, 6] is typical of well-trained layers; alpha < 2 "
        "flags over-trained layers, alpha > 6 under-trained ones. Also norm metrics, ranks, entropy, "
        "tail-model comparisons and, on request, the Marchenko-Pastur bulk and randomisation tests."
    )
    Options = SpectralOptions

    def applies_to(self, layer: Layer) -> bool:
        return layer.kind in SPECTRAL_KINDS and len(layer.shape) >= 2

    def prepare(self, model: Model, options: SpectralOptions) -> SpectralRun:
        if options.spectrum not in ("full", "partial"):
            raise UserError(f"esd.spectrum must be full or partial, not {options.spectrum!r}")
        if options.spectrum == "partial" and (options.mp_fit or options.randomize or options.per_slice):
            raise UserError("esd.spectrum=partial computes the top of the spectrum only; mp_fit, randomize and "
                            "per_slice need the full spectrum")
        if options.partial_min_size < 0:
            raise UserError(f"esd.partial_min_size must be >= 0, not {options.partial_min_size!r}")
        if options.spectrum == "partial" and not options.partial_give_up_alpha >= options.partial_alpha_max:
            raise UserError(f"esd.partial_give_up_alpha must be at least esd.partial_alpha_max "
                            f"({options.partial_alpha_max!r}), not {options.partial_give_up_alpha!r}")
        if not options.partial_edge_factor > 0:
            raise UserError(f"esd.partial_edge_factor must be > 0, not {options.partial_edge_factor!r}")
        if not (1e-4 <= options.partial_margin_tol <= 0.1):  # the tail's own tolerance is 1e-4
            raise UserError(f"esd.partial_margin_tol must lie in [1e-4, 0.1], not {options.partial_margin_tol!r}")
        if not (0.0 <= options.partial_margin < 1.0):
            raise UserError(f"esd.partial_margin must lie in [0, 1), not {options.partial_margin!r}")
        base = None
        if options.base:
            from ..io import load

            base = load(options.base)
        # no scipy here: the fits need none (powerlaw.py), and the Gram product's
        # BLAS (scipy.linalg, 0.3 s to import) is imported by the first layer large
        # enough to use it (esd._syrk_gram)
        return SpectralRun(model, default_device(), base)

    def layer_workers(self, layers: list[Layer], options: SpectralOptions, context: SpectralRun) -> int:
        if options.workers > 0:
            return options.workers
        return 1 if context.device.type != "cpu" else max(1, min(os.cpu_count() or 1, len(layers)))

    # -- one layer ------------------------------------------------------------
    @staticmethod
    def _weight(layer: Layer, base: Model | None) -> torch.Tensor:
        # kept in its stored dtype (bf16 stays bf16); slabs are converted as they are used
        w = layer.weight(dtype=None)
        if not w.is_floating_point() or w.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            w = w.to(torch.float32)
        if base is None:
            return w
        w = w.to(torch.float32)
        if layer.name not in base:
            raise LayerError(f"{layer.name}: no layer of that name in the base model")
        wb = base[layer.name].weight(dtype=torch.float32)
        if tuple(wb.shape) != tuple(w.shape):
            raise LayerError(f"{layer.name}: shape {tuple(w.shape)} differs from the base model's {tuple(wb.shape)}")
        return w - wb

    def analyze_layer(self, layer: Layer, options: SpectralOptions, context: SpectralRun) -> list[dict]:
        if _numel(layer.shape) >= BIG_LAYER:
            with context.big:  # at most one very large layer (embedding, LM head) in memory at a time
                return self._rows(layer, options, context)
        return self._rows(layer, options, context)

    def _rows(self, layer: Layer, options: SpectralOptions, context: SpectralRun) -> list[dict]:
        w = self._weight(layer, context.base)
        device = context.device
        rows = []
        for name, batch in layer_matrices(layer, w, options.conv_mode):
            row, extras = spectral_row(name, str(layer.kind), batch, options, device)
            if layer.fused > 1:
                row["part"] = name[len(layer.name):].strip("[]")
            row["_extras"] = extras
            rows.append(row)
            per = extras.pop("per_matrix", None)
            if per is not None and options.per_slice and layer.kind in CONV_KINDS:
                labels = _slice_labels(layer.kernel_size)
                for k, lab in enumerate(labels):
                    srow, sx = spectral_row(
                        f"{name}[pos={lab}]", str(layer.kind), batch[k : k + 1],
                        dataclasses.replace(options, per_slice=False), device,
                    )
                    srow["slice"] = lab
                    srow["_extras"] = sx
                    rows.append(srow)
        return rows

    def summarize(self, records: list[dict], options: SpectralOptions, context: SpectralRun) -> dict:
        return summarize_rows(records)

    def finalize(self, result: AnalysisResult, context: SpectralRun) -> None:
        spectra: dict[str, dict] = {}
        for r in result.records:
            ex = r.pop("_extras", None)
            if ex is not None and result.options.get("keep_spectra", True):
                spectra[r["layer"]] = ex
        result.extras["spectra"] = spectra


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def summarize_rows(records: list[dict]) -> dict:
    """Model-level means over layer rows (per-slice rows excluded), as the peer's
    ``get_summary``, plus counts of flagged layers."""
    rows = [r for r in records if "slice" not in r and not r.get("error")]
    out: dict[str, Any] = {}
    for key in SUMMARY_METRICS:
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        if vals:
            out[key] = float(np.mean(vals))
    out["over_trained"] = sum(1 for r in rows if r.get("warning") == "over-trained")
    out["under_trained"] = sum(1 for r in rows if r.get("warning") == "under-trained")
    out["failed_fits"] = sum(1 for r in rows if r.get("warning") == "failed fit")
    return out


def describe(model: Model, options: SpectralOptions | None = None) -> list[dict]:
    """What ``esd`` would compute, without reading any tensor: one row per ESD
    with matrix sizes, eigenvalue counts and the precision ``auto`` starts with."""
    options = options or SpectralOptions()
    rows = []
    for layer in model.layers:
        if layer.kind not in SPECTRAL_KINDS or len(layer.shape) < 2:
            continue
        shape = tuple(layer.shape)
        out = shape[0] // max(layer.fused, 1)
        rest = shape[1:]
        if layer.kind in CONV_KINDS and options.conv_mode == "slices" and min(out, rest[0]) > 1:
            count, a, b = int(np.prod(rest[1:])) if len(rest) > 1 else 1, out, rest[0]
        else:
            count, a, b = 1, out, int(np.prod(rest))
        parts = ("q", "k", "v") if layer.fused == 3 else tuple(str(i) for i in range(layer.fused)) if layer.fused > 1 else (None,)
        for p in parts:
            rows.append(
                {
                    "layer": layer.name if p is None else f"{layer.name}[{p}]",
                    "kind": str(layer.kind),
                    "N": max(a, b),
                    "M": min(a, b),
                    "slices": count,
                    "num_evals": count * min(a, b),
                    "precision": choose_precision((count, a, b), options.precision),
                    "dtype": layer.dtype,
                }
            )
    return rows


def analyze(model_or_path, **options) -> AnalysisResult:
    """Convenience: ``analyze("model.safetensors", mp_fit=True)``."""
    from ..io import load

    model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)
    names = {f.name for f in dataclasses.fields(SpectralOptions)}
    bad = set(options) - names
    if bad:
        raise UserError(f"esd has no option {', '.join(sorted(bad))} (options: {', '.join(sorted(names))})")
    return SpectralAnalysis().run(model, SpectralOptions(**options))
