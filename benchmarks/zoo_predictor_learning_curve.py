"""How the accuracy predictor improves with the number of training runs,
from weights and, for comparison, from the hyper-parameters.

    python benchmarks/zoo_predictor_learning_curve.py ZOO_DIR [--epochs final] [--splits 5]
        [--sizes 0.125,0.25,0.5,1] [--predictors gbm,linear] [--esd]

For each split by run (20 % of runs held out), the predictors are fitted on
nested random subsets of the remaining runs and scored on the same held-out
runs (``netanatomy zoo predict --train-sizes`` does the weights part alone);
prints mean R^2 and Kendall's tau per size for the weight features and for the
hyper-parameters (Unterthiner et al.'s comparison: predicting from how a net was
trained instead of from its weights). Uses the feature cache of
``netanatomy zoo predict``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from netanatomy.zoo.features import open_zoo  # noqa: E402
from netanatomy.zoo.predict import fit_and_score, select_rows, zoo_features  # noqa: E402


def hyperparameters(meta: pd.DataFrame) -> pd.DataFrame:
    """The training settings of each row as numbers (log scale for lr, L2, init std)."""
    num = [c for c in ("lr", "l2", "dropout", "train_fraction", "init_std", "epoch") if c in meta.columns]
    cat = [c for c in ("activation", "optimizer", "init") if c in meta.columns]
    H = pd.get_dummies(meta[num + cat], dtype=float)
    for c in ("lr", "l2", "init_std"):
        if c in H.columns:
            H[c] = np.log10(H[c].astype(float).clip(lower=1e-12))
    return H


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--epochs", default="final")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--predictors", default="gbm,linear")
    ap.add_argument("--sizes", default="0.125,0.25,0.5,1")
    ap.add_argument("--esd", action="store_true", help="weight features include the ESD metrics")
    args = ap.parse_args()
    zoo = open_zoo(args.zoo)
    df = zoo.metrics
    mask = select_rows(df, args.epochs)
    if "diverged" in df.columns:
        mask &= ~df["diverged"].fillna(False).astype(bool).to_numpy()
    rows = np.flatnonzero(mask)
    cache = zoo.root / "features" if zoo.kind == "netanatomy" else None
    X = zoo_features(zoo, rows, cache_dir=cache, esd=args.esd).loc[rows].reset_index(drop=True)
    meta = df.iloc[rows].reset_index(drop=True)
    # the same rows for both inputs (rows with non-finite features are dropped),
    # so that both are scored on the same held-out runs
    H = hyperparameters(meta)
    ok = np.isfinite(X.to_numpy(dtype=float)).all(1) & np.isfinite(H.to_numpy(dtype=float)).all(1)
    X, H, meta = X[ok].reset_index(drop=True), H[ok].reset_index(drop=True), meta[ok].reset_index(drop=True)
    y = meta["test_acc"].to_numpy(dtype=float)
    runs = meta["run"].astype(str).to_numpy()
    sizes = [float(s) for s in args.sizes.split(",")]
    preds = args.predictors.split(",")
    frames = []
    for inputs, M, names in (("weights" + (" + esd" if args.esd else ""), X, preds), ("hparams", H, ["gbm"])):
        rep = fit_and_score(M, y, runs, None, names, splits=args.splits, importance=False, train_sizes=sizes)
        summ = rep.summary_frame()
        if "train_size" not in summ.columns:  # a single size of 1
            summ["train_size"] = 1.0
        frames.append(summ.assign(inputs=inputs))
    r = pd.concat(frames).set_index(["inputs", "predictor", "train_size"])[["train_runs", "r2_mean", "r2_std", "tau_mean", "tau_std"]]
    print(f"zoo {args.zoo}: {len(np.unique(runs))} runs, rows '{args.epochs}', {args.splits} splits, 20% runs held out")
    print(r.round(4).to_string())


if __name__ == "__main__":
    main()
