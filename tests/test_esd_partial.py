"""Partial spectra (``esd.spectrum=partial``): the top of the spectrum only,
extended until the fit's xmin lies well inside it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netanatomy.errors import UserError
import dataclasses

from netanatomy.spectral.analysis import SpectralAnalysis, SpectralOptions, partial_accepts, spectral_row
from netanatomy.spectral.esd import gram_matrix, partial_spectrum_of, spectrum_of, top_sq_singular_values
from netanatomy.spectral.powerlaw import fit_power_law


def _spiked(n=1536, m=768, spikes=40, seed=0):
    """Gaussian bulk plus ``spikes`` rank-one terms with Pareto strengths: a
    heavy tail of a few dozen eigenvalues above a Marchenko-Pastur bulk."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, m, generator=g, dtype=torch.float64) / math.sqrt(n)
    u, _ = torch.linalg.qr(torch.randn(n, spikes, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, spikes, generator=g, dtype=torch.float64))
    s = 2.5 * (1 - torch.rand(spikes, generator=g, dtype=torch.float64)) ** (-1 / 1.5)
    return (w + u @ torch.diag(s) @ v.T).to(torch.float32)


@pytest.mark.parametrize("transpose", [False, True])
def test_top_squared_singular_values_match_the_full_spectrum(transpose):
    w = _spiked(800, 400).double()
    g = gram_matrix(w, torch.float64)
    assert torch.allclose(g, w.T @ w, rtol=1e-10, atol=1e-10)
    full = torch.linalg.eigvalsh(g).flip(0)
    top = top_sq_singular_values(w.T if transpose else w, 20, torch.float64, tol=1e-9, max_dim=300)
    c = top.converged
    assert c >= 20
    assert torch.allclose(top.values[:c], full[:c], rtol=1e-6)
    # Ritz values never exceed the true ones
    n = top.values.numel()
    assert bool((top.values <= full[:n] * (1 + 1e-9)).all())


def test_the_spiked_tail_converges_first():
    w = _spiked(1536, 768)
    top = top_sq_singular_values(w, 40, torch.float32, max_dim=256)
    assert top.converged >= 30  # the 40 spikes stand well apart from the bulk
    full = torch.linalg.eigvalsh(w.double().T @ w.double()).flip(0)
    c = top.converged
    assert torch.allclose(top.values[:c], full[:c], rtol=1e-4)


@pytest.mark.parametrize("shape,seed", [((2048, 2048), 2), ((3072, 2048), 3)])
def test_partial_alpha_is_within_0_02_of_exact_on_a_heavy_tailed_matrix(shape, seed):
    # 40 spikes of which the fitted tail takes 14-19: the spikes converge long before the
    # bulk, and the top is accepted once it reaches the bulk's edge (44 values)
    w = _spiked(*shape, seed=seed).unsqueeze(0)
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial", partial_min_size=0))
    assert exact["spectrum"] == "full" and fast["spectrum"] == "partial"
    assert fast["evals_computed"] < w.shape[2] / 8  # only the top was computed
    assert abs(fast["alpha"] - exact["alpha"]) < 0.02
    assert fast["num_pl_spikes"] == exact["num_pl_spikes"]
    # sums from the weights: identical; the spectral norm: the same eigenvalue
    for key in ("log_norm", "stable_rank", "log_spectral_norm"):
        assert fast[key] == pytest.approx(exact[key], rel=1e-5)
    assert fast["matrix_rank"] is None and math.isnan(fast["entropy"])  # need every eigenvalue


def test_a_tail_reaching_into_the_bulk_falls_back_to_the_whole_spectrum():
    # the fitted tail is all 40 spikes: xmin sits at the bulk edge, whose values
    # converge too slowly to be worth computing from the top
    w = _spiked(2048, 1536, seed=0).unsqueeze(0)
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial", partial_min_size=0))
    assert exact["num_pl_spikes"] == 40
    assert fast["spectrum"] == "full" and fast["evals_computed"] == 1536
    assert abs(fast["alpha"] - exact["alpha"]) < 0.02


def test_the_whole_spectrum_is_computed_when_the_top_is_never_enough():
    torch.manual_seed(3)
    w = torch.distributions.StudentT(2.5).sample((1024, 512)).float().unsqueeze(0)
    calls = []

    def accept(sp):
        calls.append((sp.computed, sp.boundary))
        return False  # never satisfied: must fall back to the whole spectrum

    sp = partial_spectrum_of(w, accept, max_fraction=0.5)
    assert sp.computed == sp.M and sp.evals.size == 512 and not sp.partial
    assert calls and [c for c, _ in calls] == sorted(c for c, _ in calls)
    assert [b for _, b in calls] == sorted((b for _, b in calls), reverse=True)  # the part only grows
    full = np.sort(torch.linalg.eigvalsh(gram_matrix(w[0], torch.float64)).numpy() / 1024)
    assert np.allclose(sp.evals, full, rtol=1e-4, atol=1e-9)
    # through the analysis: the fit agrees with exact
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial", partial_min_size=0))
    assert exact["xmin"] >= 0 and fast["xmin"] == pytest.approx(exact["xmin"], rel=1e-4)
    assert abs(fast["alpha"] - exact["alpha"]) < 0.02


@pytest.mark.parametrize("seed", [1, 2])
def test_a_light_top_of_a_random_bulk_is_not_accepted(seed):
    # the top 16-24 eigenvalues of a Gaussian matrix: a fit over them alone settles
    # on 5-7 values with alpha 80-140 (the whole spectrum gives 15-19), and its xmin
    # passes the margin and top-half checks; only the light-tail rule refuses it
    opts = SpectralOptions(spectrum="partial")
    full = spectrum_of(torch.randn(1, 2048, 2048, generator=torch.Generator().manual_seed(seed)), "float32", "cpu")
    for k in (16, 20, 24):
        top = dataclasses.replace(full, evals=full.evals[-k:], computed=k, boundary=float(full.evals[-k]))
        assert top.partial
        assert not partial_accepts(top, opts)
        assert partial_accepts(top, dataclasses.replace(opts, partial_alpha_max=math.inf, partial_min_computed=0,
                                                        partial_give_up_alpha=math.inf))


def test_partial_boundary_is_the_largest_smallest_computed_value():
    w = torch.stack([_spiked(1200, 600, seed=s) for s in (0, 1)])
    sp = partial_spectrum_of(w, lambda sp: True, max_fraction=0.5)
    c = sp.computed
    assert sp.partial and sp.count == 2 and 2 <= c < 600 and sp.evals.size == 2 * c
    per = [torch.linalg.eigvalsh(gram_matrix(w[i], torch.float64)).numpy()[-c:] / 1200 for i in range(2)]
    assert sp.boundary == pytest.approx(max(p[0] for p in per), rel=1e-4)
    assert np.allclose(sp.evals, np.sort(np.concatenate(per)), rtol=1e-4)


def test_small_matrices_get_the_whole_spectrum_in_partial_mode():
    import netanatomy as na

    w = _spiked(seed=0).unsqueeze(0)  # smaller side 768 <= partial_min_size 1024
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial"))
    assert fast["spectrum"] == "full" and fast["evals_computed"] == 768
    assert fast["alpha"] == pytest.approx(exact["alpha"], rel=1e-9)
    with pytest.raises(UserError):
        SpectralAnalysis().run(na.load({"w": torch.zeros(4, 4)}), SpectralOptions(spectrum="partial", partial_min_size=-1))


def test_exact_stays_the_default_and_bad_spectrum_is_a_user_error(tiny_cnn):
    import netanatomy as na

    assert SpectralOptions().spectrum == "full"
    m = na.load(tiny_cnn)
    with pytest.raises(UserError):
        SpectralAnalysis().run(m, SpectralOptions(spectrum="sparse"))
    with pytest.raises(UserError):
        SpectralAnalysis().run(m, SpectralOptions(spectrum="partial", mp_fit=True))


def test_device_logic_runs_on_cpu():
    w = _spiked(1024, 512, spikes=12)
    sp = partial_spectrum_of(w.unsqueeze(0), lambda sp: True, device=torch.device("cpu"), max_fraction=0.5, min_ready=8)
    assert sp.evals.dtype == np.float64 and sp.partial


def test_a_short_top_part_is_not_accepted_when_the_tail_is_longer():
    """40 Pareto spikes on a Gaussian bulk (the benchmark's generator): a fit over the top 18
    eigenvalues accepted alpha 3.00 where the whole spectrum gives 1.79 (38 in the tail)."""
    import math

    g = torch.Generator().manual_seed(100)
    n = 4096
    w = torch.randn(n, n, generator=g) / math.sqrt(n)
    u, _ = torch.linalg.qr(torch.randn(n, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 40, generator=g))
    s = 2.5 * (1 - torch.rand(40, generator=g)) ** (-1 / 1.5)
    w = ((w + u @ torch.diag(s) @ v.T) * 0.05).unsqueeze(0)
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial"))
    assert fast["alpha"] == pytest.approx(exact["alpha"], abs=0.02)
    assert fast["evals_computed"] >= SpectralOptions().partial_min_computed  # refused at 18, as before the rule
    # the values below the tail are held to the looser tolerance only: the top part is
    # accepted (with the margin at 1e-4 this layer needed its whole spectrum)
    assert fast["spectrum"] == "partial" and fast["evals_computed"] < n


def test_the_fitted_tail_must_be_tightly_converged():
    """A top part whose tail reaches below the tightly converged values is refused, however
    well the loosely converged margin below it fits."""
    w = _spiked(seed=3).unsqueeze(0).double()
    full = spectrum_of(w, "float64")
    top = full.evals[-120:]
    base = dict(evals=top, N=full.N, M=full.M, count=1, fro2=full.fro2, precision="float64", computed=120,
                boundary=float(top[0]))
    opts = SpectralOptions(spectrum="partial")
    tight = dataclasses.replace(full, **base, settled_above=float(top[0]))
    assert partial_accepts(tight, opts)
    fit_xmin = float(top[-30])  # the 40 spikes' tail starts below the top 30
    loose = dataclasses.replace(full, **base, settled_above=fit_xmin)
    assert not partial_accepts(loose, opts)


def test_the_loose_tolerance_never_counts_fewer_values_than_the_tight_one():
    w = _spiked(seed=1)
    from netanatomy.spectral.esd import BlockKrylov

    it = BlockKrylov(w, 32, torch.float64, tol=1e-6, loose_tol=1e-9)  # a looser bound below tol is tol
    it2 = BlockKrylov(w, 32, torch.float64, tol=1e-6, loose_tol=1e-2)
    for _ in range(6):
        it.step()
        it2.step()
        assert it.loosely == it.converged
        assert it2.loosely >= it2.converged
    assert it2.loosely > it2.converged


def test_a_bulk_without_a_power_law_stops_the_iteration_early():
    """A Gaussian matrix's top is fitted with alpha far above partial_give_up_alpha: the
    whole spectrum is computed as soon as partial_min_computed values are in, not after
    the whole M / 8 budget."""
    from netanatomy.spectral.analysis import _partial

    n = 3072
    w = torch.randn(1, n, n, generator=torch.Generator().manual_seed(5)) / math.sqrt(n)
    opts = SpectralOptions(spectrum="partial")
    early = _partial(w, opts, "float32", None)
    late = _partial(w, dataclasses.replace(opts, partial_give_up_alpha=math.inf), "float32", None)
    assert not early.partial and not late.partial  # both end with every eigenvalue
    assert np.allclose(early.evals, late.evals)
    assert late.extensions == n // 8 // 32  # the budget: M / 8 in blocks of 32
    assert early.extensions < late.extensions


def test_give_up_verdict_and_its_option():
    from netanatomy.spectral.analysis import partial_verdict
    from netanatomy.spectral.esd import WHOLE

    full = spectrum_of(torch.randn(1, 2048, 2048, generator=torch.Generator().manual_seed(2)), "float32", "cpu")
    top = dataclasses.replace(full, evals=full.evals[-40:], computed=40, boundary=float(full.evals[-40]))
    opts = SpectralOptions(spectrum="partial")
    assert partial_verdict(top, opts) == WHOLE
    assert partial_accepts(top, opts) is False
    assert partial_verdict(top, dataclasses.replace(opts, partial_give_up_alpha=math.inf)) is False
    heavy = spectrum_of(_spiked(seed=3).unsqueeze(0), "float64")  # heavy tail: never a reason to give up
    htop = dataclasses.replace(heavy, evals=heavy.evals[-60:], computed=60, boundary=float(heavy.evals[-60]))
    assert partial_verdict(htop, opts) != WHOLE


def test_give_up_alpha_below_the_accept_limit_is_a_user_error(tiny_cnn):
    import netanatomy as na

    m = na.load(tiny_cnn)
    with pytest.raises(UserError, match="partial_give_up_alpha"):
        SpectralAnalysis().run(m, SpectralOptions(spectrum="partial", partial_give_up_alpha=5.0))
    with pytest.raises(UserError, match="partial_margin_tol"):  # tighter than the tail's own 1e-4
        SpectralAnalysis().run(m, SpectralOptions(spectrum="partial", partial_margin_tol=1e-5))
    with pytest.raises(UserError, match="partial_edge_factor"):
        SpectralAnalysis().run(m, SpectralOptions(spectrum="partial", partial_edge_factor=0.0))


def test_pooled_values_above_settled_above_are_tightly_converged():
    """Two pooled matrices converging at different speeds: in every top part offered to
    accept, the values at and above settled_above are the true eigenvalues (to 1e-8);
    below it, only loosely converged values appear."""
    w = torch.stack([_spiked(1536, 768, seed=0, spikes=40), _spiked(1536, 768, seed=1, spikes=10)]).double()
    true = np.sort(np.concatenate([torch.linalg.eigvalsh(gram_matrix(w[i], torch.float64)).numpy() / 1536
                                   for i in range(2)]))
    offered = []
    partial_spectrum_of(w, lambda sp: offered.append(sp) or False, precision="float64", loose_tol=1e-2,
                        max_fraction=0.4)
    assert offered

    def worst(values):
        return max((float(np.min(np.abs(true - v)) / v) for v in values), default=0.0)

    for sp in offered:
        assert worst(sp.evals[sp.evals >= sp.settled_above]) < 1e-8
    assert max(worst(sp.evals[sp.evals < sp.settled_above]) for sp in offered) > 1e-5  # the loose part is loose


def test_partial_option_checks_leave_exact_mode_alone(tiny_cnn):
    import netanatomy as na

    m = na.load(tiny_cnn)
    SpectralAnalysis().run(m, SpectralOptions(partial_alpha_max=15.0))  # exact mode: no partial check
    SpectralAnalysis().run(m, SpectralOptions(spectrum="partial", partial_alpha_max=math.inf,
                                              partial_give_up_alpha=math.inf))


def test_rest_edge_of_a_gaussian_top_is_its_bulk_edge():
    """With only a Gaussian bulk, the Marchenko-Pastur edge estimated from the energy not
    yet computed lies just below the top of the bulk (the computed top's energy is left out)."""
    from netanatomy.spectral.analysis import rest_edge

    g = torch.Generator().manual_seed(4)
    full = spectrum_of((torch.randn(1, 2048, 1024, generator=g, dtype=torch.float64) / math.sqrt(2048)), "float64")
    for k in (30, 60, 120):
        top = dataclasses.replace(full, evals=full.evals[-k:], computed=k, boundary=float(full.evals[-k]))
        assert 0.8 * float(full.evals[-1]) < rest_edge(top) <= float(full.evals[-1])
    assert rest_edge(full) == math.inf  # nothing left to estimate


def test_a_top_far_above_the_bulk_is_not_accepted_on_a_long_tail():
    """150 spikes: tops of the exact spectrum far above the bulk were accepted with alpha off
    by 0.33 before the bulk-edge rule; with it, no top that short is accepted wrongly."""
    w = _spiked(1536, 768, spikes=150, seed=0).unsqueeze(0).double()
    full = spectrum_of(w, "float64")
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    opts = SpectralOptions(spectrum="partial")

    def wrong_accepts(o):
        out = []
        for c in range(28, 192, 4):
            top = dataclasses.replace(full, evals=full.evals[-c:], computed=c, boundary=float(full.evals[-c]))
            if partial_accepts(top, o):
                fit = fit_power_law(top.evals, min_tail=o.min_tail, ks=o.ks)
                if abs(fit.alpha - exact["alpha"]) > 0.02:
                    out.append(c)
        return out

    assert wrong_accepts(dataclasses.replace(opts, partial_edge_factor=math.inf))  # the failure the rule is for
    assert not wrong_accepts(opts)
