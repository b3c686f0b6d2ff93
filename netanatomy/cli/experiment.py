"""``netanatomy experiment ...``: the commands that run the papers' experiments
(:mod:`netanatomy.experiments`). One module for all of them, so that the
capability commands never import a study."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    for add in (_banding, _banding_seeds, _branches, _width, _synthesis):
        add(experiment_app)


from ._common import err_console, parse_list
from ._common import out_console as _console


def _command(args: list[str]) -> str | None:
    """The command that regenerates the results (``--rescore`` dropped: the file says how to rescore)."""
    import shlex

    args = [a for a in args if a != "--rescore"]
    return "netanatomy experiment banding " + " ".join(shlex.quote(a) for a in args) if args else None


def _banding(experiment_app: typer.Typer) -> None:
    @experiment_app.command("banding")
    def banding_experiment(
        config: str = typer.Option("fashion", "--config", help="fashion (the reported runs: upright object photos), quick (smoke test, seconds), small / small_long (landscape scenes; small_long: baseline and rotation 3x longer), topbottom (scenes whose class is a long-range vertical relation), photos / photos_long (photo crops: vertical fifth and orientation; seeds via banding-seeds), photos_smoke, full"),
        out: Path = typer.Option(Path("results"), "--out", help="directory for banding.md, banding_*.png and banding_weights/"),
        only: Optional[str] = typer.Option(None, "--only", help="comma-separated interventions (baseline,rotate,nopool,xpool,xpool_rotate)"),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads"),
        retrain: bool = typer.Option(False, "--retrain", help="train again even when OUT/banding_weights holds this run"),
        rescore: bool = typer.Option(False, "--rescore", help="train nothing: recompute the tables and pictures from the saved weights"),
        weights: Optional[Path] = typer.Option(None, "--weights", help="directory of the trained weights (default OUT/banding_weights)"),
    ) -> None:
        """Train the simplified network under the article's interventions and write the banding table and pictures."""
        import sys

        import torch

        from ..experiments.banding import CONFIGS, INTERVENTIONS, run_experiment

        if config not in CONFIGS:
            raise UserError(f"unknown config {config!r} (choose from {', '.join(CONFIGS)})")
        chosen = None
        if only:
            chosen = tuple(s.strip() for s in only.split(",") if s.strip())
            bad = [s for s in chosen if s not in INTERVENTIONS]
            if bad:
                raise UserError(f"unknown intervention(s) {', '.join(bad)} (choose from {', '.join(INTERVENTIONS)})")
        if retrain and rescore:
            raise UserError("--retrain and --rescore exclude each other")
        if threads < 1:
            raise UserError("--threads must be at least 1")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        torch.set_num_threads(threads)

        def log(msg: str) -> None:
            typer.echo(msg, err=True)

        res = run_experiment(config, out, interventions=chosen, log=log, reuse=not retrain, weights=weights, rescore=rescore,
                             command=_command(sys.argv[3:]))
        for f in res.findings:
            typer.echo(f"{f['intervention']}: {'reproduced' if f['reproduced'] else 'not reproduced'} - {f['evidence']}")
        from ..experiments.banding_results import prefix_for

        typer.echo(f"wrote {out / (prefix_for(res.config.name) + '.md')}")


def _banding_seeds(experiment_app: typer.Typer) -> None:
    @experiment_app.command("banding-seeds")
    def banding_seeds(
        config: str = typer.Option("photos_long", "--config", help="the config run once per seed (other seeds: <config>_seed<N>)"),
        seeds: str = typer.Option("0,1,2", "--seeds", help="comma-separated seeds"),
        out: Path = typer.Option(Path("results"), "--out", help="directory for banding_<config>_seeds.md/.json, the per-seed files and banding_weights/"),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads"),
        rescore: bool = typer.Option(False, "--rescore", help="train nothing: recompute from the saved weights"),
        weights: Optional[Path] = typer.Option(None, "--weights", help="directory of the trained weights (default OUT/banding_weights)"),
    ) -> None:
        """Run one banding config over several seeds (reusing saved runs) and write the over-seeds table, the x-pool control and a verdict per finding."""
        import shlex

        import torch

        from ..experiments.banding import run_experiment, seed_config, xpool_control
        from ..experiments.banding_results import write_seeds_results

        seed_list = parse_list(seeds, int, "--seeds", "integers")
        if len(set(seed_list)) != len(seed_list):
            raise UserError("--seeds repeats a seed")
        if not seed_list:
            raise UserError("--seeds names no seed")
        cfgs = [seed_config(config, s) for s in seed_list]
        if threads < 1:
            raise UserError("--threads must be at least 1")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        torch.set_num_threads(threads)
        results = [run_experiment(c, out, log=lambda m, c=c: typer.echo(f"[{c.name}] {m}", err=True), weights=weights,
                                  rescore=rescore, command=f"netanatomy experiment banding --config {c.name} --out {shlex.quote(str(out))}")
                   for c in cfgs]
        control = xpool_control(results)
        command = (f"netanatomy experiment banding-seeds --config {config} --seeds {','.join(map(str, seed_list))} "
                   f"--out {shlex.quote(str(out))}" + (f" --weights {shlex.quote(str(weights))}" if weights else ""))
        path, doc = write_seeds_results(results, out, command, control)
        for v in doc["verdicts"]:
            typer.echo(f"{v['finding']} ({v['layer']}, {v['measure']}): mean {100 * v['mean']:.1f}%, goal {v['goal']}: {v['verdict']}")
        typer.echo(f"wrote {path}")


def _branches(experiment_app: typer.Typer) -> None:
    @experiment_app.command("branches")
    def experiment_branches(
        config: str = typer.Option("quick", "--config", help="smoke, quick, full, towers (colour crops, 3000 steps, 5 seeds), alexstem (11x11 stride-4 conv1, 10 seeds), its one-lever ablations alexstem_colour (no grey crops) and alexstem_smallstem (towers' 5x5 stride-1 conv1 on 32-px crops), or smoke_alexstem."),
        out: Path = typer.Option(Path("results"), "--out", help="Folder for branches.md, branches_runs.json and pictures."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (overrides the config)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per run (overrides the config)."),
        threads: int = typer.Option(1, "--threads", help="Torch threads (keep 1 on a shared machine)."),
    ) -> None:
        """Train small two-tower CNNs and their unbranched twins on offline photos; test whether the towers specialize."""
        from dataclasses import replace

        from ..experiments.branches import CONFIGS, run

        if config not in CONFIGS:
            raise UserError(f"unknown config {config!r} (choose {', '.join(CONFIGS)})")
        cfg = replace(CONFIGS[config], threads=threads)
        if seeds:
            cfg = replace(cfg, seeds=tuple(parse_list(seeds, int, "--seeds", "integers")))
        if steps is not None:
            if steps < 1:
                raise UserError("--steps must be at least 1")
            cfg = replace(cfg, steps=steps)
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        err = err_console()
        doc = run(cfg, out, log=lambda s: err.print(s, markup=False))
        _console().print(f"wrote {out / 'branches.md'} ({len(doc['runs'])} runs, {doc['wall_seconds'] / 60:.1f} min)")


def _width(experiment_app: typer.Typer) -> None:
    @experiment_app.command("width")
    def experiment_width(
        config: str = typer.Option("quick", "--config", help="smoke (seconds, pipeline only), quick (~25 min on 2 busy cores: MLP), cnn-quick (~20 min: the CNN) or full (about an hour: MLP and CNN)."),
        out: Path = typer.Option(Path("netanatomy-width-experiment"), "--out", help="Output folder."),
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds for the planned-vs-original comparison."),
        threads: int = typer.Option(1, "--threads", help="torch threads."),
        fresh: bool = typer.Option(False, "--fresh", help="Retrain runs already complete in --out."),
    ) -> None:
        """Narrow vs wide layer on Fashion-MNIST: DS/IS curves, sign changes, planned vs original model."""
        from ..experiments.width import run_experiment

        run_experiment(config, out, seeds=seeds, threads=threads, log=lambda s: typer.echo(s, err=True),
                       reuse=not fresh)


def _synthesis(experiment_app: typer.Typer) -> None:
    @experiment_app.command("synthesis")
    def experiment_cmd(
        config: str = typer.Option(
            "full", "--config",
            help="full (soups from a weak start + barriers, ~25 min on one core), merge (task-vector merges vs soups, ~7-10 min per seed; merge-smoke), soups (soups from a strong pre-trained start, ~15 min), quick / soups-quick (smoke tests).",
        ),
        out: Path = typer.Option(Path("results"), "--out", help="Folder for synthesis.md, synthesis.json and the figure."),
        seed: int = typer.Option(
            0, "--seed",
            help="Run seed S: moves every random choice (held-out split, the start's init and data order, each member's seed) by S x 1000; 0 = the config as written. Files get a _seedS suffix.",
        ),
        seeds: Optional[str] = typer.Option(
            None, "--seeds",
            help="Comma-separated seeds, e.g. 0,1,2: runs them one after the other (a seed whose JSON exists is read, not rerun) and writes <stem>_seeds.md with the per-seed table, mean and spread.",
        ),
    ) -> None:
        """Fashion-MNIST: greedy and uniform soups vs the best member; interpolation barriers before/after alignment, with and without BN recalibration."""
        from .._util import atomic_write_text, dumps
        from ..experiments import merges as mx
        from ..experiments import soups as ex

        if config not in ex.CONFIGS and config not in mx.CONFIGS:
            raise UserError(f"--config is one of {', '.join([*ex.CONFIGS, *mx.CONFIGS])}, got {config!r}")
        if config in mx.CONFIGS:
            _merge_experiment(mx, config, out, seed, seeds, atomic_write_text, dumps)
            return
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
        seed_list = None if seeds is None else _parse_seeds(seeds)
        if seed_list is not None and seed != 0:
            raise UserError("give either --seed or --seeds, not both")
        console = _console()
        say = lambda m: console.print(m, markup=False)  # noqa: E731
        seeds_stem = f"{ex.result_stem(config, 0)}_seeds"
        if seed_list is None:
            note = None
            if (out / f"{seeds_stem}.md").is_file():
                note = f"Over several seeds: [{seeds_stem}.md]({seeds_stem}.md)."
            _experiment_one(ex, config, seed, out, say, note, atomic_write_text, dumps)
            return
        done: dict = {}
        for s in seed_list:  # every existing JSON is checked before any training starts
            p = out / f"{ex.result_stem(config, s)}.json"
            if p.is_file():
                try:
                    done[s] = ex.load_seed_result(p, config, s)
                except ValueError as e:
                    raise UserError(str(e)) from None
        note = f"Over several seeds: [{seeds_stem}.md]({seeds_stem}.md)."
        for s in seed_list:
            if s in done:
                say(f"seed {s}: {out / (ex.result_stem(config, s) + '.json')} exists, not rerun")
                continue
            say(f"seed {s}: running")
            done[s] = _experiment_one(ex, config, s, out, say, note, atomic_write_text, dumps)
        agg = ex.aggregate_seeds([done[s] for s in seed_list])
        command = f"netanatomy experiment synthesis --config {config} --seeds {','.join(map(str, seed_list))} --out {out}"
        reports = {s: f"{ex.result_stem(config, s)}.md" for s in seed_list}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{seeds_stem}.json", dumps(agg, indent=1) + "\n")
        atomic_write_text(out / f"{seeds_stem}.md", ex.render_seeds_markdown(agg, command, reports))
        say(f"wrote {out / (seeds_stem + '.md')}")


def _merge_experiment(mx, config: str, out: Path, seed: int, seeds, atomic_write_text, dumps) -> None:
    """``--config merge`` / ``merge-smoke``: results/synthesis_<config>.{json,md}, all seeds in one file."""
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    seed_list = [seed] if seeds is None else _parse_seeds(seeds)
    if seeds is not None and seed != 0:
        raise UserError("give either --seed or --seeds, not both")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    console = _console()
    say = lambda m: console.print(m, markup=False)  # noqa: E731
    stem = "synthesis_" + config.replace("-", "_")
    results = []
    for s in seed_list:  # the files are rewritten after every seed: an interrupted run keeps the seeds it finished
        say(f"seed {s}: running")
        results.append(mx.run(config, seed=s, log=say))
        done = [r["seed"] for r in results]
        out.mkdir(parents=True, exist_ok=True)
        command = (f"netanatomy experiment synthesis --config {config} "
                   + (f"--seeds {','.join(map(str, done))}" if seeds else f"--seed {seed}") + f" --out {out}")
        atomic_write_text(out / f"{stem}.json", dumps({"results": results, "selected": mx.aggregate(results)}, indent=1) + "\n")
        atomic_write_text(out / f"{stem}.md", mx.render_markdown(results, command))
        say(f"wrote {out / (stem + '.md')} (seed(s) {', '.join(map(str, done))})")


def _parse_seeds(text: str) -> list[int]:
    seeds = parse_list(text, int, "--seeds", "integers >= 0")
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seeds takes comma-separated integers >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: a seed appears twice in {text!r}")
    return seeds


def _experiment_one(ex, config: str, seed: int, out: Path, say, note, atomic_write_text, dumps) -> dict:
    """One run of ``netanatomy experiment synthesis``: JSON first (atomically), then markdown and figure."""
    res = ex.run(config, log=say, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    stem = ex.result_stem(config, seed)
    figure = None
    if "_curves" in res:
        try:
            fig = ex.plot_curves(res)
            figure = f"{stem}_interpolation.png"
            fig.savefig(out / figure, dpi=110)
        except ImportError:
            say("note: matplotlib not installed; no figure")
    earlier = None
    if config == "soups" and seed == 0 and (out / "synthesis.json").is_file():  # the full run is the soups run's earlier data point
        import json

        try:
            earlier = json.loads((out / "synthesis.json").read_text())
        except ValueError:
            earlier = None
    command = ("netanatomy experiment synthesis" + ("" if config == "full" else f" --config {config}")
               + (f" --seed {seed}" if seed else "") + f" --out {out}")
    doc = {k: v for k, v in res.items() if not k.startswith("_")}
    atomic_write_text(out / f"{stem}.json", dumps(doc, indent=1) + "\n")
    atomic_write_text(out / f"{stem}.md", ex.render_markdown(res, command, figure, earlier, note))
    say(f"wrote {out / (stem + '.md')}")
    return doc
