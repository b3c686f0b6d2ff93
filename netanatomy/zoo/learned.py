"""A permutation-invariant accuracy predictor that learns from the weights themselves.

``deepsets`` reads a net as, for every hidden layer, a *set* of hidden units
(DeepSets over neurons, in the spirit of Zaheer et al. 2017 and the
weight-space networks that beat statistics + boosting on the Small CNN Zoo).
A hidden unit ``i`` of layer ``l`` is described by

* its bias ``b_l[i]``;
* its incoming weights ``W_l[i, j, :]`` (the ``kh*kw`` kernel from each input
  ``j``): flattened when the inputs are the network's fixed input channels,
  otherwise each kernel goes through a shared edge encoder and the results are
  pooled (mean and max) over ``j``, because the inputs are themselves hidden
  units that may be permuted;
* its outgoing weights ``W_{l+1}[k, i, :]``: flattened when ``l+1`` is the
  output layer (fixed classes), otherwise encoded and pooled over ``k``.

A shared per-layer MLP maps each unit to an embedding, mean and max pooling over
the units give a layer embedding, the layer embeddings and the output bias are
concatenated, and an MLP head predicts the target. Every pooling is symmetric,
so permuting the hidden units of any layer (and the matching rows/columns of
its neighbours) leaves the prediction unchanged, up to float summation order.

Inputs are scaled per tensor by one scalar (the tensor's standard deviation
over the training nets) and passed through ``sign(x) log1p(|x|)``: both are
element-wise, so they keep the symmetry. Training: Adam, MSE on the
standardised target, early stopping on a validation part of the *training*
runs (split by run), the best validation epoch's weights kept, predictions
clipped to the training target range. Deterministic given the seed on CPU.

The layout must be a chain: each layer's weight is ``(out, in)`` or
``(out, in, kh, kw)`` with ``in`` equal to the previous layer's ``out``
(global average pooling between convolutions and the dense layer keeps that
true for the Small CNN Zoo architecture), and at least two layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError

LEARNED = ("deepsets",)

# fixed before any held-out score was looked at (see results/zoo_learned.md)
DEFAULTS = dict(edge_dim=16, unit_dim=64, head_dim=64, lr=1e-3, weight_decay=1e-4, batch_size=32,
                max_epochs=200, patience=20, val_fraction=0.15)


@dataclass
class ChainLayer:
    name: str
    weight: object  # LayoutEntry of the weight
    bias: object | None  # LayoutEntry of the bias (or None)
    out: int
    inp: int
    k: int  # kernel size kh*kw (1 for dense)


def chain_layers(layout) -> list[ChainLayer]:
    """The layers of a flat layout as a feed-forward chain, or a UserError."""
    if not layout:
        raise UserError("the learned predictor needs a weight layout (the zoo has no tensors)")
    order: list[str] = []
    by_layer: dict[str, dict] = {}
    for e in layout:
        if e.layer not in by_layer:
            order.append(e.layer)
            by_layer[e.layer] = {}
        by_layer[e.layer][e.role] = e
    layers = []
    for name in order:
        parts = by_layer[name]
        w, b = parts.get("weight"), parts.get("bias")
        if w is None:
            raise UserError(f"layer {name} has no weight tensor; the learned predictor reads chains of weight layers")
        shape = tuple(w.shape)
        if len(shape) not in (2, 4):
            raise UserError(f"{w.name} has shape {shape}; the learned predictor reads dense (out, in) and conv (out, in, kh, kw) weights")
        if b is not None and tuple(b.shape) != (shape[0],):
            raise UserError(f"{b.name} has shape {tuple(b.shape)}, expected ({shape[0]},) for {w.name} {shape}")
        layers.append(ChainLayer(name, w, b, shape[0], shape[1], int(np.prod(shape[2:])) if len(shape) == 4 else 1))
    if len(layers) < 2:
        raise UserError("the learned predictor needs at least one hidden layer (two weight layers)")
    for a, b in zip(layers, layers[1:]):
        if b.inp != a.out:
            raise UserError(f"{b.weight.name} takes {b.inp} inputs but {a.weight.name} has {a.out} outputs; "
                            "the learned predictor needs a chain of layers")
    return layers


def _signed_log(x):
    return np.sign(x) * np.log1p(np.abs(x))


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a core dependency
        raise UserError("the learned predictor needs torch") from exc
    return torch


def _build_module(layers: list[ChainLayer], edge_dim: int, unit_dim: int, head_dim: int):
    torch = _torch()
    nn = torch.nn

    def mlp(d_in, d_hidden, d_out):
        return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out), nn.ReLU())

    class DeepSetsOverUnits(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = len(layers) - 1
            self.phi_in, self.phi_out, self.rho = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for l in range(self.hidden):
                cur, nxt = layers[l], layers[l + 1]
                d_in = cur.inp * cur.k if l == 0 else 2 * edge_dim
                self.phi_in.append(nn.Identity() if l == 0 else mlp(cur.k, edge_dim, edge_dim))
                last = l + 1 == len(layers) - 1
                d_out = nxt.out * nxt.k if last else 2 * edge_dim
                self.phi_out.append(nn.Identity() if last else mlp(nxt.k, edge_dim, edge_dim))
                self.rho.append(mlp(1 + d_in + d_out, unit_dim, unit_dim))
            d_head = 2 * unit_dim * self.hidden + layers[-1].out
            self.head = nn.Sequential(nn.Linear(d_head, head_dim), nn.ReLU(), nn.Linear(head_dim, 1))

        def forward(self, ws, bs):
            # ws[l]: (B, out, in, k); bs[l]: (B, out)
            pooled = []
            for l in range(self.hidden):
                W, Wn = ws[l], ws[l + 1]
                B, O = W.shape[0], W.shape[1]
                if l == 0:
                    inc = W.reshape(B, O, -1)
                else:
                    e = self.phi_in[l](W)  # (B, O, I, e)
                    inc = torch.cat([e.mean(2), e.amax(2)], -1)
                if l + 1 == len(ws) - 1:
                    out = Wn.permute(0, 2, 1, 3).reshape(B, O, -1)
                else:
                    e = self.phi_out[l](Wn)  # (B, O2, O, e)
                    out = torch.cat([e.mean(1), e.amax(1)], -1)
                u = self.rho[l](torch.cat([bs[l].unsqueeze(-1), inc, out], -1))  # (B, O, h)
                pooled += [u.mean(1), u.amax(1)]
            return self.head(torch.cat(pooled + [bs[-1]], -1)).squeeze(-1)

    return DeepSetsOverUnits()


class DeepSetsPredictor:
    """Permutation-invariant regressor from flat weight rows (see the module docstring).

    ``fit(W, y, groups)`` with ``W`` of shape ``(n, P)`` in the zoo's layout;
    ``groups`` (the run of each row) keeps every run on one side of the
    early-stopping validation split."""

    needs_weights = True

    def __init__(self, layout, seed: int = 0, **params):
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise UserError(f"unknown deepsets parameters: {', '.join(sorted(unknown))}")
        self.layout = list(layout)
        self.layers = chain_layers(self.layout)
        self.seed = int(seed)
        self.params = {**DEFAULTS, **params}

    # -- inputs -------------------------------------------------------------
    def _check(self, W, y=None):
        W = np.asarray(W, dtype=np.float64) if not isinstance(W, np.ndarray) else W
        P = max(e.end for e in self.layout)
        if W.ndim != 2 or W.shape[1] != P:
            raise UserError(f"weights of shape {tuple(W.shape)} do not match the layout ({P} values per net)")
        if len(W) == 0:
            raise UserError("no nets to learn from or predict (empty zoo or selection)")
        if not np.isfinite(W).all():
            raise UserError(f"{int((~np.isfinite(W).all(1)).sum())} nets have non-finite weights; drop them first")
        if y is not None:
            y = np.asarray(y, dtype=float).reshape(-1)
            if len(y) != len(W):
                raise UserError(f"{len(W)} weight rows but {len(y)} targets")
            if not np.isfinite(y).all():
                raise UserError("the target has non-finite values")
        return W, y

    def _tensors(self, W):
        torch = _torch()
        ws, bs = [], []
        for L in self.layers:
            e = L.weight
            w = W[:, e.start : e.end].reshape((len(W),) + tuple(e.source_shape or e.shape))
            if e.transpose is not None:
                w = np.transpose(w, (0,) + tuple(t + 1 for t in e.transpose))
            w = _signed_log(w.reshape(len(W), L.out, L.inp, L.k) / self.scale_[e.name])
            ws.append(torch.as_tensor(np.ascontiguousarray(w), dtype=torch.float32))
            if L.bias is not None:
                b = _signed_log(W[:, L.bias.start : L.bias.end] / self.scale_[L.bias.name])
            else:
                b = np.zeros((len(W), L.out))
            bs.append(torch.as_tensor(np.ascontiguousarray(b), dtype=torch.float32))
        return ws, bs

    # -- fit / predict ------------------------------------------------------
    def fit(self, W, y, groups=None):
        torch = _torch()
        W, y = self._check(W, y)
        p = self.params
        groups = np.arange(len(y)).astype(str) if groups is None else np.asarray([str(g) for g in groups])
        if len(groups) != len(y):
            raise UserError(f"{len(y)} targets but {len(groups)} run labels")
        uniq = np.unique(groups)
        if len(uniq) < 4:
            raise UserError(f"the learned predictor needs at least 4 training runs (got {len(uniq)})")
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(uniq)
        n_val = min(max(1, int(round(p["val_fraction"] * len(uniq)))), len(uniq) - 1)
        val_runs = set(perm[:n_val].tolist())
        va = np.array([g in val_runs for g in groups])
        tr = ~va
        self.scale_ = {}
        for e in self.layout:
            s = float(np.std(W[tr, e.start : e.end]))
            self.scale_[e.name] = s if s > 0 and math.isfinite(s) else 1.0
        self.y_mean_, self.y_std_ = float(y[tr].mean()), float(y[tr].std()) or 1.0
        self.lo_, self.hi_ = float(y.min()), float(y.max())
        ws, bs = self._tensors(W)
        yt = torch.as_tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float32)
        tr_idx, va_idx = np.flatnonzero(tr), np.flatnonzero(va)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net = _build_module(self.layers, p["edge_dim"], p["unit_dim"], p["head_dim"])
                opt = torch.optim.Adam(net.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
                best, best_state, since, history = math.inf, None, 0, []
                vi = torch.as_tensor(va_idx)
                for epoch in range(int(p["max_epochs"])):
                    net.train()
                    order = rng.permutation(tr_idx)
                    for i in range(0, len(order), int(p["batch_size"])):
                        b = torch.as_tensor(order[i : i + int(p["batch_size"])])
                        loss = torch.mean((net([w[b] for w in ws], [x[b] for x in bs]) - yt[b]) ** 2)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    net.eval()
                    with torch.no_grad():
                        v = float(torch.mean((net([w[vi] for w in ws], [x[vi] for x in bs]) - yt[vi]) ** 2))
                    history.append(v)
                    if v < best - 1e-6:
                        best, since = v, 0
                        best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
                    else:
                        since += 1
                        if since >= int(p["patience"]):
                            break
                if best_state is not None:
                    net.load_state_dict(best_state)
        finally:
            torch.set_num_threads(old_threads)
        self.net_ = net.eval()
        self.val_history_ = history
        self.best_epoch_ = int(np.argmin(history)) + 1 if history else 0
        self.val_runs_, self.train_runs_ = sorted(val_runs), sorted(set(groups[tr].tolist()))
        return self

    def predict(self, W):
        torch = _torch()
        if not hasattr(self, "net_"):
            raise UserError("the learned predictor is not fitted")
        W, _ = self._check(W)
        ws, bs = self._tensors(W)
        with torch.no_grad():
            out = self.net_(ws, bs).double().numpy()
        return np.clip(out * self.y_std_ + self.y_mean_, self.lo_, self.hi_)

    def score(self, W, y):
        from sklearn.metrics import r2_score

        return r2_score(y, self.predict(W))


def make_learned(name: str, layout, seed: int = 0) -> DeepSetsPredictor:
    if name == "deepsets":
        return DeepSetsPredictor(layout, seed=seed)
    raise UserError(f"unknown learned predictor {name!r}; choose from {', '.join(LEARNED)}")


def permute_hidden_units(W: np.ndarray, layout, perms: Sequence[np.ndarray]) -> np.ndarray:
    """Flat weights with the hidden units of each hidden layer permuted by
    ``perms[l]`` (and the next layer's inputs permuted to match): the same
    function, another point in weight space."""
    layers = chain_layers(layout)
    if len(perms) != len(layers) - 1:
        raise UserError(f"need {len(layers) - 1} permutations (one per hidden layer), got {len(perms)}")
    W = np.array(W, copy=True)
    from .features import unflatten

    for row in range(len(W)):
        t = {e.name: unflatten(W[row], e) for e in layout}
        for l, perm in enumerate(perms):
            cur, nxt = layers[l], layers[l + 1]
            perm = np.asarray(perm)
            t[cur.weight.name] = t[cur.weight.name][perm]
            if cur.bias is not None:
                t[cur.bias.name] = t[cur.bias.name][perm]
            t[nxt.weight.name] = t[nxt.weight.name][:, perm]
        for e in layout:
            x = t[e.name]
            if e.transpose is not None:
                x = np.transpose(x, np.argsort(e.transpose))
            W[row, e.start : e.end] = x.reshape(-1)
    return W
