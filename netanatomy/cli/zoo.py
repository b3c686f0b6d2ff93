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


def _floats(value: str, name: str, n: int | None = None) -> tuple:
    try:
        items = tuple(float(v) for v in _csv(value, name))
    except ValueError:
        raise UserError(f"{name} takes comma-separated numbers, got {value!r}") from None
    if n is not None and len(items) != n:
        raise UserError(f"{name} takes {n} comma-separated numbers, got {value!r}")
    return items


def _ints(value: str, name: str) -> tuple:
    try:
        return tuple(int(v) for v in _csv(value, name))
    except ValueError:
        raise UserError(f"{name} takes comma-separated integers, got {value!r}") from None


def _progress(label: str):
    from rich.console import Console
    from rich.progress import TextColumn

    from ._common import progress_bar

    prog = progress_bar(Console(stderr=True), TextColumn(label))
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
        checkpoint_steps: Optional[str] = typer.Option(
            None, "--checkpoint-steps",
            help="Comma-separated cumulative optimiser steps to checkpoint at (replaces --epochs/--steps-per-epoch), e.g. 120,360,1050,2100."),
        train_fractions: Optional[str] = typer.Option(
            None, "--train-fractions", help="Draw each net's train fraction from these values (Small CNN Zoo: 0.1,0.25,0.5,1.0) instead of U[0.1, 1]."),
        lr_range: str = typer.Option("5e-4,5e-2", "--lr-range", help="Learning rate range LOW,HIGH (log-uniform)."),
        l2_range: str = typer.Option("1e-8,1e-2", "--l2-range", help="L2 / weight decay range LOW,HIGH (log-uniform)."),
        init_std_range: str = typer.Option("1e-3,0.5", "--init-std-range", help="Init std range LOW,HIGH (log-uniform) for normal inits."),
        dropout_max: float = typer.Option(0.5, "--dropout-max", help="Dropout rate drawn from U[0, MAX] ..."),
        dropout_zero_prob: float = typer.Option(0.3, "--dropout-zero-prob", help="... or 0 with this probability."),
        quick: bool = typer.Option(False, "--quick", help="A smoke-test zoo: 12 nets, 2 epochs of 5 steps."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many minutes (re-run to continue)."),
        ray: Optional[str] = RayOpt,
        workers: Optional[int] = WorkersOpt,
    ) -> None:
        """Train a zoo of small CNNs on Fashion-MNIST: checkpoints + metrics table."""
        from ..parallel import get_executor
        from ..zoo.train import ZooConfig, generate_zoo

        cfg = ZooConfig(
            nets=nets, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
            group_size=group_size, activations=_csv(activations, "--activations"),
            optimizers=_csv(optimizers, "--optimizers"), eval_test=eval_test, eval_train=eval_train,
            lr_range=_floats(lr_range, "--lr-range", 2), l2_range=_floats(l2_range, "--l2-range", 2),
            init_std_range=_floats(init_std_range, "--init-std-range", 2),
            dropout_max=dropout_max, dropout_zero_prob=dropout_zero_prob,
            checkpoint_steps=None if checkpoint_steps is None else _ints(checkpoint_steps, "--checkpoint-steps"),
            train_fractions=None if train_fractions is None else _floats(train_fractions, "--train-fractions"),
        )
        if quick:
            cfg.nets, cfg.epochs, cfg.steps_per_epoch, cfg.eval_test, cfg.eval_train, cfg.group_size = 12, 2, 5, 500, 200, 4
            cfg.checkpoint_steps = None
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

    @zoo_app.command("finetune")
    def zoo_finetune(
        base: Path = typer.Option(..., "--base", help="A zoo checkpoint (safetensors) to start every net from."),
        out: Path = typer.Option(..., "--out", help="Output zoo folder (re-running it resumes)."),
        tasks: str = typer.Option("orig,vflip,invert,coarse", "--tasks", help="orig, vflip, hflip, rot90, invert, coarse."),
        nets_per_task: int = typer.Option(8, "--nets-per-task"),
        steps: int = typer.Option(150, "--steps"),
        seed: int = typer.Option(0, "--seed"),
        ray: Optional[str] = RayOpt,
        workers: Optional[int] = WorkersOpt,
    ) -> None:
        """Fine-tune copies of one net on related tasks (a zoo for region maps)."""
        from ..parallel import get_executor
        from ..zoo.finetune import FinetuneConfig, finetune_zoo

        if nets_per_task < 1 or steps < 1:
            raise UserError("--nets-per-task and --steps must be >= 1")
        cfg = FinetuneConfig(tasks=_csv(tasks, "--tasks"), nets_per_task=nets_per_task, steps=steps, seed=seed)
        prog, cb = _progress("finetune")
        with get_executor(ray, workers) as ex, prog:
            summary, df = finetune_zoo(out, base, cfg, executor=ex, progress=cb)
        acc = df.groupby("task")["test_acc"].mean() if len(df) else {}
        _out(f"wrote {out}: {len(df)} fine-tuned nets; mean test accuracy per task: "
             + ", ".join(f"{t} {a:.3f}" for t, a in acc.items()))
        if summary.failures:
            f = summary.failures[0]
            raise UserError(f"{len(summary.failures)} groups failed (first: {f.key}: {f.error}); re-run to retry them")

    @zoo_app.command("predict")
    def zoo_predict(
        zoo: Path = typer.Argument(..., help="A zoo folder (ours, or the Small CNN Zoo's weights.npy + metrics.csv)."),
        target: str = typer.Option("test_acc", "--target", help="Metrics column to predict."),
        epochs: str = typer.Option("final", "--epochs", help="Rows: final, trained, all, or epochs like 1,2,3; comma-joined selections with '+', e.g. final+all."),
        predictors: str = typer.Option("linear,gbm,mlp", "--predictors", help="Comma-separated: linear, gbm, mlp, gbm-cv (on the features), deepsets (a permutation-invariant network learning from the weights)."),
        splits: int = typer.Option(3, "--splits", help="Random splits by training run."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Fraction of runs held out per split."),
        seed: int = typer.Option(0, "--seed"),
        esd: bool = typer.Option(False, "--esd", help="Add per-layer ESD metrics (netanatomy.spectral) to the features."),
        features: str = typer.Option("stats", "--features", help="stats (per tensor mean, std, 5 percentiles, L1, L2) or unterthiner (their 7 statistics per tensor)."),
        train_sizes: str = typer.Option("1", "--train-sizes", help="Learning curve: fractions of each split's training runs to fit on (nested subsets; the same held-out runs), e.g. 0.25,0.5,1."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ZOO/predict)."),
        ray: Optional[str] = RayOpt,
        workers: Optional[int] = WorkersOpt,
    ) -> None:
        """Predict accuracy from weight statistics; R^2 and Kendall's tau on held-out runs."""
        from .._util import atomic_write, atomic_write_text, dumps
        from ..parallel import get_executor
        from ..zoo.predict import ALL_PREDICTORS, predict_zoo, prediction_plot

        preds = _csv(predictors, "--predictors")
        for p in preds:
            if p not in ALL_PREDICTORS:
                raise UserError(f"unknown predictor {p!r}; choose from {', '.join(ALL_PREDICTORS)}")
        from ..zoo.predict import FEATURE_SETS

        if features not in FEATURE_SETS:
            raise UserError(f"unknown --features {features!r}; choose from {', '.join(FEATURE_SETS)}")
        if not 0 < test_fraction < 1:
            raise UserError("--test-fraction must lie in (0, 1)")
        if splits < 1:
            raise UserError("--splits must be >= 1")
        selections = tuple(s.strip() for s in epochs.split("+") if s.strip())
        from ..zoo.predict import check_train_sizes

        try:
            sizes = check_train_sizes(x.strip() for x in train_sizes.split(",") if x.strip())
        except UserError as exc:
            raise UserError(f"--train-sizes: {exc}") from None
        prog, cb = _progress("features")
        with get_executor(ray, 0 if workers is None else workers) as ex, prog:
            rep = predict_zoo(zoo, target, selections, preds, splits, test_fraction, seed, esd, ex, progress=cb,
                              feature_set=features, train_sizes=sizes)
        out_dir = out or (zoo / "predict")
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "report.json", dumps(rep.to_json(), indent=1))
        atomic_write(out_dir / "predictions.parquet", lambda p: rep.predictions.to_parquet(p, index=False))
        atomic_write(out_dir / "importances.csv", lambda p: rep.importances.to_csv(p, index=False))
        summ = rep.summary_frame()
        atomic_write(out_dir / "summary.csv", lambda p: summ.to_csv(p, index=False))
        try:
            import matplotlib  # noqa: F401

            for sel in selections:
                for name in preds:
                    fig = prediction_plot(rep, name, sel)
                    atomic_write(out_dir / f"scatter_{sel}_{name}.png", lambda p, f=fig: f.savefig(p, dpi=110, bbox_inches="tight", format="png"))
        except ImportError:
            pass
        lines = [f"{r['selection']:>8} {r['predictor']:>8}: "
                 + (f"{r['train_runs']:.0f} training runs, " if "train_size" in r else "")
                 + f"R2 {r['r2_mean']:.4f} (sd {r['r2_std']:.4f}), "
                 f"tau {r['tau_mean']:.4f} (sd {r['tau_std']:.4f}) over {r['splits']} splits, {r['test_runs']:.0f} held-out runs"
                 + (f", fit {r['fit_s']:.2f} s" if "fit_s" in r else "")
                 for r in summ.to_dict("records")]
        for sel, c in rep.info.get("noise_ceiling", {}).items():
            lines.append(f"{sel:>8} noise ceiling (test accuracy on {c['n_eval']} images, binomial sd {c['noise_sd']:.4f}): "
                         f"R2 {c['r2']:.4f}, tau {c['tau']:.4f}")
        top = ", ".join(f"{f} {v:.3f}" for f, v in zip(rep.importances["feature"][:5], rep.importances["importance"][:5]))
        _out("\n".join(lines) + (f"\ntop features (gbm permutation importance): {top}" if top else "") + f"\nwrote {out_dir}")

    @app.command("map")
    def map_cmd(
        zoo: Path = typer.Argument(..., help="A zoo folder."),
        space: str = typer.Option("weights", "--space", help="weights (task vectors) or features (weight statistics)."),
        base: str = typer.Option("mean", "--base", help="Task-vector base: mean, init (each run's epoch 0), none, or a checkpoint file."),
        epochs: str = typer.Option("final", "--epochs", help="Rows: final, trained, all or epoch numbers."),
        clusters: Optional[int] = typer.Option(None, "--clusters", help="k (default: distinct values of the first --labels column)."),
        methods: str = typer.Option("kmeans,spectral", "--methods", help="kmeans, spectral."),
        labels: str = typer.Option("activation,optimizer", "--labels", help="Metadata columns to score cluster purity against ('' for none)."),
        color: Optional[str] = typer.Option(None, "--color", help="Metadata column to colour the map by (default: first label)."),
        embedding: str = typer.Option("pca", "--embedding", help="pca, tsne or umap."),
        seed: int = typer.Option(0, "--seed"),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ZOO/map-<space>)."),
    ) -> None:
        """Distances between models, clusters, purity and a 2-D map of a zoo."""
        from .._util import atomic_write, atomic_write_text, dumps
        from ..zoo.regions import map_plot, map_zoo

        labs = tuple(v.strip() for v in labels.split(",") if v.strip())
        meths = _csv(methods, "--methods")
        res = map_zoo(zoo, space, base, epochs, clusters, meths, labs, embedding, seed)
        out_dir = out or (zoo / f"map-{space}")
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "map.json", dumps(res.to_json(), indent=1))
        frame = res.to_frame()
        atomic_write(out_dir / "map.parquet", lambda p: frame.to_parquet(p, index=False))
        colour = color or (labs[0] if labs else None)
        try:
            import matplotlib  # noqa: F401

            fig = map_plot(res, colour)
            atomic_write(out_dir / "map.png", lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
        except ImportError:
            pass
        lines = [f"{len(frame)} models, {space} space, base {base}"]
        for p in res.purity:
            lines.append(f"  {p['method']:>8} k={p['k']} vs {p['label']}: purity {p['purity']:.3f} "
                         f"(majority share {p['chance_purity']:.3f}), ARI {p['ari']:.3f}")
        for d in res.distance_summary:
            if d["space"].startswith("model"):
                lines.append(f"  {d['space']} by {d['label']}: within {d['within']:.4g}, between {d['between']:.4g}")
        _out("\n".join(lines) + f"\nwrote {out_dir}")
