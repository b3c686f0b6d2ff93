"""CPU-scale branch-specialization experiment (``netanatomy experiment branches``).

Task: "which photograph is this crop from", on offline photographs (Debian
wallpaper packages, scikit-image and scikit-learn sample images), with a held-out
strip of every photo for testing. A share of the crops is turned grey so that
colour alone does not identify the photo.

Two networks per seed, from the same initial conv1 weights:

* ``branched``: conv1 (3 -> C1) feeds a two-group conv2 (AlexNet's two towers:
  conv1's first half feeds group 0, its second half group 1), then an ungrouped
  conv3, global average pooling and a linear classifier;
* ``unbranched``: the same with an ungrouped conv2.

After training, the ``branches`` analysis reads the weights: colour / grey and
low / high frequency counts per tower with hypergeometric p-values, Mann-Whitney
tests of colourfulness and frequency between towers, and the SVD of
``|W_conv2|`` against the conv1 descriptors.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ._kit import NOT_PHOTOS, PHOTO_GLOBS, _pixels, _resize, load_photos, photo_paths  # noqa: F401 (moved; re-exported)

@dataclass
class Config:
    name: str = "quick"
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1500
    batch: int = 32
    crop: int = 32
    short_side: int = 192  # photos are resized so their shorter side is this
    grey_share: float = 0.5  # share of crops turned grey
    c1: int = 32
    c2: int = 48
    c3: int = 48
    k1: int = 5
    s1: int = 1  # conv1 stride (AlexNet's is 4)
    k2: int = 3
    lr: float = 0.05
    weight_decay: float = 5e-4
    conv1_weight_decay: float = 5e-3
    test_crops: int = 1000
    threads: int = 1
    max_photos: int = 0  # 0: all


CONFIGS = {
    "smoke": Config(name="smoke", seeds=(0,), steps=20, batch=16, short_side=176, test_crops=64, c1=8, c2=8, c3=8),
    # quick fits ~20 minutes of one shared core; full is the run to do on a free machine
    "quick": Config(name="quick", seeds=(0, 1, 2), steps=1000, c2=32, c3=32),
    "full": Config(name="full", seeds=tuple(range(10)), steps=4000),
    # the feasibility design recorded in DESIGN.md (combined p 5e-4 over 4 seeds there):
    # colour crops only, 3000 steps; five seeds
    "towers": Config(name="towers", seeds=(0, 1, 2, 3, 4), steps=3000, grey_share=0.0),
    # alexstem: the `towers` design with AlexNet's stem, fixed before any run. What changed and why:
    # towers' 5x5 stride-1 conv1 on 32-px crops grew colour blobs in both towers (28 of 32 filters
    # colour, no grey Gabor bank), so there was no second kind of filter to gather in one tower.
    # AlexNet's towers split into grey Gabors and colour blobs; a Gabor bank needs many filters
    # (orientations, phases) and room to be oriented and high-frequency, and a tower's conv2 can only
    # compose the filters its own half of conv1 holds. Hence: 11x11 conv1 at stride 4 (AlexNet's) on
    # 64-px crops of photos at a 320-px short side, a 5x5 conv2 (AlexNet's) over the towers, 16 conv1
    # filters per tower (few for a full Gabor bank plus colour), and a quarter of the crops grey so
    # that colour alone does not identify every crop and luminance edges earn their filters. The
    # stem is cheap (about 9 ms a step against towers' 22 on one core), so ten seeds x 4000 steps.
    "alexstem": Config(name="alexstem", seeds=tuple(range(10)), steps=4000, crop=64, short_side=320,
                       k1=11, s1=4, k2=5, grey_share=0.25),
    # the same code paths (strided conv1, 5x5 conv2, grey crops, 64-px crops) at test size
    "smoke_alexstem": Config(name="smoke_alexstem", seeds=(0,), steps=20, batch=16, crop=64, short_side=320,
                             k1=11, s1=4, k2=5, grey_share=0.25, test_crops=64, c1=8, c2=8, c3=8),
    # One-lever ablations of `alexstem` (issue 13: say which lever mattered), fixed before any run of
    # either. Each is `alexstem` with one lever put back; seeds 0-4 for both, so that both finish within
    # about an hour of a shared core (the small stem costs about 37 ms a step there, against alexstem's
    # 13), and so that they compare with alexstem's own seeds 0-4 (same seeds; alexstem_colour also has
    # alexstem's initial weights and crop draws, only none of them turned grey).
    # alexstem_colour: no grey crops (grey_share 0.0, as in `towers`). Does the grey-crop share matter?
    "alexstem_colour": Config(name="alexstem_colour", seeds=tuple(range(5)), steps=4000, crop=64, short_side=320,
                              k1=11, s1=4, k2=5, grey_share=0.0),
    # alexstem_smallstem: the `towers` stem back (5x5 stride-1 conv1 on 32-px crops of photos at a 192-px
    # short side, the Config defaults that `towers` uses), keeping alexstem's 5x5 conv2, 25% grey crops
    # and 4000 steps. Does the big strided stem matter?
    "alexstem_smallstem": Config(name="alexstem_smallstem", seeds=tuple(range(5)), steps=4000, crop=32, short_side=192,
                                 k1=5, s1=1, k2=5, grey_share=0.25),
}

# The goal for the towers (issue 13), fixed before the alexstem run: Fisher-combined
# colourfulness p below GOAL_P over at least GOAL_SEEDS seeds for the branched towers, and the
# same-split unbranched control not significant (p >= CONTROL_ALPHA).
GOAL_P = 1e-3
GOAL_SEEDS = 5
CONTROL_ALPHA = 0.05


# ---------------------------------------------------------------------------
# data


class CropTask:
    """Random crops; the right-most 20% of every photo is held out for testing."""

    def __init__(self, images: Sequence[np.ndarray], crop: int, grey_share: float):
        self.crop, self.grey_share = crop, grey_share
        self.train, self.test = [], []
        for im in images:
            t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
            w = t.shape[2]
            cut = int(w * 0.8)
            if cut < crop or w - cut < crop or t.shape[1] < crop:
                raise UserError(f"a photo of {tuple(t.shape[1:])} pixels is too small for {crop}-pixel crops")
            self.train.append(t[:, :, :cut])
            self.test.append(t[:, :, cut:])
        all_px = torch.cat([t.reshape(3, -1) for t in self.train], dim=1)
        self.mean = all_px.mean(dim=1).view(3, 1, 1)
        self.std = all_px.std(dim=1).view(3, 1, 1)

    @property
    def classes(self) -> int:
        return len(self.train)

    def batch(self, n: int, gen: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        src = self.train if split == "train" else self.test
        labels = torch.randint(len(src), (n,), generator=gen)
        out = torch.empty(n, 3, self.crop, self.crop)
        for i, c in enumerate(labels.tolist()):
            im = src[c]
            y = int(torch.randint(im.shape[1] - self.crop + 1, (1,), generator=gen))
            x = int(torch.randint(im.shape[2] - self.crop + 1, (1,), generator=gen))
            patch = im[:, y : y + self.crop, x : x + self.crop]
            if split == "train" and bool(torch.rand(1, generator=gen) < 0.5):
                patch = patch.flip(2)
            out[i] = patch
        grey = torch.rand(n, generator=gen) < self.grey_share
        if grey.any():
            lum = (0.299 * out[grey, 0] + 0.587 * out[grey, 1] + 0.114 * out[grey, 2]).unsqueeze(1)
            out[grey] = lum.expand(-1, 3, -1, -1)
        return (out - self.mean) / self.std, labels


# ---------------------------------------------------------------------------
# networks


class TowerNet(nn.Module):
    """conv1 -> (two towers when ``branched``) conv2 -> conv3 -> GAP -> fc."""

    def __init__(self, classes: int, cfg: Config, branched: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.c1, cfg.k1, stride=cfg.s1, padding=cfg.k1 // 2)
        self.bn1 = nn.BatchNorm2d(cfg.c1)
        self.conv2 = nn.Conv2d(cfg.c1, cfg.c2, cfg.k2, padding=cfg.k2 // 2, groups=2 if branched else 1)
        self.bn2 = nn.BatchNorm2d(cfg.c2)
        self.conv3 = nn.Conv2d(cfg.c2, cfg.c3, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(cfg.c3)
        self.fc = nn.Linear(cfg.c3, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_pair(classes: int, cfg: Config, seed: int) -> dict[str, TowerNet]:
    """Branched and unbranched nets with the same conv1 / conv3 / fc initial weights."""
    torch.manual_seed(seed)
    branched = TowerNet(classes, cfg, True)
    torch.manual_seed(seed)
    unbranched = TowerNet(classes, cfg, False)
    with torch.no_grad():
        for name in ("conv1", "conv3", "fc"):
            getattr(unbranched, name).load_state_dict(getattr(branched, name).state_dict())
    return {"branched": branched, "unbranched": unbranched}


def train(net: TowerNet, task: CropTask, cfg: Config, seed: int, on_step: Callable[[int], None] | None = None) -> dict:
    from .._util import default_device

    device = default_device()
    net.to(device).train()
    gen = torch.Generator().manual_seed(10_000 + seed)
    conv1 = [net.conv1.weight]
    rest = [p for n, p in net.named_parameters() if n != "conv1.weight"]
    opt = torch.optim.SGD(
        [{"params": conv1, "weight_decay": cfg.conv1_weight_decay}, {"params": rest, "weight_decay": cfg.weight_decay}],
        lr=cfg.lr, momentum=0.9, nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    t0 = time.perf_counter()
    losses = []
    for step in range(cfg.steps):
        x, y = task.batch(cfg.batch, gen)
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step and (step % 100 == 0 or step == cfg.steps - 1):
            on_step(step)
    net.eval()
    correct = total = 0
    tgen = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        while total < cfg.test_crops:
            x, y = task.batch(min(256, cfg.test_crops - total), tgen, split="test")
            correct += int((net(x.to(device)).argmax(1).cpu() == y).sum())
            total += len(y)
    net.cpu()
    return {"seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-50:])), "test_accuracy": correct / total}


# ---------------------------------------------------------------------------
# measurement


def measure(net: TowerNet, colour_threshold: float = 1 / 3) -> dict:
    """Read the trained weights with the ``branches`` analysis."""
    from .. import load
    from ..branches.analysis import BranchesOptions, compute
    from ..branches.descriptors import rgb_categories, rgb_descriptors
    from ..branches.specialization import category_tests, continuous_tests
    from ..branches.svd import separation_auc

    model = load(net, name="towernet")
    res = compute(model, BranchesOptions(colour_threshold=colour_threshold))
    w1 = net.conv1.weight.detach()
    d = rgb_descriptors(w1)
    c1 = w1.shape[0]
    half = np.array([0] * (c1 // 2) + [1] * (c1 - c1 // 2))  # the towers (or the same split, unbranched)
    cats = rgb_categories(d, colour_threshold)
    names = ["tower 0", "tower 1"]
    out: dict = {
        "colour_filters": int((cats["colour"] == "colour").sum()),
        "filters": int(c1),
        "colourfulness": d.colourfulness.tolist(),
        "frequency": d.frequency.tolist(),
    }
    freq = np.where(d.frequency > np.median(d.frequency), "high-frequency", "low-frequency").astype(object)
    tests = category_tests("colour", cats["colour"], half, names, unit="filters") + category_tests(
        "frequency", freq, half, names, unit="filters"
    )
    out["counts"] = [t.to_dict() for t in tests]
    out["mwu"] = continuous_tests("colourfulness", d.colourfulness, half, names)[:1] + continuous_tests(
        "frequency", d.frequency, half, names
    )[:1]
    out["tower_colourfulness"] = [float(np.mean(d.colourfulness[half == i])) for i in (0, 1)]
    out["tower_colour_count"] = [int(((cats["colour"] == "colour") & (half == i)).sum()) for i in (0, 1)]
    out["tower_frequency"] = [float(np.mean(d.frequency[half == i])) for i in (0, 1)]
    pair = next((p for p in res.pairs if p.layer1 == "conv1" and p.layer2 == "conv2"), None)
    if pair is not None:
        colour = d.colourfulness >= colour_threshold
        sv = {}
        for variant, mp in pair.maps.items():
            sv[variant] = [
                {
                    "sv": j,
                    "r_colourfulness": float(np.corrcoef(mp.left[:, j], d.colourfulness)[0, 1]),
                    "r_frequency": float(np.corrcoef(mp.left[:, j], d.frequency)[0, 1]),
                    "auc_colour_grey": separation_auc(mp.left[:, j], colour),
                }
                for j in range(mp.left.shape[1])
            ]
        out["svd"] = sv
    point = next((r for r in res.point_records if r["kind"] == "groups" and r["layer"] == "conv1"), None)
    out["analysis_headline"] = point.get("best", "") if point else ""
    return out


def init_baseline(net: TowerNet, seed: int) -> dict:
    """The SVD-vs-colourfulness correlation of an untrained unbranched net (the baseline)."""
    m = measure(net)
    out = {"seed": seed}
    for variant in ("uncentred", "centred"):
        rows = m.get("svd", {}).get(variant, [])
        if rows:
            j = max(range(len(rows)), key=lambda k: abs(rows[k]["r_colourfulness"]))
            out[variant] = {"sv": j, "r": rows[j]["r_colourfulness"], "r_per_sv": [r["r_colourfulness"] for r in rows]}
    return out


def fisher_combined(pvalues: Sequence[float]) -> float:
    from scipy.stats import chi2

    ps = [min(max(p, 1e-300), 1.0) for p in pvalues if p is not None and math.isfinite(p)]
    if not ps:
        return math.nan
    return float(chi2.sf(-2 * sum(math.log(p) for p in ps), 2 * len(ps)))


def run(cfg: Config, out_dir: Path, images: Sequence[np.ndarray] | None = None, names: Sequence[str] | None = None,
        log: Callable[[str], None] | None = None) -> dict:
    """Train, measure and write ``branches_runs.json``, ``branches.md`` and pictures."""
    torch.set_num_threads(max(1, cfg.threads))
    log = log or (lambda s: None)
    if images is None:
        images, names = load_photos(cfg.short_side, cfg.max_photos)
    if len(images) < 4:
        raise UserError(
            f"only {len(images)} photographs found; install the Debian packages lomiri-wallpapers-16.04, "
            "mate-backgrounds and plasma-workspace-wallpapers (and scikit-image)"
        )
    task = CropTask(images, cfg.crop, cfg.grey_share)
    runs = []
    trained: dict[tuple[int, str], TowerNet] = {}
    t0 = time.perf_counter()
    init = []
    for seed in cfg.seeds:
        nets = build_pair(task.classes, cfg, seed)
        init.append(init_baseline(nets["unbranched"], seed))
        for arch, net in nets.items():
            info = train(net, task, cfg, seed, on_step=lambda s, a=arch, sd=seed: log(f"seed {sd} {a}: step {s}"))
            m = measure(net)
            runs.append({"seed": seed, "arch": arch, **info, **m})
            trained[(seed, arch)] = net
            log(f"seed {seed} {arch}: acc {info['test_accuracy']:.3f}, {info['seconds']:.0f} s, "
                f"tower colourfulness {m['tower_colourfulness'][0]:.2f} / {m['tower_colourfulness'][1]:.2f}")
    doc = {
        "config": asdict(cfg),
        "photos": list(names or []),
        "classes": task.classes,
        "wall_seconds": time.perf_counter() - t0,
        "runs": runs,
        "init": init,
        "summary": summarize(runs),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .._util import atomic_write_text, dumps

    atomic_write_text(out_dir / "branches_runs.json", dumps(doc, indent=1))
    pictures = draw(trained, runs, out_dir)
    atomic_write_text(out_dir / "branches.md", markdown(doc, pictures))
    return doc


def summarize(runs: list[dict]) -> dict:
    out = {}
    for arch in ("branched", "unbranched"):
        rs = [r for r in runs if r["arch"] == arch]
        if not rs:
            continue
        mwu_c = [next((m["mwu_p"] for m in r["mwu"] if m["descriptor"] == "colourfulness"), math.nan) for r in rs]
        mwu_f = [next((m["mwu_p"] for m in r["mwu"] if m["descriptor"] == "frequency"), math.nan) for r in rs]
        best_count_p = [min((t["p"] for t in r["counts"] if t["descriptor"] == "colour" and t["category"] == "colour"), default=math.nan) for r in rs]
        s = {
            "runs": len(rs),
            "test_accuracy_mean": float(np.mean([r["test_accuracy"] for r in rs])),
            "colourfulness_mwu_p": mwu_c,
            "colourfulness_fisher_p": fisher_combined(mwu_c),
            "frequency_mwu_p": mwu_f,
            "frequency_fisher_p": fisher_combined(mwu_f),
            "colour_count_best_p": best_count_p,
            "more_colourful_tower_is_lower_frequency": [
                bool((r["tower_colourfulness"][0] - r["tower_colourfulness"][1]) * (r["tower_frequency"][0] - r["tower_frequency"][1]) < 0)
                for r in rs
            ],
        }
        if all("svd" in r for r in rs):
            for variant in ("uncentred", "centred"):
                best = []
                for r in rs:
                    rows = r["svd"][variant]
                    j = max(range(len(rows)), key=lambda k: abs(rows[k]["r_colourfulness"]))
                    best.append({"sv": j, "r": rows[j]["r_colourfulness"], "auc": rows[j]["auc_colour_grey"]})
                s[f"svd_{variant}_best_colour_sv"] = best
        out[arch] = s
    return out


def draw(trained: dict, runs: list[dict], out_dir: Path) -> dict[str, str]:
    """Pictures: conv1 filters per tower for every seed; SVD maps of one unbranched net."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    from .. import load
    from ..branches.analysis import compute
    from ..branches.plots import plot_branch_filters, plot_svd_map

    pics: dict[str, str] = {}
    seeds = sorted({s for s, _ in trained})
    for arch in ("branched", "unbranched"):
        fig, axes = plt.subplots(len(seeds), 1, figsize=(7, 2.2 * len(seeds)), squeeze=False)
        for ax, seed in zip(axes[:, 0], seeds):
            net = trained[(seed, arch)]
            w = net.conv1.weight.detach().numpy()
            c = w.shape[0]
            half = np.array([0] * (c // 2) + [1] * (c - c // 2))
            from ..branches.descriptors import rgb_descriptors

            d = rgb_descriptors(net.conv1.weight.detach())
            plot_branch_filters(w, half, ["tower 0", "tower 1"] if arch == "branched" else ["ch 0-15", "ch 16-31"],
                                ax=ax, order=d.colourfulness)
            ax.set_title(f"seed {seed}, {arch}", fontsize=8)
        fig.tight_layout()
        name = f"branches_filters_{arch}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        pics[f"filters_{arch}"] = name
    seed = seeds[0]
    for arch in ("unbranched", "branched"):
        net = trained[(seed, arch)]
        res = compute(load(net, name="towernet"))
        pair = next((p for p in res.pairs if p.layer1 == "conv1" and p.layer2 == "conv2"), None)
        if pair is None:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
        plot_svd_map(pair, res.filters.get("conv1"), variant="uncentred", vectors=(0, 1), ax=axes[0])
        plot_svd_map(pair, res.filters.get("conv1"), variant="uncentred", vectors=(1, 2), ax=axes[1])
        fig.tight_layout()
        name = f"branches_svd_{arch}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        pics[f"svd_{arch}"] = name
    return pics


def regenerate_command(cfg: dict) -> str:
    cmd = f"OMP_NUM_THREADS=1 netanatomy experiment branches --config {cfg['name']}"
    preset = CONFIGS.get(cfg["name"])
    if preset is not None and tuple(cfg["seeds"]) != tuple(preset.seeds):
        cmd += f" --seeds {','.join(str(s) for s in cfg['seeds'])}"
    if preset is not None and cfg["steps"] != preset.steps:
        cmd += f" --steps {cfg['steps']}"
    return cmd + " --out results"


def _p(p) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    return f"{p:.2g}"


def markdown(doc: dict, pictures: dict[str, str]) -> str:
    cfg = doc["config"]
    runs = doc["runs"]
    s = doc["summary"]
    lines = [
        "# Branch specialization at CPU scale",
        "",
        f"Regenerate: `{regenerate_command(cfg)}`",
        "",
        f"Config `{cfg['name']}`: {len(cfg['seeds'])} seed(s), {cfg['steps']} SGD steps of {cfg['batch']} crops "
        f"({cfg['crop']}x{cfg['crop']} px from photos resized to a {cfg['short_side']}-px short side), "
        f"{int(cfg['grey_share'] * 100)}% of crops turned grey, conv1 {cfg['c1']} filters {cfg['k1']}x{cfg['k1']}"
        f"{' stride ' + str(cfg['s1']) if cfg.get('s1', 1) != 1 else ''} "
        f"(weight decay {cfg['conv1_weight_decay']}), conv2 {cfg['c2']} {cfg['k2']}x{cfg['k2']} (two groups when branched), conv3 {cfg['c3']} 3x3, "
        f"GAP, linear. Task: which of {doc['classes']} photographs a crop comes from (right-most 20% of each photo held out). "
        f"Wall time {doc['wall_seconds'] / 60:.1f} min on one thread of a shared 2-core machine (timings are noisy).",
        "",
        "## Per run",
        "",
        "| seed | net | test acc | colour filters (tower 0 / 1) | mean colourfulness (0 / 1) | mean frequency (0 / 1) | colourfulness MWU p | frequency MWU p | best colour count |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        mw = {m["descriptor"]: m["mwu_p"] for m in r["mwu"]}
        counts = [t for t in r["counts"] if t["descriptor"] == "colour" and t["category"] == "colour"]
        best = min(counts, key=lambda t: t["p"]) if counts else None
        lines.append(
            f"| {r['seed']} | {r['arch']} | {r['test_accuracy']:.3f} | {r['tower_colour_count'][0]} / {r['tower_colour_count'][1]} "
            f"| {r['tower_colourfulness'][0]:.2f} / {r['tower_colourfulness'][1]:.2f} "
            f"| {r['tower_frequency'][0]:.3f} / {r['tower_frequency'][1]:.3f} | {_p(mw.get('colourfulness'))} | {_p(mw.get('frequency'))} "
            f"| {best['sentence'] if best else ''} |"
        )
    lines += ["", "For the unbranched net the 'towers' are the same channel split (0-15 / 16-31): a control with no reason to differ.", ""]
    lines += ["## Over seeds", ""]
    for arch, a in s.items():
        lines.append(
            f"- **{arch}** ({a['runs']} runs, mean test accuracy {a['test_accuracy_mean']:.3f}): colourfulness differs between "
            f"towers with Fisher-combined p = {_p(a['colourfulness_fisher_p'])} (per seed {', '.join(_p(p) for p in a['colourfulness_mwu_p'])}); "
            f"frequency p = {_p(a['frequency_fisher_p'])} (per seed {', '.join(_p(p) for p in a['frequency_mwu_p'])}); "
            f"the more colourful tower is the lower-frequency one in {sum(a['more_colourful_tower_is_lower_frequency'])} of {a['runs']}."
        )
        for variant in ("uncentred", "centred"):
            best = a.get(f"svd_{variant}_best_colour_sv")
            if best:
                lines.append(
                    f"  - {variant} SVD of |W_conv2|: the singular vector most correlated with colourfulness, per seed: "
                    + "; ".join(f"SV{b['sv']} r = {b['r']:.2f} (colour/grey AUC {b['auc']:.2f})" for b in best)
                )
                base = [i[variant] for i in doc.get("init", []) if variant in i]
                if arch == "unbranched" and base:
                    lines.append(
                        f"    - the same nets untrained (baseline): largest |r| with colourfulness over SV0-{len(base[0]['r_per_sv']) - 1}, per seed: "
                        + "; ".join(f"SV{b['sv']} r = {b['r']:.2f}" for b in base)
                    )
    lines.append("")
    if pictures:
        lines += ["## Pictures", ""]
        for key, fname in pictures.items():
            lines += [f"![{key}]({fname})", ""]
    lines += ["## Verdict (computed from the numbers above)", ""] + verdict(s, doc.get("init", [])) + [""]
    full = CONFIGS["full"]
    if cfg["name"] in ("quick", "smoke"):
        lines += [
            "## Scale",
            "",
            f"This is the `{cfg['name']}` config, sized to about 20 minutes of one core of a shared machine: "
            f"{len(cfg['seeds'])} seeds and {cfg['steps']} steps are fewer than the effect may need (the filters above are "
            "still noisy). The full config trains "
            f"{len(full.seeds)} seeds x {full.steps} steps with wider conv2/conv3 ({full.c2}/{full.c3}); on one free core "
            "expect roughly 1.5-3 hours: `OMP_NUM_THREADS=1 netanatomy experiment branches --config full --out results`.",
            "",
        ]
    return "\n".join(lines)


def goal_verdict(s: dict) -> tuple[str, str]:
    """``("strongly" | "weakly" | "not", sentence)``: the towers against the issue's goal.

    strongly: branched combined p < GOAL_P over >= GOAL_SEEDS seeds, control p >= CONTROL_ALPHA;
    weakly: branched p < CONTROL_ALPHA and the control not significant, short of the goal;
    not: otherwise (including a significant control, which would mean the split itself differs).
    """
    b, u = s.get("branched"), s.get("unbranched")
    if not b:
        return "not", "no branched runs."
    pb = b["colourfulness_fisher_p"]
    pu = (u or {}).get("colourfulness_fisher_p", math.nan)
    n = b["runs"]
    control_ok = u is not None and math.isfinite(pu) and pu >= CONTROL_ALPHA
    facts = f"branched combined p = {_p(pb)} over {n} seed(s), control p = {_p(pu)}"
    goal = f"goal p < {GOAL_P:g} over >= {GOAL_SEEDS} seeds, control p >= {CONTROL_ALPHA:g}"
    if not math.isfinite(pb):
        return "not", f"not reproduced ({facts}; {goal})."
    if pb < GOAL_P and n >= GOAL_SEEDS and control_ok:
        return "strongly", f"reproduced strongly ({facts}; {goal})."
    if pb < CONTROL_ALPHA and control_ok:
        return "weakly", f"reproduced weakly ({facts}; {goal})."
    why = "; the control is significant too" if u is not None and not control_ok and math.isfinite(pu) else ""
    return "not", f"not reproduced ({facts}{why}; {goal})."


def verdict(s: dict, init: Sequence[dict] = ()) -> list[str]:
    out = []
    b, u = s.get("branched"), s.get("unbranched")
    if b:
        out.append(f"- Against the issue's goal, the tower colour specialization is {goal_verdict(s)[1]}")
        pb, pu = b["colourfulness_fisher_p"], (u or {}).get("colourfulness_fisher_p", math.nan)
        if math.isfinite(pb) and pb < 0.01 and not (math.isfinite(pu) and pu < 0.01):
            out.append(f"- The towers specialize by colour (combined p = {_p(pb)}), and the same channel split of the "
                       f"unbranched control does not (p = {_p(pu)}).")
        elif math.isfinite(pb) and pb < 0.05:
            out.append(f"- Weak evidence that the towers specialize by colour (combined p = {_p(pb)}; control p = {_p(pu)}).")
        else:
            out.append(f"- No colour specialization of the towers at this scale (combined p = {_p(pb)}; control p = {_p(pu)}).")
        pf = b["frequency_fisher_p"]
        out.append(f"- Frequency: combined p = {_p(pf)} for the towers"
                   + (" (significant)." if math.isfinite(pf) and pf < 0.05 else " (not significant)."))
    if u and u.get("svd_uncentred_best_colour_sv"):
        best = u["svd_uncentred_best_colour_sv"]
        rs = [abs(x["r"]) for x in best]
        svs = sorted({x["sv"] for x in best})
        sv0 = [abs(x["r"]) for x in best if x["sv"] == 0]
        out.append(
            f"- Unbranched nets: the uncentred singular vector most tied to colourfulness is "
            f"{', '.join('SV' + str(v) for v in svs)} (|r| {min(rs):.2f}-{max(rs):.2f} over seeds)"
            + ("; SV0 itself is the all-positive Perron vector" if not sv0 or len(sv0) < len(best) else "")
            + (
                f"; untrained, the largest |r| over the first singular vectors is "
                f"{min(abs(i['uncentred']['r']) for i in init if 'uncentred' in i):.2f}-"
                f"{max(abs(i['uncentred']['r']) for i in init if 'uncentred' in i):.2f}."
                if any("uncentred" in i for i in init) else "."
            )
        )
    return out
