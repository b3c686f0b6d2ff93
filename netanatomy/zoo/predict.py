"""Accuracy prediction from weights (Unterthiner et al. 2020) over a zoo.

Rows are checkpoints, features are per-tensor weight statistics (see
:mod:`netanatomy.zoo.features`), the target is a metric column (``test_acc``
by default). Splits are by training run, never by checkpoint: every checkpoint
of a run lands on the same side, so a predictor cannot score well by
recognising a run it has seen at another epoch. Predictors (scikit-learn,
the ``ml`` extra, imported lazily):

* ``linear``: ridge regression on standardised features;
* ``gbm``: histogram gradient boosting;
* ``mlp``: a two-hidden-layer perceptron on standardised features.

Scores on the held-out runs: R^2 and Kendall's tau; feature importance is the
permutation importance of the boosting model on the held-out rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError

PREDICTORS = ("linear", "gbm", "mlp")


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise UserError("accuracy prediction needs scikit-learn: pip install 'netanatomy[ml]'") from exc


def signed_log(x):
    """sign(x) * log1p(|x|): tames the heavy tails of weight statistics (norms of
    diverging runs) for the linear model and the MLP; trees do not need it."""
    return np.sign(x) * np.log1p(np.abs(x))


class ClippedRegressor:
    """Clip predictions to the target range seen in training (accuracies are bounded)."""

    def __init__(self, model):
        self.model = model

    def fit(self, X, y):
        self.model.fit(X, y)
        self.lo_, self.hi_ = float(np.min(y)), float(np.max(y))
        return self

    def predict(self, X):
        return np.clip(self.model.predict(X), self.lo_, self.hi_)

    def score(self, X, y):
        from sklearn.metrics import r2_score

        return r2_score(y, self.predict(X))


def make_predictor(name: str, seed: int = 0):
    _sklearn()
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    if name == "linear":
        from sklearn.linear_model import RidgeCV

        return ClippedRegressor(make_pipeline(FunctionTransformer(signed_log), StandardScaler(),
                                              RidgeCV(alphas=np.logspace(-4, 3, 15))))
    if name == "gbm":
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(max_iter=500, learning_rate=0.05, max_leaf_nodes=31, min_samples_leaf=10,
                                             l2_regularization=1e-3, random_state=seed)
    if name == "mlp":
        from sklearn.neural_network import MLPRegressor

        return ClippedRegressor(make_pipeline(
            FunctionTransformer(signed_log),
            StandardScaler(),
            MLPRegressor(hidden_layer_sizes=(128, 64), alpha=1e-2, learning_rate_init=1e-3, max_iter=2000,
                         early_stopping=True, validation_fraction=0.15, n_iter_no_change=50, random_state=seed),
        ))
    raise UserError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}")


def split_by_run(runs: Sequence, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train / test masks over rows such that no run is on both sides."""
    runs = np.asarray([str(r) for r in runs])
    uniq = np.unique(runs)
    if len(uniq) < 2:
        raise UserError("splitting by run needs at least two runs")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    n_test = min(max(1, int(round(test_fraction * len(uniq)))), len(uniq) - 1)
    test_runs = set(perm[:n_test].tolist())
    test = np.array([r in test_runs for r in runs])
    return ~test, test


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    t = kendalltau(a, b).statistic
    return float(t) if t is not None and math.isfinite(t) else math.nan


@dataclass
class PredictionReport:
    """Scores per split and predictor, held-out predictions, feature importances."""

    scores: list[dict]
    predictions: "object"  # DataFrame: split, predictor, run, epoch, y_true, y_pred
    importances: "object"  # DataFrame: feature, importance (mean over splits), std
    info: dict = field(default_factory=dict)

    def summary_frame(self):
        import pandas as pd

        df = pd.DataFrame(self.scores)
        if df.empty:
            return df
        agg = df.groupby(["selection", "predictor"]).agg(
            r2_mean=("r2", "mean"), r2_std=("r2", "std"), tau_mean=("tau", "mean"), tau_std=("tau", "std"),
            splits=("split", "count"), test_runs=("test_runs", "mean"),
        ).reset_index()
        return agg

    def to_json(self) -> dict:
        return {
            "info": self.info,
            "scores": self.scores,
            "summary": self.summary_frame().to_dict("records"),
            "importances": self.importances.head(30).to_dict("records") if len(self.importances) else [],
        }


def select_rows(df, epochs: str = "final"):
    """Row mask: ``final`` (last checkpoint of each run), ``trained`` (every epoch
    but 0), ``all``, or a comma list of epoch numbers."""
    if epochs == "all":
        return np.ones(len(df), dtype=bool)
    if epochs == "trained":
        return np.array(df["epoch"] > 0, dtype=bool)
    if epochs == "final":
        last = df.groupby("run")["epoch"].transform("max")
        return np.array(df["epoch"] == last, dtype=bool)
    try:
        wanted = {int(e) for e in epochs.split(",")}
    except ValueError:
        raise UserError(f"--epochs takes final, trained, all or a comma list of numbers, got {epochs!r}") from None
    return np.array(df["epoch"].isin(wanted), dtype=bool)


def fit_and_score(
    X,
    y: np.ndarray,
    runs: Sequence,
    meta=None,
    predictors: Sequence[str] = PREDICTORS,
    splits: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    selection: str = "",
    importance: bool = True,
    importance_repeats: int = 3,
) -> PredictionReport:
    """Fit every predictor on ``splits`` random run-level splits; score held-out runs."""
    import pandas as pd

    _sklearn()
    if not isinstance(X, pd.DataFrame):
        X = pd.DataFrame(np.asarray(X))
    ok = np.isfinite(X.to_numpy()).all(1) & np.isfinite(y)
    X, y = X[ok].reset_index(drop=True), np.asarray(y)[ok]
    runs = np.asarray([str(r) for r in np.asarray(runs)[ok]])
    meta = meta[ok].reset_index(drop=True) if meta is not None else pd.DataFrame(index=range(len(y)))
    if len(np.unique(runs)) < 4:
        raise UserError(f"too few runs with finite features to split ({len(np.unique(runs))}); train a bigger zoo")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # small problems: threads only add contention
        return _fit_and_score(X, y, runs, meta, predictors, splits, test_fraction, seed, selection, importance,
                              importance_repeats)


def _fit_and_score(X, y, runs, meta, predictors, splits, test_fraction, seed, selection, importance, importance_repeats):
    import pandas as pd
    from sklearn.metrics import r2_score

    scores, preds, imps = [], [], []
    for s in range(splits):
        tr, te = split_by_run(runs, test_fraction, seed + s)
        assert not (set(runs[tr]) & set(runs[te]))
        for name in predictors:
            model = make_predictor(name, seed + s)
            model.fit(X[tr].to_numpy(), y[tr])
            p = model.predict(X[te].to_numpy())
            scores.append({
                "selection": selection, "split": s, "predictor": name,
                "r2": float(r2_score(y[te], p)), "tau": kendall_tau(y[te], p),
                "train_rows": int(tr.sum()), "test_rows": int(te.sum()),
                "train_runs": int(len(set(runs[tr]))), "test_runs": int(len(set(runs[te]))),
            })
            preds.append(pd.DataFrame({"selection": selection, "split": s, "predictor": name, "run": runs[te],
                                       **{c: meta.loc[te, c].to_numpy() for c in meta.columns if c != "run"},
                                       "y_true": y[te], "y_pred": p}))
            if importance and name == "gbm":
                from sklearn.inspection import permutation_importance

                r = permutation_importance(model, X[te].to_numpy(), y[te], n_repeats=importance_repeats,
                                           random_state=seed + s, scoring="r2")
                imps.append(pd.Series(r.importances_mean, index=X.columns))
    if imps:
        m = pd.concat(imps, axis=1)
        importances = pd.DataFrame({"feature": m.index, "importance": m.mean(axis=1).to_numpy(), "std": m.std(axis=1).fillna(0).to_numpy()})
        importances = importances.sort_values("importance", ascending=False).reset_index(drop=True)
    else:
        importances = pd.DataFrame(columns=["feature", "importance", "std"])
    return PredictionReport(scores, pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(), importances,
                            {"rows": int(len(y)), "runs": int(len(np.unique(runs))), "features": int(X.shape[1])})


# ---------------------------------------------------------------------------
# features of a zoo, resumable and on any executor


def _feature_work(payload):
    """Work function: features of a chunk of zoo rows."""
    from .features import esd_features, flat_features, open_zoo, unflatten

    zoo = open_zoo(payload["root"])
    rows = payload["rows"]
    W = zoo.flat(rows)
    df = flat_features(W, zoo.layout)
    recs = df.to_dict("list")
    if payload.get("esd"):
        extra = [esd_features({e.name: unflatten(W[i], e) for e in zoo.layout}) if np.isfinite(W[i]).all() else {}
                 for i in range(len(rows))]
        keys = sorted({k for d in extra for k in d})
        for k in keys:
            recs[k] = [d.get(k, math.nan) for d in extra]
    return {"rows": list(rows), "columns": recs}


def zoo_features(zoo, rows: Sequence[int], cache_dir: Path | None = None, executor=None, esd: bool = False,
                 chunk: int | None = None, progress=None):
    """Feature table for ``rows`` of ``zoo`` (index = row). With ``cache_dir``
    the chunks are cached resume-safely (a re-run reads finished chunks)."""
    import hashlib
    import tempfile

    import pandas as pd

    from ..parallel import SerialExecutor, WorkItem, run_resumable

    rows = [int(r) for r in rows]
    if chunk is None:  # file-per-checkpoint zoos: small chunks; one big matrix: big ones
        chunk = 250 if zoo.kind == "netanatomy" else 5000
    if esd:
        chunk = min(chunk, 100)
    items = []
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        h = hashlib.sha256(f"{part}|{esd}".encode()).hexdigest()[:12]
        items.append(WorkItem(f"features-{'esd-' if esd else ''}{i // chunk:05d}-{h}",
                              {"root": str(zoo.root), "rows": part, "esd": esd}))
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory()
        cache_dir = Path(tmp.name)
    try:
        ex = executor or SerialExecutor()
        summary = run_resumable(_feature_work, items, cache_dir, executor=ex, progress=progress)
        if summary.failures:
            f = summary.failures[0]
            raise UserError(f"feature extraction failed for {len(summary.failures)} chunks (first: {f.error})")
        frames = []
        for rec in summary.records.values():
            frames.append(pd.DataFrame(rec["columns"], index=rec["rows"]))
        return pd.concat(frames).sort_index() if frames else pd.DataFrame()
    finally:
        if tmp is not None:
            tmp.cleanup()


def predict_zoo(
    path,
    target: str = "test_acc",
    selections: Sequence[str] = ("final",),
    predictors: Sequence[str] = PREDICTORS,
    splits: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    esd: bool = False,
    executor=None,
    cache: bool = True,
    progress=None,
) -> PredictionReport:
    """Open a zoo, compute features, fit and score the predictors for each row selection."""
    import pandas as pd

    from .features import open_zoo

    _sklearn()
    zoo = open_zoo(path)
    df = zoo.metrics
    if target not in df.columns:
        raise UserError(f"target {target!r} is not a metrics column (have: {', '.join(map(str, df.columns))})")
    masks = {sel: select_rows(df, sel) for sel in selections}
    union = np.zeros(len(df), dtype=bool)
    for m in masks.values():
        union |= m
    if "diverged" in df.columns:
        union &= ~df["diverged"].fillna(False).astype(bool).to_numpy()
    rows = np.flatnonzero(union)
    cache_dir = (Path(path) / "features") if cache and zoo.kind == "netanatomy" else None
    feats = zoo_features(zoo, rows, cache_dir=cache_dir, executor=executor, esd=esd, progress=progress)
    reports = []
    meta_cols = [c for c in ("run", "epoch") if c in df.columns]
    for sel, m in masks.items():
        r = np.flatnonzero(m & union)
        X = feats.loc[r].reset_index(drop=True)
        y = pd.to_numeric(df[target].iloc[r], errors="coerce").to_numpy(dtype=float)
        reports.append(fit_and_score(X, y, df["run"].iloc[r].to_numpy(), df[meta_cols].iloc[r].reset_index(drop=True),
                                     predictors, splits, test_fraction, seed, selection=sel))
    scores = [s for rep in reports for s in rep.scores]
    preds = pd.concat([rep.predictions for rep in reports], ignore_index=True)
    imp = reports[0].importances
    info = {"zoo": str(path), "kind": zoo.kind, "target": target, "selections": list(selections),
            "splits": splits, "test_fraction": test_fraction, "esd": esd,
            "rows": {sel: rep.info for sel, rep in zip(selections, reports)},
            "excluded_diverged": int(df["diverged"].fillna(False).astype(bool).sum()) if "diverged" in df.columns else 0}
    return PredictionReport(scores, preds, imp, info)


# ---------------------------------------------------------------------------
# pictures (separate from computation)


def prediction_plot(report: PredictionReport, predictor: str = "gbm", selection: str | None = None, ax=None):
    """Predicted vs true target on held-out runs (all splits)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    df = report.predictions
    df = df[df["predictor"] == predictor]
    if selection is not None:
        df = df[df["selection"] == selection]
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    else:
        fig = ax.figure
    ax.scatter(df["y_true"], df["y_pred"], s=6, alpha=0.5)
    lo = float(min(df["y_true"].min(), df["y_pred"].min())) if len(df) else 0.0
    hi = float(max(df["y_true"].max(), df["y_pred"].max())) if len(df) else 1.0
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    sc = [s for s in report.scores if s["predictor"] == predictor and (selection is None or s["selection"] == selection)]
    if sc:
        ax.set_title(f"{predictor}: R2 {np.mean([s['r2'] for s in sc]):.3f}, tau {np.mean([s['tau'] for s in sc]):.3f}")
    ax.set_xlabel(f"true {report.info.get('target', 'target')}")
    ax.set_ylabel("predicted from weights")
    return fig
