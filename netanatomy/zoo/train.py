"""Zoo generation: many small CNNs in the style of the Small CNN Zoo
(Unterthiner et al. 2020) trained on Fashion-MNIST, many nets at once.

The architecture: three 3x3 convolutions with stride 2 and 16 channels
(28 -> 14 -> 7 -> 4), an activation after each, global average pooling and a
dense layer to 10 classes; 4,970 parameters. Hyper-parameters vary per net:
activation, initialisation (scheme and scale), learning rate, optimiser, L2
(weight decay), dropout and the fraction of the training set the net may see.

Batching: nets of one group share activation and optimiser and are stacked on the
channel axis, so one grouped convolution (``groups=K``) runs the K nets at once,
each on its own mini-batch; the dense layer is one ``einsum``. The loss is the
sum over nets of each net's mean cross-entropy, so every net receives exactly the
gradient it would receive alone. Per-net learning rate, weight decay and dropout
rate are tensors broadcast over the stack; the optimisers are written out here
(SGD with momentum, Adam, RMSprop with torch's update rules) so they work on
stacks. Every net has its own ``torch.Generator`` for its data subset, its
mini-batches and its dropout masks, and :func:`train_sequential` replays the same
random draws on a plain ``nn.Module`` with ``torch.optim``: the two agree up to
floating-point rounding (tests/test_zoo_train.py).

An "epoch" of the zoo is ``steps_per_epoch`` steps of ``batch_size`` images drawn
with replacement from the net's training subset (a fixed step budget for every
net, so a group's nets stay in lock step); checkpoints are written at epoch 0
(the initialisation) and after every epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
INITS = ("glorot_uniform", "he_normal", "normal", "truncated_normal")
CHANNELS = 16
LAYERS = ("conv1", "conv2", "conv3", "fc")
PARAM_NAMES = tuple(f"{l}.{t}" for l in LAYERS for t in ("weight", "bias"))
HPARAM_COLUMNS = ("activation", "optimizer", "init", "init_std", "lr", "l2", "dropout", "train_fraction", "seed")


@dataclass
class ZooConfig:
    """Everything that defines a zoo; stored as zoo.json next to it."""

    nets: int = 500
    seed: int = 0
    epochs: int = 4
    steps_per_epoch: int = 100
    batch_size: int = 32
    group_size: int = 32
    activations: tuple = ("relu", "tanh")
    optimizers: tuple = OPTIMIZERS
    inits: tuple = INITS
    lr_range: tuple = (5e-4, 5e-2)
    l2_range: tuple = (1e-8, 1e-2)
    init_std_range: tuple = (1e-3, 0.5)
    dropout_max: float = 0.5
    dropout_zero_prob: float = 0.3
    train_fraction_range: tuple = (0.1, 1.0)
    eval_train: int = 1000  # images of each net's own training subset for train acc / loss
    eval_test: int = 10000  # first N test images for test acc / loss
    dataset: str = "fashion_mnist"
    # Optional: checkpoint after these cumulative optimiser steps instead of every
    # ``steps_per_epoch`` steps (checkpoint i is "epoch" i; epoch 0 = init).
    checkpoint_steps: tuple | None = None
    # Optional: draw the train fraction from these values (the Small CNN Zoo uses
    # 0.1, 0.25, 0.5, 1.0) instead of uniformly from ``train_fraction_range``.
    train_fractions: tuple | None = None

    def __post_init__(self) -> None:
        for name in ("activations", "optimizers", "inits", "lr_range", "l2_range", "init_std_range", "train_fraction_range"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("checkpoint_steps", "train_fractions"):
            v = getattr(self, name)
            setattr(self, name, None if v is None else tuple(v))
        if self.checkpoint_steps:
            self.checkpoint_steps = tuple(int(s) for s in self.checkpoint_steps)
            self.epochs = len(self.checkpoint_steps)

    def schedule(self) -> list[int]:
        """Cumulative optimiser steps at checkpoints 1..epochs."""
        if self.checkpoint_steps:
            return list(self.checkpoint_steps)
        return [e * self.steps_per_epoch for e in range(1, self.epochs + 1)]

    def validate(self) -> None:
        from ..errors import UserError

        if self.nets < 1 or self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1 or self.group_size < 1:
            raise UserError("nets, epochs, steps per epoch, batch size and group size must be >= 1")
        for a in self.activations:
            if a not in ACTIVATIONS:
                raise UserError(f"unknown activation {a!r}; choose from {', '.join(ACTIVATIONS)}")
        for o in self.optimizers:
            if o not in OPTIMIZERS:
                raise UserError(f"unknown optimiser {o!r}; choose from {', '.join(OPTIMIZERS)}")
        for i in self.inits:
            if i not in INITS:
                raise UserError(f"unknown init {i!r}; choose from {', '.join(INITS)}")
        lo, hi = self.train_fraction_range
        if not (0 < lo <= hi <= 1):
            raise UserError("train fraction range must lie in (0, 1]")
        if self.train_fractions is not None:
            if not self.train_fractions or not all(0 < float(f) <= 1 for f in self.train_fractions):
                raise UserError("train fractions must lie in (0, 1]")
        if self.checkpoint_steps is not None:
            cs = list(self.checkpoint_steps)
            if not cs or cs[0] < 1 or any(b <= a for a, b in zip(cs, cs[1:])):
                raise UserError("checkpoint steps must be increasing positive step counts, e.g. 100,300,1000")
        for name in ("lr_range", "l2_range", "init_std_range"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi < float("inf")):
                raise UserError(f"{name.replace('_', ' ')} must be 0 < low <= high, finite (sampled log-uniformly)")
        if not (0 <= self.dropout_max < 1):
            raise UserError("dropout max must lie in [0, 1)")
        if not (0 <= self.dropout_zero_prob <= 1):
            raise UserError("dropout zero probability must lie in [0, 1]")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, doc: dict) -> "ZooConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def identity(self) -> dict:
        """The fields that change what a given net is (``nets`` may grow)."""
        d = self.to_json()
        d.pop("nets")
        return d


# ---------------------------------------------------------------------------
# hyper-parameters and grouping


def _net_seed(zoo_seed: int, index: int) -> int:
    h = hashlib.sha256(f"netanatomy-zoo/{zoo_seed}/{index}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def sample_hparams(config: ZooConfig, index: int) -> dict:
    """The hyper-parameters of net ``index`` (independent of how many nets there are)."""
    seed = _net_seed(config.seed, index)
    rng = np.random.default_rng(seed)
    combos = [(a, o) for a in config.activations for o in config.optimizers]
    act, opt = combos[index % len(combos)]

    def loguni(lo, hi):
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    dropout = 0.0 if rng.uniform() < config.dropout_zero_prob else float(rng.uniform(0.0, config.dropout_max))
    return {
        "run": f"net{index:05d}",
        "index": index,
        "activation": act,
        "optimizer": opt,
        "init": str(config.inits[int(rng.integers(len(config.inits)))]),
        "init_std": loguni(*config.init_std_range),
        "lr": loguni(*config.lr_range),
        "l2": loguni(*config.l2_range),
        "dropout": dropout,
        "train_fraction": (float(config.train_fractions[int(rng.integers(len(config.train_fractions)))])
                           if config.train_fractions else float(rng.uniform(*config.train_fraction_range))),
        "seed": seed,
    }


def plan_groups(config: ZooConfig) -> list[tuple[str, list[dict]]]:
    """Work items: nets that share activation and optimiser, in chunks of
    ``group_size``. A group's key names its combo, chunk and size, so growing a
    zoo re-runs only the chunks that change."""
    combos = [(a, o) for a in config.activations for o in config.optimizers]
    C = len(combos)
    groups = []
    for c, (act, opt) in enumerate(combos):
        members = [i for i in range(c, config.nets, C)]
        for j in range(0, len(members), config.group_size):
            chunk = members[j : j + config.group_size]
            key = f"{act}-{opt}-{j // config.group_size:04d}-n{len(chunk)}"
            groups.append((j, c, key, chunk))
    # chunk-major order: a run stopped early still holds every combination
    groups.sort(key=lambda g: (g[0], g[1]))
    return [(key, [sample_hparams(config, i) for i in chunk]) for _, _, key, chunk in groups]


# ---------------------------------------------------------------------------
# data


@dataclass
class ZooData:
    x_train: torch.Tensor  # (N, 28, 28) float32, normalised
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


_DATA_CACHE: dict[str, ZooData] = {}


def load_data(name: str = "fashion_mnist") -> ZooData:
    """The dataset, normalised, cached per process."""
    if name not in _DATA_CACHE:
        if name != "fashion_mnist":
            from ..errors import UserError

            raise UserError(f"unknown zoo dataset {name!r} (only fashion_mnist is built in)")
        from ..datasets import fashion_mnist, normalize_images

        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
        _DATA_CACHE[name] = ZooData(
            normalize_images(xtr)[:, 0].contiguous(), ytr, normalize_images(xte)[:, 0].contiguous(), yte
        )
    return _DATA_CACHE[name]


def synthetic_data(n_train: int = 512, n_test: int = 256, seed: int = 0) -> ZooData:
    """A small learnable stand-in for tests: class = which of 10 blobs is bright."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = torch.randn(n, 28, 28, generator=g) * 0.5
        for c in range(10):
            r, col = divmod(c, 4)
            m = y == c
            x[m, 2 + 7 * r : 7 + 7 * r, 2 + 7 * col : 6 + 7 * col] += 2.0
        return x, y

    a, b = make(n_train)
    c, d = make(n_test)
    return ZooData(a, b, c, d)


class _NetRandom:
    """One net's random streams: its data subset, its batches, its dropout masks."""

    def __init__(self, hp: dict, n_train: int):
        self.gen = torch.Generator().manual_seed(int(hp["seed"]) % (2**63))
        n = max(1, int(round(hp["train_fraction"] * n_train)))
        self.subset = torch.randperm(n_train, generator=self.gen)[:n]

    def batch(self, batch_size: int) -> torch.Tensor:
        pick = torch.randint(0, self.subset.numel(), (batch_size,), generator=self.gen)
        return self.subset[pick]

    def mask(self, shape, p: float) -> torch.Tensor | None:
        if p <= 0:
            return None
        return (torch.rand(shape, generator=self.gen) >= p).to(torch.float32) / (1.0 - p)


# ---------------------------------------------------------------------------
# initialisation


def init_params(hp: dict) -> dict[str, torch.Tensor]:
    """The initial weights of one net (its own generator, so batching does not change them)."""
    g = torch.Generator().manual_seed((int(hp["seed"]) + 1) % (2**63))
    shapes = {
        "conv1.weight": (CHANNELS, 1, 3, 3),
        "conv2.weight": (CHANNELS, CHANNELS, 3, 3),
        "conv3.weight": (CHANNELS, CHANNELS, 3, 3),
        "fc.weight": (10, CHANNELS),
    }
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        fan_out = shape[0] * int(np.prod(shape[2:]))
        kind, std = hp["init"], hp["init_std"]
        if kind == "glorot_uniform":
            a = math.sqrt(6.0 / (fan_in + fan_out))
            w = (torch.rand(shape, generator=g) * 2 - 1) * a
        elif kind == "he_normal":
            w = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif kind == "normal":
            w = torch.randn(shape, generator=g) * std
        elif kind == "truncated_normal":
            w = torch.randn(shape, generator=g)
            for _ in range(10):  # redraw beyond two standard deviations
                bad = w.abs() > 2
                if not bad.any():
                    break
                w[bad] = torch.randn(int(bad.sum()), generator=g)
            w = w.clamp(-2, 2) * std
        else:  # pragma: no cover - validated earlier
            raise ValueError(kind)
        out[name] = w.float()
        out[name.replace("weight", "bias")] = torch.zeros(shape[0])
    return {k: out[k] for k in PARAM_NAMES}


def _act(name: str):
    return {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid}[name]


# ---------------------------------------------------------------------------
# batched forward and optimisers


def forward_stack(p: dict[str, torch.Tensor], x: torch.Tensor, act, masks=None, shared_input: bool = False) -> torch.Tensor:
    """Logits ``(B, K, 10)`` of K stacked nets.

    ``x`` is ``(B, K, 28, 28)`` (each net its own images) or, with
    ``shared_input``, ``(B, 28, 28)`` seen by every net."""
    K = p["conv1.weight"].shape[0]
    h = x.unsqueeze(1) if shared_input else x
    for l in range(3):
        W = p[f"conv{l + 1}.weight"]
        b = p[f"conv{l + 1}.bias"]
        groups = 1 if (l == 0 and shared_input) else K
        h = act(F.conv2d(h, W.reshape(K * CHANNELS, W.shape[2], 3, 3), b.reshape(-1), stride=2, padding=1, groups=groups))
        if masks is not None and masks[l] is not None:
            h = h * masks[l]
    g = h.mean((2, 3)).view(h.shape[0], K, CHANNELS)
    return torch.einsum("bkc,koc->bko", g, p["fc.weight"]) + p["fc.bias"]


def _per_net(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class StackOptimizer:
    """SGD (momentum 0.9), Adam and RMSprop (alpha 0.9) on stacked parameters with
    per-net learning rate and weight decay; the update rules of ``torch.optim``."""

    def __init__(self, kind: str, params: dict[str, torch.Tensor], lr, wd):
        self.kind = kind
        self.params = params
        self.t = 0
        self.lr = {k: _per_net(lr, v) for k, v in params.items()}
        self.wd = {k: _per_net(wd, v) for k, v in params.items()}
        self.state: dict[str, dict[str, torch.Tensor]] = {k: {} for k in params}

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for k, p in self.params.items():
            g = p.grad + self.wd[k] * p
            s = self.state[k]
            lr = self.lr[k]
            if self.kind == "sgd":
                if "buf" not in s:
                    s["buf"] = g.clone()
                else:
                    s["buf"].mul_(0.9).add_(g)
                p.sub_(lr * s["buf"])
            elif self.kind == "adam":
                b1, b2, eps = 0.9, 0.999, 1e-8
                if "m" not in s:
                    s["m"] = torch.zeros_like(p)
                    s["v"] = torch.zeros_like(p)
                s["m"].lerp_(g, 1 - b1)
                s["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - b1**self.t
                bc2 = 1 - b2**self.t
                denom = (s["v"].sqrt() / math.sqrt(bc2)).add_(eps)
                p.sub_((lr / bc1) * s["m"] / denom)
            elif self.kind == "rmsprop":
                alpha, eps = 0.9, 1e-8
                if "v" not in s:
                    s["v"] = torch.zeros_like(p)
                s["v"].mul_(alpha).addcmul_(g, g, value=1 - alpha)
                p.sub_(lr * g / (s["v"].sqrt().add_(eps)))
            else:  # pragma: no cover
                raise ValueError(self.kind)
            p.grad = None


def _torch_optimizer(kind: str, params, lr: float, wd: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-8, weight_decay=wd)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-8, weight_decay=wd)
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_stack(p, act, data: ZooData, rngs: list[_NetRandom], config: ZooConfig, chunk: int = 500) -> list[dict]:
    """Train / test accuracy and loss of every net of a stack."""
    K = p["conv1.weight"].shape[0]
    n_test = min(config.eval_test, data.x_test.shape[0])
    correct = torch.zeros(K, dtype=torch.float64)
    loss = torch.zeros(K, dtype=torch.float64)
    for s in range(0, n_test, chunk):
        e = min(s + chunk, n_test)
        x = data.x_test[s:e]
        y = data.y_test[s:e]
        logits = forward_stack(p, x, act, shared_input=True)  # (B, K, 10)
        loss += F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, K), reduction="none").double().sum(0)
        correct += (logits.argmax(-1) == y[:, None]).double().sum(0)
    test_acc, test_loss = correct / n_test, loss / n_test
    # train metrics: the first eval_train images of each net's own subset
    idx = torch.stack([r.subset[torch.arange(config.eval_train) % r.subset.numel()] for r in rngs])  # (K, n)
    correct = torch.zeros(K, dtype=torch.float64)
    loss = torch.zeros(K, dtype=torch.float64)
    n = idx.shape[1]
    for s in range(0, n, chunk):
        ii = idx[:, s : s + chunk]
        x = data.x_train[ii].transpose(0, 1).contiguous()
        y = data.y_train[ii].transpose(0, 1)  # (B, K)
        logits = forward_stack(p, x, act)
        loss += F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none").double().sum(0)
        correct += (logits.argmax(-1) == y).double().sum(0)
    train_acc, train_loss = correct / n, loss / n
    return [
        {"train_acc": float(train_acc[k]), "train_loss": float(train_loss[k]), "test_acc": float(test_acc[k]), "test_loss": float(test_loss[k])}
        for k in range(K)
    ]


# ---------------------------------------------------------------------------
# training


def _checkpoint_bytes(params: dict[str, torch.Tensor], hp: dict, epoch: int) -> bytes:
    from safetensors.torch import save

    meta = {k: str(hp[k]) for k in ("run", *HPARAM_COLUMNS)}
    meta["epoch"] = str(epoch)
    meta["architecture"] = "small_cnn_zoo: 3x conv3x3/s2 16ch, GAP, dense 10"
    return save({k: v.detach().contiguous().clone() for k, v in params.items()}, metadata=meta)


def checkpoint_path(run: str, epoch: int) -> str:
    return f"checkpoints/{run}/epoch_{epoch:03d}.safetensors"


def train_stack(hps: list[dict], config: ZooConfig, data: ZooData):
    """Train the nets of one group together. Returns ``(snapshots, metrics)``:
    ``snapshots[e][k]`` are net k's parameters after epoch e (0 = init) and
    ``metrics`` one row per net and epoch."""
    acts = {hp["activation"] for hp in hps}
    opts = {hp["optimizer"] for hp in hps}
    if len(acts) != 1 or len(opts) != 1:
        raise ValueError("one group shares activation and optimiser")
    act = _act(acts.pop())
    K = len(hps)
    n_train = data.x_train.shape[0]
    rngs = [_NetRandom(hp, n_train) for hp in hps]
    inits = [init_params(hp) for hp in hps]
    p = {k: torch.stack([i[k] for i in inits]).requires_grad_(True) for k in PARAM_NAMES}
    opt = StackOptimizer(opts.pop(), p, [hp["lr"] for hp in hps], [hp["l2"] for hp in hps])
    drops = [float(hp["dropout"]) for hp in hps]
    B = config.batch_size
    shapes = [(B, CHANNELS, 14, 14), (B, CHANNELS, 7, 7), (B, CHANNELS, 4, 4)]

    def snapshot():
        return [{k: v[i].detach().clone() for k, v in p.items()} for i in range(K)]

    snaps = [snapshot()]
    metrics = [evaluate_stack(p, act, data, rngs, config)]
    schedule = config.schedule()
    done = 0
    for epoch in range(1, config.epochs + 1):
        for _ in range(schedule[epoch - 1] - done):
            idx = []
            masks: list[list] = [[], [], []]
            for r, d in zip(rngs, drops):
                idx.append(r.batch(B))
                for l in range(3):
                    masks[l].append(r.mask(shapes[l], d))
            idx_t = torch.stack(idx)  # (K, B)
            x = data.x_train[idx_t].transpose(0, 1).contiguous()  # (B, K, 28, 28)
            y = data.y_train[idx_t]  # (K, B)
            stacked = []
            for l in range(3):
                if all(m is None for m in masks[l]):
                    stacked.append(None)
                    continue
                ms = [m if m is not None else torch.ones(shapes[l]) for m in masks[l]]
                stacked.append(torch.stack(ms, 1).reshape(B, K * CHANNELS, *shapes[l][2:]))
            logits = forward_stack(p, x, act, stacked)  # (B, K, 10)
            loss = F.cross_entropy(logits.permute(0, 2, 1), y.t(), reduction="none").mean(0).sum()
            loss.backward()
            opt.step()
        done = schedule[epoch - 1]
        snaps.append(snapshot())
        metrics.append(evaluate_stack(p, act, data, rngs, config))
    steps = [0, *schedule]
    rows = []
    for e, per_net in enumerate(metrics):
        for k, hp in enumerate(hps):
            rows.append({"run": hp["run"], "epoch": e, "step": steps[e], **per_net[k]})
    return snaps, rows


class ZooCNN(nn.Module):
    """One net of the zoo as a plain module (the sequential reference and the
    model the checkpoints describe)."""

    def __init__(self, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(1, CHANNELS, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(CHANNELS, CHANNELS, 3, stride=2, padding=1)
        self.fc = nn.Linear(CHANNELS, 10)
        self.activation = activation

    def forward(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        act = _act(self.activation)
        h = x.unsqueeze(1) if x.dim() == 3 else x
        for l, conv in enumerate((self.conv1, self.conv2, self.conv3)):
            h = act(conv(h))
            if masks is not None and masks[l] is not None:
                h = h * masks[l]
        return self.fc(h.mean((2, 3)))


def train_sequential(hp: dict, config: ZooConfig, data: ZooData) -> tuple[list[dict], list[dict]]:
    """Train one net alone with ``torch.optim`` (the reference for the batched path)."""
    net = ZooCNN(hp["activation"])
    net.load_state_dict(init_params(hp))
    r = _NetRandom(hp, data.x_train.shape[0])
    opt = _torch_optimizer(hp["optimizer"], net.parameters(), hp["lr"], hp["l2"])
    B = config.batch_size
    shapes = [(B, CHANNELS, 14, 14), (B, CHANNELS, 7, 7), (B, CHANNELS, 4, 4)]
    d = float(hp["dropout"])

    def snap():
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    def evaluate():
        with torch.no_grad():
            p = {k: v.unsqueeze(0) for k, v in net.state_dict().items()}
            return evaluate_stack(p, _act(hp["activation"]), data, [r], config)[0]

    snaps, rows = [snap()], [{"run": hp["run"], "epoch": 0, "step": 0, **evaluate()}]
    schedule = config.schedule()
    done = 0
    for epoch in range(1, config.epochs + 1):
        for _ in range(schedule[epoch - 1] - done):
            idx = r.batch(B)
            masks = [r.mask(s, d) for s in shapes]
            loss = F.cross_entropy(net(data.x_train[idx], masks), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        done = schedule[epoch - 1]
        snaps.append(snap())
        rows.append({"run": hp["run"], "epoch": epoch, "step": done, **evaluate()})
    return snaps, rows


def train_group(payload: dict):
    """Work function for :func:`netanatomy.parallel.run_resumable`: train one
    group and return its checkpoints (bytes) and metric rows."""
    from ..parallel import WorkOutput

    config = ZooConfig.from_json(payload["config"])
    data = payload.get("data") or load_data(config.dataset)
    hps = payload["nets"]
    snaps, rows = train_stack(hps, config, data)
    by_run = {hp["run"]: hp for hp in hps}
    files: dict[str, bytes] = {}
    out_rows = []
    for row in rows:
        hp = by_run[row["run"]]
        params = snaps[row["epoch"]][hps.index(hp)]
        finite = all(bool(torch.isfinite(v).all()) for v in params.values())
        rel = checkpoint_path(hp["run"], row["epoch"])
        if finite:
            files[rel] = _checkpoint_bytes(params, hp, row["epoch"])
        out_rows.append(
            {
                **row,
                "group": payload.get("group", ""),
                "checkpoint": rel if finite else "",
                "diverged": not finite or not math.isfinite(row["train_loss"]),
                **{k: hp[k] for k in HPARAM_COLUMNS},
            }
        )
    return WorkOutput(record=out_rows, files=files)


# ---------------------------------------------------------------------------
# a whole zoo


def metrics_frame(records: dict[str, list[dict]]):
    """All groups' rows as one DataFrame, sorted by run and epoch."""
    import pandas as pd

    rows = [r for recs in records.values() for r in recs]
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values(["run", "epoch"]).reset_index(drop=True)
    return df


def write_metrics(out_dir, df) -> None:
    """metrics.parquet and metrics.csv, each written atomically."""
    from pathlib import Path

    from .._util import atomic_write

    out_dir = Path(out_dir)
    atomic_write(out_dir / "metrics.parquet", lambda p: df.to_parquet(p, index=False))
    atomic_write(out_dir / "metrics.csv", lambda p: df.to_csv(p, index=False))


def generate_zoo(out_dir, config: ZooConfig, executor=None, progress=None, data: ZooData | None = None,
                 time_limit: float | None = None):
    """Train (or finish training) the zoo in ``out_dir``; returns ``(summary, metrics DataFrame)``.

    A re-run with the same config skips finished groups; a folder holding a zoo
    with another config is refused."""
    from pathlib import Path

    from .._util import atomic_write_text, dumps
    from ..errors import UserError
    from ..parallel import WorkItem, run_resumable

    config.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    meta = out / "zoo.json"
    if meta.exists():
        try:
            old = ZooConfig.from_json(json.loads(meta.read_text())["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{meta}: unreadable zoo description ({exc}); use another --out") from exc
        if old.identity() != config.identity():
            diff = sorted(k for k in config.identity() if old.identity().get(k) != config.identity()[k])
            raise UserError(f"{out} holds a zoo trained with other settings ({', '.join(diff)}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, dumps({"config": config.to_json(), "format": "netanatomy-zoo/1"}, indent=1))
    items = []
    for key, hps in plan_groups(config):
        payload = {"config": config.to_json(), "nets": hps, "group": key}
        if data is not None:
            payload["data"] = data
        items.append(WorkItem(key, payload))
    summary = run_resumable(train_group, items, out, executor=executor, progress=progress, time_limit=time_limit)
    df = metrics_frame(summary.records)
    write_metrics(out, df)
    return summary, df
