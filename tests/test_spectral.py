"""Spectral health (esd): fit correctness, normalisation, layer handling, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import netanatomy
from netanatomy.spectral.analysis import SpectralAnalysis, SpectralOptions, analyze, describe, summarize_rows
from netanatomy.spectral.esd import layer_matrices, spectrum_of
from netanatomy.spectral.metrics import mp_fit
from netanatomy.spectral.powerlaw import compare_tail, fit_power_law
from netanatomy.report.render import render


@pytest.fixture(autouse=True)
def _one_thread():
    """One BLAS thread: the CI machine is shared and oversubscribed OpenMP threads
    make small eigenproblems a hundred times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pareto(alpha: float, n: int, xmin: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def naive_fit(x: np.ndarray, min_tail: int, ks: str):
    """The CSN scan written out as loops, for checking the vectorised one."""
    x = np.sort(x)
    n = len(x)
    best = (math.inf, None, None)
    for i in range(n - min_tail + 1):
        t = x[i:]
        m = len(t)
        a = 1 + m / np.sum(np.log(t / t[0]))
        F = 1 - (t / t[0]) ** (1 - a)
        emp = np.arange(m) / m
        d = np.abs(F - emp)
        if ks == "sup":
            d = np.maximum(d, np.abs(F - (np.arange(m) + 1) / m))
        D = d.max()
        if D < best[0]:
            best = (D, a, t[0])
    return best


# ---------------------------------------------------------------------------
# the power-law fit


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_fit_recovers_known_alpha(alpha):
    x = pareto(alpha, 3000, seed=1)
    fit = fit_power_law(x)
    assert fit.ok
    # MLE standard error is (alpha-1)/sqrt(n) ~ 0.03-0.05; allow about 3 of them
    assert abs(fit.alpha - alpha) < 0.15
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail))
    assert fit.xmax == pytest.approx(x.max())


def test_fit_finds_xmin_above_a_bulk():
    rng = np.random.default_rng(2)
    bulk = rng.uniform(0.1, 1.0, 1500)
    tail = pareto(3.0, 400, xmin=2.0, seed=3)
    fit = fit_power_law(np.concatenate([bulk, tail]))
    assert 1.5 < fit.xmin < 3.0
    assert abs(fit.alpha - 3.0) < 0.35


@pytest.mark.parametrize("ks", ["plfit", "sup"])
def test_vectorised_scan_equals_naive_loop(ks):
    x = np.concatenate([np.random.default_rng(4).lognormal(0, 1, 150), pareto(2.2, 60, 5.0, seed=5)])
    fit = fit_power_law(x, min_tail=5, ks=ks, block_elems=997)  # several blocks
    D, a, xmin = naive_fit(x, 5, ks)
    assert fit.D == pytest.approx(D, rel=1e-9)
    assert fit.alpha == pytest.approx(a, rel=1e-9)
    assert fit.xmin == pytest.approx(xmin)


def test_fit_failures_are_nan_with_reason():
    f = fit_power_law(np.zeros(10))
    assert math.isnan(f.alpha) and "no positive" in f.reason
    f = fit_power_law([1.0, 2.0, 3.0], min_tail=5)
    assert math.isnan(f.alpha) and "too few" in f.reason
    f = fit_power_law(np.ones(20))
    assert math.isnan(f.alpha) and "degenerate" in f.reason


def test_tail_comparison_prefers_the_true_model():
    x = pareto(2.5, 2000, seed=6)
    fit = fit_power_law(x)
    c = compare_tail(x, fit)
    assert c.R_exp > 2 and c.p_exp < 0.05 and c.best == "power_law"
    # a power law with an exponential cutoff: the truncated power law must win
    rng = np.random.default_rng(7)
    y = pareto(1.5, 200_000, seed=8)
    y = y[rng.random(y.size) < np.exp(-y / 50.0)]
    fit = fit_power_law(y, xmin=1.0)
    c = compare_tail(y, fit)
    assert c.R_tpl < 0 and c.p_tpl < 0.01 and c.best == "truncated_power_law"
    assert c.tpl_lambda == pytest.approx(1 / 50.0, rel=0.3)


# ---------------------------------------------------------------------------
# eigenvalues, normalisation, MP


def test_eigenvalues_are_squared_singular_values_over_N():
    torch.manual_seed(0)
    for shape in [(30, 20), (20, 30)]:
        w = torch.randn(*shape)
        sp = spectrum_of(w[None], "float64")
        ref = np.sort(torch.linalg.svdvals(w.double()).numpy() ** 2 / 30)
        np.testing.assert_allclose(sp.evals, ref, rtol=1e-10, atol=1e-12)
        assert (sp.N, sp.M) == (30, 20)
        assert sp.fro2 == pytest.approx(float(w.double().pow(2).sum()))
    sp32 = spectrum_of(torch.randn(1, 200, 100), "float32")
    assert sp32.precision == "float32" and sp32.evals.dtype == np.float64


def test_mp_edges_on_random_matrix():
    torch.manual_seed(1)
    N, M, s = 2000, 500, 0.5
    w = torch.randn(N, M, dtype=torch.float64) * s
    sp = spectrum_of(w[None], "float64")
    mp = mp_fit(sp)
    y = M / N
    assert mp["sigma_mp"] == pytest.approx(s, rel=0.02)
    assert mp["mp_lambda_plus"] == pytest.approx(s**2 * (1 + math.sqrt(y)) ** 2, rel=0.03)
    assert mp["mp_lambda_minus"] == pytest.approx(s**2 * (1 - math.sqrt(y)) ** 2, rel=0.05)
    assert mp["num_spikes"] == 0
    assert sp.evals.max() < mp["mp_lambda_plus"] * 1.03 and sp.evals.min() > mp["mp_lambda_minus"] * 0.9
    # plant two strong directions: exactly two spikes
    u = torch.randn(N, 2, dtype=torch.float64)
    v = torch.randn(2, M, dtype=torch.float64)
    spiked = w + 0.08 * u @ v
    mp2 = mp_fit(spectrum_of(spiked[None], "float64"))
    assert mp2["num_spikes"] == 2
    assert mp2["mp_softrank"] < 0.5


# ---------------------------------------------------------------------------
# layers: conv1d, conv2d, fused qkv


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.c1 = nn.Conv1d(16, 8, 5)
        self.c2 = nn.Conv2d(6, 4, 3)
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 40)


def _model():
    torch.manual_seed(3)
    return netanatomy.load(Layers().eval())


def test_conv1d_kernel_positions_are_separate_matrices():
    m = _model()
    layer = m["c1"]
    (name, batch), = layer_matrices(layer)
    assert batch.shape == (5, 8, 16)  # kernel size is never a matrix dimension
    w = layer.weight().double()
    ref = np.sort(np.concatenate([torch.linalg.svdvals(w[:, :, k]).numpy() ** 2 / 16 for k in range(5)]))
    res = SpectralAnalysis().run(m, SpectralOptions(workers=1))
    row = next(r for r in res.records if r["layer"] == "c1")
    assert (row["N"], row["M"], row["slices"], row["num_evals"]) == (16, 8, 5, 40)
    np.testing.assert_allclose(res.extras["spectra"]["c1"]["evals"], ref, rtol=1e-9)
    # norm metrics come from the whole tensor, whatever the slicing
    assert row["log_norm"] == pytest.approx(math.log10(float(w.pow(2).sum())))


def test_conv2d_slices_reshape_and_per_slice_rows():
    m = _model()
    res = SpectralAnalysis().run(m, SpectralOptions(workers=1, per_slice=True))
    rows = [r for r in res.records if r["layer"].startswith("c2")]
    pooled = rows[0]
    assert (pooled["N"], pooled["M"], pooled["slices"], pooled["num_evals"]) == (6, 4, 9, 36)
    slices = [r for r in rows if "slice" in r]
    assert [r["slice"] for r in slices] == [f"{i},{j}" for i in range(3) for j in range(3)]
    assert all(r["num_evals"] == 4 for r in slices)
    res2 = SpectralAnalysis().run(m, SpectralOptions(workers=1))
    p2 = next(r for r in res2.records if r["layer"] == "c2")
    for key in ("log_norm", "log_spectral_norm", "stable_rank", "alpha"):  # independent of per_slice
        assert p2[key] == pytest.approx(pooled[key], nan_ok=True)
    res3 = SpectralAnalysis().run(m, SpectralOptions(workers=1, conv_mode="reshape"))
    r3 = next(r for r in res3.records if r["layer"] == "c2")
    assert (r3["N"], r3["M"], r3["slices"]) == (54, 4, 1)
    assert r3["log_norm"] == pytest.approx(pooled["log_norm"])


def test_fused_qkv_is_split():
    m = _model()
    res = SpectralAnalysis().run(m, SpectralOptions(workers=2))
    parts = [r for r in res.records if r["layer"].startswith("attn.in_proj")]
    assert [r["layer"] for r in parts] == ["attn.in_proj[q]", "attn.in_proj[k]", "attn.in_proj[v]"]
    assert all((r["N"], r["M"]) == (16, 16) for r in parts)
    w = m["attn.in_proj"].weight().double()
    for r, chunk in zip(parts, torch.chunk(w, 3, 0)):
        assert r["log_spectral_norm"] == pytest.approx(math.log10(float(torch.linalg.svdvals(chunk)[0] ** 2)))
    # model order is kept although layers ran in parallel
    names = [r["layer"] for r in res.records]
    assert names.index("attn.in_proj[q]") < names.index("c1") < names.index("emb") < names.index("fc")


def test_describe_reads_no_tensor_and_matches_run():
    m = _model()
    for layer in m.layers:
        layer.store = _NoRead(layer.store)
    rows = describe(m)
    d = {r["layer"]: r for r in rows}
    assert d["c1"]["num_evals"] == 40 and d["c2"]["slices"] == 9
    assert d["attn.in_proj[k]"]["M"] == 16 and d["emb"]["N"] == 50


class _NoRead:
    def __init__(self, store):
        self._s = store

    def keys(self):
        return self._s.keys()

    def shape(self, k):
        return self._s.shape(k)

    def dtype(self, k):
        return self._s.dtype(k)

    def get(self, k):
        raise AssertionError("describe read a tensor")


# ---------------------------------------------------------------------------
# bad input: every layer gets a row, with a reason


class Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.zero = nn.Linear(40, 30, bias=False)
        self.rank1 = nn.Linear(40, 30, bias=False)
        self.nan = nn.Linear(40, 30, bias=False)
        self.row = nn.Linear(500, 1, bias=False)
        self.wide = nn.Linear(20000, 3, bias=False)
        self.tall = nn.Linear(2, 20000, bias=False)
        self.good = nn.Linear(60, 120, bias=False)


def test_bad_matrices_give_rows_with_reasons():
    torch.manual_seed(5)
    b = Bad()
    with torch.no_grad():
        b.zero.weight.zero_()
        b.rank1.weight.copy_(torch.randn(30, 1) @ torch.randn(1, 40))
        b.nan.weight[3, 4] = float("nan")
    res = SpectralAnalysis().run(netanatomy.load(b), SpectralOptions(mp_fit=True, randomize=True))
    rows = {r["layer"]: r for r in res.records}
    assert set(rows) == {"zero", "rank1", "nan", "row", "wide", "tall", "good"}
    assert "NaN" in rows["nan"]["error"]
    for name in ("zero", "rank1", "row", "wide", "tall"):
        r = rows[name]
        assert not r.get("error"), r
        assert math.isnan(r["alpha"]) and r["warning"] == "failed fit" and r["fit_reason"]
    assert "zero" in rows["zero"]["fit_reason"]
    assert rows["rank1"]["matrix_rank"] == 1
    assert rows["tall"]["M"] == 2 and rows["wide"]["N"] == 20000
    assert math.isfinite(rows["good"]["alpha"]) and rows["good"]["fit_reason"] is None
    s = res.summary
    assert s["failed_fits"] == 5 and s["layers_failed"] == 1
    blocks = render("esd", res)  # the report copes with all of it
    assert blocks


# ---------------------------------------------------------------------------
# randomisation, base model, summary, report


def test_randomization_is_seeded_and_finds_traps():
    torch.manual_seed(6)
    lin = nn.Sequential(nn.Linear(200, 300, bias=False), nn.Linear(200, 300, bias=False))
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(300, 200) * 0.05)
        lin[1].weight[7, 9] = 4.0  # one huge entry survives shuffling
        lin[1].weight[100, 50] = -4.0
    m = netanatomy.load(lin)
    a = analyze(m, randomize=True, seed=1, workers=1)
    b = analyze(m, randomize=True, seed=1, workers=2)
    c = analyze(m, randomize=True, seed=2, workers=1)
    ra, rb, rc = a.records, b.records, c.records
    assert ra[0]["rand_distance"] == rb[0]["rand_distance"]
    assert ra[0]["rand_distance"] != rc[0]["rand_distance"]
    assert ra[0]["num_traps"] == 0
    assert ra[1]["num_traps"] >= 1


def test_base_model_difference(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(7)
    base = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
    tuned = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
    delta = [torch.randn(96, 64) * 0.01, torch.randn(64, 96) * 0.01]
    with torch.no_grad():
        for i, d in enumerate(delta):
            tuned[i].weight.copy_(base[i].weight + d)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    res = analyze(netanatomy.load(tuned), base=str(path), workers=1)
    for r, d in zip(res.records, delta):
        expect = math.log10(float(torch.linalg.svdvals(d.double())[0] ** 2))
        assert r["log_spectral_norm"] == pytest.approx(expect, abs=1e-4)
    # a base model with other layer names: one error row per unmatched layer
    other = tmp_path / "other.safetensors"
    save_file({"x.weight": torch.zeros(3, 3)}, str(other))
    res = analyze(netanatomy.load(tuned), base=str(other), workers=1)
    assert all("base model" in r["error"] for r in res.records)


def test_summary_means_and_flags():
    recs = [
        {"layer": "a", "alpha": 1.5, "alpha_weighted": 1.0, "warning": "over-trained"},
        {"layer": "b", "alpha": 4.5, "alpha_weighted": 3.0, "warning": ""},
        {"layer": "b[pos=0]", "slice": "0", "alpha": 100.0},
        {"layer": "c", "alpha": math.nan, "warning": "failed fit"},
    ]
    s = summarize_rows(recs)
    assert s["alpha"] == pytest.approx(3.0) and s["alpha_weighted"] == pytest.approx(2.0)
    assert (s["over_trained"], s["under_trained"], s["failed_fits"]) == (1, 0, 1)


def test_bad_option_is_a_user_error():
    from netanatomy.errors import UserError

    with pytest.raises(UserError):
        SpectralAnalysis.make_options({"ks": "nonsense"})
    with pytest.raises(UserError):
        analyze(_model(), nonsense=1)


def test_plots_return_figures():
    pytest.importorskip("matplotlib")
    from netanatomy.spectral.plots import alpha_depth_plot, esd_plot

    res = analyze(_model(), mp_fit=True, randomize=True, workers=1)
    fig = esd_plot(res, "fc")
    assert fig.axes and fig.axes[0].get_xscale() == "log"
    fig2 = alpha_depth_plot(res)
    assert len(fig2.axes[0].get_xticklabels()) == len([r for r in res.records if not r.get("error")])


def test_depthwise_conv_uses_the_reshaped_matrix():
    torch.manual_seed(9)
    m = netanatomy.load(nn.Sequential(nn.Conv2d(12, 12, 3, groups=12)))
    res = analyze(m, workers=1)
    r = res.records[0]
    assert (r["N"], r["M"], r["slices"]) == (12, 9, 1)
    d = describe(m)[0]
    assert (d["N"], d["M"], d["slices"]) == (12, 9, 1)


def test_own_nelder_mead_matches_scipy_and_tail_p_values_match_scipy_stats():
    from scipy import optimize, stats

    from netanatomy.spectral.powerlaw import nelder_mead

    def f(p):
        return 3 * (p[0] - 1.3) ** 2 + (p[1] + 2) ** 2 + 0.5 * p[0] * p[1] + 0.1 * p[0] ** 4

    for x0 in ([2.0, -5.0], [0.0, 0.0], [10.0, 3.0]):
        ref = optimize.minimize(f, x0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 1000})
        x, fx = nelder_mead(f, x0, xatol=1e-4, fatol=1e-7, maxiter=1000)
        assert fx == pytest.approx(ref.fun, abs=1e-7)
        assert np.allclose(x, ref.x, atol=1e-3)
    # the tail comparison's p-values: chi^2(1) and normal tails from math.erfc
    rng = np.random.default_rng(0)
    x = np.sort(rng.pareto(1.5, 3000) + 1.0) * np.exp(-rng.exponential(0.001, 3000))
    c = compare_tail(x, fit_power_law(x))
    assert c.p_tpl == pytest.approx(float(stats.chi2.sf(-2.0 * c.R_tpl, df=1)), rel=1e-9, abs=1e-300)
    assert c.p_exp == pytest.approx(float(2 * stats.norm.sf(abs(c.R_exp))), rel=1e-9, abs=1e-300)


def _numpy_nelder_mead(f, x0, xatol=1e-4, fatol=1e-7, maxiter=1000):
    """The simplex on NumPy arrays, as powerlaw.nelder_mead was written before it
    moved to Python floats: the reference it must equal to the last bit."""
    x0 = np.asarray(x0, dtype=np.float64)
    n = x0.size
    sim = np.empty((n + 1, n))
    sim[0] = x0
    for i in range(n):
        y = x0.copy()
        y[i] = 1.05 * y[i] if y[i] != 0 else 0.00025
        sim[i + 1] = y
    fs = np.array([f(v) for v in sim])
    evals = n + 1
    for _ in range(maxiter):
        order = np.argsort(fs, kind="stable")
        sim, fs = sim[order], fs[order]
        if np.max(np.abs(sim[1:] - sim[0])) <= xatol and np.max(np.abs(fs[0] - fs[1:])) <= fatol:
            break
        if evals >= 200 * n * 10:
            break
        centre = sim[:-1].mean(axis=0)
        xr = centre + (centre - sim[-1])
        fr = f(xr)
        evals += 1
        if fr < fs[0]:
            xe = centre + 2.0 * (centre - sim[-1])
            fe = f(xe)
            evals += 1
            sim[-1], fs[-1] = (xe, fe) if fe < fr else (xr, fr)
            continue
        if fr < fs[-2]:
            sim[-1], fs[-1] = xr, fr
            continue
        if fr < fs[-1]:
            xc = centre + 0.5 * (xr - centre)
            fc = f(xc)
            evals += 1
            if fc <= fr:
                sim[-1], fs[-1] = xc, fc
                continue
        else:
            xc = centre + 0.5 * (sim[-1] - centre)
            fc = f(xc)
            evals += 1
            if fc < fs[-1]:
                sim[-1], fs[-1] = xc, fc
                continue
        sim[1:] = sim[0] + 0.5 * (sim[1:] - sim[0])
        fs[1:] = [f(v) for v in sim[1:]]
        evals += n
    k = int(np.argmin(fs))
    return sim[k], float(fs[k])


def test_nelder_mead_in_python_floats_equals_the_numpy_simplex_bit_for_bit():
    from netanatomy.spectral.powerlaw import _ll_truncated_power_law, nelder_mead

    rng = np.random.default_rng(3)
    for trial in range(150):
        n = int(rng.integers(1, 11))  # 8+ vertices: where NumPy's 1-D sums turn pairwise
        c = rng.standard_normal(n) * 10 ** rng.uniform(-3, 3)
        s = rng.uniform(0.1, 10, n)
        x0 = rng.standard_normal(n)
        if trial % 5 == 0:
            x0[0] = 0.0

        def f(p, c=c, s=s):
            return float(np.sum(s * (np.asarray(p) - c) ** 2) + np.sin(np.sum(p)))

        x, fx = nelder_mead(f, x0)
        rx, rfx = _numpy_nelder_mead(f, x0)
        assert np.array_equal(x, rx) and fx == rfx, (trial, n)
    # and the fit it serves: a truncated power law on a heavy tail
    x = np.sort(rng.pareto(1.5, 400) + 1.0) * np.exp(-rng.exponential(0.01, 400))
    fit = fit_power_law(x)
    tail = x[x >= fit.xmin]
    _, a, lam = _ll_truncated_power_law(tail, fit.xmin, fit.alpha)
    assert math.isfinite(a) and lam > 0
