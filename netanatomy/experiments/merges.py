"""CPU-scale merge experiment on Fashion-MNIST (issue 15): task-vector merges vs soups.

One shared start (a :class:`SmallCNN` trained briefly on all ten classes) is
fine-tuned once per *task*, a subset of the classes: each member keeps the
10-way head but sees only its task's training images. The members are merged
with every method of :mod:`netanatomy.synthesis.merge` over a small grid of its
parameters, fixed in :data:`GRIDS` before any result was seen, and compared with
each member, the start, the uniform soup and the greedy soup
(:mod:`netanatomy.synthesis.soup`).

Every candidate is scored on a validation split carved out of the training set
(per task: 10-way accuracy on that task's classes; plus all classes) and on the
test set. Per method, the parameters are chosen by the mean per-task
*validation* accuracy (:func:`select`); the test numbers are only reported.
Training, data and evaluation helpers are those of :mod:`.soups`.
Computation never prints or plots; :func:`render_markdown` renders a result.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ._kit import SmallCNN
from .soups import evaluate, train

# Fixed before the first run (see the results file): one entry per candidate.
GRIDS = {
    "task_arithmetic": [{"lam": v} for v in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "lam": v} for d in (0.2, 0.5) for v in (0.5, 1.0, 1.5)],
    "dare_linear": [{"p": p, "lam": v} for p in (0.5, 0.9) for v in (0.5, 1.0)],
    "dare_ties": [{"p": p, "lam": v} for p in (0.5, 0.9) for v in (0.5, 1.0, 1.5)],
    "model_stock": [{}],
    "slerp": [{"t": t} for t in (0.3, 0.5, 0.7)],  # per pair of members
}
MERGE_METHODS = tuple(GRIDS)


@dataclass
class Config:
    tasks: tuple = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    widths: tuple = (16, 32, 32)
    val_size: int = 5000
    test_size: int = 10000
    base_samples: int = 20000
    base_lr: float = 0.05
    member_samples: int = 4000
    member_lr: float = 0.01
    batch: int = 128
    grids: dict = field(default_factory=lambda: copy.deepcopy(GRIDS))
    seed: int = 0  # split, start, members, DARE


CONFIGS = {
    "merge": Config(),
    "merge-smoke": Config(
        val_size=300, test_size=300, base_samples=256, member_samples=128, widths=(4, 8, 8),
        grids={"task_arithmetic": [{"lam": 0.5}, {"lam": 1.0}], "ties": [{"density": 0.5, "lam": 1.0}],
               "dare_linear": [{"p": 0.5, "lam": 1.0}], "dare_ties": [{"p": 0.5, "lam": 1.0}],
               "model_stock": [{}], "slerp": [{"t": 0.5}]},
    ),
}
SEED_STRIDE = 1000


def _subset(x, y, classes):
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


@torch.no_grad()
def _predict(net, x, batch: int = 2000) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def _scores(net, sd, data, tasks, splits=("val", "test")) -> dict:
    """Accuracy on every task's images of each split, their mean, and on all images."""
    net.load_state_dict(sd)
    out = {}
    for split in splits:
        x, y = data[split]
        right = _predict(net, x) == y
        accs = [float(right[torch.isin(y, torch.tensor(t))].float().mean()) for t in tasks]
        out[split] = {"tasks": accs, "mean": sum(accs) / len(accs), "all": float(right.float().mean())}
    return out


def run(config: str | Config = "merge", seed: int = 0, log=None) -> dict:
    """One seed of the experiment: every candidate's validation and test scores."""
    from ..datasets import fashion_mnist_normalized
    from ..synthesis.merge import merge
    from ..synthesis.soup import greedy_soup, uniform_soup

    cfg = CONFIGS[config] if isinstance(config, str) else config
    s0 = cfg.seed + SEED_STRIDE * seed
    say = log or (lambda m: None)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = fashion_mnist_normalized()
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(s0))
    vi, ti = perm[: cfg.val_size], perm[cfg.val_size:]
    data = {"val": (xtr[vi], ytr[vi]), "test": (xte[: cfg.test_size], yte[: cfg.test_size])}
    xpool, ypool = xtr[ti], ytr[ti]
    torch.manual_seed(s0)
    base = train(SmallCNN(cfg.widths), xpool, ypool, cfg.base_samples, cfg.base_lr, s0, False, cfg.batch)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    say(f"start trained ({time.perf_counter() - t0:.0f} s)")
    members = []
    for i, task in enumerate(cfg.tasks):
        xs, ys = _subset(xpool, ypool, task)
        net = train(copy.deepcopy(base), xs, ys, cfg.member_samples, cfg.member_lr, s0 + 1 + i, False, cfg.batch)
        members.append({k: v.clone() for k, v in net.state_dict().items()})
        say(f"member {i} (classes {task}) trained ({time.perf_counter() - t0:.0f} s)")
    net = SmallCNN(cfg.widths)
    rows = []

    def add(method, params, sd, group):
        rows.append({"method": method, "params": params, "group": group, **_scores(net, sd, data, cfg.tasks)})

    add("start", {}, base_sd, "reference")
    for i, sd in enumerate(members):
        add(f"member {i}", {"classes": list(cfg.tasks[i])}, sd, "reference")
    def val_all(sd):  # the greedy soup chooses on the validation mean per task
        return _scores(net, sd, data, cfg.tasks, ("val",))["val"]["mean"]

    add("uniform soup", {}, uniform_soup(members).average.tensors, "soup")
    greedy = greedy_soup(members, val_all)
    add("greedy soup", {"ingredients": greedy.ingredients}, greedy.tensors, "soup")
    for method, grid in cfg.grids.items():
        for params in grid:
            if method == "slerp":
                for a, b in itertools.combinations(range(len(members)), 2):
                    r = merge("slerp", members[a], [members[b]], t=params["t"])
                    add(method, {"pair": [a, b], **params}, r.tensors, "merge")
                continue
            kw = dict(params)
            if method.startswith("dare"):
                kw["seed"] = s0
            add(method, params, merge(method, base_sd, members, **kw).tensors, "merge")
        say(f"{method}: {len(grid)} setting(s) scored ({time.perf_counter() - t0:.0f} s)")
    return {"config": asdict(cfg), "config_name": config if isinstance(config, str) else None, "seed": seed,
            "rows": rows, "seconds": time.perf_counter() - t0}


def select(res: dict) -> dict:
    """Per method (and per reference / soup), the row with the highest mean per-task
    *validation* accuracy; the test split plays no part in the choice."""
    best: dict = {}
    for r in res["rows"]:
        key = r["method"]
        if key not in best or r["val"]["mean"] > best[key]["val"]["mean"]:
            best[key] = r
    return best


def aggregate(results: list[dict]) -> dict:
    """Per method, the selected row's test numbers over seeds: mean and spread."""
    per: dict = {}
    for res in results:
        for m, r in select(res).items():
            per.setdefault(m, []).append(r)
    out = {}
    for m, rs in per.items():
        def stat(vals):
            n = len(vals)
            mu = sum(vals) / n
            sd = (sum((v - mu) ** 2 for v in vals) / (n - 1)) ** 0.5 if n > 1 else None
            return {"mean": mu, "std": sd, "n": n}
        k = len(rs[0]["test"]["tasks"])
        out[m] = {"tasks": [stat([r["test"]["tasks"][i] for r in rs]) for i in range(k)],
                  "mean": stat([r["test"]["mean"] for r in rs]), "all": stat([r["test"]["all"] for r in rs]),
                  "val_mean": stat([r["val"]["mean"] for r in rs]), "params": [r["params"] for r in rs]}
    return out


def _p(params: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "-"


def render_markdown(results: list[dict], command: str) -> str:
    cfg = results[0]["config"]
    tasks = cfg["tasks"]
    n = len(results)
    agg = aggregate(results)
    L = ["# Merges vs soups on Fashion-MNIST (issue 15)", "",
         f"Regenerate: `{command}` (one thread; {n} seed(s): {', '.join(str(r['seed']) for r in results)}).", "",
         f"Setup: a SmallCNN {tuple(cfg['widths'])} start trained on all classes for {cfg['base_samples']} samples "
         f"(lr {cfg['base_lr']}); one member per task, fine-tuned from it for {cfg['member_samples']} samples "
         f"(lr {cfg['member_lr']}) on that task's classes only, keeping the 10-way head. Tasks: "
         + "; ".join(f"T{i} = classes {list(t)}" for i, t in enumerate(tasks))
         + f". Validation: {cfg['val_size']} training images held out; test: the first {cfg['test_size']} test images. "
         "Task accuracy = 10-way accuracy on that task's images; mean = mean over tasks; all = accuracy on every image.", "",
         "Protocol, fixed before any result was seen: the grid below, and per method the setting with the highest mean "
         "per-task **validation** accuracy is the one reported on **test** (the greedy soup also chooses on the "
         "validation mean). SLERP merges two members at a time (each pair). Grid: "
         + "; ".join(f"{m}: " + (" / ".join(_p(p) for p in g) or "-") for m, g in cfg["grids"].items()) + ".", "",
         "## Selected by validation, scored on test" + (f" (mean ± std over {n} seeds)" if n > 1 else " (1 seed)"), "",
         "| method | chosen parameters | " + " | ".join(f"T{i} test" for i in range(len(tasks))) + " | mean test | all test | mean val |",
         "|---|---|" + "---|" * (len(tasks) + 3)]

    def cell(s):
        return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")

    order = sorted(agg, key=lambda m: -agg[m]["mean"]["mean"])
    for m in order:
        a = agg[m]
        L.append(f"| {m} | {' / '.join(_p(p) for p in a['params'])} | " + " | ".join(cell(s) for s in a["tasks"])
                 + f" | {cell(a['mean'])} | {cell(a['all'])} | {cell(a['val_mean'])} |")
    for res in results:
        L += ["", f"## Every candidate, seed {res['seed']}", "",
              "| method | parameters | " + " | ".join(f"T{i} val" for i in range(len(tasks))) + " | mean val | "
              + " | ".join(f"T{i} test" for i in range(len(tasks))) + " | mean test | all test |",
              "|---|---|" + "---|" * (2 * len(tasks) + 3)]
        for r in res["rows"]:
            L.append(f"| {r['method']} | {_p(r['params'])} | " + " | ".join(f"{v:.4f}" for v in r["val"]["tasks"])
                     + f" | {r['val']['mean']:.4f} | " + " | ".join(f"{v:.4f}" for v in r["test"]["tasks"])
                     + f" | {r['test']['mean']:.4f} | {r['test']['all']:.4f} |")
    L += ["", "## Reading", "", " ".join(_read(agg, n))]
    return "\n".join(L) + "\n"


def _read(agg: dict, n: int) -> list[str]:
    merges = [m for m in agg if m in MERGE_METHODS]
    mem = [m for m in agg if m.startswith("member")]
    bm = max(merges, key=lambda m: agg[m]["val_mean"]["mean"])
    bmem = max(mem, key=lambda m: agg[m]["val_mean"]["mean"])
    g = lambda m: agg[m]["mean"]["mean"]  # noqa: E731
    L = [f"By validation, the best merge method is {bm} (chosen: {' / '.join(_p(p) for p in agg[bm]['params'])}; "
         f"mean per-task test accuracy {g(bm):.4f}); the best single member by validation is {bmem} ({g(bmem):.4f}); "
         f"the start {g('start'):.4f}; uniform soup {g('uniform soup'):.4f}; greedy soup {g('greedy soup'):.4f}."]
    rivals = {"the best member": g(bmem), "the uniform soup": g("uniform soup"), "the greedy soup": g("greedy soup"), "the start": g("start")}
    above = [k for k, v in rivals.items() if g(bm) > v]
    below = [k for k, v in rivals.items() if g(bm) <= v]
    L.append(f"The best merge is above {', '.join(above) or 'none of them'}" + (f" and not above {', '.join(below)}." if below else "."))
    own = [agg[f"member {i}"]["tasks"][i]["mean"] for i in range(len(mem))]
    start_t = [t["mean"] for t in agg["start"]["tasks"]]
    merged_t = [t["mean"] for t in agg[bm]["tasks"]]
    L.append("Own-task test accuracy, start -> member -> best merge: "
             + "; ".join(f"T{i} {a:.3f} -> {b:.3f} -> {c:.3f}" for i, (a, b, c) in enumerate(zip(start_t, own, merged_t))) + ".")
    if g("start") >= g(bm):
        L.append("Here merging did not recover a multi-task model better than the shared start: each member forgets the "
                 "classes it did not see, and the merges keep only part of each member's own-task gain while inheriting "
                 "part of the others' forgetting.")
    grid = [p for p in GRIDS.get(bm, [])]
    if bm == "task_arithmetic" and all(p.get("lam") == min(q["lam"] for q in grid) for p in agg[bm]["params"]):
        L.append("The chosen lambda is the smallest of the grid: a smaller one (closer to the start) might score higher still.")
    L.append(f"{n} seed(s); " + ("spread over seeds is in the table (± sample std)." if n > 1 else "no spread over seeds: read differences under ~0.01 as noise."))
    return L
