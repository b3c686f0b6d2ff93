"""Distances and regions between models (Gueta et al. 2023 style).

Given N checkpoints of one architecture as flat vectors:

* distances: Euclidean, and cosine between *task vectors* (checkpoint minus a
  base: the zoo mean, each run's own initialisation, a given checkpoint, or
  none), over the whole model and per layer;
* clustering: k-means on the (optionally standardised) vectors and spectral
  clustering on the cosine affinity;
* a 2-D map: PCA (always), t-SNE (scikit-learn) or UMAP (``umap-learn``, if
  installed), coloured by any metadata column in a separate plot function;
* purity (and adjusted Rand index) of the clusters against a label column.

The space can be the raw weights or the per-tensor statistics of
:mod:`netanatomy.zoo.features` (invariant to permuting hidden units, which the
raw weights of independently trained nets are not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import UserError

BASES = ("mean", "init", "none")


def task_vectors(W: np.ndarray, base: str | np.ndarray = "mean", init: np.ndarray | None = None) -> np.ndarray:
    """``W`` minus the base: ``mean`` (zoo mean), ``init`` (row-wise, ``init`` given),
    ``none``, or an explicit vector."""
    W = np.asarray(W, dtype=np.float64)
    if isinstance(base, np.ndarray):
        if base.shape != W.shape[1:]:
            raise UserError(f"base has {base.size} values, the zoo's checkpoints {W.shape[1]}")
        return W - base
    if base == "mean":
        return W - W.mean(0, keepdims=True)
    if base == "init":
        if init is None or init.shape != W.shape:
            raise UserError("base 'init' needs every run's epoch-0 checkpoint")
        return W - init
    if base == "none":
        return W
    raise UserError(f"unknown base {base!r}; use mean, init, none or a checkpoint path")


def pairwise_distances(X: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Dense N x N distances: ``euclidean`` or ``cosine`` (1 - cosine similarity)."""
    X = np.asarray(X, dtype=np.float64)
    if metric == "euclidean":
        sq = (X * X).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0.0)
        np.fill_diagonal(d2, 0.0)
        return np.sqrt(d2)
    if metric == "cosine":
        n = np.linalg.norm(X, axis=1)
        n[n == 0] = 1.0
        U = X / n[:, None]
        D = 1.0 - np.clip(U @ U.T, -1.0, 1.0)
        np.fill_diagonal(D, 0.0)
        return D
    raise UserError(f"unknown distance {metric!r}; use cosine or euclidean")


def layer_distances(X: np.ndarray, layout, metric: str = "cosine") -> dict[str, np.ndarray]:
    """Distances per layer (all tensors of a layer together)."""
    layers: dict[str, list] = {}
    for e in layout:
        layers.setdefault(e.layer, []).append((e.start, e.end))
    out = {}
    for name, spans in layers.items():
        cols = np.concatenate([np.arange(a, b) for a, b in spans])
        out[name] = pairwise_distances(X[:, cols], metric)
    return out


def purity(clusters: Sequence, labels: Sequence) -> float:
    """Fraction of items whose cluster's majority label is their own label."""
    clusters = np.asarray(clusters)
    labels = np.asarray([str(l) for l in labels])
    total = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels[clusters == c], return_counts=True)
        total += counts.max()
    return float(total / max(len(labels), 1))


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components and their explained-variance ratios."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(0, keepdims=True)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    var = S**2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    k = min(2, U.shape[1])
    Y = U[:, :k] * S[:k]
    if k < 2:
        Y = np.hstack([Y, np.zeros((Y.shape[0], 2 - k))])
    return Y, ratio[:2]


def embed_2d(X: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    if method == "pca":
        return pca_2d(X)[0]
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise UserError("t-SNE needs scikit-learn: pip install 'netanatomy[ml]'") from exc
        perp = float(min(30.0, max(2.0, (X.shape[0] - 1) / 3)))
        return TSNE(2, perplexity=perp, init="pca", random_state=seed).fit_transform(np.asarray(X, dtype=np.float64))
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise UserError("UMAP needs the umap-learn package (pip install umap-learn); use --embedding pca or tsne") from exc
        return umap.UMAP(random_state=seed).fit_transform(np.asarray(X, dtype=np.float64))
    raise UserError(f"unknown embedding {method!r}; use pca, tsne or umap")


def cluster(X: np.ndarray, k: int, method: str = "kmeans", seed: int = 0, D_cos: np.ndarray | None = None) -> np.ndarray:
    """Cluster labels: ``kmeans`` on X, or ``spectral`` on the cosine affinity."""
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise UserError("clustering needs scikit-learn: pip install 'netanatomy[ml]'") from exc
    k = int(max(1, min(k, X.shape[0])))
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(k, n_init=10, random_state=seed).fit_predict(np.asarray(X, dtype=np.float64))
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        D = D_cos if D_cos is not None else pairwise_distances(X, "cosine")
        A = np.clip(1.0 - D / 2.0, 0.0, 1.0)  # (1 + cos) / 2 in [0, 1]
        return SpectralClustering(k, affinity="precomputed", random_state=seed, assign_labels="cluster_qr").fit_predict(A)
    raise UserError(f"unknown clustering {method!r}; use kmeans or spectral")


@dataclass
class RegionMap:
    """Everything ``netanatomy map`` computes; ``to_frame`` gives one row per model."""

    meta: "object"  # DataFrame: one row per model (run, epoch, metrics, hyper-params)
    coords: np.ndarray  # (N, 2)
    clusters: dict[str, np.ndarray]  # method -> labels
    distance_summary: list[dict]  # per layer / whole: within- vs between-label mean distance
    purity: list[dict]  # method x label column -> purity, ARI
    info: dict = field(default_factory=dict)

    def to_frame(self):
        df = self.meta.copy()
        df["x"], df["y"] = self.coords[:, 0], self.coords[:, 1]
        for m, c in self.clusters.items():
            df[f"cluster_{m}"] = c
        return df

    def to_json(self) -> dict:
        return {"info": self.info, "purity": self.purity, "distances": self.distance_summary}


def _within_between(D: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    w = D[same & off]
    b = D[~same]
    return (float(w.mean()) if w.size else math.nan, float(b.mean()) if b.size else math.nan)


def build_map(
    X: np.ndarray,
    meta,
    k: int | None = None,
    methods: Sequence[str] = ("kmeans", "spectral"),
    labels: Sequence[str] = (),
    embedding: str = "pca",
    standardize: bool = False,
    layout=None,
    X_layers: np.ndarray | None = None,
    seed: int = 0,
    info: dict | None = None,
) -> RegionMap:
    """Cluster, embed and score the rows of ``X`` (already task vectors or features).

    ``k`` defaults to the number of distinct values of the first label column
    (else 2). ``X_layers`` (with ``layout``) is the raw-weight matrix whose
    per-layer distances are summarised against each label column."""
    from sklearn.metrics import adjusted_rand_score

    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] < 3:
        raise UserError(f"a map needs at least 3 models, got {X.shape[0]}")
    ok = np.isfinite(X).all(1)
    X, meta = X[ok], meta[ok].reset_index(drop=True)
    if X_layers is not None:
        X_layers = X_layers[ok]
    if standardize:
        sd = X.std(0)
        sd[sd == 0] = 1.0
        X = (X - X.mean(0)) / sd
    for col in labels:
        if col not in meta.columns:
            raise UserError(f"label column {col!r} not in the zoo's metrics ({', '.join(map(str, meta.columns))})")
    # k: given, else per label column its number of distinct values (else 2)
    ks = {col: (k or int(meta[col].astype(str).nunique())) for col in labels}
    k_main = k or (ks[labels[0]] if labels else 2)
    D_cos = pairwise_distances(X, "cosine")
    by_k = {kk: {m: cluster(X, kk, m, seed, D_cos) for m in methods} for kk in sorted(set(ks.values()) | {k_main})}
    clusters = by_k[k_main]
    coords = embed_2d(X, embedding, seed)
    pur = []
    for col in labels:
        lab = meta[col].astype(str).to_numpy()
        for m, c in by_k[ks[col]].items():
            pur.append({"method": m, "label": col, "k": ks[col], "purity": purity(c, lab),
                        "chance_purity": float(np.unique(lab, return_counts=True)[1].max() / len(lab)),
                        "ari": float(adjusted_rand_score(lab, c))})
    dist = []
    spaces = {"model (cosine)": D_cos, "model (euclidean)": pairwise_distances(X, "euclidean")}
    if X_layers is not None and layout is not None:
        for name, D in layer_distances(X_layers, layout, "cosine").items():
            spaces[f"{name} (cosine)"] = D
    for col in labels:
        lab = meta[col].astype(str).to_numpy()
        for space, D in spaces.items():
            w, b = _within_between(D, lab)
            dist.append({"label": col, "space": space, "within": w, "between": b,
                         "ratio": b / w if w and w > 0 and math.isfinite(b) else math.nan})
    return RegionMap(meta, coords, clusters, dist, pur, dict(info or {}, models=int(X.shape[0]), k=k_main, embedding=embedding))


def map_zoo(
    path,
    space: str = "weights",
    base: str = "mean",
    epochs: str = "final",
    k: int | None = None,
    methods: Sequence[str] = ("kmeans", "spectral"),
    labels: Sequence[str] = (),
    embedding: str = "pca",
    seed: int = 0,
    executor=None,
) -> RegionMap:
    """Open a zoo and build its region map in weight space or feature space."""
    from pathlib import Path

    from .features import open_zoo
    from .predict import select_rows, zoo_features

    zoo = open_zoo(path)
    df = zoo.metrics
    mask = select_rows(df, epochs)
    if "diverged" in df.columns:
        mask &= ~df["diverged"].fillna(False).astype(bool).to_numpy()
    rows = np.flatnonzero(mask)
    if len(rows) < 3:
        raise UserError(f"{path}: only {len(rows)} usable checkpoints for a map")
    meta = df.iloc[rows].reset_index(drop=True)
    W = zoo.flat(rows).astype(np.float64)
    info = {"zoo": str(path), "space": space, "base": base, "epochs": epochs}
    if space == "weights":
        init = None
        if base == "init":
            idx0 = {r: i for i, r in zip(np.flatnonzero((df["epoch"] == 0).to_numpy()), df["run"][df["epoch"] == 0])}
            missing = [r for r in meta["run"] if r not in idx0]
            if missing:
                raise UserError(f"base 'init' needs epoch-0 checkpoints; {len(missing)} runs have none")
            init = zoo.flat([idx0[r] for r in meta["run"]]).astype(np.float64)
        b: str | np.ndarray = base
        if base not in BASES:
            from .features import _safetensors_layout  # noqa: F401

            b = _base_vector(Path(base), zoo)
        X = task_vectors(W, b, init)
        return build_map(X, meta, k, methods, labels, embedding, False, zoo.layout, X, seed, info)
    if space == "features":
        feats = zoo_features(zoo, rows, executor=executor)
        X = feats.to_numpy(dtype=np.float64)
        return build_map(X, meta, k, methods, labels, embedding, True, zoo.layout, task_vectors(W, "mean"), seed,
                         dict(info, base="(features are standardised)"))
    raise UserError(f"unknown space {space!r}; use weights or features")


def _base_vector(path, zoo) -> np.ndarray:
    from ..io import load

    if not path.exists():
        raise UserError(f"--base {path}: not mean/init/none and no such file")
    m = load(path)
    flat = np.zeros(zoo.num_params, dtype=np.float64)
    names = {f"{l.name}.{role}": (l, role) for l in m.layers for role in ("weight", "bias")}
    for e in zoo.layout:
        if e.name not in names:
            raise UserError(f"--base {path}: has no tensor {e.name}")
        l, role = names[e.name]
        t = l.weight() if role == "weight" else l.bias()
        if t is None or tuple(t.shape) != tuple(e.shape):
            raise UserError(f"--base {path}: tensor {e.name} missing or of another shape")
        flat[e.start : e.end] = t.double().reshape(-1).numpy() if e.transpose is None else \
            np.transpose(t.double().numpy(), np.argsort(e.transpose)).reshape(-1)
    return flat


# ---------------------------------------------------------------------------
# pictures


def map_plot(result: RegionMap, color_by: str | None = None, ax=None, title: str | None = None):
    """The 2-D map, points coloured by a metadata column (categorical or numeric)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
    else:
        fig = ax.figure
    xy = result.coords
    if color_by is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=10)
    else:
        if color_by.startswith("cluster_"):
            col = result.clusters[color_by[len("cluster_"):]]
        elif color_by in result.meta.columns:
            col = result.meta[color_by].to_numpy()
        else:
            raise UserError(f"--color {color_by!r}: not a metrics column")
        if np.issubdtype(np.asarray(col).dtype, np.number) and len(np.unique(col)) > 10:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=col, s=10, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=color_by)
        else:
            for v in sorted(np.unique(np.asarray(col).astype(str))):
                m = np.asarray(col).astype(str) == v
                ax.scatter(xy[m, 0], xy[m, 1], s=10, label=v)
            ax.legend(title=color_by, fontsize=7, markerscale=1.5)
    ax.set_xlabel(f"{result.info.get('embedding', 'pca')} 1")
    ax.set_ylabel(f"{result.info.get('embedding', 'pca')} 2")
    ax.set_title(title or f"{result.info.get('space', '')} map ({result.info.get('models', '')} models)")
    return fig
