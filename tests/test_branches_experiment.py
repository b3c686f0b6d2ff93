"""The branch experiment end to end on a tiny config and synthetic pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from netanatomy.experiments import branches as E
from netanatomy.errors import UserError


def _pictures(n=5, seed=0, h=64, w=200):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w] / 10.0
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


def test_alexstem_smoke_runs_with_strided_conv1(tmp_path):
    """The alexstem code paths: 11x11 stride-4 conv1, 5x5 conv2, grey crops, 64-px crops."""
    pytest.importorskip("matplotlib")
    cfg = E.CONFIGS["smoke_alexstem"]
    big = E.CONFIGS["alexstem"]
    assert (cfg.k1, cfg.s1, cfg.k2, cfg.crop, cfg.short_side, cfg.grey_share) == (
        big.k1, big.s1, big.k2, big.crop, big.short_side, big.grey_share)
    assert big.short_side * 0.2 >= big.crop  # the held-out strip of a square photo holds one crop
    nets = E.build_pair(5, cfg, seed=0)
    assert nets["branched"].conv1.stride == (4, 4) and nets["branched"].conv1.kernel_size == (11, 11)
    assert nets["branched"].conv2.kernel_size == (5, 5)
    x = torch.zeros(2, 3, cfg.crop, cfg.crop)
    assert nets["branched"].conv1(x).shape[-1] == cfg.crop // 4
    doc = E.run(cfg, tmp_path, images=_pictures(h=96, w=400), names=[f"p{i}" for i in range(5)])
    assert [(r["seed"], r["arch"]) for r in doc["runs"]] == [(0, "branched"), (0, "unbranched")]
    for r in doc["runs"]:
        assert len(r["colourfulness"]) == cfg.c1 and 0.0 <= r["test_accuracy"] <= 1.0
    md = (tmp_path / "branches.md").read_text()
    assert "--config smoke_alexstem" in md and "11x11 stride 4" in md
    assert "Against the issue's goal" in md


@pytest.mark.parametrize("name, lever", [
    ("alexstem_colour", {"grey_share": 0.0}),
    ("alexstem_smallstem", {k: getattr(E.CONFIGS["towers"], k) for k in ("k1", "s1", "crop", "short_side")}),
])
def test_alexstem_ablations_change_one_lever(name, lever):
    """Each ablation is alexstem with one lever put back (to towers' value), on seeds 0-4."""
    from dataclasses import asdict

    cfg, base = asdict(E.CONFIGS[name]), asdict(E.CONFIGS["alexstem"])
    differs = {k for k in base if cfg[k] != base[k]} - {"name", "seeds"}
    assert differs == set(lever) and all(cfg[k] == v for k, v in lever.items())
    assert cfg["name"] == name and tuple(cfg["seeds"]) == tuple(base["seeds"][:5])
    net = E.TowerNet(5, E.CONFIGS[name], branched=True)
    x = torch.zeros(2, 3, cfg["crop"], cfg["crop"])
    assert net(x).shape == (2, 5) and net.conv2.kernel_size == (5, 5)


def test_grey_share_turns_that_share_grey():
    task = E.CropTask(_pictures(h=96, w=400), 64, 0.25)
    x, _ = task.batch(400, torch.Generator().manual_seed(0))
    raw = x * task.std + task.mean
    grey = (raw.std(dim=1) < 1e-5).flatten(1).all(dim=1)
    assert 0.15 < grey.float().mean() < 0.35


def _summary(pb, pu, runs=5):
    return {"branched": {"colourfulness_fisher_p": pb, "runs": runs},
            "unbranched": {"colourfulness_fisher_p": pu, "runs": runs}}


def test_goal_verdict_uses_the_issue_thresholds():
    assert E.goal_verdict(_summary(1e-4, 0.5))[0] == "strongly"
    assert E.goal_verdict(_summary(1e-4, 0.5, runs=4))[0] == "weakly"  # too few seeds for the goal
    assert E.goal_verdict(_summary(0.01, 0.5))[0] == "weakly"
    assert E.goal_verdict(_summary(0.082, 0.48))[0] == "not"
    kind, sentence = E.goal_verdict(_summary(1e-5, 1e-3))
    assert kind == "not" and "control is significant" in sentence
    assert E.goal_verdict({"branched": {"colourfulness_fisher_p": 1e-5, "runs": 5}})[0] == "not"  # no control
