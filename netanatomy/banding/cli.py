"""``netanatomy experiment banding``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def _command(args: list[str]) -> str | None:
    """The command that regenerates the results (``--rescore`` dropped: the file says how to rescore)."""
    import shlex

    args = [a for a in args if a != "--rescore"]
    return "netanatomy experiment banding " + " ".join(shlex.quote(a) for a in args) if args else None


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    @experiment_app.command("banding")
    def banding_experiment(
        config: str = typer.Option("fashion", "--config", help="fashion (the reported runs: upright object photos), quick (smoke test, seconds), small / small_long (landscape scenes; small_long: baseline and rotation 3x longer), topbottom (scenes whose class is a long-range vertical relation), full"),
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
