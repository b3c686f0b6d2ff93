"""Partial spectra (``esd.spectrum=partial``): the top of the spectrum only,
extended until the fit's xmin lies well inside it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netanatomy.errors import UserError
from netanatomy.spectral.analysis import SpectralAnalysis, SpectralOptions, spectral_row
from netanatomy.spectral.esd import gram_matrix, partial_spectrum_of, top_eigvalsh


def _spiked(n=1536, m=768, spikes=40, seed=0):
    """Gaussian bulk plus ``spikes`` rank-one terms with Pareto strengths: a
    heavy tail of a few dozen eigenvalues above a Marchenko-Pastur bulk."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, m, generator=g, dtype=torch.float64) / math.sqrt(n)
    u, _ = torch.linalg.qr(torch.randn(n, spikes, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, spikes, generator=g, dtype=torch.float64))
    s = 2.5 * (1 - torch.rand(spikes, generator=g, dtype=torch.float64)) ** (-1 / 1.5)
    return (w + u @ torch.diag(s) @ v.T).to(torch.float32)


def test_top_eigvalsh_matches_the_full_spectrum():
    w = _spiked(800, 400).double()
    g = gram_matrix(w, torch.float64)
    assert torch.allclose(g, w.T @ w, rtol=1e-10, atol=1e-10)
    full = torch.linalg.eigvalsh(g)
    top = top_eigvalsh(g, 40)
    assert torch.allclose(top, full[-40:], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_alpha_is_within_0_02_of_exact_on_a_heavy_tailed_matrix(seed):
    w = _spiked(seed=seed).unsqueeze(0)
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial"))
    assert exact["spectrum"] == "full" and fast["spectrum"] == "partial"
    assert fast["evals_computed"] < w.shape[2] / 2  # only the top was computed
    assert abs(fast["alpha"] - exact["alpha"]) < 0.02
    assert fast["num_pl_spikes"] == exact["num_pl_spikes"]
    # sums from the weights: identical; the spectral norm: the same eigenvalue
    for key in ("log_norm", "stable_rank", "log_spectral_norm"):
        assert fast[key] == pytest.approx(exact[key], rel=1e-6)
    assert fast["matrix_rank"] is None and math.isnan(fast["entropy"])  # need every eigenvalue


def test_extension_triggers_when_xmin_falls_below_the_computed_part():
    # Student-t entries: the best xmin lies deep in the spectrum
    g = torch.Generator().manual_seed(3)
    w = torch.distributions.StudentT(2.5).sample((1024, 512)).float().unsqueeze(0)
    calls = []

    def accept(sp):
        calls.append((sp.computed, sp.boundary))
        return False  # never satisfied: must grow to the whole spectrum

    sp = partial_spectrum_of(w, accept, start=1 / 16)
    assert sp.extensions >= 1 and sp.computed == sp.M and sp.evals.size == 512
    assert [c for c, _ in calls] == sorted(c for c, _ in calls) and calls[0][0] == 32
    # through the analysis: extended until the fit agrees with exact
    exact, _ = spectral_row("w", "linear", w, SpectralOptions())
    fast, _ = spectral_row("w", "linear", w, SpectralOptions(spectrum="partial"))
    assert exact["xmin"] >= 0 and fast["xmin"] == pytest.approx(exact["xmin"], rel=1e-4)
    assert abs(fast["alpha"] - exact["alpha"]) < 0.02


def test_partial_boundary_is_the_largest_smallest_computed_value():
    w = torch.stack([_spiked(600, 300, seed=s) for s in (0, 1)])
    sp = partial_spectrum_of(w, lambda sp: True, start=1 / 8)
    assert sp.count == 2 and sp.computed == 38
    per = [torch.linalg.eigvalsh(gram_matrix(w[i], torch.float64)).numpy()[-38:] / 600 for i in range(2)]
    assert sp.boundary == pytest.approx(max(p[0] for p in per), rel=1e-4)


def test_exact_stays_the_default_and_bad_spectrum_is_a_user_error(tiny_cnn):
    import netanatomy as na

    assert SpectralOptions().spectrum == "full"
    m = na.load(tiny_cnn)
    with pytest.raises(UserError):
        SpectralAnalysis().run(m, SpectralOptions(spectrum="sparse"))
    with pytest.raises(UserError):
        SpectralAnalysis().run(m, SpectralOptions(spectrum="partial", mp_fit=True))


def test_device_logic_runs_on_cpu():
    w = _spiked(400, 200)
    sp = partial_spectrum_of(w.unsqueeze(0), lambda sp: True, device=torch.device("cpu"))
    assert sp.evals.dtype == np.float64 and sp.partial
