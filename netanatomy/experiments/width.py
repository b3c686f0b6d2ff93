"""The width experiment at CPU scale (``netanatomy experiment width``).

On Fashion-MNIST (Debian's ``dataset-fashion-mnist``, read offline):

1. train the same small network with its middle layer narrow and with it wide,
   tracking the coupled-norm variance per epoch; classify every layer (IS / DS);
2. report the sign changes since init by epoch 5;
3. make a width plan from the narrow run (widen the DS bottleneck, narrow the IS
   layers at constant FLOPs), build it with :func:`apply_plan` (fresh init) and
   train it against the original over several seeds: parameters, FLOPs, accuracy.

Recipe (DESIGN.md): SGD momentum 0.9, lr 0.05, weight decay 5e-4, batch 128,
constant learning rate. Networks: MLP 784-256-X-128-10 and CNN
conv32-pool-convX-pool-conv64-GAP-FC.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._util import atomic_write_text, dumps
from ._kit import fashion_subset


@dataclass
class NetConfig:
    arch: str  # "mlp" | "cnn"
    narrow: int
    wide: int
    epochs: int
    train_n: int
    plan_epochs: int | None = None  # epochs of the planned-vs-original runs (default: epochs)
    plan_train_n: int | None = None  # training images of those runs (default: train_n)


@dataclass
class ExperimentConfig:
    name: str
    nets: list[NetConfig]
    seeds: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch: int = 128
    eval_n: int = 2000
    tau: float | None = None  # None: the rule's default constants (dynamics.rule.RuleOptions)
    plan_arch: list[str] = field(default_factory=lambda: ["mlp"])


CONFIGS = {
    "smoke": ExperimentConfig(  # seconds; for tests of the pipeline, not of the effect
        "smoke",
        [NetConfig("mlp", 4, 32, epochs=5, train_n=512), NetConfig("cnn", 2, 8, epochs=4, train_n=256)],
        seeds=1,
        eval_n=256,
        plan_arch=["mlp", "cnn"],
    ),
    # what fits ~25 minutes of a shared 2-core machine: the MLP curves at full data, the
    # planned-vs-original comparison on 10k images; the rule at its default constants
    "quick": ExperimentConfig(
        "quick",
        [NetConfig("mlp", 8, 256, epochs=30, train_n=60000, plan_epochs=15, plan_train_n=10000)],
        seeds=3,
    ),
    # the CNN in ~20 minutes: 12 tracked epochs on 5k images, plans compared over 3 seeds
    "cnn-quick": ExperimentConfig(
        "cnn-quick",
        [NetConfig("cnn", 4, 128, epochs=12, train_n=5000, plan_epochs=8)],
        seeds=3,
        plan_arch=["cnn"],
    ),
    "full": ExperimentConfig(
        "full",
        [NetConfig("mlp", 8, 256, epochs=40, train_n=60000), NetConfig("cnn", 4, 128, epochs=25, train_n=10000)],
        seeds=5,
        plan_arch=["mlp", "cnn"],
    ),
}


def make_mlp(widths: dict | None = None) -> nn.Module:
    w = {"fc1": 256, "fc2": 256, "fc3": 128, **(widths or {})}
    return nn.Sequential(
        OrderedDict(
            flat=nn.Flatten(),
            fc1=nn.Linear(784, w["fc1"]),
            act1=nn.ReLU(),
            fc2=nn.Linear(w["fc1"], w["fc2"]),
            act2=nn.ReLU(),
            fc3=nn.Linear(w["fc2"], w["fc3"]),
            act3=nn.ReLU(),
            out=nn.Linear(w["fc3"], 10),
        )
    )


def make_cnn(widths: dict | None = None) -> nn.Module:
    w = {"conv1": 32, "conv2": 32, "conv3": 64, **(widths or {})}
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, w["conv1"], 3, padding=1),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(w["conv1"], w["conv2"], 3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(w["conv2"], w["conv3"], 3, padding=1),
            act3=nn.ReLU(),
            gap=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(w["conv3"], 10),
        )
    )


MIDDLE = {"mlp": "fc2", "cnn": "conv2"}
FACTORY = {"mlp": make_mlp, "cnn": make_cnn}


def load_data(train_n: int, eval_n: int, seed: int = 0):
    return (*fashion_subset(train_n, seed), eval_n)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train()
    return correct / max(1, len(x))


def train(model, data, epochs, cfg: ExperimentConfig, seed: int, tracker=None):
    xtr, ytr, xte, yte, eval_n = data
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed + 1000)
    lossf = nn.CrossEntropyLoss()
    history = []
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(0, len(xtr), cfg.batch):
            b = perm[i : i + cfg.batch]
            loss = lossf(model(xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            if tracker is not None:
                tracker.step()
        acc = accuracy(model, xte[:eval_n], yte[:eval_n])
        history.append({"epoch": epoch + 1, "loss": total / len(xtr), "val_acc": acc})
        if tracker is not None:
            tracker.epoch_end({"train_loss": total / len(xtr), "val_acc": acc})
    return accuracy(model, xte, yte), history


def _fresh(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def run_experiment(config: str, out: Path, seeds: int | None = None, threads: int = 1, log=print,
                   reuse: bool = True) -> dict:
    """Run (or finish) the experiment; runs already complete in ``out`` are reused
    when ``reuse`` (their curves and test accuracy are read back)."""
    from ..errors import UserError
    from ..dynamics.tracker import WidthTracker
    from ..dynamics.width import analyze_record

    if config not in CONFIGS:
        raise UserError(f"--config is one of {', '.join(CONFIGS)}")
    import copy

    cfg = copy.deepcopy(CONFIGS[config])
    if seeds is not None:
        if seeds < 1:
            raise UserError("--seeds must be >= 1")
        cfg.seeds = int(seeds)
    torch.set_num_threads(max(1, int(threads)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    summary: dict = {"config": asdict(cfg), "runs": {}, "plans": {}, "threads": threads}
    for net in cfg.nets:
        data = load_data(net.train_n, cfg.eval_n)
        runs = {}
        for label, width in (("narrow", net.narrow), ("wide", net.wide)):
            t0 = time.time()
            run_dir = out / f"{net.arch}_{label}"
            done = run_dir / "result.json"
            if reuse and done.exists() and (run_dir / "width_curves.parquet").exists():
                from ..dynamics.record import WidthRecord

                rec = WidthRecord.load(run_dir)
                prev = json.loads(done.read_text())
                acc, seconds = prev["test_acc"], prev["seconds"]
                model = None
                log(f"{net.arch} {label}: reusing the finished run in {run_dir}")
            else:
                torch.manual_seed(0)
                model = FACTORY[net.arch]({MIDDLE[net.arch]: width})
                tracker = WidthTracker(model, similarity_epochs=(0, 5, net.epochs))
                acc, hist = train(model, data, net.epochs, cfg, seed=0, tracker=tracker)
                tracker.save(run_dir)
                rec = tracker.record()
                seconds = time.time() - t0
                atomic_write_text(done, dumps({"test_acc": acc, "seconds": seconds, "width": width}))
            analysis = analyze_record(rec, _rule_options(cfg))
            runs[label] = (model, rec, analysis)
            rows = {r["layer"]: r for r in analysis.layers}
            summary["runs"][f"{net.arch}_{label}"] = {
                "middle_width": width,
                "test_acc": acc,
                "seconds": seconds,
                "verdicts": {k: {kk: r[kk] for kk in ("verdict", "confidence", "v0", "peak", "t_peak", "final",
                                                       "sign_changed_at_5", "rho_early_final", "bottleneck")}
                             for k, r in rows.items()},
                "stages": analysis.stages,
            }
            log(f"{net.arch} {label} (X={width}): acc {acc:.4f}, {MIDDLE[net.arch]} {rows[MIDDLE[net.arch]]['verdict']} "
                f"({seconds:.0f} s)")
        _save_figures(out, net.arch, runs)
        # the real-curve file the rule's tests read
        curves = {}
        for label, (_, rec, analysis) in runs.items():
            for r in analysis.layers:
                x, v = rec.curve(r["layer"], "var_ratio", analysis.axis)
                curves[f"{net.arch}_{label}/{r['layer']}"] = {"x": x.tolist(), "v": v.tolist(), "verdict": r["verdict"],
                                                               "channels": r["channels"]}
        atomic_write_text(out / f"curves_{net.arch}.json", dumps(curves))
        if net.arch in cfg.plan_arch:
            if net.plan_train_n and net.plan_train_n != net.train_n:
                data = load_data(net.plan_train_n, cfg.eval_n)
            summary["plans"][net.arch] = _compare_plan(net, cfg, data, runs["narrow"], out, log)
    summary["seconds"] = time.time() - t_start
    atomic_write_text(out / "summary.json", dumps(summary, indent=1))
    log(f"wrote {out} in {summary['seconds']:.0f} s")
    return summary


def _rule_options(cfg: ExperimentConfig):
    from ..dynamics.rule import RuleOptions

    return RuleOptions() if cfg.tau is None else RuleOptions(tau=cfg.tau)


def _save_figures(out: Path, arch: str, runs: dict) -> None:
    from ..plots import _mpl
    from ..dynamics.report import plot_sign_changes, plot_variance_curves

    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, label in zip(axes[:2], ("narrow", "wide")):
        _, rec, analysis = runs[label]
        plot_variance_curves(rec, analysis, ax=ax)
        ax.set_title(f"{arch.upper()}, middle layer {label} ({rec.curves[rec.curves.layer == MIDDLE[arch]].channels.iloc[0]} ch)")
    _, rec, analysis = runs["narrow"]
    plot_sign_changes(rec, analysis.axis, ax=axes[2])
    axes[2].set_title(f"{arch.upper()} narrow: sign changes since init")
    fig.tight_layout()
    fig.savefig(out / f"width_{arch}_curves.png", dpi=90)
    plt.close(fig)


def _compare_plan(net: NetConfig, cfg: ExperimentConfig, data, narrow_run, out: Path, log) -> dict:
    from ..dynamics.plan import make_plan
    from ..dynamics.rebuild import apply_plan, count_flops, count_params

    _, rec, analysis = narrow_run
    tau = _rule_options(cfg).tau
    plan = make_plan(analysis, rec.meta)
    atomic_write_text(out / f"plan_{net.arch}.json", dumps(plan, indent=1))
    example = data[2][:1]
    epochs = net.plan_epochs or net.epochs
    res = {"tau": tau, "epochs": epochs, "train_n": net.plan_train_n or net.train_n,
           "verdicts": {r["layer"]: r["verdict"] for r in analysis.layers},
           "plan": {r["layer"]: [r["width"], r["new_width"], r["action"]] for r in plan["layers"]},
           "original": [], "planned": []}
    orig0 = FACTORY[net.arch]({MIDDLE[net.arch]: net.narrow})
    planned0 = apply_plan(orig0, plan, init="fresh")
    res["params"] = {"original": count_params(orig0), "planned": count_params(planned0)}
    res["flops"] = {"original": count_flops(orig0, example), "planned": count_flops(planned0, example)}
    for seed in range(cfg.seeds):
        for label, proto in (("original", orig0), ("planned", planned0)):
            import copy

            model = _fresh(copy.deepcopy(proto), seed)
            acc, _ = train(model, data, epochs, cfg, seed=seed)
            res[label].append(acc)
            log(f"{net.arch} {label} seed {seed}: acc {acc:.4f}")
    for label in ("original", "planned"):
        a = np.asarray(res[label])
        res[f"{label}_mean"] = float(a.mean())
        res[f"{label}_std"] = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return res
