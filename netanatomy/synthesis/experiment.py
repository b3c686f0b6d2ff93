"""CPU-scale experiment on Fashion-MNIST: soups and alignment barriers.

Part 1, soups (Wortsman et al. 2022). A small CNN is trained from scratch (the
shared start), then fine-tuned several times with different learning rates,
seeds and augmentation. Members are scored on a held-out split of the training
set; the uniform and greedy soups are built with :mod:`netanatomy.synthesis`
and compared with the best single member on that held-out split and on the
test set, with and without batch-norm recalibration.

Part 2, barriers (Ainsworth et al. 2023). Two networks are trained independently
(different seeds). The test loss / accuracy along the straight line between
them is measured before and after weight-matching alignment, each with and
without batch-norm recalibration at every point of the path.

Everything runs on one thread (``torch.set_num_threads(1)``); the ``quick``
config is a smoke test, ``full`` the run reported in ``results/synthesis.md``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """conv-bn-relu-pool x2, conv-bn-relu, global average pool, linear."""

    def __init__(self, widths=(16, 32, 32), classes: int = 10):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@dataclass
class Member:
    lr: float
    seed: int
    augment: bool


@dataclass
class Config:
    widths: tuple = (16, 32, 32)
    val_size: int = 5000
    base_samples: int = 30000
    base_lr: float = 0.05
    member_samples: int = 10000
    members: list = field(
        default_factory=lambda: [
            Member(0.01, 1, False),
            Member(0.03, 2, False),
            Member(0.01, 3, True),
            Member(0.03, 4, True),
            Member(0.1, 5, True),
            Member(0.003, 6, False),
        ]
    )
    scratch_samples: int = 40000
    scratch_lr: float = 0.05
    scratch_seeds: tuple = (10, 11)
    test_size: int = 10000  # soups: whole test set
    curve_size: int = 2000  # interpolation points are scored on this many test images
    curve_points: int = 11
    bn_samples: int = 1000  # training images used to recalibrate batch norm
    batch: int = 128


CONFIGS = {
    "full": Config(),
    "quick": Config(
        val_size=500, base_samples=1024, member_samples=512,
        members=[Member(0.01, 1, False), Member(0.03, 2, True), Member(0.3, 3, True)],
        scratch_samples=1024, test_size=500, curve_size=300, curve_points=3, bn_samples=256,
    ),
}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(model: nn.Module, x, y, samples: int, lr: float, seed: int, augment: bool, batch: int) -> nn.Module:
    """SGD with momentum, cosine learning rate, over ``samples`` drawn without replacement."""
    g = torch.Generator().manual_seed(seed)
    steps = max(1, samples // batch)
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(samples // len(x) + 1)])[: steps * batch]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for s in range(steps):
        idx = order[s * batch : (s + 1) * batch]
        xb = x[idx]
        if augment:
            xb = _augment(xb, g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), y[idx]).backward()
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch: int = 1000) -> dict:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return {"loss": loss / len(x), "acc": correct / len(x)}


def make_evaluator(template: nn.Module, x, y, bn_batches=None):
    """state dict -> {loss, acc}; with ``bn_batches`` batch norm is recalibrated first."""
    from .bn import recalibrate_bn

    net = copy.deepcopy(template)

    def ev(state):
        net.load_state_dict(state)
        if bn_batches is not None:
            recalibrate_bn(net, bn_batches)
        return evaluate(net, x, y)

    return ev


def run(config: str | Config = "full", log=None) -> dict:
    from ..datasets import fashion_mnist, normalize_images
    from .interpolate import interpolate
    from .permute import align, spec_from_module
    from .soup import greedy_soup, uniform_soup

    cfg = CONFIGS[config] if isinstance(config, str) else config
    say = log or (lambda msg: None)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    xtr, xte = normalize_images(xtr), normalize_images(xte)
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    val_idx, tr_idx = perm[: cfg.val_size], perm[cfg.val_size :]
    xval, yval, xtr, ytr = xtr[val_idx], ytr[val_idx], xtr[tr_idx], ytr[tr_idx]
    xtest, ytest = xte[: cfg.test_size], yte[: cfg.test_size]
    xcurve, ycurve = xte[: cfg.curve_size], yte[: cfg.curve_size]
    bn_batches = [xtr[i : i + 250] for i in range(0, cfg.bn_samples, 250)]
    out: dict = {"config": {k: v for k, v in asdict(cfg).items()}}

    # ---- part 1: soups -------------------------------------------------------
    torch.manual_seed(0)
    base = train(SmallCNN(cfg.widths), xtr, ytr, cfg.base_samples, cfg.base_lr, 0, False, cfg.batch)
    say(f"base trained ({time.perf_counter() - t_start:.0f} s)")
    template = SmallCNN(cfg.widths)
    val_ev = make_evaluator(template, xval, yval)
    test_ev = make_evaluator(template, xtest, ytest)
    test_ev_bn = make_evaluator(template, xtest, ytest, bn_batches)
    members, rows = [], []
    for i, m in enumerate(cfg.members):
        net = train(copy.deepcopy(base), xtr, ytr, cfg.member_samples, m.lr, m.seed, m.augment, cfg.batch)
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        members.append(sd)
        rows.append({"member": f"member {i}", **asdict(m), "val_acc": val_ev(sd)["acc"], **{f"test_{k}": v for k, v in test_ev(sd).items()}})
        say(f"member {i} {asdict(m)}: val acc {rows[-1]['val_acc']:.4f} ({time.perf_counter() - t_start:.0f} s)")
    out["base"] = {"val_acc": val_ev(base.state_dict())["acc"], **{f"test_{k}": v for k, v in test_ev(base.state_dict()).items()}}
    out["members"] = rows
    greedy = greedy_soup(members, val_ev, metric="acc", member_scores={i: r["val_acc"] for i, r in enumerate(rows)})
    uniform = uniform_soup(members, evaluate=val_ev, metric="acc")
    best = max(range(len(rows)), key=lambda i: rows[i]["val_acc"])
    soups = {}
    for name, sd in (("best member", members[best]), ("uniform soup", uniform.tensors), ("greedy soup", greedy.tensors)):
        soups[name] = {
            "val_acc": val_ev(sd)["acc"],
            "test_acc": test_ev(sd)["acc"],
            "test_acc_bn_recal": test_ev_bn(sd)["acc"],
            "test_loss": test_ev(sd)["loss"],
        }
    out["soups"] = soups
    out["greedy_steps"] = greedy.steps
    out["greedy_ingredients"] = greedy.ingredients
    out["best_member"] = rows[best]["member"]
    say(f"soups done ({time.perf_counter() - t_start:.0f} s)")

    # ---- part 2: barriers ------------------------------------------------------
    nets = []
    for seed in cfg.scratch_seeds:
        torch.manual_seed(seed)
        nets.append(train(SmallCNN(cfg.widths), xtr, ytr, cfg.scratch_samples, cfg.scratch_lr, seed, False, cfg.batch))
        say(f"scratch net seed {seed} trained ({time.perf_counter() - t_start:.0f} s)")
    a, b = (n.state_dict() for n in nets)
    al = align(a, b, spec_from_module(template))
    out["alignment"] = al.summary()
    curve_ev = make_evaluator(template, xcurve, ycurve)
    curve_ev_bn = make_evaluator(template, xcurve, ycurve, bn_batches)
    curves = {}
    for label, other in (("naive", b), ("aligned", al.aligned)):
        for bn_label, ev in (("", curve_ev), (" + BN recalibration", curve_ev_bn)):
            c = interpolate(a, other, ev, cfg.curve_points, label=label + bn_label)
            curves[c.label] = c
            say(f"curve {c.label}: loss barrier {c.barrier('loss'):.4f} ({time.perf_counter() - t_start:.0f} s)")
    out["endpoints"] = {"A": curve_ev(a), "B": curve_ev(b), "B aligned": curve_ev(al.aligned)}
    out["curves"] = {
        k: {
            "records": c.to_records(),
            "loss_barrier": c.barrier("loss"),
            "acc_barrier": c.barrier("acc"),
            "midpoint_loss": c.midpoint("loss"),
            "midpoint_acc": c.midpoint("acc"),
        }
        for k, c in curves.items()
    }
    out["_curves"] = curves
    out["seconds"] = time.perf_counter() - t_start
    return out


def render_markdown(res: dict, command: str, figure: str | None) -> str:
    cfg = res["config"]
    L = ["# Synthesis of weights on Fashion-MNIST: soups and alignment barriers", ""]
    L.append(f"Regenerate: `{command}` (one thread; {res['seconds'] / 60:.1f} min wall time on a shared 2-core machine, "
             "so timings are noisy). Numbers below are from that run.")
    L += ["", f"Model: SmallCNN widths {tuple(cfg['widths'])} (conv-BN-ReLU-pool x2, conv-BN-ReLU, global average pool, linear). "
          f"Held-out split: {cfg['val_size']} training images set aside (used by the greedy soup); test: "
          f"the first {cfg['test_size']} Fashion-MNIST test images (soups), the first {cfg['curve_size']} (interpolation curves). "
          f"BN recalibration uses {cfg['bn_samples']} training images.", ""]
    L += ["## 1. Soups of members fine-tuned from one start", ""]
    L.append(f"Shared start: trained from scratch on {cfg['base_samples']} samples (lr {cfg['base_lr']}); "
             f"val acc {res['base']['val_acc']:.4f}, test acc {res['base']['test_acc']:.4f}. "
             f"Each member: {cfg['member_samples']} samples of fine-tuning (SGD momentum 0.9, cosine schedule).")
    L += ["", "| member | lr | seed | augment | held-out acc | test acc |", "|---|---|---|---|---|---|"]
    for r in res["members"]:
        L.append(f"| {r['member']} | {r['lr']} | {r['seed']} | {'yes' if r['augment'] else 'no'} | {r['val_acc']:.4f} | {r['test_acc']:.4f} |")
    L += ["", "| model | held-out acc | test acc | test acc, BN recalibrated | test loss |", "|---|---|---|---|---|"]
    for name, s in res["soups"].items():
        label = f"{name} ({res['best_member']})" if name == "best member" else name
        L.append(f"| {label} | {s['val_acc']:.4f} | {s['test_acc']:.4f} | {s['test_acc_bn_recal']:.4f} | {s['test_loss']:.4f} |")
    g, u, bm = res["soups"]["greedy soup"], res["soups"]["uniform soup"], res["soups"]["best member"]
    L += ["", f"Greedy soup ingredients (in order added): {', '.join(res['greedy_ingredients'])}.", ""]
    L += ["| step | candidate | candidate alone (held-out) | soup with it (held-out) | added |", "|---|---|---|---|---|"]
    for s in res["greedy_steps"]:
        L.append(f"| {s['step']} | {s['candidate']} | {s['candidate_score']:.4f} | {s['soup_score']:.4f} | {'yes' if s['accepted'] else 'no'} |")
    L += ["", "Outcome: greedy soup held-out acc "
          f"{g['val_acc']:.4f} vs best member {bm['val_acc']:.4f} ({'>=' if g['val_acc'] >= bm['val_acc'] else '<'}, as it must be by construction); "
          f"test acc {g['test_acc']:.4f} vs {bm['test_acc']:.4f} ({g['test_acc'] - bm['test_acc']:+.4f}). "
          f"Uniform soup: held-out {u['val_acc']:.4f}, test {u['test_acc']:.4f} ({u['test_acc'] - bm['test_acc']:+.4f} vs best member).", ""]
    L += ["## 2. Interpolation barrier between independently trained networks", ""]
    al = res["alignment"]
    L.append(f"Two nets trained from scratch with seeds {tuple(cfg['scratch_seeds'])} on {cfg['scratch_samples']} samples each "
             f"(lr {cfg['scratch_lr']}). Weight matching ({al['permutations']} permutations, {al['units_moved']}/{al['units']} units moved, "
             f"{al['sweeps']} sweeps): L2 distance {al['l2_distance_before']:.2f} -> {al['l2_distance_after']:.2f}. "
             "Barrier = largest excess over the straight line between the end-point values "
             f"({cfg['curve_points']} evenly spaced points, test loss / accuracy on {cfg['curve_size']} images).")
    e = res["endpoints"]
    L.append(f"End points: A loss {e['A']['loss']:.4f} acc {e['A']['acc']:.4f}; B loss {e['B']['loss']:.4f} acc {e['B']['acc']:.4f}; "
             f"aligned B loss {e['B aligned']['loss']:.4f} acc {e['B aligned']['acc']:.4f} (same function as B).")
    L += ["", "| path | loss barrier | accuracy barrier | midpoint loss | midpoint acc |", "|---|---|---|---|---|"]
    for k, c in res["curves"].items():
        L.append(f"| {k} | {c['loss_barrier']:.4f} | {c['acc_barrier']:.4f} | {c['midpoint_loss']:.4f} | {c['midpoint_acc']:.4f} |")
    c = res["curves"]
    nb, ab = c["naive"]["loss_barrier"], c["aligned"]["loss_barrier"]
    nbb, abb = c["naive + BN recalibration"]["loss_barrier"], c["aligned + BN recalibration"]["loss_barrier"]
    L += ["", f"Outcome: alignment changes the loss barrier from {nb:.4f} to {ab:.4f} without BN recalibration "
          f"and from {nbb:.4f} to {abb:.4f} with it.", ""]
    if figure:
        L += [f"![interpolation curves]({figure})", ""]
    L += ["## Reading", ""]
    if g["val_acc"] > bm["val_acc"]:
        L.append(f"The greedy soup beat the best member on the held-out split by {g['val_acc'] - bm['val_acc']:+.4f} "
                 f"and on the test set by {g['test_acc'] - bm['test_acc']:+.4f}.")
    else:
        L.append("The greedy soup kept only the best member: adding any other member lowered held-out accuracy, so "
                 "'greedy soup >= best member' holds here only as an equality, and the uniform soup is worse than the "
                 "best member. This run does not reproduce the soup gain of Wortsman et al., whose members are fine-tuned "
                 "from a strong pre-trained model. Here the shared start is a briefly trained small CNN "
                 f"(test acc {res['base']['test_acc']:.4f}), so fine-tuning with these learning rates may move members "
                 "to different parts of the basin; that explanation is a hypothesis this run did not test (a longer-trained "
                 "start and smaller learning rates would be the next run).")
        L.append("")
    if abb < nbb and ab < nb:
        L.append(f"Weight matching lowered the interpolation barrier between the two independently trained networks: "
                 f"test loss barrier {nb:.3f} -> {ab:.3f} (accuracy barrier {c['naive']['acc_barrier']:.3f} -> "
                 f"{c['aligned']['acc_barrier']:.3f}); with batch-norm statistics recomputed at every point of the path "
                 f"{nbb:.3f} -> {abb:.3f} (accuracy barrier {c['naive + BN recalibration']['acc_barrier']:.3f} -> "
                 f"{c['aligned + BN recalibration']['acc_barrier']:.3f}). On the aligned path, recomputing the batch-norm "
                 f"statistics removed most of what alignment left ({ab:.3f} -> {abb:.3f}).")
    else:
        L.append(f"Alignment did not lower both barriers in this run (loss barrier {nb:.3f} -> {ab:.3f} without BN "
                 f"recalibration, {nbb:.3f} -> {abb:.3f} with it).")
    L += ["", "Single run, single seed pair: no error bars."]
    return "\n".join(L) + "\n"


def plot_curves(res: dict, ax=None):
    from ..plots import _mpl

    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    from .interpolate import plot_interpolation

    curves = list(res["_curves"].values())
    plot_interpolation(curves, "loss", ax=axes[0], title="test loss along the path")
    plot_interpolation(curves, "acc", ax=axes[1], title="test accuracy along the path")
    return fig
