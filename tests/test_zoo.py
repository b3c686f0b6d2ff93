"""Model zoo: batched training, resume, features, predictors, maps, readers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from netanatomy.errors import UserError
from netanatomy.parallel import SerialExecutor, done_path
from netanatomy.zoo.train import (
    PARAM_NAMES,
    ZooConfig,
    generate_zoo,
    plan_groups,
    synthetic_data,
    train_sequential,
    train_stack,
)

TINY = dict(nets=6, epochs=2, steps_per_epoch=3, batch_size=8, group_size=2, eval_train=32, eval_test=64,
            activations=("relu", "tanh"), optimizers=("adam", "sgd", "rmsprop"))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the zoo's workers use (and results must not depend on)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n_train=256, n_test=128, seed=1)


def tiny_config(**kw):
    return ZooConfig(**{**TINY, **kw})


def test_batched_equals_sequential(data):
    # Scaled inits (he / glorot): with a tiny "normal" init the gradients of Adam and
    # RMSprop sit near their eps, and those optimisers amplify rounding-level
    # differences between the grouped and the plain convolution to O(lr).
    cfg = tiny_config(nets=6, group_size=2, epochs=1, steps_per_epoch=5, activations=("relu",),
                      inits=("he_normal", "glorot_uniform"))
    checked = set()
    for _, hps in plan_groups(cfg):
        snaps, rows = train_stack(hps, cfg, data)
        assert len(snaps) == cfg.epochs + 1
        for k, hp in enumerate(hps):
            seq_snaps, seq_rows = train_sequential(hp, cfg, data)
            for e in range(cfg.epochs + 1):
                for name in PARAM_NAMES:
                    torch.testing.assert_close(snaps[e][k][name], seq_snaps[e][name], rtol=1e-4, atol=1e-5)
            mine = [r for r in rows if r["run"] == hp["run"]]
            assert [round(r["test_acc"], 6) for r in mine] == [round(r["test_acc"], 6) for r in seq_rows]
            checked.add((hp["optimizer"], hp["dropout"] > 0))
        # the stack really trained: weights moved away from the initialisation
        assert any(not torch.equal(snaps[0][0][n], snaps[-1][0][n]) for n in PARAM_NAMES)
    assert {o for o, _ in checked} == {"adam", "sgd", "rmsprop"} and (("adam", True) in checked or ("sgd", True) in checked or ("rmsprop", True) in checked)


def test_hparams_do_not_depend_on_zoo_size():
    small = {hp["run"]: hp for _, hps in plan_groups(tiny_config(nets=6)) for hp in hps}
    big = {hp["run"]: hp for _, hps in plan_groups(tiny_config(nets=20)) for hp in hps}
    assert all(big[r] == hp for r, hp in small.items())
    assert len(big) == 20


def _digest(root):
    """Checkpoint contents (tensors and metadata; the byte order of a
    safetensors header's metadata is not fixed, so bytes are not compared)."""
    from safetensors import safe_open

    out = {}
    for p in sorted((root / "checkpoints").rglob("*.safetensors")):
        h = hashlib.sha256()
        with safe_open(str(p), "np") as f:
            for k in sorted(f.keys()):
                h.update(k.encode() + f.get_tensor(k).tobytes())
            h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def test_generate_resume_and_partial_groups(tmp_path, data):
    cfg = tiny_config()
    s1, df = generate_zoo(tmp_path, cfg, SerialExecutor(), data=data)
    assert s1.ok and len(s1.ran) == len(plan_groups(cfg))
    assert len(df) == cfg.nets * (cfg.epochs + 1) and df["run"].nunique() == cfg.nets
    assert set(df["epoch"]) == {0, 1, 2}
    for col in ("train_acc", "test_acc", "train_loss", "lr", "l2", "dropout", "optimizer", "activation", "init", "train_fraction"):
        assert col in df.columns
    assert (tmp_path / "metrics.parquet").exists() and (tmp_path / "metrics.csv").exists()
    digest = _digest(tmp_path)
    assert len(digest) == cfg.nets * (cfg.epochs + 1)

    # a re-run trains nothing
    s2, df2 = generate_zoo(tmp_path, cfg, SerialExecutor(), data=data)
    assert s2.ran == [] and len(s2.skipped) == len(s1.ran)
    pd.testing.assert_frame_equal(df, df2)

    # a killed group: its checkpoint written but cut short, its done record never written
    key, hps = plan_groups(cfg)[1]
    ck = tmp_path / "checkpoints" / hps[0]["run"] / "epoch_001.safetensors"
    ck.write_bytes(ck.read_bytes()[:50])  # a half-written file
    done_path(tmp_path, key).unlink()
    # and another group whose done record is half written
    key2, _ = plan_groups(cfg)[2]
    p2 = done_path(tmp_path, key2)
    p2.write_text(p2.read_text()[:40])
    s3, df3 = generate_zoo(tmp_path, cfg, SerialExecutor(), data=data)
    assert sorted(s3.ran) == sorted([key, key2])
    assert _digest(tmp_path) == digest  # same seeds -> the same bytes again
    pd.testing.assert_frame_equal(df, df3)


def test_other_config_in_same_folder_is_refused(tmp_path, data):
    generate_zoo(tmp_path, tiny_config(nets=2), SerialExecutor(), data=data)
    with pytest.raises(UserError, match="other settings"):
        generate_zoo(tmp_path, tiny_config(nets=2, steps_per_epoch=5), SerialExecutor(), data=data)
    # growing the zoo is allowed
    s, df = generate_zoo(tmp_path, tiny_config(nets=3), SerialExecutor(), data=data)
    assert df["run"].nunique() == 3


@pytest.mark.slow  # starting a local Ray cluster takes ~10 s idle, over a minute on a loaded machine
def test_ray_and_local_backends_agree(tmp_path, data):
    ray = pytest.importorskip("ray")
    from netanatomy.parallel import RayExecutor

    cfg = tiny_config(nets=4, group_size=2, activations=("relu",), optimizers=("adam", "sgd"))
    _, df_local = generate_zoo(tmp_path / "local", cfg, SerialExecutor(threads=1), data=data)
    with RayExecutor("local", num_cpus=1) as ex:
        _, df_ray = generate_zoo(tmp_path / "ray", cfg, ex, data=data)
    assert not ray.is_initialized()
    pd.testing.assert_frame_equal(df_local, df_ray)
    assert _digest(tmp_path / "local") == _digest(tmp_path / "ray")


# ---------------------------------------------------------------------------
# features, readers


def test_flat_features_match_tensor_stats():
    from netanatomy.stats import tensor_stats
    from netanatomy.zoo.features import LayoutEntry, flat_features

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, generator=g), torch.randn(3, 7, generator=g)
    W = torch.cat([a, b], 1).numpy()
    layout = [LayoutEntry("l.weight", 0, 40, (40,)), LayoutEntry("l.bias", 40, 47, (7,))]
    F = flat_features(W, layout)
    for i in range(3):
        st = tensor_stats(a[i])
        for k in ("mean", "std", "q0", "q25", "q50", "q75", "q100"):
            assert F.loc[i, f"l.weight.{k}"] == pytest.approx(st[k], rel=1e-9, abs=1e-12)
        assert F.loc[i, "l.weight.l2"] == pytest.approx(st["fro_norm"], rel=1e-9)
        assert F.loc[i, "l.bias.l1"] == pytest.approx(float(b[i].abs().sum()), rel=1e-6)
    W[1, 3] = np.nan
    assert flat_features(W, layout).iloc[1].isna().all()


def _write_small_cnn_zoo(root, n_runs=5, with_layout=True):
    """A tiny file in the published Small CNN Zoo layout: TF kernels, bias first."""
    rng = np.random.default_rng(0)
    shapes = [("sequential/conv2d/bias:0", (16,)), ("sequential/conv2d/kernel:0", (3, 3, 1, 16)),
              ("sequential/conv2d_1/bias:0", (16,)), ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
              ("sequential/conv2d_2/bias:0", (16,)), ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
              ("sequential/dense/bias:0", (10,)), ("sequential/dense/kernel:0", (16, 10))]
    rows, pos, layout = [], 0, []
    for name, sh in shapes:
        n = int(np.prod(sh))
        layout.append({"varname": name, "start_idx": pos, "end_idx": pos + n, "size": n, "shape": str(sh)})
        pos += n
    W = rng.normal(size=(n_runs * 3, pos)).astype(np.float32)
    for r in range(n_runs):
        for j, step in enumerate((0, 100, 200)):
            rows.append({"modeldir": f"/zoo/run{r}/model.ckpt-{step}", "test_accuracy": 0.1 + 0.1 * r + 0.01 * j,
                         "test_loss": 1.0, "train_accuracy": 0.5, "train_loss": 1.0, "step": step,
                         "config.activation": "relu" if r % 2 else "tanh", "config.learning_rate": 0.01,
                         "config.optimizer": "adam"})
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "weights.npy", W)
    pd.DataFrame(rows).to_csv(root / "metrics.csv")
    if with_layout:
        pd.DataFrame(layout).to_csv(root / "layout.csv", index=False)
    return W, shapes, layout


@pytest.mark.parametrize("with_layout", [True, False])
def test_small_cnn_zoo_reader(tmp_path, with_layout):
    from netanatomy.zoo.features import open_zoo

    W, shapes, layout = _write_small_cnn_zoo(tmp_path, with_layout=with_layout)
    zoo = open_zoo(tmp_path)
    assert zoo.kind == "smallcnnzoo" and zoo.num_params == 4970
    df = zoo.metrics
    assert df["run"].nunique() == 5 and list(df["epoch"][:3]) == [0, 1, 2]
    assert df["test_acc"].iloc[4] == pytest.approx(0.21) and df["activation"].iloc[3] == "relu"
    t = zoo.tensors(4)
    k2 = W[4, layout[3]["start_idx"] : layout[3]["end_idx"]].reshape(3, 3, 16, 16)
    assert t["conv2.weight"].shape == (16, 16, 3, 3)
    np.testing.assert_array_equal(t["conv2.weight"][5, 7], k2[:, :, 7, 5])  # (out, in, kh, kw)
    d = W[4, layout[7]["start_idx"] : layout[7]["end_idx"]].reshape(16, 10)
    np.testing.assert_array_equal(t["fc.weight"], d.T)
    np.testing.assert_array_equal(t["conv1.bias"], W[4, :16])


def test_small_cnn_zoo_reader_refuses_mismatch(tmp_path):
    from netanatomy.zoo.features import open_zoo

    _write_small_cnn_zoo(tmp_path)
    pd.read_csv(tmp_path / "metrics.csv").iloc[:-1].to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(UserError, match="metric rows"):
        open_zoo(tmp_path)


# ---------------------------------------------------------------------------
# predictors and maps


def test_split_by_run_never_shares_a_run():
    from netanatomy.zoo.predict import split_by_run

    runs = np.repeat([f"r{i}" for i in range(23)], 4)
    for seed in range(5):
        tr, te = split_by_run(runs, 0.25, seed)
        assert not (set(runs[tr]) & set(runs[te]))
        assert (tr | te).all() and not (tr & te).any()
        assert len(set(runs[te])) == 6


def test_predictors_learn_a_weight_statistic_and_split_by_run():
    pytest.importorskip("sklearn")
    from netanatomy.zoo.predict import fit_and_score

    rng = np.random.default_rng(0)
    n_runs, per = 60, 3
    runs = np.repeat([f"run{i}" for i in range(n_runs)], per)
    X = pd.DataFrame(rng.normal(size=(n_runs * per, 6)), columns=[f"f{i}" for i in range(6)])
    y = 1 / (1 + np.exp(-2 * X["f2"].to_numpy())) + 0.01 * rng.normal(size=len(X))
    rep = fit_and_score(X, y, runs, pd.DataFrame({"run": runs}), ("linear", "gbm"), splits=2, test_fraction=0.25)
    by = {(s["predictor"], s["split"]): s for s in rep.scores}
    assert by[("gbm", 0)]["r2"] > 0.9 and by[("linear", 0)]["tau"] > 0.8
    assert rep.importances["feature"].iloc[0] == "f2"
    for (pred, split), s in by.items():
        held = set(rep.predictions.query("predictor == @pred and split == @split")["run"])
        assert len(held) == s["test_runs"] == 15
    assert set(rep.summary_frame()["predictor"]) == {"linear", "gbm"}


def test_learning_curve_fits_on_nested_run_subsets_and_scores_the_same_held_out_runs():
    pytest.importorskip("sklearn")
    from netanatomy.errors import UserError
    from netanatomy.zoo.predict import fit_and_score, subsample_runs

    rng = np.random.default_rng(1)
    n_runs, per = 80, 2
    runs = np.repeat([f"run{i}" for i in range(n_runs)], per)
    X = pd.DataFrame(rng.normal(size=(n_runs * per, 5)), columns=[f"f{i}" for i in range(5)])
    y = np.tanh(X["f1"].to_numpy()) + 0.3 * X["f3"].to_numpy() ** 2 + 0.02 * rng.normal(size=len(X))
    rep = fit_and_score(X, y, runs, pd.DataFrame({"run": runs}), ("gbm",), splits=2, test_fraction=0.25,
                        train_sizes=(1.0, 0.1, 0.5))
    summ = rep.summary_frame().sort_values("train_size")
    assert list(summ["train_size"]) == [0.1, 0.5, 1.0]
    assert list(summ["train_runs"]) == [6, 30, 60]  # whole runs: 10 %, 50 %, all of the 60 training runs
    assert summ["r2_mean"].iloc[0] < summ["r2_mean"].iloc[2]  # more runs, better fit
    assert {s["test_runs"] for s in rep.scores} == {20}
    # held-out predictions only for the full size, the same held-out runs per split
    assert len(rep.predictions) == 2 * 20 * per
    tr = np.isin(runs, [f"run{i}" for i in range(60)])
    small, big = subsample_runs(runs, tr, 0.25, 3), subsample_runs(runs, tr, 0.5, 3)
    assert (small <= big).all() and (big <= tr).all() and not (small & ~tr).any()
    assert len(set(runs[small])) == 15 and small.sum() == 30  # whole runs only
    with pytest.raises(UserError, match="fractions"):
        fit_and_score(X, y, runs, None, ("linear",), train_sizes=(0.0, 1.0))
    with pytest.raises(UserError, match="fractions"):
        fit_and_score(X, y, runs, None, ("linear",), train_sizes="0")
    # a subset too small for the MLP's validation split: one line, not a traceback
    with pytest.raises(UserError, match="mlp could not be fitted on 4 training rows"):
        fit_and_score(X, y, runs, None, ("mlp",), splits=1, train_sizes=(0.01, 1.0))
    pytest.importorskip("matplotlib")
    from netanatomy.zoo.predict import prediction_plot

    full = summ[summ["train_size"] == 1.0].iloc[0]
    title = prediction_plot(rep, "gbm").axes[0].get_title()
    assert title == f"gbm: R2 {full['r2_mean']:.3f}, tau {full['tau_mean']:.3f}"  # the scores of the points shown


def test_map_finds_planted_regions():
    pytest.importorskip("sklearn")
    from netanatomy.zoo.features import LayoutEntry
    from netanatomy.zoo.regions import build_map, pairwise_distances, purity, task_vectors

    rng = np.random.default_rng(0)
    base = rng.normal(size=30)
    dirs = rng.normal(size=(3, 30))
    labels = np.repeat(["a", "b", "c"], 8)
    W = base + 2.0 * dirs[np.repeat([0, 1, 2], 8)] + 0.3 * rng.normal(size=(24, 30))
    T = task_vectors(W, base)
    D = pairwise_distances(T, "cosine")
    assert D.shape == (24, 24) and np.allclose(np.diag(D), 0) and np.allclose(D, D.T)
    assert D[0, 1] < D[0, 20]
    E = pairwise_distances(W, "euclidean")
    assert E[0, 5] == pytest.approx(np.linalg.norm(W[0] - W[5]))
    layout = [LayoutEntry("l1.weight", 0, 20, (20,)), LayoutEntry("l2.weight", 20, 30, (10,))]
    res = build_map(T, pd.DataFrame({"task": labels}), labels=("task",), layout=layout, X_layers=T)
    for p in res.purity:
        assert p["purity"] == 1.0 and p["ari"] == pytest.approx(1.0)
    assert res.coords.shape == (24, 2)
    per_layer = [d for d in res.distance_summary if d["space"].startswith("l1")]
    assert per_layer and per_layer[0]["between"] > per_layer[0]["within"]
    assert purity([0, 0, 1, 1], ["x", "y", "x", "y"]) == 0.5
    assert "cluster_kmeans" in res.to_frame().columns


def test_predict_and_map_on_a_generated_zoo(tmp_path, data):
    pytest.importorskip("sklearn")
    from netanatomy.zoo.predict import predict_zoo
    from netanatomy.zoo.regions import map_zoo

    generate_zoo(tmp_path, tiny_config(nets=12, group_size=2), SerialExecutor(), data=data)
    rep = predict_zoo(tmp_path, selections=("all",), predictors=("linear",), splits=1, test_fraction=0.25)
    s = rep.scores[0]
    assert s["test_runs"] == 3 and s["train_runs"] == 9 and s["test_rows"] == 9
    assert (tmp_path / "features" / ".done").is_dir()  # cached, resume-safe
    m = map_zoo(tmp_path, labels=("activation",), methods=("kmeans",))
    assert m.coords.shape == (12, 2) and m.info["base"] == "mean"
    m2 = map_zoo(tmp_path, base="init", labels=("optimizer",), methods=("kmeans",))
    assert m2.purity[0]["k"] == 3


def test_cli_errors_are_one_line(tmp_path, capsys):
    from netanatomy.cli import main

    for args in (["zoo", "predict", str(tmp_path / "nope")], ["map", str(tmp_path)],
                 ["zoo", "train", "--out", str(tmp_path / "z"), "--activations", "swish"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        _, err = capsys.readouterr()
        assert exc.value.code == 2
        assert len([l for l in err.strip().splitlines() if l.strip()]) == 1 and "Traceback" not in err


def test_finetune_zoo_and_map_against_its_base(tmp_path, data):
    pytest.importorskip("sklearn")
    from netanatomy.zoo.finetune import FinetuneConfig, finetune_zoo, task_view
    from netanatomy.zoo.regions import map_zoo

    v = task_view(data, "vflip")
    assert torch.equal(v.x_train[0], data.x_train[0].flip(0)) and torch.equal(v.y_train, data.y_train)
    c = task_view(data, "coarse")
    assert set(c.y_train.tolist()) <= {0, 1, 2} and torch.equal(c.x_test, data.x_test)
    with pytest.raises(UserError):
        task_view(data, "swirl")

    generate_zoo(tmp_path / "zoo", tiny_config(nets=1, group_size=1), SerialExecutor(), data=data)
    base = tmp_path / "zoo" / "checkpoints" / "net00000" / "epoch_002.safetensors"
    cfg = FinetuneConfig(tasks=("orig", "invert"), nets_per_task=3, steps=3, batch_size=8, eval_test=64)
    s, df = finetune_zoo(tmp_path / "ft", base, cfg, SerialExecutor(), data=data)
    assert s.ok and len(df) == 6 and set(df["task"]) == {"orig", "invert"}
    again, _ = finetune_zoo(tmp_path / "ft", base, cfg, SerialExecutor(), data=data)
    assert again.ran == []
    m = map_zoo(tmp_path / "ft", base=str(tmp_path / "ft" / "base.safetensors"), labels=("task",), methods=("kmeans",))
    assert m.coords.shape == (6, 2) and m.purity[0]["k"] == 2
    with pytest.raises(UserError):
        finetune_zoo(tmp_path / "ft", base, FinetuneConfig(tasks=("orig",), nets_per_task=1, steps=1), SerialExecutor(), data=data)


def test_predict_cli_on_the_published_layout(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from netanatomy.cli import main

    _write_small_cnn_zoo(tmp_path / "scz", n_runs=12)
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "predict", str(tmp_path / "scz"), "--epochs", "all", "--predictors", "linear",
              "--splits", "1", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert "linear: R2" in out
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["info"]["kind"] == "smallcnnzoo" and doc["scores"][0]["test_runs"] == 2
    assert doc["scores"][0]["test_rows"] == 6


def test_checkpoint_steps_and_discrete_train_fractions(data):
    cfg = tiny_config(nets=2, group_size=2, checkpoint_steps=(2, 5), train_fractions=(0.25, 1.0),
                      activations=("relu",), optimizers=("adam",), inits=("he_normal",))
    assert cfg.epochs == 2 and cfg.schedule() == [2, 5]
    (key, hps), = plan_groups(cfg)
    assert all(hp["train_fraction"] in (0.25, 1.0) for hp in hps)
    snaps, rows = train_stack(hps, cfg, data)
    assert [r["step"] for r in rows if r["run"] == hps[0]["run"]] == [0, 2, 5]
    seq_snaps, seq_rows = train_sequential(hps[0], cfg, data)
    assert [r["step"] for r in seq_rows] == [0, 2, 5]
    for e in range(3):
        for name in PARAM_NAMES:
            torch.testing.assert_close(snaps[e][0][name], seq_snaps[e][name], rtol=1e-4, atol=1e-5)
    # 2 steps then 3 more differ from 3 per epoch (a real schedule, not steps_per_epoch)
    plain, _ = train_stack(hps, tiny_config(nets=2, group_size=2, epochs=2, steps_per_epoch=3, train_fractions=(0.25, 1.0),
                                            activations=("relu",), optimizers=("adam",), inits=("he_normal",)), data)
    assert not torch.equal(plain[1][0]["conv1.weight"], snaps[1][0]["conv1.weight"])
    # a zoo described without the new fields keeps its identity (old zoo.json files still resume)
    old = ZooConfig.from_json({k: v for k, v in tiny_config().to_json().items() if k not in ("checkpoint_steps", "train_fractions")})
    assert old.identity() == tiny_config().identity()
    for bad in (dict(checkpoint_steps=(5, 5)), dict(checkpoint_steps=(0, 3)), dict(train_fractions=(0.0,)),
                dict(lr_range=(0.1, 0.01)), dict(dropout_zero_prob=1.5)):
        with pytest.raises(UserError):
            tiny_config(**bad).validate()


def test_train_cli_range_options(tmp_path, capsys):
    from netanatomy.cli import main

    for args, msg in ((["--lr-range", "0.1"], "--lr-range takes 2"), (["--checkpoint-steps", "10,5"], "increasing"),
                      (["--train-fractions", "0.5,x"], "--train-fractions takes"),
                      (["--lr-range", "1e-3,inf"], "finite"), (["--l2-range", "1e-3,1e-4"], "low <= high")):
        with pytest.raises(SystemExit) as exc:
            main(["zoo", "train", "--out", str(tmp_path / "z"), *args])
        _, err = capsys.readouterr()
        assert exc.value.code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "z").exists()


def test_unterthiner_features_and_noise_ceiling():
    from netanatomy.zoo.features import LayoutEntry, flat_features
    from netanatomy.zoo.predict import noise_ceiling, select_features

    layout = [LayoutEntry("conv1.weight", 0, 9, (1, 1, 3, 3)), LayoutEntry("conv1.bias", 9, 10, (1,))]
    X = flat_features(np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32), layout)
    U = select_features(X, "unterthiner")
    assert U.shape[1] == 2 * 7 and not any(c.endswith((".l1", ".l2")) for c in U.columns)
    assert select_features(X, "stats").shape[1] == X.shape[1] == 2 * 9
    with pytest.raises(UserError):
        select_features(X, "nope")
    y = np.random.default_rng(1).uniform(0.6, 0.9, size=300)
    exact, noisy = noise_ceiling(y, 10**9, reps=20), noise_ceiling(y, 500, reps=20)
    assert exact["r2"] > 0.9999 and exact["tau"] > 0.999
    assert noisy["r2"] < exact["r2"] and noisy["tau"] < 0.9 and noisy["n_eval"] == 500
    # binomial sd at p ~ 0.75 on 500 images
    assert noisy["noise_sd"] == pytest.approx(np.sqrt(np.mean(y * (1 - y)) / 500), rel=0.01)


def test_gbm_tuned_by_grouped_inner_cv_only_sees_its_rows(monkeypatch):
    pytest.importorskip("sklearn")
    from netanatomy.zoo.predict import GBM_GRID, GroupTunedGBM

    rng = np.random.default_rng(0)
    n_runs, per = 40, 3  # ungrouped 3-fold CV on 60 rows would train on 40 rows, not a multiple of 3
    runs = np.repeat([f"run{i}" for i in range(n_runs)], per)
    X = rng.normal(size=(n_runs * per, 4))
    y = np.tanh(X[:, 1]) + 0.01 * rng.normal(size=len(X))
    seen = []

    class Spy(GroupTunedGBM):
        def _model(self, params):
            m = super()._model({**params, "max_iter": min(params["max_iter"], 60)})
            fit = m.fit

            def spy_fit(Xa, ya):
                seen.append(len(ya))
                return fit(Xa, ya)

            m.fit = spy_fit
            return m

    g = Spy(seed=0, n_candidates=2).fit(X[:60], y[:60], groups=runs[:60])
    assert len(g.cv_results_) == 3 and all(set(r) >= set(GBM_GRID) for r in g.cv_results_)
    assert all(g.best_params_[k] in GBM_GRID[k] for k in GBM_GRID if k != "max_iter")
    assert max(seen) == 60 and all(n % per == 0 for n in seen)  # inner folds keep runs whole
    assert g.score(X[60:], y[60:]) > 0.8

    # as the only predictor of a report (its importances come from the refitted model)
    import netanatomy.zoo.predict as predict

    monkeypatch.setattr(predict, "GBM_GRID", {k: (v[0],) for k, v in GBM_GRID.items()})
    rep = predict.fit_and_score(pd.DataFrame(X, columns=list("abcd")), y, runs, pd.DataFrame({"run": runs}),
                                ("gbm-cv",), splits=1, test_fraction=0.25, importance_repeats=1)
    assert rep.scores[0]["r2"] > 0.8 and "params" in rep.scores[0]
    assert rep.importances["feature"].iloc[0] == "b"


def test_feature_cache_follows_checkpoints_when_rows_move(tmp_path, data):
    # a zoo that grows gets new rows in between; cached features must not stay with row numbers
    from netanatomy.zoo.features import open_zoo
    from netanatomy.zoo.predict import zoo_features

    generate_zoo(tmp_path, tiny_config(nets=4, group_size=2), SerialExecutor(), data=data)
    zoo = open_zoo(tmp_path)
    rows = list(range(len(zoo.metrics)))
    cache = tmp_path / "features"
    first = zoo_features(zoo, rows, cache_dir=cache)
    moved = zoo.metrics.iloc[::-1].reset_index(drop=True)
    for name in ("metrics.parquet", "metrics.csv"):
        if (tmp_path / name).exists():
            (moved.to_parquet if name.endswith("parquet") else lambda p: moved.to_csv(p, index=False))(tmp_path / name)
    zoo2 = open_zoo(tmp_path)
    assert zoo2.metrics["checkpoint"].iloc[0] == zoo.metrics["checkpoint"].iloc[-1]
    cached = zoo_features(zoo2, rows, cache_dir=cache)
    fresh = zoo_features(zoo2, rows)
    pd.testing.assert_frame_equal(cached, fresh)
    assert not first.equals(cached)  # the rows really hold other checkpoints now
