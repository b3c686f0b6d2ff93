"""Accuracy prediction from weights (Unterthiner et al. 2020) over a zoo.

Rows are checkpoints, features are per-tensor weight statistics (see
:mod:`netanatomy.zoo.features`), the target is a metric column (``test_acc``
by default). Splits are by training run, never by checkpoint: every checkpoint
of a run lands on the same side, so a predictor cannot score well by
recognising a run it has seen at another epoch. Predictors (scikit-learn,
the ``ml`` extra, imported lazily):

* ``linear``: ridge regression on standardised features;
* ``gbm``: histogram gradient boosting;
* ``mlp``: a two-hidden-layer perceptron on standardised features;
* ``gbm-cv``: histogram gradient boosting whose hyper-parameters (rounds,
  learning rate, tree size, leaf size, L2) are chosen by an inner 3-fold
  cross-validation grouped by run, on the training runs of the split only
  (the held-out runs never take part in the choice);
* ``deepsets`` (:mod:`netanatomy.zoo.learned`, torch): a permutation-invariant
  network over each hidden layer's units, learning from the raw weights rather
  than the feature table; fitted on the same training runs and scored on the
  same held-out runs as the others (its rows are the rows with finite features).

Every score records the predictor's fitting time (``fit_s``, seconds on this CPU).

Feature sets: ``stats`` (per tensor mean, std, 0/25/50/75/100th percentiles,
L1 and L2 norm) or ``unterthiner`` (their exact set: the same without the two
norms, 7 statistics x 8 tensors = 56 features); ``--esd`` adds ESD metrics.

:func:`noise_ceiling` bounds the scores any predictor can reach when the target
is an accuracy measured on ``n`` test images (binomial sampling noise).

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

PREDICTORS = ("linear", "gbm", "mlp", "gbm-cv")
LEARNED_PREDICTORS = ("deepsets",)
ALL_PREDICTORS = PREDICTORS + LEARNED_PREDICTORS
FEATURE_SETS = ("stats", "unterthiner")
UNTERTHINER_STATS = ("mean", "std", "q0", "q25", "q50", "q75", "q100")


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


def make_predictor(name: str, seed: int = 0, layout=None):
    if name in LEARNED_PREDICTORS:
        if layout is None:
            raise UserError(f"predictor {name} learns from the weights and needs the zoo's layout")
        from .learned import make_learned

        return make_learned(name, layout, seed)
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
    if name == "gbm-cv":
        return GroupTunedGBM(seed=seed)
    raise UserError(f"unknown predictor {name!r}; choose from {', '.join(ALL_PREDICTORS)}")


# the inner-CV search space of ``gbm-cv`` (a fixed random subset of this grid)
GBM_GRID = {
    "learning_rate": (0.02, 0.05, 0.1),
    "max_iter": (300, 1000, 2000),
    "max_leaf_nodes": (7, 15, 31, 63),
    "min_samples_leaf": (3, 10, 20),
    "l2_regularization": (0.0, 1e-3, 1.0),
}


class GroupTunedGBM:
    """Gradient boosting tuned by inner cross-validation grouped by run.

    ``fit(X, y, groups)`` scores ``n_candidates`` settings drawn (with a fixed
    seed) from :data:`GBM_GRID` by 3-fold ``GroupKFold`` on the given rows only,
    then refits the best on all of them. Nothing outside ``X`` is looked at."""

    needs_groups = True

    def __init__(self, seed: int = 0, n_candidates: int = 14, folds: int = 3):
        self.seed, self.n_candidates, self.folds = seed, n_candidates, folds

    def candidates(self) -> list[dict]:
        import itertools

        keys = list(GBM_GRID)
        grid = [dict(zip(keys, v)) for v in itertools.product(*(GBM_GRID[k] for k in keys))]
        rng = np.random.default_rng(12345)  # the same candidates for every split
        pick = rng.choice(len(grid), size=min(self.n_candidates, len(grid)), replace=False)
        default = {"learning_rate": 0.05, "max_iter": 500, "max_leaf_nodes": 31, "min_samples_leaf": 10,
                   "l2_regularization": 1e-3}
        return [default] + [grid[i] for i in sorted(pick)]

    def _model(self, params: dict):
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(random_state=self.seed, **params)

    def fit(self, X, y, groups=None):
        from sklearn.metrics import mean_squared_error
        from sklearn.model_selection import GroupKFold, KFold

        X, y = np.asarray(X), np.asarray(y)
        groups = np.arange(len(y)) if groups is None else np.asarray([str(g) for g in groups])
        n_groups = len(np.unique(groups))
        folds = min(self.folds, n_groups)
        cands = self.candidates()
        self.cv_results_ = []
        if folds >= 2:
            if n_groups < len(y):  # several rows per run: keep each run in one fold
                parts = list(GroupKFold(n_splits=folds).split(X, y, groups))
            else:  # one row per run: plain shuffled folds
                parts = list(KFold(folds, shuffle=True, random_state=self.seed).split(X, y))
            for params in cands:
                errs = []
                for tr, va in parts:
                    m = self._model(params).fit(X[tr], y[tr])
                    errs.append(mean_squared_error(y[va], m.predict(X[va])))
                self.cv_results_.append({**params, "cv_mse": float(np.mean(errs))})
            self.best_params_ = min(self.cv_results_, key=lambda r: r["cv_mse"])
            self.best_params_ = {k: v for k, v in self.best_params_.items() if k != "cv_mse"}
        else:
            self.best_params_ = cands[0]
        self.model_ = self._model(self.best_params_).fit(X, y)
        return self

    def predict(self, X):
        return self.model_.predict(np.asarray(X))

    def score(self, X, y):
        from sklearn.metrics import r2_score

        return r2_score(y, self.predict(X))


def select_features(X, feature_set: str = "stats"):
    """Columns of a feature table for one feature set (``stats`` keeps all)."""
    if feature_set not in FEATURE_SETS:
        raise UserError(f"unknown feature set {feature_set!r}; choose from {', '.join(FEATURE_SETS)}")
    if feature_set == "stats":
        return X
    keep = [c for c in X.columns if str(c).rsplit(".", 1)[-1] in UNTERTHINER_STATS
            and str(c).count(".") == 2 and not str(c).startswith("esd")]
    esd = [c for c in X.columns if c not in keep and (str(c).startswith("esd") or str(c).count(".") != 2)]
    return X[keep + esd]


def noise_ceiling(y, n_eval: int, reps: int = 200, seed: int = 0) -> dict:
    """Best R^2 and Kendall tau a predictor of the *true* accuracy can score against
    accuracies measured on ``n_eval`` test images (independent binomial noise,
    sd sqrt(p(1-p)/n)); the observed accuracies stand in for the true ones."""
    y = np.asarray(y, dtype=float)
    y = y[np.isfinite(y)]
    if len(y) < 3 or n_eval < 1:
        return {"n_eval": int(n_eval), "r2": math.nan, "tau": math.nan, "tau_sd": math.nan, "noise_sd": math.nan}
    p = np.clip(y, 0.5 / n_eval, 1 - 0.5 / n_eval)
    sd = np.sqrt(p * (1 - p) / n_eval)
    rng = np.random.default_rng(seed)
    taus = [kendall_tau(p, p + sd * rng.standard_normal(len(p))) for _ in range(reps)]
    var = float(np.var(y))
    return {"n_eval": int(n_eval), "r2": float(1 - np.mean(sd**2) / var) if var > 0 else math.nan,
            "tau": float(np.mean(taus)), "tau_sd": float(np.std(taus)), "noise_sd": float(np.sqrt(np.mean(sd**2)))}


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
        keys = ["selection", "predictor"] + (["train_size"] if "train_size" in df.columns else [])
        agg = df.groupby(keys).agg(
            r2_mean=("r2", "mean"), r2_std=("r2", "std"), tau_mean=("tau", "mean"), tau_std=("tau", "std"),
            splits=("split", "count"), test_runs=("test_runs", "mean"), train_runs=("train_runs", "mean"),
            **({"fit_s": ("fit_s", "mean")} if "fit_s" in df.columns else {}),
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
    train_sizes: Sequence[float] = (1.0,),
    weights: np.ndarray | None = None,
    layout=None,
) -> PredictionReport:
    """Fit every predictor on ``splits`` random run-level splits; score held-out runs.

    ``weights`` (flat weight rows aligned with ``X``) and ``layout`` feed the
    learned predictors (``deepsets``); they see the same rows, training runs and
    held-out runs as the feature-based ones.

    ``train_sizes`` (fractions in (0, 1]) gives a learning curve: in each split
    the predictors are also fitted on that fraction of the training runs (nested
    random subsets, whole runs) and scored on the same held-out runs. Held-out
    predictions and importances are kept for the largest size only."""
    import pandas as pd

    _sklearn()
    if not isinstance(X, pd.DataFrame):
        X = pd.DataFrame(np.asarray(X))
    if len(X) != len(y):
        raise UserError(f"{len(X)} feature rows but {len(y)} targets")
    if weights is not None:
        weights = np.asarray(weights)
        if weights.ndim != 2 or len(weights) != len(y):
            raise UserError(f"weights of shape {tuple(weights.shape)} do not match {len(y)} rows")
    elif any(p in LEARNED_PREDICTORS for p in predictors):
        raise UserError(f"predictors {', '.join(p for p in predictors if p in LEARNED_PREDICTORS)} learn from the "
                        "weights: pass weights= and layout=")
    ok = np.isfinite(X.to_numpy()).all(1) & np.isfinite(y)
    if weights is not None:
        ok &= np.isfinite(weights).all(1)
        weights = weights[ok]
    X, y = X[ok].reset_index(drop=True), np.asarray(y)[ok]
    runs = np.asarray([str(r) for r in np.asarray(runs)[ok]])
    meta = meta[ok].reset_index(drop=True) if meta is not None else pd.DataFrame(index=range(len(y)))
    if len(np.unique(runs)) < 4:
        raise UserError(f"too few runs with finite features to split ({len(np.unique(runs))}); train a bigger zoo")
    from threadpoolctl import threadpool_limits

    sizes = check_train_sizes(train_sizes)
    with threadpool_limits(limits=1):  # small problems: threads only add contention
        return _fit_and_score(X, y, runs, meta, predictors, splits, test_fraction, seed, selection, importance,
                              importance_repeats, sizes, weights, layout)


def check_train_sizes(train_sizes: Sequence[float]) -> tuple[float, ...]:
    """Sorted, distinct learning-curve fractions, each in (0, 1]."""
    if isinstance(train_sizes, (str, bytes)) or not hasattr(train_sizes, "__iter__"):
        train_sizes = [train_sizes]
    train_sizes = list(train_sizes)
    try:
        sizes = tuple(sorted({float(f) for f in train_sizes}))
    except (TypeError, ValueError):
        raise UserError(f"train sizes must be numbers in (0, 1], got {', '.join(map(str, train_sizes))}") from None
    if not sizes or not all(0 < f <= 1 for f in sizes):
        raise UserError(f"train sizes must be fractions in (0, 1], got {', '.join(map(str, train_sizes)) or 'none'}")
    return sizes


def subsample_runs(runs: np.ndarray, train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of the training rows of a random ``fraction`` of the training runs
    (at least 2 runs; the same seed gives nested subsets for growing fractions)."""
    if fraction >= 1:
        return train
    uniq = np.unique(runs[train])
    order = np.random.default_rng(seed).permutation(uniq)
    keep = set(order[: max(2, int(round(fraction * len(uniq))))].tolist())
    return train & np.array([r in keep for r in runs])


def importance_of(predictors: Sequence[str]) -> str | None:
    """The predictor whose permutation importances are reported: gbm, else gbm-cv."""
    for name in ("gbm", "gbm-cv"):
        if name in predictors:
            return name
    return None


def _fit_and_score(X, y, runs, meta, predictors, splits, test_fraction, seed, selection, importance, importance_repeats,
                   sizes=(1.0,), weights=None, layout=None):
    import time

    import pandas as pd
    from sklearn.metrics import r2_score

    scores, preds, imps = [], [], []
    curve = len(sizes) > 1 or sizes[-1] < 1
    for s, size in ((s, size) for s in range(splits) for size in sizes):
        tr_all, te = split_by_run(runs, test_fraction, seed + s)
        tr = subsample_runs(runs, tr_all, size, seed + s + 7919)
        assert not (set(runs[tr]) & set(runs[te]))
        last = size == sizes[-1]
        for name in predictors:
            model = make_predictor(name, seed + s, layout=layout)
            learned = getattr(model, "needs_weights", False)
            t0 = time.perf_counter()
            try:
                if learned:
                    model.fit(weights[tr], y[tr], groups=runs[tr])
                elif getattr(model, "needs_groups", False):
                    model.fit(X[tr].to_numpy(), y[tr], groups=runs[tr])
                else:
                    model.fit(X[tr].to_numpy(), y[tr])
            except ValueError as exc:  # e.g. too few rows for the MLP's validation split
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(f"predictor {name} could not be fitted on {int(tr.sum())} training rows "
                                f"({len(set(runs[tr]))} runs{f', train size {size}' if curve else ''}): {first}") from None
            fit_s = time.perf_counter() - t0
            p = model.predict(weights[te] if learned else X[te].to_numpy())
            scores.append({
                "selection": selection, "split": s, "predictor": name,
                "r2": float(r2_score(y[te], p)), "tau": kendall_tau(y[te], p),
                "train_rows": int(tr.sum()), "test_rows": int(te.sum()),
                "train_runs": int(len(set(runs[tr]))), "test_runs": int(len(set(runs[te]))), "fit_s": float(fit_s),
                **({"best_epoch": model.best_epoch_, "val_runs": len(model.val_runs_)} if learned else {}),
                **({"train_size": size} if curve else {}),
                **({"params": dict(model.best_params_)} if hasattr(model, "best_params_") else {}),
            })
            if not last:
                continue
            preds.append(pd.DataFrame({"selection": selection, "split": s, "predictor": name, "run": runs[te],
                                       **{c: meta.loc[te, c].to_numpy() for c in meta.columns if c != "run"},
                                       "y_true": y[te], "y_pred": p}))
            if importance and name == importance_of(predictors):
                from sklearn.inspection import permutation_importance

                est = getattr(model, "model_", model)  # gbm-cv: the refitted sklearn model
                r = permutation_importance(est, X[te].to_numpy(), y[te], n_repeats=importance_repeats,
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


def _row_identities(zoo, rows: Sequence[int]) -> list[str]:
    """What a cached feature row stands for: the checkpoint file, its size and
    modification time (for zoos stored as one weights matrix, the row number)."""
    df = zoo.metrics
    if "checkpoint" not in df.columns:
        return [str(r) for r in rows]
    names = df["checkpoint"].astype(str).to_numpy()
    out = []
    for r in rows:
        try:
            st = (Path(zoo.root) / names[r]).stat()
            out.append(f"{names[r]}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append(f"{names[r]}:missing")
    return out


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
    ident = _row_identities(zoo, rows)
    items = []
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        # the key names the checkpoints, not just the row numbers: rows move when a zoo grows
        h = hashlib.sha256(f"{part}|{ident[i : i + chunk]}|{esd}".encode()).hexdigest()[:12]
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
    feature_set: str = "stats",
    train_sizes: Sequence[float] = (1.0,),
) -> PredictionReport:
    """Open a zoo, compute features, fit and score the predictors for each row selection."""
    import pandas as pd

    from .features import open_zoo

    _sklearn()
    if feature_set not in FEATURE_SETS:
        raise UserError(f"unknown feature set {feature_set!r}; choose from {', '.join(FEATURE_SETS)}")
    train_sizes = check_train_sizes(train_sizes)
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
    feats = select_features(feats, feature_set)
    learned = [p for p in predictors if p in LEARNED_PREDICTORS]
    weights = zoo.flat(rows) if learned else None
    pos = {int(r): i for i, r in enumerate(rows)}
    n_eval = eval_test_size(zoo)
    reports, ceilings = [], {}
    meta_cols = [c for c in ("run", "epoch") if c in df.columns]
    for sel, m in masks.items():
        r = np.flatnonzero(m & union)
        X = feats.loc[r].reset_index(drop=True)
        y = pd.to_numeric(df[target].iloc[r], errors="coerce").to_numpy(dtype=float)
        reports.append(fit_and_score(X, y, df["run"].iloc[r].to_numpy(), df[meta_cols].iloc[r].reset_index(drop=True),
                                     predictors, splits, test_fraction, seed, selection=sel, train_sizes=train_sizes,
                                     weights=weights[[pos[int(i)] for i in r]] if learned else None,
                                     layout=zoo.layout if learned else None))
        if n_eval:
            ceilings[sel] = noise_ceiling(y, n_eval)
    scores = [s for rep in reports for s in rep.scores]
    preds = pd.concat([rep.predictions for rep in reports], ignore_index=True)
    imp = reports[0].importances
    info = {"zoo": str(path), "kind": zoo.kind, "target": target, "selections": list(selections),
            "splits": splits, "test_fraction": test_fraction, "esd": esd, "feature_set": feature_set,
            "train_sizes": list(train_sizes),
            "features": int(feats.shape[1]), "noise_ceiling": ceilings,
            "rows": {sel: rep.info for sel, rep in zip(selections, reports)},
            "excluded_diverged": int(df["diverged"].fillna(False).astype(bool).sum()) if "diverged" in df.columns else 0}
    return PredictionReport(scores, preds, imp, info)


def eval_test_size(zoo) -> int | None:
    """Test images behind the zoo's test accuracies: ours from zoo.json (capped by
    the 10,000 Fashion-MNIST test images), the Small CNN Zoo's full test set."""
    import json

    if zoo.kind != "netanatomy":
        return 10000
    try:
        cfg = json.loads((Path(zoo.root) / "zoo.json").read_text())["config"]
        return int(min(int(cfg.get("eval_test", 10000)), 10000))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    full = max((s.get("train_size", 1.0) for s in sc), default=1.0)
    sc = [s for s in sc if s.get("train_size", 1.0) == full]  # the points shown come from the largest size
    if sc:
        ax.set_title(f"{predictor}: R2 {np.mean([s['r2'] for s in sc]):.3f}, tau {np.mean([s['tau'] for s in sc]):.3f}")
    ax.set_xlabel(f"true {report.info.get('target', 'target')}")
    ax.set_ylabel("predicted from weights")
    return fig
