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
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

from ._kit import SmallCNN  # noqa: F401  (the model of this study; also imported from here)


@dataclass
class Member:
    lr: float
    seed: int
    augment: bool
    label_smoothing: float = 0.0
    samples: int | None = None  # fine-tuning samples (None: ``Config.member_samples``)


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
    soups: bool = True  # run part 1
    barriers: bool = True  # run part 2
    # part 1 data: False = start and members both train on the whole training pool;
    # True = the start pre-trains on one half, members fine-tune on the other half
    split_pretrain: bool = False
    greedy_bn: bool = False  # also a greedy soup whose candidates are scored after BN recalibration
    split_seed: int = 0  # permutation that sets the held-out split apart
    start_seed: int = 0  # the start's initialisation and data order


# ``--seed S`` adds S * SEED_STRIDE to every seed of a config (the held-out split,
# the start, each member, the scratch nets of part 2). Seed 0 is the config as
# written; the configs' own seeds stay below the stride, so no seed of one run
# is reused by another run for a different purpose.
SEED_STRIDE = 1000


def reseed(cfg: "Config", seed: int) -> "Config":
    """``cfg`` with every random choice moved to run ``seed`` (0: ``cfg`` unchanged)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    d = SEED_STRIDE * seed
    return replace(
        cfg,
        split_seed=cfg.split_seed + d,
        start_seed=cfg.start_seed + d,
        members=[replace(m, seed=m.seed + d) for m in cfg.members],
        scratch_seeds=tuple(s + d for s in cfg.scratch_seeds),
    )


def split_indices(n: int, cfg: "Config") -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, training-pool indices) of ``n`` training images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    return perm[: cfg.val_size], perm[cfg.val_size :]


def _soup_members() -> list[Member]:
    """A sweep of small fine-tuning learning rates (the start was trained at 0.05),
    augmentation, label smoothing, seeds and lengths (6k or 12k samples)."""
    grid = [
        (0.003, False, 0.0, 12000),
        (0.01, False, 0.0, 12000),
        (0.001, False, 0.1, 12000),
        (0.003, True, 0.0, 12000),
        (0.01, True, 0.1, 12000),
        (0.003, False, 0.1, 6000),
        (0.01, True, 0.0, 6000),
        (0.001, True, 0.0, 12000),
        (0.003, True, 0.1, 6000),
        (0.01, False, 0.1, 6000),
    ]
    return [Member(lr, i + 1, aug, ls, n) for i, (lr, aug, ls, n) in enumerate(grid)]


CONFIGS = {
    "full": Config(),
    # soups from a strong start: pre-trained to convergence on one half of the
    # training pool, members fine-tuned on the other half with small learning rates
    "soups": Config(
        base_samples=150000, members=_soup_members(), barriers=False, split_pretrain=True, greedy_bn=True,
    ),
    "soups-quick": Config(
        val_size=500, base_samples=1024, member_samples=256,
        members=[Member(0.003, 1, False), Member(0.01, 2, True, 0.1), Member(0.001, 3, False, 0.1, 512)],
        test_size=500, bn_samples=256, barriers=False, split_pretrain=True, greedy_bn=True,
    ),
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


def train(
    model: nn.Module, x, y, samples: int, lr: float, seed: int, augment: bool, batch: int, label_smoothing: float = 0.0
) -> nn.Module:
    """SGD with momentum, cosine learning rate, over ``samples`` drawn without replacement
    (epoch after epoch when ``samples`` exceeds the data)."""
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
        F.cross_entropy(model(xb), y[idx], label_smoothing=label_smoothing).backward()
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
    from ..synthesis.bn import recalibrate_bn

    net = copy.deepcopy(template)

    def ev(state):
        net.load_state_dict(state)
        if bn_batches is not None:
            recalibrate_bn(net, bn_batches)
        return evaluate(net, x, y)

    return ev


def run(config: str | Config = "full", log=None, seed: int = 0) -> dict:
    """One run of the experiment; ``seed`` moves every random choice (see :func:`reseed`)."""
    from ..datasets import fashion_mnist_normalized

    cfg = reseed(CONFIGS[config] if isinstance(config, str) else config, seed)
    say = log or (lambda msg: None)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    xtr, ytr, xte, yte = fashion_mnist_normalized()
    val_idx, tr_idx = split_indices(len(xtr), cfg)
    data = {
        "val": (xtr[val_idx], ytr[val_idx]),
        "train": (xtr[tr_idx], ytr[tr_idx]),
        "test": (xte[: cfg.test_size], yte[: cfg.test_size]),
        "curve": (xte[: cfg.curve_size], yte[: cfg.curve_size]),
    }
    xpool = data["train"][0]
    data["bn"] = [xpool[i : i + 250] for i in range(0, cfg.bn_samples, 250)]
    out: dict = {
        "config": {k: v for k, v in asdict(cfg).items()},
        "config_name": config if isinstance(config, str) else None,
        "seed": seed,
    }
    clock = lambda: f"({time.perf_counter() - t_start:.0f} s)"  # noqa: E731
    if cfg.soups:
        out.update(_soups(cfg, data, lambda m: say(f"{m} {clock()}")))
    if cfg.barriers:
        out.update(_barriers(cfg, data, lambda m: say(f"{m} {clock()}")))
    out["seconds"] = time.perf_counter() - t_start
    return out


def _soups(cfg: Config, data: dict, say) -> dict:
    """Part 1: members fine-tuned from one start; uniform / greedy soups vs the best member."""
    from ..synthesis.soup import greedy_soup, uniform_soup

    xtr, ytr = data["train"]
    if cfg.split_pretrain:
        half = len(xtr) // 2
        (xpre, ypre), (xft, yft) = (xtr[:half], ytr[:half]), (xtr[half:], ytr[half:])
    else:
        (xpre, ypre), (xft, yft) = (xtr, ytr), (xtr, ytr)
    torch.manual_seed(cfg.start_seed)
    base = train(SmallCNN(cfg.widths), xpre, ypre, cfg.base_samples, cfg.base_lr, cfg.start_seed, False, cfg.batch)
    say("start trained")
    template = SmallCNN(cfg.widths)
    bn = data["bn"]
    val_ev = make_evaluator(template, *data["val"])
    val_ev_bn = make_evaluator(template, *data["val"], bn)
    test_ev = make_evaluator(template, *data["test"])
    test_ev_bn = make_evaluator(template, *data["test"], bn)
    out: dict = {"data": {"pretrain_samples_available": len(xpre), "finetune_samples_available": len(xft)}}
    members, rows = [], []
    for i, m in enumerate(cfg.members):
        n = m.samples or cfg.member_samples
        net = train(copy.deepcopy(base), xft, yft, n, m.lr, m.seed, m.augment, cfg.batch, m.label_smoothing)
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        members.append(sd)
        row = {"member": f"member {i}", **asdict(m), "samples": n, "val_acc": val_ev(sd)["acc"]}
        row.update({f"test_{k}": v for k, v in test_ev(sd).items()})
        rows.append(row)
        say(f"member {i} lr {m.lr} aug {m.augment} ls {m.label_smoothing} n {n}: val acc {row['val_acc']:.4f}")
    base_sd = base.state_dict()
    out["base"] = {"val_acc": val_ev(base_sd)["acc"], **{f"test_{k}": v for k, v in test_ev(base_sd).items()}}
    out["members"] = rows
    scores = {i: r["val_acc"] for i, r in enumerate(rows)}
    greedy = greedy_soup(members, val_ev, metric="acc", member_scores=scores)
    uniform = uniform_soup(members, evaluate=val_ev, metric="acc")
    best = max(range(len(rows)), key=lambda i: rows[i]["val_acc"])
    candidates = [("best member", members[best]), ("uniform soup", uniform.tensors), ("greedy soup", greedy.tensors)]
    if cfg.greedy_bn:
        bn_scores = {i: val_ev_bn(sd)["acc"] for i, sd in enumerate(members)}
        greedy_bn = greedy_soup(members, val_ev_bn, metric="acc", member_scores=bn_scores)
        candidates.append(("greedy soup, BN recalibrated while choosing", greedy_bn.tensors))
        out["greedy_bn_ingredients"] = greedy_bn.ingredients
        out["greedy_bn_steps"] = greedy_bn.steps
    soups = {}
    for name, sd in candidates:
        t, tb = test_ev(sd), test_ev_bn(sd)
        soups[name] = {
            "val_acc": val_ev(sd)["acc"],
            "val_acc_bn_recal": val_ev_bn(sd)["acc"],
            "test_acc": t["acc"],
            "test_acc_bn_recal": tb["acc"],
            "test_loss": t["loss"],
            "test_loss_bn_recal": tb["loss"],
        }
    out["soups"] = soups
    out["greedy_steps"] = greedy.steps
    out["greedy_ingredients"] = greedy.ingredients
    out["best_member"] = rows[best]["member"]
    out["member_spread"] = _spread(base_sd, members)
    say("soups done")
    return out


def _spread(base: dict, members: list[dict]) -> dict:
    """How far the members moved from the start and from each other (float weights, L2)."""
    keys = [k for k in base if base[k].is_floating_point() and "running" not in k]

    def dist(a, b):
        return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)) ** 0.5

    to_start = [dist(base, m) for m in members]
    pair = [dist(members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members))]
    return {
        "start_norm": dist(base, {k: torch.zeros_like(base[k]) for k in keys}),
        "to_start_mean": sum(to_start) / len(to_start),
        "to_start_max": max(to_start),
        "pairwise_mean": sum(pair) / len(pair) if pair else 0.0,
    }


def _barriers(cfg: Config, data: dict, say) -> dict:
    """Part 2: interpolation barriers between two independently trained nets, before/after alignment."""
    from ..synthesis.interpolate import interpolate
    from ..synthesis.permute import align, spec_from_module

    xtr, ytr = data["train"]
    template = SmallCNN(cfg.widths)
    bn = data["bn"]
    out: dict = {}
    nets = []
    for seed in cfg.scratch_seeds:
        torch.manual_seed(seed)
        nets.append(train(SmallCNN(cfg.widths), xtr, ytr, cfg.scratch_samples, cfg.scratch_lr, seed, False, cfg.batch))
        say(f"scratch net seed {seed} trained")
    a, b = (n.state_dict() for n in nets)
    al = align(a, b, spec_from_module(template))
    out["alignment"] = al.summary()
    curve_ev = make_evaluator(template, *data["curve"])
    curve_ev_bn = make_evaluator(template, *data["curve"], bn)
    curves = {}
    for label, other in (("naive", b), ("aligned", al.aligned)):
        for bn_label, ev in (("", curve_ev), (" + BN recalibration", curve_ev_bn)):
            c = interpolate(a, other, ev, cfg.curve_points, label=label + bn_label)
            curves[c.label] = c
            say(f"curve {c.label}: loss barrier {c.barrier('loss'):.4f}")
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
    return out


def _f(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def render_markdown(res: dict, command: str, figure: str | None, earlier: dict | None = None, note: str | None = None) -> str:
    """The results file. ``earlier``: a previous run's JSON, quoted as an earlier data point;
    ``note``: a closing paragraph (e.g. a pointer to the results over several seeds)."""
    cfg = res["config"]
    parts = (["soups"] if cfg.get("soups", True) else []) + (["alignment barriers"] if cfg.get("barriers", True) else [])
    L = [f"# Synthesis of weights on Fashion-MNIST: {' and '.join(parts)}", ""]
    L.append(f"Regenerate: `{command}` (one thread; {res['seconds'] / 60:.1f} min wall time on a shared 2-core machine, "
             "so timings are noisy). Numbers below are from that run.")
    L += ["", f"Model: SmallCNN widths {tuple(cfg['widths'])} (conv-BN-ReLU-pool x2, conv-BN-ReLU, global average pool, linear). "
          f"Held-out split: {cfg['val_size']} training images set aside (used by the greedy soup); test: "
          f"the first {cfg['test_size']} Fashion-MNIST test images" + (" (soups)" if "curves" in res else "")
          + (f", the first {cfg['curve_size']} (interpolation curves)" if "curves" in res else "")
          + f". BN recalibration uses {cfg['bn_samples']} training images.", ""]
    if "soups" in res:
        L += _render_soups(res, earlier)
    if "curves" in res:
        L += _render_barriers(res, figure)
    L += ["## Reading", ""]
    if "soups" in res:
        L += _read_soups(res) + [""]
    if "curves" in res:
        L += _read_barriers(res) + [""]
    seed = res.get("seed", 0)
    L += ["Single run, single seed" + (" pair" if "curves" in res else "") + (f" (--seed {seed})" if seed else "") + ": no error bars."]
    if note:
        L += ["", note]
    return "\n".join(L) + "\n"


def _soup_table(res: dict) -> list[str]:
    L = ["| model | held-out acc | held-out acc, BN recalibrated | test acc | test acc, BN recalibrated | test loss | test loss, BN recalibrated |",
         "|---|---|---|---|---|---|---|"]
    for name, s in res["soups"].items():
        label = f"{name} ({res['best_member']})" if name == "best member" else name
        L.append(f"| {label} | {_f(s.get('val_acc'))} | {_f(s.get('val_acc_bn_recal'))} | {_f(s.get('test_acc'))} | "
                 f"{_f(s.get('test_acc_bn_recal'))} | {_f(s.get('test_loss'))} | {_f(s.get('test_loss_bn_recal'))} |")
    return L


def _steps_table(steps: list[dict]) -> list[str]:
    L = ["| step | candidate | candidate alone (held-out) | soup with it (held-out) | added |", "|---|---|---|---|---|"]
    for s in steps:
        L.append(f"| {s['step']} | {s['candidate']} | {s['candidate_score']:.4f} | {s['soup_score']:.4f} | {'yes' if s['accepted'] else 'no'} |")
    return L


def _render_soups(res: dict, earlier: dict | None) -> list[str]:
    cfg = res["config"]
    L = ["## 1. Soups of members fine-tuned from one start", ""]
    data = res.get("data", {})
    if cfg.get("split_pretrain"):
        where = (f"pre-trained on one half of the training pool ({data.get('pretrain_samples_available')} images), "
                 f"{cfg['base_samples']} samples (about {cfg['base_samples'] / max(1, data.get('pretrain_samples_available', 1)):.1f} epochs)")
        ft = (f"Members are fine-tuned on the other half ({data.get('finetune_samples_available')} images, never seen by the start): "
              "SGD momentum 0.9, weight decay 5e-4, cosine schedule, a sweep of small learning rates "
              f"(the start used {cfg['base_lr']}), augmentation (random flip + shift), label smoothing, seed and length.")
    else:
        where = f"trained from scratch on {cfg['base_samples']} samples"
        ft = f"Each member: {cfg['member_samples']} samples of fine-tuning (SGD momentum 0.9, cosine schedule)."
    L.append(f"Shared start: {where} (lr {cfg['base_lr']}); held-out acc {res['base']['val_acc']:.4f}, "
             f"test acc {res['base']['test_acc']:.4f}. {ft}")
    L += ["", "| member | lr | seed | augment | label smoothing | samples | held-out acc | test acc |", "|---|---|---|---|---|---|---|---|"]
    for r in res["members"]:
        L.append(f"| {r['member']} | {r['lr']} | {r['seed']} | {'yes' if r['augment'] else 'no'} | {r.get('label_smoothing', 0.0)} | "
                 f"{r.get('samples', cfg['member_samples'])} | {r['val_acc']:.4f} | {r['test_acc']:.4f} |")
    sp = res.get("member_spread")
    if sp:
        L += ["", f"Weight distances (L2 over parameters): start norm {sp['start_norm']:.2f}; members moved "
              f"{sp['to_start_mean']:.2f} from the start on average (max {sp['to_start_max']:.2f}); mean distance between two "
              f"members {sp['pairwise_mean']:.2f}."]
    L += [""] + _soup_table(res)
    L += ["", f"Greedy soup ingredients (in order added): {', '.join(res['greedy_ingredients'])}.", ""]
    L += _steps_table(res["greedy_steps"])
    if "greedy_bn_steps" in res:
        L += ["", "Greedy soup with BN recalibration while choosing (each member and candidate soup scored on the held-out "
              f"split after recomputing its BN statistics): ingredients {', '.join(res['greedy_bn_ingredients'])}.", ""]
        L += _steps_table(res["greedy_bn_steps"])
    g, u, bm = res["soups"]["greedy soup"], res["soups"]["uniform soup"], res["soups"]["best member"]
    L += ["", "Outcome: greedy soup held-out acc "
          f"{g['val_acc']:.4f} vs best member {bm['val_acc']:.4f} ({'>=' if g['val_acc'] >= bm['val_acc'] else '<'}, as it must be by construction); "
          f"test acc {g['test_acc']:.4f} vs {bm['test_acc']:.4f} ({g['test_acc'] - bm['test_acc']:+.4f}). "
          f"Uniform soup: held-out {u['val_acc']:.4f}, test {u['test_acc']:.4f} ({u['test_acc'] - bm['test_acc']:+.4f} vs best member).", ""]
    if earlier and "soups" in earlier:
        ecfg = earlier.get("config", {})
        L += ["### Earlier data point: a weak start", "",
              f"The previous run (`netanatomy experiment synthesis --out results`, kept in `synthesis.md`): start trained from "
              f"scratch on {ecfg.get('base_samples')} samples at lr {ecfg.get('base_lr')} (test acc "
              f"{earlier['base']['test_acc']:.4f}), {len(earlier['members'])} members fine-tuned on the same data with lr "
              f"{', '.join(str(r['lr']) for r in earlier['members'])}.", ""]
        L += _soup_table(earlier)
        L += ["", f"Greedy soup ingredients then: {', '.join(earlier.get('greedy_ingredients', []))}.", ""]
    return L


def _read_soups(res: dict) -> list[str]:
    g, u, bm = res["soups"]["greedy soup"], res["soups"]["uniform soup"], res["soups"]["best member"]
    n_in, n = len(res["greedy_ingredients"]), len(res["members"])
    L = []
    if g["val_acc"] > bm["val_acc"]:
        L.append(f"The greedy soup took {n_in} of {n} members and beat the best member on the held-out split by "
                 f"{g['val_acc'] - bm['val_acc']:+.4f} and on the test set by {g['test_acc'] - bm['test_acc']:+.4f} "
                 f"(with BN recalibration: {g['test_acc_bn_recal'] - bm['test_acc_bn_recal']:+.4f}).")
    elif n_in == 1:
        L.append("The greedy soup kept only the best member: adding any other member lowered held-out accuracy, so "
                 "'greedy soup >= best member' holds here only as an equality.")
    else:
        L.append(f"The greedy soup took {n_in} of {n} members and tied the best member on the held-out split "
                 f"(test: {g['test_acc'] - bm['test_acc']:+.4f}).")
    L.append(f"The uniform soup of all {n} members is {u['test_acc'] - bm['test_acc']:+.4f} vs the best member on the test set "
             f"({u['val_acc'] - bm['val_acc']:+.4f} held-out; with BN recalibration {u['test_acc_bn_recal'] - bm['test_acc_bn_recal']:+.4f} test).")
    if res["config"].get("split_pretrain"):
        L.append(f"The start scored {res['base']['test_acc']:.4f} on the test set; the best member "
                 f"{bm['test_acc']:.4f} ({bm['test_acc'] - res['base']['test_acc']:+.4f} from fine-tuning on data the start had not seen), "
                 f"the greedy soup {g['test_acc']:.4f} ({g['test_acc'] - res['base']['test_acc']:+.4f}).")
    aug = [r for r in res["members"] if r["augment"]]
    plain = [r for r in res["members"] if not r["augment"]]
    if aug and plain:
        chosen = set(res["greedy_ingredients"])
        L.append(f"Members fine-tuned with augmentation scored {sum(r['val_acc'] for r in aug) / len(aug):.4f} held-out on average, "
                 f"without {sum(r['val_acc'] for r in plain) / len(plain):.4f}; the greedy soup took "
                 f"{sum(r['member'] in chosen for r in aug)} of the {len(aug)} augmented ones.")
    n_test = res["config"]["test_size"]
    p = bm["test_acc"]
    L.append(f"Scale of the noise: one test accuracy near {p:.2f} on {n_test} images has a binomial standard error of "
             f"{(p * (1 - p) / n_test) ** 0.5:.4f}; differences between models of a few thousandths are of that order, "
             "and the held-out gains are measured on the split the greedy soup chose on.")
    return [" ".join(L)]


def _render_barriers(res: dict, figure: str | None) -> list[str]:
    cfg = res["config"]
    L = ["## 2. Interpolation barrier between independently trained networks", ""]
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
    return L


def _read_barriers(res: dict) -> list[str]:
    c = res["curves"]
    nb, ab = c["naive"]["loss_barrier"], c["aligned"]["loss_barrier"]
    nbb, abb = c["naive + BN recalibration"]["loss_barrier"], c["aligned + BN recalibration"]["loss_barrier"]
    if abb < nbb and ab < nb:
        return [f"Weight matching lowered the interpolation barrier between the two independently trained networks: "
                f"test loss barrier {nb:.3f} -> {ab:.3f} (accuracy barrier {c['naive']['acc_barrier']:.3f} -> "
                f"{c['aligned']['acc_barrier']:.3f}); with batch-norm statistics recomputed at every point of the path "
                f"{nbb:.3f} -> {abb:.3f} (accuracy barrier {c['naive + BN recalibration']['acc_barrier']:.3f} -> "
                f"{c['aligned + BN recalibration']['acc_barrier']:.3f}). On the aligned path, recomputing the batch-norm "
                f"statistics removed most of what alignment left ({ab:.3f} -> {abb:.3f})."]
    return [f"Alignment did not lower both barriers in this run (loss barrier {nb:.3f} -> {ab:.3f} without BN "
            f"recalibration, {nbb:.3f} -> {abb:.3f} with it)."]


def plot_curves(res: dict, ax=None):
    from ..plots import _mpl

    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    from ..synthesis.interpolate import plot_interpolation

    curves = list(res["_curves"].values())
    plot_interpolation(curves, "loss", ax=axes[0], title="test loss along the path")
    plot_interpolation(curves, "acc", ax=axes[1], title="test accuracy along the path")
    return fig


# ---------------------------------------------------------------------------
# several seeds: one row per seed, mean and spread of the differences


def seed_row(res: dict) -> dict:
    """The numbers of one seed's soups run that the multi-seed table shows."""
    s = res["soups"]
    g, u, bm = s["greedy soup"], s["uniform soup"], s["best member"]
    gbn = s.get("greedy soup, BN recalibrated while choosing")
    return {
        "seed": int(res.get("seed", 0)),
        "start_test_acc": res["base"]["test_acc"],
        "best_member": res["best_member"],
        "best_val_acc": bm["val_acc"],
        "best_test_acc": bm["test_acc"],
        "uniform_test_acc": u["test_acc"],
        "greedy_val_acc": g["val_acc"],
        "greedy_test_acc": g["test_acc"],
        "ingredients": len(res["greedy_ingredients"]),
        "members": len(res["members"]),
        "greedy_minus_best_val": g["val_acc"] - bm["val_acc"],
        "greedy_minus_best_test": g["test_acc"] - bm["test_acc"],
        "uniform_minus_best_test": u["test_acc"] - bm["test_acc"],
        "greedy_bn_minus_best_test": None if gbn is None else gbn["test_acc"] - bm["test_acc"],
    }


DIFFERENCES = {
    "greedy_minus_best_val": "greedy soup - best member, held-out",
    "greedy_minus_best_test": "greedy soup - best member, test",
    "uniform_minus_best_test": "uniform soup - best member, test",
    "greedy_bn_minus_best_test": "greedy soup (BN recalibrated while choosing) - best member, test",
}


def _describe(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return {
        "n": n,
        "mean": mean,
        "std": std,  # sample standard deviation (n - 1)
        "sem": None if std is None else std / n**0.5,
        "min": min(values),
        "max": max(values),
        "at_least_zero": sum(v >= 0 for v in values),
        "above_zero": sum(v > 0 for v in values),
    }


def aggregate_seeds(results: list[dict]) -> dict:
    """Per-seed rows (sorted by seed) and, per difference, mean / std / standard error over seeds."""
    if not results:
        raise ValueError("no seed results to aggregate")
    rows = sorted((seed_row(r) for r in results), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rows]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice: {seeds}")
    stats = {}
    for key in DIFFERENCES:
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            stats[key] = _describe(vals)
    return {
        "seeds": seeds,
        "rows": rows,
        "stats": stats,
        "test_size": results[0]["config"]["test_size"],
        "val_size": results[0]["config"]["val_size"],
        "config_name": results[0].get("config_name"),
    }


def _t_two_sided_p(t: float, dof: int) -> float | None:
    try:
        from scipy import stats
    except ImportError:
        return None
    return float(2 * stats.t.sf(abs(t), dof))


def render_seeds_markdown(agg: dict, command: str, reports: dict | None = None) -> str:
    """results/synthesis_<config>_seeds.md. ``reports``: seed -> file name of that seed's full report."""
    rows, st, n = agg["rows"], agg["stats"], len(agg["rows"])
    name = agg.get("config_name") or "custom"
    L = [f"# Soups over {n} seeds: greedy soup vs best member (Fashion-MNIST, config {name})", ""]
    L.append(f"Regenerate: `{command}` (one thread per run, seeds run one after the other; a seed whose JSON exists "
             "is read, not rerun). Seed S adds "
             f"{SEED_STRIDE} x S to every seed of the config: the permutation that sets the held-out split apart, the "
             "start's initialisation and data order, and each member's data order and augmentation. The members' "
             "hyper-parameters (learning rate, augmentation, label smoothing, length) are the same in every seed; "
             f"the test set is the same {agg['test_size']} images in every seed. Best member = highest held-out "
             f"accuracy ({agg['val_size']} held-out images), the split the greedy soup chooses on.")
    if reports:
        L += ["", "Full report of each seed: " + ", ".join(f"seed {s}: [{f}]({f})" for s, f in sorted(reports.items())) + "."]
    L += ["", "| seed | start test acc | best member | best member held-out acc | best member test acc | uniform soup test acc | "
          "greedy soup held-out acc | greedy soup test acc | ingredients | greedy - best, held-out | greedy - best, test |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['seed']} | {r['start_test_acc']:.4f} | {r['best_member']} | {r['best_val_acc']:.4f} | {r['best_test_acc']:.4f} | "
                 f"{r['uniform_test_acc']:.4f} | {r['greedy_val_acc']:.4f} | {r['greedy_test_acc']:.4f} | "
                 f"{r['ingredients']} of {r['members']} | {r['greedy_minus_best_val']:+.4f} | {r['greedy_minus_best_test']:+.4f} |")
    L += ["", "| difference | seeds | mean | std | standard error | min | max | seeds >= 0 | seeds > 0 |",
          "|---|---|---|---|---|---|---|---|---|"]
    for key, label in DIFFERENCES.items():
        if key in st:
            d = st[key]
            L.append(f"| {label} | {d['n']} | {d['mean']:+.4f} | {_f(d['std'])} | {_f(d['sem'])} | {d['min']:+.4f} | "
                     f"{d['max']:+.4f} | {d['at_least_zero']} of {d['n']} | {d['above_zero']} of {d['n']} |")
    L += ["", "std: sample standard deviation over seeds (n - 1); standard error = std / sqrt(seeds).", "", "## Reading", ""]
    L.append(" ".join(_read_seeds(agg)))
    return "\n".join(L) + "\n"


def _read_seeds(agg: dict) -> list[str]:
    st, n = agg["stats"], len(agg["rows"])
    v, t = st["greedy_minus_best_val"], st["greedy_minus_best_test"]
    L = []
    held = "it held in every seed" if v["at_least_zero"] == n else "it did not hold in every seed"
    L.append(f"On held-out data (what the issue asks), greedy soup >= best member in {v['at_least_zero']} of {n} seeds "
             f"(strictly greater in {v['above_zero']}; mean {v['mean']:+.4f}): {held}. This comparison is not independent evidence: "
             "the greedy soup starts from the best member and keeps a candidate only when held-out accuracy does not drop, "
             "so it cannot end below the best member on that split.")
    held = "it held in every seed" if t["at_least_zero"] == n else "it did not hold in every seed"
    L.append(f"On the test set, greedy soup >= best member in {t['at_least_zero']} of {n} seeds "
             f"(strictly greater in {t['above_zero']}): {held}; the difference was {t['mean']:+.4f} on average"
             + (f" (std {t['std']:.4f}, standard error {t['sem']:.4f})" if t["sem"] is not None else "") + ".")
    if t["sem"] is not None and t["sem"] > 0:
        z = t["mean"] / t["sem"]
        p = _t_two_sided_p(z, n - 1)
        pt = "" if p is None else f", two-sided p {p:.2g} from a t distribution with {n - 1} degrees of freedom"
        if abs(z) >= 2:
            L.append(f"The mean test difference is {abs(z):.1f} standard errors {'above' if z > 0 else 'below'} zero ({pt[2:] or 'no p-value: scipy missing'}"
                     f"; with {n} seeds a rough guide only).")
        else:
            L.append(f"The mean test difference is within two standard errors of zero ({z:+.1f}{pt}): with {n} seeds it is "
                     "not distinguishable from no difference.")
    elif n == 1:
        L.append("One seed: no spread to compare against.")
    b = st.get("greedy_bn_minus_best_test")
    if b:
        L.append(f"The greedy soup chosen with BN recalibration vs the best member on test: {b['mean']:+.4f} on average "
                 f"(min {b['min']:+.4f}), >= in {b['at_least_zero']} of {n} seeds.")
    u = st.get("uniform_minus_best_test")
    if u:
        L.append(f"The uniform soup of all members vs the best member on test: {u['mean']:+.4f} on average, >= in {u['at_least_zero']} of {n} seeds.")
    p = sum(r["best_test_acc"] for r in agg["rows"]) / n
    N = agg["test_size"]
    L.append(f"For scale: one accuracy near {p:.2f} on {N} test images has a binomial standard error of "
             f"{(p * (1 - p) / N) ** 0.5:.4f}; the greedy soup and the best member are scored on the same images, so their "
             "difference is less noisy than that, and the spread over seeds above includes the randomness of the "
             "split, the start and the members.")
    return L


def result_stem(config: str, seed: int = 0) -> str:
    """File stem of one run's results: synthesis[_<config>][_seed<S>] (seed 0 keeps the historical name)."""
    return ("synthesis" if config == "full" else f"synthesis_{config}") + (f"_seed{seed}" if seed else "")


def load_seed_result(path, config: str, seed: int) -> dict:
    """A finished run's JSON, checked to be the run of ``config`` at ``seed``; ValueError otherwise."""
    import json
    from pathlib import Path

    from .._util import dumps

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable results JSON ({type(e).__name__}); move it away to rerun seed {seed}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict) or "soups" not in doc:
        raise ValueError(f"{path}: not a soups results JSON; move it away to rerun seed {seed}")
    want = json.loads(dumps(asdict(reseed(CONFIGS[config], seed))))
    got = dict(doc["config"])
    for k in ("split_seed", "start_seed"):  # written before --seed existed: both were 0
        got.setdefault(k, 0)
    if doc.get("seed", 0) != seed or got != want:
        raise ValueError(f"{path}: written by another configuration or seed than --config {config} seed {seed}; "
                         "move it away to rerun that seed")
    doc["seed"] = seed
    return doc
