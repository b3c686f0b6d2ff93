"""CLI: ``netanatomy zoo train``, ``netanatomy zoo predict``, ``netanatomy map``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

RayOpt = typer.Option(
    None, "--ray", help="Run on Ray: 'auto' (join a running cluster or start a local one) or a cluster ADDRESS."
)
WorkersOpt = typer.Option(None, "--workers", help="Local worker processes (default: all cores; 0 = in this process).")


def _csv(value: str, name: str) -> tuple:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise UserError(f"{name} needs at least one value")
    return items


def _progress(label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                    transient=True, disable=not console.is_terminal)
    state: dict = {}

    def cb(done: int, total: int) -> None:
        if "task" not in state:
            state["task"] = prog.add_task(label, total=total or 1)
        prog.update(state["task"], completed=done, total=total or 1)

    return prog, cb


def _out(msg: str) -> None:
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(msg, markup=False)


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    zoo_app = typer.Typer(help="Model zoos: train one, predict accuracy from weights.", no_args_is_help=True)
    app.add_typer(zoo_app, name="zoo")

    @zoo_app.command("train")
    def zoo_train(
        out: Path = typer.Option(..., "--out", help="Zoo folder (re-running it resumes)."),
        nets: int = typer.Option(500, "--nets", help="Number of networks."),
        epochs: int = typer.Option(3, "--epochs", help="Epochs (checkpoints are written at epoch 0 and after each)."),
        steps_per_epoch: int = typer.Option(100, "--steps-per-epoch", help="Optimiser steps per epoch."),
        batch_size: int = typer.Option(32, "--batch-size"),
        group_size: int = typer.Option(32, "--group-size", help="Nets trained together in one stacked model."),
        seed: int = typer.Option(0, "--seed"),
        activations: str = typer.Option("relu,tanh", "--activations", help="Comma-separated: relu, tanh, gelu, sigmoid."),
        optimizers: str = typer.Option("sgd,adam,rmsprop", "--optimizers"),
        eval_test: int = typer.Option(3000, "--eval-test", help="Test images used for test accuracy / loss."),
        eval_train: int = typer.Option(500, "--eval-train", help="Images of each net's training subset for train accuracy."),
        quick: bool = typer.Option(False, "--quick", help="A smoke-test zoo: 12 nets, 2 epochs of 5 steps."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many minutes (re-run to continue)."),
        ray: Optional[str] = RayOpt,
        workers: Optional[int] = WorkersOpt,
    ) -> None:
        """Train a zoo of small CNNs on Fashion-MNIST: checkpoints + metrics table."""
        from ..parallel import get_executor
        from .train import ZooConfig, generate_zoo

        cfg = ZooConfig(
            nets=nets, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
            group_size=group_size, activations=_csv(activations, "--activations"),
            optimizers=_csv(optimizers, "--optimizers"), eval_test=eval_test, eval_train=eval_train,
        )
        if quick:
            cfg.nets, cfg.epochs, cfg.steps_per_epoch, cfg.eval_test, cfg.eval_train, cfg.group_size = 12, 2, 5, 500, 200, 4
        cfg.validate()
        import time

        t0 = time.time()
        prog, cb = _progress("zoo train")
        with get_executor(ray, workers) as ex, prog:
            summary, df = generate_zoo(out, cfg, executor=ex, progress=cb,
                                       time_limit=None if time_limit is None else 60 * time_limit)
        dt = time.time() - t0
        n_ran = sum(len(summary.records[k]) for k in summary.ran) // (cfg.epochs + 1)
        msg = (f"wrote {out}: {df['run'].nunique() if len(df) else 0} nets, {len(df)} checkpoints rows "
               f"({len(summary.ran)} groups trained, {len(summary.skipped)} already done) in {dt:.0f} s")
        if n_ran:
            msg += f"; {n_ran / dt:.2f} nets/s"
        if summary.unfinished:
            msg += f"; {len(summary.unfinished)} groups not trained yet (time limit): re-run the same command to continue"
        _out(msg)
        if summary.failures:
            f = summary.failures[0]
            raise UserError(f"{len(summary.failures)} groups failed (first: {f.key}: {f.error}); re-run to retry them")
