"""How the accuracy predictor improves with the number of training runs.

    python benchmarks/zoo_predictor_learning_curve.py ZOO_DIR [--epochs final] [--splits 5]

For each split by run (20 % of runs held out), the predictors are fitted on
25 / 50 / 75 / 100 % of the remaining runs and scored on the same held-out runs;
prints mean R^2 and Kendall's tau per size, plus the hyper-parameter baseline
(predicting from the hyper-parameters instead of the weights, Unterthiner et
al.'s comparison). Uses the feature cache of ``netanatomy zoo predict``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import r2_score  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from netanatomy.zoo.features import open_zoo  # noqa: E402
from netanatomy.zoo.predict import kendall_tau, make_predictor, select_rows, split_by_run, zoo_features  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--epochs", default="final")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--predictors", default="gbm,linear")
    args = ap.parse_args()
    zoo = open_zoo(args.zoo)
    df = zoo.metrics
    mask = select_rows(df, args.epochs)
    if "diverged" in df.columns:
        mask &= ~df["diverged"].fillna(False).astype(bool).to_numpy()
    rows = np.flatnonzero(mask)
    feats = zoo_features(zoo, rows, cache_dir=zoo.root / "features" if zoo.kind == "netanatomy" else None)
    X = feats.loc[rows].to_numpy()
    meta = df.iloc[rows].reset_index(drop=True)
    y = meta["test_acc"].to_numpy(dtype=float)
    runs = meta["run"].astype(str).to_numpy()
    hcols = [c for c in ("lr", "l2", "dropout", "train_fraction", "init_std", "epoch") if c in meta.columns]
    H = pd.get_dummies(meta[hcols + [c for c in ("activation", "optimizer", "init") if c in meta.columns]], dtype=float)
    for c in ("lr", "l2", "init_std"):
        if c in H.columns:
            H[c] = np.log10(H[c].astype(float))
    H = H.to_numpy()
    results = []
    with threadpool_limits(1):
        for s in range(args.splits):
            tr, te = split_by_run(runs, 0.2, s)
            train_runs = np.random.default_rng(100 + s).permutation(np.unique(runs[tr]))
            for frac in (0.25, 0.5, 0.75, 1.0):
                keep = set(train_runs[: max(2, int(round(frac * len(train_runs))))])
                sub = tr & np.isin(runs, list(keep))
                for name in args.predictors.split(","):
                    for space, M in (("weights", X), ("hparams", H)):
                        if space == "hparams" and name != "gbm":
                            continue
                        m = make_predictor(name, s).fit(M[sub], y[sub])
                        p = m.predict(M[te])
                        results.append({"predictor": name, "inputs": space, "train_runs": len(keep),
                                        "frac": frac, "r2": r2_score(y[te], p), "tau": kendall_tau(y[te], p)})
    r = pd.DataFrame(results).groupby(["inputs", "predictor", "frac"]).agg(
        train_runs=("train_runs", "mean"), r2=("r2", "mean"), r2_sd=("r2", "std"), tau=("tau", "mean"), tau_sd=("tau", "std"))
    print(f"zoo {args.zoo}: {len(np.unique(runs))} runs, rows '{args.epochs}', {args.splits} splits, 20% runs held out")
    print(r.round(4).to_string())


if __name__ == "__main__":
    main()
