"""Evaluators: how soups and interpolation curves score a set of weights.

An evaluator is either

* a Python callable ``f(state_dict) -> float`` (or ``-> {metric: float}``), or
* an evaluation command (:class:`CommandEvaluator`): a program that receives the
  path of a safetensors file and prints a number as the last thing on stdout.
  It runs with :mod:`subprocess`, arguments as a list (never through a shell),
  with a timeout; a failure, a timeout or output without a number is a
  one-line :class:`~netanatomy.errors.UserError`.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import UserError

PLACEHOLDER = "{model}"
Scores = dict[str, float]


class CommandEvaluator:
    """Run ``command`` on a weights file and read the number it prints.

    ``command`` is a list of arguments or a string split like a POSIX shell
    would (``shlex.split``) but never run by one. Every ``{model}`` in an
    argument is replaced by the file's path; without any, the path is appended.
    The number is the last whitespace-separated token of the last non-empty
    line of stdout.
    """

    def __init__(self, command: str | Sequence[str], timeout: float = 600.0, cwd: str | os.PathLike | None = None, metric: str = "score"):
        if isinstance(command, str):
            try:
                args = shlex.split(command)
            except ValueError as exc:
                raise UserError(f"evaluation command cannot be parsed: {exc}") from None
        else:
            args = [str(a) for a in command]
        if not args:
            raise UserError("evaluation command is empty")
        self.args = args
        self.timeout = float(timeout)
        self.cwd = cwd
        self.metric = metric
        self.calls = 0

    def _argv(self, path: str) -> list[str]:
        if any(PLACEHOLDER in a for a in self.args):
            return [a.replace(PLACEHOLDER, path) for a in self.args]
        return [*self.args, path]

    def run_on_file(self, path: str | os.PathLike) -> float:
        argv = self._argv(str(path))
        shown = shlex.join(self.args)
        self.calls += 1
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, cwd=self.cwd, stdin=subprocess.DEVNULL, check=False
            )
        except FileNotFoundError:
            raise UserError(f"evaluation command not found: {argv[0]}") from None
        except PermissionError:
            raise UserError(f"evaluation command is not executable: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"evaluation command timed out after {self.timeout:g} s: {shown}") from None
        except OSError as exc:
            raise UserError(f"evaluation command could not start: {argv[0]} ({exc.strerror})") from None
        if proc.returncode != 0:
            tail = _last_line(proc.stderr) or _last_line(proc.stdout)
            raise UserError(f"evaluation command failed with exit code {proc.returncode}: {shown}" + (f" ({tail})" if tail else ""))
        line = _last_line(proc.stdout)
        try:
            value = float(line.split()[-1])
        except (ValueError, IndexError):
            raise UserError(f"evaluation command printed no number as its last output ({line[:80]!r}): {shown}") from None
        if not math.isfinite(value):
            raise UserError(f"evaluation command printed a non-finite score ({value}): {shown}")
        return value

    def __call__(self, state: Mapping[str, torch.Tensor] | str | os.PathLike) -> float:
        if isinstance(state, (str, os.PathLike)):
            return self.run_on_file(state)
        from ..io import save_tensors

        with tempfile.TemporaryDirectory(prefix="netanatomy-eval-") as d:
            path = Path(d) / "candidate.safetensors"
            save_tensors(path, dict(state), {"netanatomy.method": "candidate"}, sidecar=False)
            return self.run_on_file(path)


def _last_line(text: str | None) -> str:
    for line in reversed((text or "").strip().splitlines()):
        if line.strip():
            return line.strip()[:200]
    return ""


def as_evaluator(obj: Any, timeout: float = 600.0) -> Callable[[Any], Any]:
    """A command string / argument list becomes a :class:`CommandEvaluator`;
    a callable is used as it is."""
    if isinstance(obj, (str, list, tuple)):
        return CommandEvaluator(obj, timeout=timeout)
    if callable(obj):
        return obj
    raise UserError(f"an evaluator is a callable or a command, not a {type(obj).__name__}")


def scores_of(value: Any, metric_name: str = "score") -> Scores:
    """Normalise what an evaluator returned to ``{metric: float}``."""
    if isinstance(value, Mapping):
        out = {str(k): float(v) for k, v in value.items()}
    else:
        try:
            out = {metric_name: float(value)}
        except (TypeError, ValueError):
            raise UserError(f"the evaluator returned {type(value).__name__}, not a number or a dict of numbers") from None
    if not out:
        raise UserError("the evaluator returned no metric")
    return out


def pick(scores: Scores, metric: str | None) -> float:
    if metric is None:
        if len(scores) != 1:
            raise UserError(f"the evaluator returns several metrics ({', '.join(scores)}); say which one to use")
        return next(iter(scores.values()))
    if metric not in scores:
        raise UserError(f"the evaluator returned no metric {metric!r} (it returned {', '.join(scores)})")
    return scores[metric]
