"""Results file of the banding experiments: markdown table + pictures."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np

from .._util import atomic_write_text

MAIN_CONFIG = "fashion"  # the config whose results are results/banding.md

ARTICLE = {
    "baseline": "horizontal bands in 5b (article: 100% of 5b in its horizontal-bands type)",
    "rotate": "vertical bands in 5b (article: 100% vertical type)",
    "nopool": "no banding in 5b",
    "xpool": "banding gone from 5b, visible in 5a",
}


def _pct(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _f(v, nd=2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def prefix_for(config_name: str) -> str:
    """File prefix: ``banding`` for the main config, ``banding_<config>`` otherwise."""
    return "banding" if config_name == MAIN_CONFIG else f"banding_{config_name}"


def figures(res, out: Path, prefix: str = "banding") -> dict[str, str]:
    """Write the pictures; returns name -> file name. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    import torch

    from ..banding.figures import centre_pictures, picture_grid, tile
    from .scenes import DATASETS

    files = {}
    runs = list(res.runs)
    layers = [name for name in ("3a", "3b", "5a", "5b") if any(k[1] == name for k in res.layers)]
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(3.2 * len(layers), 2.9 * len(runs)), squeeze=False)
    for i, run in enumerate(runs):
        for j, layer in enumerate(layers):
            lb = res.layers[(run, layer)]
            r = lb.record
            picture_grid(lb, ax=axes[i][j], title=f"{run} {layer}: {r['orientation']}\nV_y {r['v_y_median']:.2f} V_x {r['v_x_median']:.2f}")
    fig.tight_layout()
    files["grids"] = f"{prefix}_grids.png"
    fig.savefig(out / files["grids"], dpi=110)
    plt.close(fig)

    jt = res.joint_types
    if jt:
        k = len(jt["names"])
        fig, axes = plt.subplots(1, k, figsize=(1.6 * k, 1.9))
        for i, a in enumerate(np.atleast_1d(axes)):
            a.imshow(np.clip(centre_pictures(jt["centres"])[i][..., :3], 0, 1), interpolation="nearest")
            a.set_axis_off()
            a.set_title(f"type {i}\n{jt['names'][i]}", fontsize=8)
        fig.tight_layout()
        files["types"] = f"{prefix}_types.png"
        fig.savefig(out / files["types"], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 2.8), squeeze=False)
    for i, run in enumerate(runs):
        a = axes[0][i]
        for layer, colour in (("5a", "C0"), ("5b", "C3")):
            lb = res.layers.get((run, layer))
            if lb is not None:
                a.scatter(lb.v_y, lb.v_x, s=5, alpha=0.6, color=colour, label=layer)
        a.plot([0, 1], [0, 1], color="grey", lw=0.5)
        a.set_xlim(0, 1)
        a.set_ylim(0, 1)
        a.set_title(run, fontsize=9)
        a.set_xlabel("V_y")
        if i == 0:
            a.set_ylabel("V_x")
            a.legend(fontsize=7)
    fig.tight_layout()
    files["v"] = f"{prefix}_v.png"
    fig.savefig(out / files["v"], dpi=110)
    plt.close(fig)

    make, classes = DATASETS[res.config.data]
    g = torch.Generator().manual_seed(0)
    x, y = make(20, res.config.size, g, labels=torch.arange(20) % len(classes))
    img = tile(((x.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1)).numpy(), cols=10, pad=2)
    fig, a = plt.subplots(figsize=(10, 2.3))
    a.imshow(img)
    a.set_axis_off()
    a.set_title("training images, two per class (columns: " + ", ".join(c[0] for c in classes) + ")", fontsize=7)
    files["scenes"] = f"{prefix}_scenes.png"
    fig.savefig(out / files["scenes"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return files


def markdown(res, files: dict[str, str], command: str) -> str:
    cfg = res.config
    L = []
    L.append("# Weight banding: the article's interventions at CPU scale\n")
    L.append(f"Regenerate: `{command}` (trains only the runs missing from the weights directory; add `--rescore` "
             "to recompute the tables and pictures from the saved weights without training)\n")
    L.append(
        f"Config `{cfg.name}`: {cfg.size}x{cfg.size} RGB inputs; convs {', '.join(f'{w}({k}x{k})' for w, k in zip(cfg.widths, cfg.kernels))} "
        f"(conv1 | L2 pool | conv2 | L2 pool | 3a 3b | L2 pool | 5a 5b | head | FC), batch norm after every conv, "
        f"final map {(cfg.size + 7) // 8}x{(cfg.size + 7) // 8}; "
        f"{'AdamW' if cfg.optimizer == 'adamw' else 'SGD (Nesterov, momentum 0.9)'}, weight decay {cfg.weight_decay}"
        f"{'' if cfg.conv_weight_decay is None else f' ({cfg.conv_weight_decay} on the conv weights)'}, "
        f"one-cycle learning rate up to {cfg.lr}, {cfg.steps} steps of {cfg.batch} "
        f"{'augmented Fashion-MNIST training photos' if cfg.data == 'fashion' else 'freshly generated images'} "
        f"({cfg.steps * cfg.batch} images{', random horizontal flips' if cfg.flip else ''}), seed {cfg.seed}; "
        f"every run sees the same image stream. Data: `{cfg.data}` (`netanatomy/experiments/scenes.py`). "
        f"Trained weights: `{res.weights_dir or 'not saved'}` (the tables can be recomputed from them with `--rescore`).\n"
    )
    L.append("## Runs\n")
    L.append("Timings: one torch thread per run, at most two runs at once on a 2-core machine shared with other jobs, "
             "so wall seconds are noisy; CPU seconds are this process's own.\n")
    L.append("| experiment | head before FC | inputs | FC parameters | test accuracy | final train loss | wall seconds | CPU seconds |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, run in res.runs.items():
        cpu = run.get("train_cpu_seconds")
        L.append(f"| {name} | {run['head']} | {'rotated 90 degrees' if run['rotate'] else 'upright'} | {run['fc_params']} | "
                 f"{100 * run['accuracy']:.1f}% | {run['train_loss']:.3f} | {run['train_seconds']:.0f} | {'' if cpu is None else f'{cpu:.0f}'} |")
    L.append("\n(10 classes; chance 10%" + ("; a model that only knows which textures are present, not their vertical order, is capped near 50%.)\n"
             if cfg.data in ("scenes", "topbottom") else ".)\n"))
    L.append("Banded and orientation thresholds were fixed before these runs (the ones DESIGN.md calibrated on published pictures).\n")
    jt = res.joint_types
    if jt:
        L.append("## Banding types (the article's appendix table)\n")
        L.append("k-means (k = %d) over the colour-aligned, per-channel-centred, unit-norm NMF pictures of every neuron of 5a and 5b "
                 "in all runs together, so that the columns mean the same in every row (the article clusters across its experiments the same way). "
                 "Type names come from the V scores of the cluster centres.\n" % len(jt["names"]))
        if "types" in files:
            L.append(f"![cluster centres]({files['types']})\n")
        head = " | ".join(f"type {i}: {n}" for i, n in enumerate(jt["names"]))
        L.append(f"| experiment (layer) | {head} |")
        L.append("| --- |" + " --- |" * len(jt["names"]))
        for (run, layer), shares in jt["shares"].items():
            L.append(f"| {run} (`{layer}`) | " + " | ".join(_pct(s) for s in shares) + " |")
        L.append("")
    L.append("## Banding scores\n")
    L.append("V_y (V_x) = share of a neuron's NMF picture variance explained by its row (column) means; i.i.d. null "
             "%.2f for 3x3 kernels. Banded: V >= 0.6 and 0.2 above the other axis. Orientation: at least 25%% of neurons "
             "banded one way and twice as many as the other way.\n" % ((3 - 1) / (9 - 1)))
    L.append("| experiment | layer | orientation | horizontally banded | vertically banded | median V_y | median V_x |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for (run, layer), lb in res.layers.items():
        r = lb.record
        L.append(f"| {run} | {layer} | {r['orientation']} | {_pct(r['horizontal_fraction'])} | {_pct(r['vertical_fraction'])} | "
                 f"{_f(r['v_y_median'])} | {_f(r['v_x_median'])} |")
    L.append("")
    if res.updates:
        L.append("### What training added: the update W - W_init\n")
        L.append("The same scores on each conv's learned change from its random initial weights (rebuilt from the seed). "
                 "The trained weights above are W_init + update; when the update is small against W_init, the i.i.d. "
                 "initial weights (V about 0.25 / 0.25) hide whatever structure the update has. This is our diagnostic, "
                 "not one of the article's measurements.\n")
        L.append("| experiment | layer | norm of update / norm of W_init | orientation of update | horizontally banded | vertically banded | median V_y | median V_x |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (run, layer), r in res.updates.items():
            L.append(f"| {run} | {layer} | {_f(r['update_norm_ratio'])} | {r['orientation']} | {_pct(r['horizontal_fraction'])} | "
                     f"{_pct(r['vertical_fraction'])} | {_f(r['v_y_median'])} | {_f(r['v_x_median'])} |")
        L.append("")
    if "grids" in files:
        L.append("## Pictures\n")
        L.append("Every neuron's posneg-NMF picture (3 components as RGB, colours aligned within a layer, similar neurons together, "
                 "each neuron scaled to its own maximum).\n")
        L.append(f"![NMF pictures]({files['grids']})\n")
    if "v" in files:
        L.append(f"![V_y against V_x per neuron]({files['v']})\n")
    L.append("## Did the article's findings reproduce?\n")
    for f in res.findings:
        L.append(f"- **{f['intervention']}** - {f['claim']}: **{'reproduced' if f['reproduced'] else 'not reproduced'}**. {f['evidence']}.")
    L.append("")
    if "scenes" in files:
        L.append("## Data\n")
        L.append(f"![training images]({files['scenes']})\n")
    return "\n".join(L) + "\n"


def demo_section(out: Path, prefix: str) -> list[str]:
    """The built-in demo CNN (Fashion-MNIST, global average pooling) through the
    same instrument: a per-layer table and its most banded layer's pictures."""
    try:
        from ..analysis import run_analyses
        from ..demo import load_demo

        model = load_demo()
    except Exception:  # the demo weights are not shipped in this install
        return []
    (_, result), = run_analyses(model, ["banding"])
    L = ["## The built-in demo model\n",
         "`netanatomy analyze` on the demo CNN (`netanatomy.demo`, Fashion-MNIST, global average pooling before its "
         "classifier), same instrument and thresholds:\n",
         "| rank | layer | kernel | orientation | horizontally banded | vertically banded | median V_y | median V_x | last conv before global pooling |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(result.ok_records, key=lambda r: r["rank"]):
        L.append(f"| {r['rank']} | {r['layer']} | {r['kernel']} | {r['orientation']} | {_pct(r['horizontal_fraction'])} | "
                 f"{_pct(r['vertical_fraction'])} | {_f(r['v_y_median'])} | {_f(r['v_x_median'])} | "
                 f"{'yes' if r.get('last_conv_before_global_pool') else ''} |")
    L.append("")
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from ..banding.figures import picture_grid

        layers = result.extras.get("layers", {})
        top = result.extras.get("ranked", [None])[0]
        if top in layers:
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
            picture_grid(layers[top], ax=axes[0])
            other = [n for n in result.extras["ranked"] if n != top][-1]
            picture_grid(layers[other], ax=axes[1])
            fig.tight_layout()
            name = f"{prefix}_demo.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            L.append(f"![demo model: most and least banded layer]({name})\n")
    except ImportError:
        pass
    return L


HANDWRITTEN = "## Reading the results"


def _handwritten(path: Path) -> str:
    """The hand-written section of an existing results file (kept when regenerating)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    i = text.find("\n" + HANDWRITTEN)
    return "" if i < 0 else "\n" + text[i + 1 :].rstrip("\n") + "\n"


def write_results(res, out, command: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix_for(res.config.name)
    files = figures(res, out, prefix)
    if command is None:
        command = f"netanatomy experiment banding --config {res.config.name} --out {shlex.quote(str(out))}"
    path = out / f"{prefix}.md"
    text = markdown(res, files, command)
    if res.config.name != "quick":
        text += "\n".join(demo_section(out, prefix)) + "\n"
    text += _handwritten(path)
    atomic_write_text(path, text)
    return path


SEED_RUNS = ("baseline", "rotate", "nopool", "xpool", "xpool_rotate")


def seeds_summary(results) -> dict:
    """Per-seed rows (run, layer 5a/5b: test accuracy, banded shares, median V) and the
    mean and spread (population standard deviation) over seeds of every number."""
    import statistics

    rows = []
    for res in results:
        for run in SEED_RUNS:
            for layer in ("5a", "5b"):
                lb = res.layers.get((run, layer))
                if lb is None:
                    continue
                r = lb.record
                rows.append({"seed": res.config.seed, "run": run, "layer": layer, "accuracy": res.runs[run]["accuracy"],
                             "horizontal": r["horizontal_fraction"], "vertical": r["vertical_fraction"],
                             "banded": r["banded_fraction"], "v_y": r["v_y_median"], "v_x": r["v_x_median"],
                             "orientation": r["orientation"]})
    agg = {}
    for key in sorted({(r["run"], r["layer"]) for r in rows}, key=lambda k: (SEED_RUNS.index(k[0]), k[1])):
        sel = [r for r in rows if (r["run"], r["layer"]) == key]
        agg[key] = {c: (statistics.fmean(r[c] for r in sel), statistics.pstdev([r[c] for r in sel]))
                    for c in ("accuracy", "horizontal", "vertical", "banded", "v_y", "v_x")}
    return {"rows": rows, "mean_spread": agg}


# The goals for the last conv (5b), fixed before the multi-seed runs: the mean over seeds
# of the share banded the expected way (no-pool: banded at all) against its goal.
GOALS = {
    "baseline": ("horizontal", ">=", 0.8, "horizontal"),
    "rotate": ("vertical", ">=", 0.8, "vertical"),
    "nopool": ("banded", "<", 0.2, None),
}


def seeds_verdicts(summary: dict, control: dict) -> list[dict]:
    """One verdict per finding from :func:`seeds_summary` and the x-pool control.

    ``strong``: the mean over seeds meets the goal. ``weak``: it does not, but every seed's 5b
    has the expected orientation (baseline / rotate), or the mean banded share is below half the
    baseline's (no-pool). ``not``: otherwise. x-pooling: ``strong`` when banding moved one
    layer earlier on every seed (5a more horizontal than both the baseline and x-pool on
    rotated inputs), ``weak`` when it did in the mean only, else ``not``."""
    out = []
    agg = summary["mean_spread"]
    rows = summary["rows"]
    for run, (col, op, goal, orient) in GOALS.items():
        a = agg.get((run, "5b"))
        if a is None:
            continue
        mean, spread = a[col]
        met = mean >= goal if op == ">=" else mean < goal
        if met:
            verdict = "strong"
        elif orient is not None:
            per_seed = [r["orientation"] for r in rows if r["run"] == run and r["layer"] == "5b"]
            verdict = "weak" if per_seed and all(o == orient for o in per_seed) else "not"
        else:
            base = agg.get(("baseline", "5b"))
            verdict = "weak" if base is not None and mean < 0.5 * base["banded"][0] else "not"
        out.append({"finding": run, "layer": "5b", "measure": f"{col} share", "goal": f"{op} {100 * goal:.0f}%",
                    "mean": mean, "spread": spread, "verdict": verdict})
    if control.get("rows"):
        m = control["mean"]
        moved_mean = m["xpool_minus_baseline"] > 0 and m["xpool_minus_rotated"] > 0
        out.append({"finding": "xpool", "layer": control["layer"], "measure": "horizontal share vs baseline and xpool_rotate",
                    "goal": "above both on every seed", "mean": m["xpool_horizontal"], "spread": control["spread"]["xpool_horizontal"],
                    "verdict": "strong" if control["moved_earlier_every_seed"] else ("weak" if moved_mean else "not")})
    return out


def seeds_markdown(results, command: str, control: dict, summary: dict | None = None) -> str:
    s = summary or seeds_summary(results)
    names = ", ".join(f"`{r.config.name}`" for r in results)
    L = ["# Weight banding over seeds\n", f"Regenerate: `{command}`\n",
         f"Configs (one per seed): {names}. Per-seed details (pictures, all layers): `banding_<config>.md` for each.\n",
         "## Verdicts\n",
         "Goals and verdict rules fixed in code (`banding_results.GOALS`, `seeds_verdicts`) before the multi-seed runs: "
         "strong = the mean over seeds meets the goal; weak = it does not, but every seed shows the expected orientation "
         "(no-pool: less than half as banded as the baseline; x-pool: moved earlier in the mean only); not = otherwise.\n",
         "| finding | layer | measure | goal | mean ± spread | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for v in seeds_verdicts(s, control):
        L.append(f"| {v['finding']} | {v['layer']} | {v['measure']} | {v['goal']} | {_pct(v['mean'])} ± {100 * v['spread']:.1f} | "
                 f"**{v['verdict']}** |")
    L += [""]
    L += ["## Mean and spread over seeds (population standard deviation)\n",
         "| run | layer | test accuracy | horizontally banded | vertically banded | banded | median V_y | median V_x |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (run, layer), a in s["mean_spread"].items():
        L.append(f"| {run} | {layer} | " + " | ".join(f"{100 * a[c][0]:.1f}% ± {100 * a[c][1]:.1f}" if c not in ("v_y", "v_x")
                                                  else f"{a[c][0]:.2f} ± {a[c][1]:.2f}"
                                                  for c in ("accuracy", "horizontal", "vertical", "banded", "v_y", "v_x")) + " |")
    L += ["", "## Per seed\n", "| seed | run | layer | test accuracy | orientation | horizontally banded | vertically banded | banded | median V_y | median V_x |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        L.append(f"| {r['seed']} | {r['run']} | {r['layer']} | {_pct(r['accuracy'])} | {r['orientation']} | {_pct(r['horizontal'])} | "
                 f"{_pct(r['vertical'])} | {_pct(r['banded'])} | {_f(r['v_y'])} | {_f(r['v_x'])} |")
    if not control["rows"]:
        return "\n".join(L) + "\n\nNo x-pooling runs in these configs, so no x-pooling control.\n"
    L += ["", f"## x-pooling control ({control['layer']}: horizontally banded share)\n",
          "| seed | baseline | xpool | xpool on rotated inputs | xpool - baseline | xpool - rotated |", "| --- | --- | --- | --- | --- | --- |"]
    for r in control["rows"]:
        L.append(f"| {r['seed']} | {_pct(r['baseline_horizontal'])} | {_pct(r['xpool_horizontal'])} | {_pct(r['xpool_rotate_horizontal'])} | "
                 f"{_pct(r['xpool_minus_baseline'])} | {_pct(r['xpool_minus_rotated'])} |")
    L.append(f"\nBanding moved one layer earlier on every seed (xpool above both): **{'yes' if control['moved_earlier_every_seed'] else 'no'}**.\n")
    return "\n".join(L) + "\n"


def write_seeds_results(results, out, command: str, control: dict) -> tuple[Path, dict]:
    """``OUT/banding_<first config>_seeds.md`` and ``.json`` from the per-seed results;
    returns the markdown's path and the JSON document."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = prefix_for(results[0].config.name) + "_seeds"
    s = seeds_summary(results)
    doc = {"command": command, "configs": [r.config.name for r in results], "rows": s["rows"],
           "mean_spread": [{"run": run, "layer": layer, **{k: {"mean": v[0], "spread": v[1]} for k, v in a.items()}}
                           for (run, layer), a in s["mean_spread"].items()],
           "xpool_control": control, "verdicts": seeds_verdicts(s, control)}
    atomic_write_text(out / f"{stem}.json", json.dumps(doc, indent=1, allow_nan=True) + "\n")
    path = out / f"{stem}.md"
    atomic_write_text(path, seeds_markdown(results, command, control, s) + _handwritten(path))
    return path, doc
