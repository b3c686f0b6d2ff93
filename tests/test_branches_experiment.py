"""The branch experiment end to end on a tiny config and synthetic pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from netanatomy.experiments import branches as E
from netanatomy.errors import UserError


def _pictures(n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:64, 0:200] / 10.0
        base = np.stack([np.sin(xx * (i + 1)), np.cos(yy * (i + 2)), np.sin((xx + yy) * 0.5 * (i + 1))], -1)
        out.append(((base + 0.3 * rng.standard_normal(base.shape)) * 0.25 + 0.5).clip(0, 1).astype(np.float32))
    return out


def test_smoke_run_writes_results(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = E.CONFIGS["smoke"]
    doc = E.run(cfg, tmp_path, images=_pictures(), names=[f"p{i}" for i in range(5)])
    assert [(r["seed"], r["arch"]) for r in doc["runs"]] == [(0, "branched"), (0, "unbranched")]
    for r in doc["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert sum(r["tower_colour_count"]) == r["colour_filters"]
        assert len(r["colourfulness"]) == cfg.c1
    assert "svd" in doc["runs"][1] and "svd" not in doc["runs"][0]  # conv2 is grouped in the branched net
    md = (tmp_path / "branches.md").read_text()
    assert "netanatomy experiment branches --config smoke" in md and "## Verdict" in md
    assert json.loads((tmp_path / "branches_runs.json").read_text())["classes"] == 5
    assert (tmp_path / "branches_filters_branched.png").stat().st_size > 0


def test_same_initial_conv1():
    nets = E.build_pair(4, E.CONFIGS["smoke"], seed=3)
    a, b = nets["branched"], nets["unbranched"]
    assert (a.conv1.weight == b.conv1.weight).all()
    assert a.conv2.groups == 2 and b.conv2.groups == 1


def test_too_few_photos(tmp_path):
    with pytest.raises(UserError, match="photographs"):
        E.run(E.CONFIGS["smoke"], tmp_path, images=_pictures(2), names=["a", "b"])


def test_fisher_combined():
    assert E.fisher_combined([1.0, 1.0]) == pytest.approx(1.0)
    assert E.fisher_combined([0.01, 0.01]) < 0.01
