"""Fine-tuning zoo: many copies of one base net fine-tuned on related tasks,
the setting in which Gueta et al. (2023) find that models of one dataset / task
occupy a region of weight space (compared as task vectors, fine-tuned minus base).

Tasks are variants of Fashion-MNIST built offline:

* ``orig``: the data as is;
* ``vflip`` / ``hflip`` / ``rot90``: the same labels on transformed images
  (other "datasets" of the same task);
* ``invert``: negated (normalised) pixel values;
* ``coarse``: a different task on the same images: 3 super-classes
  (tops 0/2/4/6, footwear 5/7/9, other 1/3/8) read from outputs 0-2.

Every fine-tuned net starts from the base weights and differs in its seed
(mini-batches) and learning rate; nets of one group train stacked, as in
:mod:`netanatomy.zoo.train`. The output folder is a zoo (``zoo.json``,
``metrics.parquet``, ``checkpoints/<run>/epoch_001.safetensors``, plus
``base.safetensors``), so ``netanatomy map DIR --base DIR/base.safetensors
--labels task`` maps it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..io import read_tensors
from .train import (
    PARAM_NAMES,
    StackOptimizer,
    ZooData,
    _act,
    _checkpoint_bytes,
    checkpoint_path,
    forward_stack,
    load_data,
    write_metrics,
)

TASKS = ("orig", "vflip", "hflip", "rot90", "invert", "coarse")
_COARSE = torch.tensor([0, 2, 0, 2, 0, 1, 0, 1, 2, 1])  # class -> super-class


def task_view(data: ZooData, task: str) -> ZooData:
    """The data of one task (images transformed and / or labels mapped)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    xtr, xte, ytr, yte = data.x_train, data.x_test, data.y_train, data.y_test
    if task == "vflip":
        xtr, xte = xtr.flip(-2), xte.flip(-2)
    elif task == "hflip":
        xtr, xte = xtr.flip(-1), xte.flip(-1)
    elif task == "rot90":
        xtr, xte = xtr.rot90(1, (-2, -1)), xte.rot90(1, (-2, -1))
    elif task == "invert":
        xtr, xte = -xtr, -xte
    elif task == "coarse":
        ytr, yte = _COARSE[ytr], _COARSE[yte]
    return ZooData(xtr.contiguous(), ytr, xte.contiguous(), yte)


@dataclass
class FinetuneConfig:
    tasks: tuple = ("orig", "vflip", "invert", "coarse")
    nets_per_task: int = 8
    steps: int = 150
    batch_size: int = 32
    lr_range: tuple = (3e-4, 3e-3)
    optimizer: str = "adam"
    seed: int = 0
    eval_test: int = 2000
    group_size: int = 16

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _seed(cfg_seed: int, task: str, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"finetune/{cfg_seed}/{task}/{i}".encode()).digest()[:7], "little")


def plan(cfg: FinetuneConfig, activation: str) -> list[tuple[str, list[dict]]]:
    groups = []
    for task in cfg.tasks:
        hps = []
        for i in range(cfg.nets_per_task):
            s = _seed(cfg.seed, task, i)
            rng = np.random.default_rng(s)
            lr = float(math.exp(rng.uniform(math.log(cfg.lr_range[0]), math.log(cfg.lr_range[1]))))
            hps.append({"run": f"{task}-{i:03d}", "task": task, "lr": lr, "seed": s, "activation": activation,
                        "optimizer": cfg.optimizer, "l2": 0.0, "dropout": 0.0, "train_fraction": 1.0,
                        "init": "base", "init_std": 0.0})
        for j in range(0, len(hps), cfg.group_size):
            chunk = hps[j : j + cfg.group_size]
            groups.append((f"{task}-{j // cfg.group_size:03d}-n{len(chunk)}", chunk))
    return groups


@torch.no_grad()
def _test_metrics(p, act, d: ZooData, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(n, d.x_test.shape[0])
    logits = torch.cat([forward_stack(p, d.x_test[s : min(s + 500, n)], act, shared_input=True) for s in range(0, n, 500)])
    y = d.y_test[:n]
    K = logits.shape[1]
    acc = (logits.argmax(-1) == y[:, None]).double().mean(0)
    loss = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, K), reduction="none").double().mean(0)
    return acc, loss


def finetune_group(payload: dict):
    """Work function: fine-tune one group (one task) from the base weights."""
    from ..parallel import WorkOutput

    cfg = FinetuneConfig(**payload["config"])
    hps = payload["nets"]
    base = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in payload["base"].items()}
    data = task_view(payload.get("data") or load_data(), hps[0]["task"])
    act = _act(hps[0]["activation"])
    K = len(hps)
    p = {k: base[k].unsqueeze(0).repeat(K, *([1] * base[k].dim())).contiguous().requires_grad_(True) for k in PARAM_NAMES}
    opt = StackOptimizer(cfg.optimizer, p, [h["lr"] for h in hps], [0.0] * K)
    gens = [torch.Generator().manual_seed(h["seed"] % (2**63)) for h in hps]
    N = data.x_train.shape[0]
    for _ in range(cfg.steps):
        idx = torch.stack([torch.randint(0, N, (cfg.batch_size,), generator=g) for g in gens])
        x = data.x_train[idx].transpose(0, 1).contiguous()
        logits = forward_stack(p, x, act)
        loss = F.cross_entropy(logits.permute(0, 2, 1), data.y_train[idx].t(), reduction="none").mean(0).sum()
        loss.backward()
        opt.step()
    acc, tl = _test_metrics(p, act, data, cfg.eval_test)
    files, rows = {}, []
    for k, hp in enumerate(hps):
        params = {n: v[k].detach() for n, v in p.items()}
        rel = checkpoint_path(hp["run"], 1)
        files[rel] = _checkpoint_bytes(params, hp, 1)
        rows.append({**hp, "epoch": 1, "step": cfg.steps, "test_acc": float(acc[k]), "test_loss": float(tl[k]),
                     "checkpoint": rel, "diverged": not math.isfinite(float(tl[k])), "group": payload["group"]})
    return WorkOutput(rows, files)


def read_base(path) -> tuple[dict[str, np.ndarray], str]:
    """Base weights (our zoo's tensor names) and its activation (from metadata)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such base checkpoint")
    t, meta = read_tensors(path, "np")
    missing = [k for k in PARAM_NAMES if k not in t]
    if missing:
        raise UserError(f"{path}: not a zoo net (missing {', '.join(missing)})")
    return {k: t[k] for k in PARAM_NAMES}, meta.get("activation", "relu")


def finetune_zoo(out, base_path, cfg: FinetuneConfig, executor=None, data: ZooData | None = None, progress=None):
    """Fine-tune ``cfg.nets_per_task`` copies of the base per task into ``out``."""
    from .._util import atomic_write, atomic_write_text, dumps
    from ..parallel import WorkItem, run_resumable
    from .train import metrics_frame

    for t in cfg.tasks:
        if t not in TASKS:
            raise UserError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    base, activation = read_base(base_path)
    out = Path(out)
    meta = out / "zoo.json"
    doc = {"config": cfg.to_json(), "format": "netanatomy-zoo/1", "kind": "finetune", "base": str(base_path)}
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except ValueError as exc:
            raise UserError(f"{meta}: unreadable ({exc}); use another --out") from exc
        if old.get("config") != doc["config"] or old.get("kind") != "finetune":
            raise UserError(f"{out} holds another zoo or other fine-tuning settings; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, dumps(doc, indent=1))
    from safetensors.numpy import save

    atomic_write(out / "base.safetensors", lambda p: p.write_bytes(save(base, metadata={"activation": activation})))
    items = []
    for key, hps in plan(cfg, activation):
        payload = {"config": cfg.to_json(), "nets": hps, "group": key, "base": {k: v.tolist() for k, v in base.items()}}
        if data is not None:
            payload["data"] = data
        items.append(WorkItem(key, payload))
    summary = run_resumable(finetune_group, items, out, executor=executor, progress=progress)
    df = metrics_frame(summary.records)
    write_metrics(out, df)
    return summary, df


def base_accuracy(base_path, tasks, data: ZooData | None = None, n: int = 2000) -> dict[str, float]:
    """Test accuracy of the base net itself on each task."""
    base, activation = read_base(base_path)
    p = {k: torch.as_tensor(v).unsqueeze(0) for k, v in base.items()}
    data = data or load_data()
    return {t: float(_test_metrics(p, _act(activation), task_view(data, t), n)[0][0]) for t in tasks}
