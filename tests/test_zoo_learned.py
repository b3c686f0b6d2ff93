"""The learned (DeepSets over hidden units) accuracy predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netanatomy.errors import UserError
from netanatomy.zoo.features import LayoutEntry
from netanatomy.zoo.learned import DeepSetsPredictor, chain_layers, permute_hidden_units

FAST = dict(max_epochs=60, patience=15, unit_dim=16, head_dim=16, edge_dim=8)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_layout(c=4, classes=3):
    """conv(1->c) conv(c->c) dense(c->classes), torch layout."""
    shapes = [("conv1.weight", (c, 1, 3, 3)), ("conv1.bias", (c,)), ("conv2.weight", (c, c, 3, 3)),
              ("conv2.bias", (c,)), ("fc.weight", (classes, c)), ("fc.bias", (classes,))]
    out, pos = [], 0
    for name, sh in shapes:
        n = int(np.prod(sh))
        out.append(LayoutEntry(name, pos, pos + n, sh, sh))
        pos += n
    return out


def planted_zoo(n=120, seed=0):
    """Random nets whose target is the mean |w| of conv2 (a permutation-invariant quantity)."""
    layout = tiny_layout()
    rng = np.random.default_rng(seed)
    P = layout[-1].end
    scale = rng.uniform(0.2, 2.0, size=(n, 1))
    W = (rng.normal(size=(n, P)) * scale).astype(np.float32)
    e = layout[2]
    y = np.abs(W[:, e.start:e.end]).mean(1)
    y = (y - y.min()) / (y.max() - y.min())
    return layout, W, y


def test_prediction_is_invariant_to_hidden_unit_permutations():
    layout, W, y = planted_zoo(40)
    m = DeepSetsPredictor(layout, seed=0, **FAST).fit(W, y)
    rng = np.random.default_rng(3)
    W2 = permute_hidden_units(W, layout, [rng.permutation(4), rng.permutation(4)])
    assert np.abs(W2 - W).max() > 0.1  # really another point in weight space
    np.testing.assert_allclose(m.predict(W2), m.predict(W), atol=1e-5)


def test_permutation_keeps_the_function():
    """The permutation used above is a symmetry of the network (same logits)."""
    import torch.nn.functional as F

    layout, W, _ = planted_zoo(3)
    W2 = permute_hidden_units(W, layout, [np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])])
    x = torch.randn(5, 1, 8, 8)

    def logits(row):
        t = {e.name: torch.as_tensor(row[e.start:e.end].reshape(e.shape)) for e in layout}
        h = torch.relu(F.conv2d(x, t["conv1.weight"], t["conv1.bias"], stride=2, padding=1))
        h = torch.relu(F.conv2d(h, t["conv2.weight"], t["conv2.bias"], stride=2, padding=1)).mean((2, 3))
        return h @ t["fc.weight"].T + t["fc.bias"]

    for a, b in zip(W, W2):
        torch.testing.assert_close(logits(a), logits(b), atol=1e-5, rtol=1e-5)


def test_deterministic_given_a_seed():
    layout, W, y = planted_zoo(40)
    a = DeepSetsPredictor(layout, seed=5, **FAST).fit(W, y).predict(W)
    b = DeepSetsPredictor(layout, seed=5, **FAST).fit(W, y).predict(W)
    c = DeepSetsPredictor(layout, seed=6, **FAST).fit(W, y).predict(W)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_learns_a_planted_relation_better_than_the_mean():
    layout, W, y = planted_zoo(160)
    tr, te = np.arange(120), np.arange(120, 160)
    m = DeepSetsPredictor(layout, seed=0, **FAST).fit(W[tr], y[tr])
    mse = np.mean((m.predict(W[te]) - y[te]) ** 2)
    mse_mean = np.mean((y[tr].mean() - y[te]) ** 2)
    assert mse < 0.5 * mse_mean
    # early stopping looked at training runs only
    assert set(m.val_runs_) <= {str(i) for i in tr} and m.best_epoch_ >= 1


def test_fit_and_score_uses_the_same_runs_for_deepsets_and_gbm():
    pytest.importorskip("sklearn")
    import pandas as pd

    from netanatomy.zoo.features import flat_features
    from netanatomy.zoo.predict import fit_and_score

    layout, W, y = planted_zoo(60)
    X = flat_features(W, layout)
    runs = np.array([f"r{i}" for i in range(60)])
    rep = fit_and_score(X, y, runs, pd.DataFrame({"run": runs}), predictors=("gbm", "deepsets"), splits=2,
                        importance=False, weights=W, layout=layout)
    by = {(s["split"], s["predictor"]): s for s in rep.scores}
    for s in range(2):
        assert by[(s, "gbm")]["test_rows"] == by[(s, "deepsets")]["test_rows"] == 12
        assert by[(s, "deepsets")]["fit_s"] > 0
    p = rep.predictions
    for s in range(2):
        a = set(p[(p.split == s) & (p.predictor == "gbm")].run)
        b = set(p[(p.split == s) & (p.predictor == "deepsets")].run)
        assert a == b and len(a) == 12
    with pytest.raises(UserError, match="learn from the weights"):
        fit_and_score(X, y, runs, predictors=("deepsets",), splits=1)


def test_bad_input_is_a_one_line_user_error():
    layout, W, y = planted_zoo(10)
    m = DeepSetsPredictor(layout, seed=0, **FAST)
    cases = [
        lambda: m.fit(W[:0], y[:0]),                 # empty zoo
        lambda: m.fit(W[:, :-1], y),                 # rows do not match the layout
        lambda: m.fit(W, y[:-1]),                    # targets do not match rows
        lambda: m.fit(np.where(np.arange(W.shape[1]) == 0, np.nan, W), y),  # NaN weights
        lambda: m.fit(W[:3], y[:3]),                 # too few runs
        lambda: m.predict(W),                        # not fitted
        lambda: DeepSetsPredictor(layout, bogus=1),  # unknown parameter
    ]
    short = [e for e in tiny_layout() if not e.name.startswith("conv2")]  # conv1 -> fc is still a chain
    cases.append(lambda: chain_layers([tiny_layout()[0], tiny_layout()[1]]))  # no hidden layer
    mismatch = tiny_layout(c=4)
    mismatch[4] = LayoutEntry("fc.weight", mismatch[4].start, mismatch[4].start + 15, (3, 5), (3, 5))
    cases.append(lambda: chain_layers(mismatch))  # dense takes 5 inputs, conv2 has 4 outputs
    cases.append(lambda: chain_layers([]))
    for case in cases:
        with pytest.raises(UserError) as exc:
            case()
        assert "\n" not in str(exc.value) and str(exc.value)
    assert len(chain_layers(short)) == 2


def test_cli_refuses_an_unknown_predictor_in_one_line(tmp_path, capsys):
    from netanatomy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["zoo", "predict", str(tmp_path), "--predictors", "gbm,nfn"])
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and "deepsets" in err
    assert len([l for l in err.strip().splitlines() if l.strip()]) == 1
