"""Commands: ``netanatomy average``, ``soup``, ``interpolate``, ``align``, ``merge``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError


from ._common import out_console as _console
from ._common import parse_list


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    return parse_list(text, float, "--weights", "numbers")


def _check_out(out: Path, inputs: list[str]) -> None:
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name ending in .safetensors")
    if not out.name.endswith(".safetensors"):
        raise UserError(f"{out}: the output is a safetensors file; name it *.safetensors")
    for i in inputs:
        p = Path(i).expanduser()
        if p.exists() and p.resolve() == out.resolve():
            raise UserError(f"{out}: is also an input; write the result elsewhere")


def _print_written(res, json_out: bool) -> None:
    if json_out:
        from .._util import dumps

        sys.stdout.write(dumps(res.summary(), indent=1) + "\n")
        return
    w = res.average.written if hasattr(res, "average") else res.written
    console = _console()
    n = len(res.members) if hasattr(res, "members") else len(res.sources)
    console.print(f"wrote {w.path} ({n} checkpoints, {w.num_tensors} tensors, {w.num_bytes:,} bytes of weights)", markup=False)
    console.print(f"sha256 {w.file_sha256}  {w.path.name}", markup=False)
    console.print(f"content-sha256 {w.content_sha256}", markup=False)
    notes = res.notes if hasattr(res, "notes") else res.average.notes
    for note in notes:
        console.print(f"note: {note}", markup=False)


def _same_keys_and_shapes(a, b) -> None:
    ka, kb = set(a.keys()), set(b.keys())
    if ka != kb:
        only = sorted(ka - kb) or sorted(kb - ka)
        side = "A" if ka - kb else "B"
        raise UserError(f"model {side} alone has {len(only)} tensor(s), e.g. {only[0]!r}: A and B must hold the same tensors")
    for k in a.keys():
        if tuple(a.shape(k)) != tuple(b.shape(k)):
            raise UserError(f"{k!r} has shape {list(a.shape(k))} in model A and {list(b.shape(k))} in model B")


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    @app.command("average")
    def average_cmd(
        checkpoints: List[str] = typer.Argument(..., help="Checkpoints to average (safetensors or PyTorch), oldest first for --ema."),
        out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file (written atomically, with OUT.sha256)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated weight per checkpoint (normalised)."),
        ema: Optional[float] = typer.Option(None, "--ema", help="Exponential moving average with this decay over the checkpoints in order."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of float tensors (default: each tensor's input dtype)."),
        non_float: str = typer.Option("last", "--non-float", help="Integer/bool tensors: last, first, or equal (must agree)."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="Average each key over the checkpoints that hold it."),
        key: Optional[str] = typer.Option(None, "--key", help="Entry of nested PyTorch checkpoints to read (e.g. ema, model)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> None:
        """Average checkpoints tensor by tensor in float64 (SWA-style mean, weighted mean or EMA); memory stays near one tensor per checkpoint for safetensors inputs."""
        from ..synthesis.average import average, ema as ema_fn

        _check_out(out, checkpoints)
        if ema is not None and weights is not None:
            raise UserError("--ema and --weights exclude each other")
        kw = dict(dtype=dtype, non_float=non_float, allow_missing=allow_missing, key=key)
        if ema is not None:
            res = ema_fn(checkpoints, ema, out, **kw)
        else:
            res = average(checkpoints, out, weights=_parse_weights(weights), **kw)
        _print_written(res, json_out)

    @app.command("soup")
    def soup_cmd(
        checkpoints: List[str] = typer.Argument(..., help="Members: checkpoints fine-tuned from one start."),
        out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
        greedy: bool = typer.Option(False, "--greedy", help="Greedy soup (needs --eval): add members best-first while the score does not drop."),
        eval_cmd: Optional[str] = typer.Option(
            None, "--eval", help="Command scoring a weights file on held-out data: it gets the file path ({model} or appended) and prints a number last."
        ),
        lower_is_better: bool = typer.Option(False, "--lower-is-better", help="The eval command prints a loss, not an accuracy."),
        timeout: float = typer.Option(600.0, "--timeout", help="Seconds allowed per evaluation."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of float tensors."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> None:
        """Uniform soup (the mean of all members) or greedy soup (Wortsman et al. 2022)."""
        from ..synthesis.soup import greedy_soup, uniform_soup

        _check_out(out, checkpoints)
        if greedy and not eval_cmd:
            raise UserError("--greedy needs --eval COMMAND to score candidate soups on held-out data")
        if greedy:
            res = greedy_soup(checkpoints, eval_cmd, out, higher_is_better=not lower_is_better, timeout=timeout, dtype=dtype)
        else:
            res = uniform_soup(checkpoints, out, evaluate=eval_cmd, higher_is_better=not lower_is_better, score_members=bool(eval_cmd), timeout=timeout, dtype=dtype)
        if json_out:
            from .._util import dumps

            doc = res.summary()
            doc["steps"] = res.steps
            doc["member_scores"] = res.member_scores
            sys.stdout.write(dumps(doc, indent=1) + "\n")
            return
        console = _console()
        if res.steps:
            from rich.table import Table

            t = Table(show_edge=False, pad_edge=False)
            for col in ("step", "candidate", "alone", "soup with it", "added"):
                t.add_column(col)
            for s in res.steps:
                t.add_row(str(s["step"]), s["candidate"], f"{s['candidate_score']:.6g}", f"{s['soup_score']:.6g}", "yes" if s["accepted"] else "no")
            console.print(t)
        elif res.member_scores:
            for name, s in res.member_scores.items():
                console.print(f"member {name}: {s:.6g}", markup=False)
        if res.score is not None:
            best = res.best_member
            console.print(
                f"{res.method} soup of {len(res.ingredients)}/{len(res.members)} members: score {res.score:.6g}"
                + (f" (best single member {best[0]}: {best[1]:.6g})" if best else ""),
                markup=False,
            )
        _print_written(res, False)

    @app.command("interpolate")
    def interpolate_cmd(
        model_a: str = typer.Argument(..., help="Model A (alpha = 0)."),
        model_b: str = typer.Argument(..., help="Model B (alpha = 1), same keys and shapes."),
        eval_cmd: str = typer.Option(..., "--eval", help="Command scoring a weights file ({model} or appended); prints a number last."),
        points: int = typer.Option(11, "--points", help="Number of evenly spaced alphas on [0, 1]."),
        higher_is_better: bool = typer.Option(False, "--higher-is-better", help="The eval command prints an accuracy (default: a loss)."),
        timeout: float = typer.Option(600.0, "--timeout", help="Seconds allowed per evaluation."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the curve and the barrier as JSON here."),
    ) -> None:
        """Score the straight path between two models and print the barrier (the largest excess over the end-point line)."""
        from ..synthesis.interpolate import interpolate

        curve = interpolate(model_a, model_b, eval_cmd, points, timeout=timeout)
        barrier = curve.barrier("score", higher_is_better)
        console = _console()
        for r in curve.to_records():
            console.print(f"alpha {r['alpha']:.3f}  {r['score']:.6g}", markup=False)
        console.print(f"barrier {barrier:.6g} ({'accuracy-like' if higher_is_better else 'loss-like'} score)", markup=False)
        if out is not None:
            from .._util import atomic_write_text, dumps

            atomic_write_text(out, dumps({"curve": curve.to_records(), "barrier": barrier, "higher_is_better": higher_is_better}, indent=1) + "\n")
            console.print(f"wrote {out}", markup=False)

    @app.command("align")
    def align_cmd(
        model_a: str = typer.Argument(..., help="Reference model A (safetensors or PyTorch state dict)."),
        model_b: str = typer.Argument(..., help="Model B, whose hidden units are permuted to match A."),
        out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors: B with its hidden units permuted (same function as B)."),
        average_out: Optional[Path] = typer.Option(None, "--average", help="Also write the midpoint (A + aligned B) / 2 here (.safetensors)."),
        max_sweeps: int = typer.Option(100, "--max-sweeps", help="At most this many sweeps of weight matching over the layers."),
        seed: int = typer.Option(0, "--seed", help="Seed of the order in which layers are matched."),
        key: Optional[str] = typer.Option(None, "--key", help="Entry of nested PyTorch checkpoints to read (e.g. model, ema)."),
        eval_cmd: Optional[str] = typer.Option(
            None, "--eval", help="Also score the straight paths A-B and A-aligned B with this command ({model} or appended; prints a number last) and print both barriers."
        ),
        points: int = typer.Option(5, "--points", help="With --eval: evenly spaced alphas on [0, 1] per path."),
        higher_is_better: bool = typer.Option(False, "--higher-is-better", help="With --eval: the command prints an accuracy (default: a loss)."),
        timeout: float = typer.Option(600.0, "--timeout", help="With --eval: seconds allowed per evaluation."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> None:
        """Permute B's hidden units to match A by weight matching (Git Re-Basin). The architecture is inferred from the weights as a plain chain of conv/linear layers with norms; residual connections, attention, grouped convs and anything ambiguous are refused."""
        from ..synthesis.average import average
        from ..synthesis.chain import infer_chain
        from ..synthesis.permute import align
        from ..io import open_store, save_tensors

        _check_out(out, [model_a, model_b])
        if average_out is not None:
            _check_out(average_out, [model_a, model_b])
            if average_out.expanduser().resolve() == out.expanduser().resolve():
                raise UserError("--average and --out name the same file")
        if max_sweeps < 1:
            raise UserError("--max-sweeps must be at least 1")
        if eval_cmd is not None and points < 2:
            raise UserError("--points must be at least 2")
        ra, rb = open_store(model_a, key=key), open_store(model_b, key=key)
        _same_keys_and_shapes(ra, rb)
        chain, spec = infer_chain(ra)
        res = align(ra, rb, spec, max_sweeps=max_sweeps, seed=seed)
        meta = {"netanatomy": "align", "reference": Path(model_a).name, "aligned": Path(model_b).name}
        written = save_tensors(out, res.aligned, meta)
        mid = None
        if average_out is not None:
            mid = average([ra, res.aligned], average_out).written
        summary = res.summary()
        summary.update({"chain": chain.describe(), "order_from": chain.order, "out": str(written.path),
                        "sha256": written.file_sha256, "content_sha256": written.content_sha256})
        summary.pop("fixed_spaces", None)
        if mid is not None:
            summary.update({"average": str(mid.path), "average_sha256": mid.file_sha256})
        if eval_cmd is not None:
            from ..synthesis.interpolate import interpolate

            for label, other in (("naive", rb), ("aligned", res.aligned)):
                curve = interpolate(ra, other, eval_cmd, points, timeout=timeout)
                summary[f"barrier_{label}"] = curve.barrier("score", higher_is_better)
                summary[f"curve_{label}"] = curve.to_records()
        if json_out:
            from .._util import dumps

            sys.stdout.write(dumps(summary, indent=1) + "\n")
            return
        console = _console()
        console.print(f"chain ({chain.order}): {chain.describe()}", markup=False)
        console.print(
            f"{summary['permutations']} permutations, {summary['units_moved']}/{summary['units']} units moved, {summary['sweeps']} sweeps",
            markup=False,
        )
        console.print(f"matching objective (sum of <A, B>): {res.objective_before:.6g} -> {res.objective_after:.6g}", markup=False)
        console.print(f"L2 distance A-B: {res.distance_before:.6g} -> {res.distance_after:.6g}", markup=False)
        if eval_cmd is not None:
            kind = "accuracy-like" if higher_is_better else "loss-like"
            console.print(
                f"barrier on the straight path ({kind} score, {points} points): {summary['barrier_naive']:.6g} -> {summary['barrier_aligned']:.6g}",
                markup=False,
            )
        console.print(f"wrote {written.path} ({written.num_tensors} tensors)", markup=False)
        console.print(f"sha256 {written.file_sha256}  {written.path.name}", markup=False)
        if mid is not None:
            console.print(f"wrote {mid.path} (midpoint of A and aligned B)", markup=False)
            console.print(f"sha256 {mid.file_sha256}  {mid.path.name}", markup=False)

    @app.command("merge")
    def merge_cmd(
        method: str = typer.Argument(..., help="task_arithmetic, ties, dare_linear, dare_ties, model_stock or slerp."),
        members: List[str] = typer.Argument(
            ..., help="Members fine-tuned from the base (same keys and shapes). For slerp: A and B (t=0 gives A), or only B with --base A."
        ),
        base: Optional[str] = typer.Option(None, "--base", help="The model the members were fine-tuned from (required except for slerp)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file (atomic, with OUT.sha256 and OUT.recipe.json)."),
        lam: Optional[float] = typer.Option(None, "--lambda", help="Scale of the merged task vector: base + lambda * merged (default 1)."),
        density: Optional[str] = typer.Option(None, "--density", help="ties: fraction of each task vector kept by magnitude, in (0, 1]; one value or one per member."),
        drop: Optional[float] = typer.Option(None, "--drop", help="dare_linear / dare_ties: probability of dropping each task-vector entry, in [0, 1)."),
        no_rescale: bool = typer.Option(False, "--no-rescale", help="dare_*: do not rescale the kept entries by 1/(1 - drop)."),
        t: Optional[float] = typer.Option(None, "--t", help="slerp: position on the arc from A (0) to B (1)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated weight per member (>= 0, not normalised; default 1 each)."),
        seed: int = typer.Option(0, "--seed", help="dare_*: seed of the drop masks (per tensor: seed + crc32 of its name)."),
        include: Optional[List[str]] = typer.Option(None, "--include", help="Merge only tensors whose name matches this glob (repeatable); the rest are copied from the base."),
        exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Copy tensors matching this glob from the base (repeatable)."),
        align: bool = typer.Option(False, "--align", help="Permute each member's hidden units to the base first (weight matching; plain chains of layers only)."),
        key: Optional[str] = typer.Option(None, "--key", help="Entry of nested PyTorch checkpoints to read (e.g. ema, model)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> None:
        """Merge fine-tuned models tensor by tensor: task arithmetic, TIES, DARE (linear or TIES), Model Stock, or slerp of two models. Non-float tensors and tensors outside --include/--exclude are copied from the base; memory stays near a few tensors for safetensors inputs."""
        from ..synthesis.merge import METHODS, merge

        name = method.lower().replace("-", "_")
        if name not in METHODS:
            raise UserError(f"unknown merge method {method!r} (choose {', '.join(METHODS)})")
        if name == "slerp":
            if base is not None:
                members = [base, *members]
            if len(members) != 2:
                raise UserError(f"slerp takes two models, A and B (or --base A and B), not {len(members)}")
            base, members = members[0], members[1:]
        elif base is None:
            raise UserError(f"{name} needs --base BASE: the model the members were fine-tuned from")
        _check_out(out, [base, *members])
        weighted = name not in ("slerp", "model_stock")
        uses = {"--lambda": weighted, "--density": name == "ties", "--drop": name.startswith("dare"),
                "--no-rescale": name.startswith("dare"), "--t": name == "slerp", "--weights": weighted}
        given = {"--lambda": lam is not None, "--density": density is not None, "--drop": drop is not None,
                 "--no-rescale": no_rescale, "--t": t is not None, "--weights": weights is not None}
        for opt, is_given in given.items():
            if is_given and not uses[opt]:
                raise UserError(f"{opt} does not apply to {name}")
        params: dict = dict(out=out, include=include or None, exclude=exclude or None, align=align, key=key)
        if name == "slerp":
            if t is None:
                raise UserError("slerp needs --t (0 gives A, 1 gives B)")
            params["t"] = t
        elif weighted:
            params["lam"] = 1.0 if lam is None else lam
            params["weights"] = _parse_weights(weights)
        if name == "ties":
            if density is None:
                raise UserError("ties needs --density (the fraction of each task vector kept, in (0, 1])")
            ds = parse_list(density, float, "--density", "numbers")
            params["density"] = ds[0] if len(ds) == 1 else ds
        if name.startswith("dare"):
            if drop is None:
                raise UserError(f"{name} needs --drop (the probability of dropping each task-vector entry, in [0, 1))")
            params.update(p=drop, seed=seed, rescale=not no_rescale)
        res = merge(name, base, members, **params)
        _print_written(res, json_out)
        if not json_out and res.recipe_path is not None:
            _console().print(f"recipe {res.recipe_path}", markup=False)
