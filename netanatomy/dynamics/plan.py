"""The width plan: widen the bottleneck DS layers, narrow the IS layers, and hold the
FLOPs of the conv / linear layers about constant.

How the plan is made (all from the run's ``width_run.json`` and the verdicts):

* Widths are tied where channels are shared: layers whose outputs meet in a residual
  add must keep one width (a tie group). Layers with no successor (the classifier),
  layers read through a concatenation, grouped or depthwise successors, keep theirs.
* Widen: each tie group holding a DS **bottleneck** (the narrowest layer of a run of
  adjacent DS layers; its DS neighbours are not widened, since the coupled norm spreads
  a DS reading one layer outwards) is multiplied by ``grow`` (2 by default).
* Narrow: every tie group whose layers all read IS is multiplied by one common factor
  ``s`` in ``[min_scale, 1]``, found by bisection so that the total FLOPs come back to
  ``target`` times the original (1.0 by default). Undecided layers and DS neighbours
  keep their width.
* Widths are rounded to a multiple of ``multiple`` and kept >= ``min_width``.

FLOPs here are 2 x multiply-accumulates of the conv / linear layers, with each conv's
output positions taken from the first training forward pass (1 when unknown, which
the plan notes). Parameters count weights, biases and the norm layers' affine pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .width import WidthAnalysis

PLAN_FORMAT = "netanatomy.width-plan/1"


@dataclass
class LayerSpec:
    name: str
    out: int
    in_fixed: int  # input features when no tracked layer feeds it
    kernel: int
    groups: int
    positions: int
    has_bias: bool
    n_norm: int
    preds: list[tuple[str, str, int]] = field(default_factory=list)  # (src, mode, positions)
    fixed_reason: str | None = None


class WidthGraph:
    """Layer widths and how FLOPs and parameters depend on them."""

    def __init__(self, meta: dict):
        layers = meta.get("layers") or {}
        order = meta.get("order") or list(layers)
        if not order:
            raise UserError("the run records no layers")
        positions = meta.get("positions") or {}
        self.positions_known = all(n in positions for n in order)
        self.specs: dict[str, LayerSpec] = {}
        for n in order:
            info = layers[n]
            shape = info["shape"]
            k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            self.specs[n] = LayerSpec(
                name=n,
                out=int(shape[0]),
                in_fixed=int(shape[1]) * int(info.get("groups", 1)) if len(shape) > 1 else 1,
                kernel=k,
                groups=int(info.get("groups", 1)),
                positions=int(positions.get(n, 1)),
                has_bias=bool(info.get("has_bias", False)),
                n_norm=len(info.get("norm_layers", [])),
            )
        # predecessors, ties
        parent = {n: n for n in order}

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        residual_into: dict[str, list[str]] = {}
        for n in order:
            info = layers[n]
            outs = info.get("out_slices", [])
            if not outs:
                self.specs[n].fixed_reason = "no successor (output layer)"
            if any("concatenation" in s or "do not match" in s or "grouped successor" in s for s in info.get("notes", [])):
                self.specs[n].fixed_reason = "a successor is not followed"
            for sl in outs:
                dst = sl["layer"]
                if dst not in self.specs:
                    self.specs[n].fixed_reason = f"successor {dst} not tracked"
                    continue
                if sl["mode"] in ("depthwise", "grouped"):
                    self.specs[n].fixed_reason = f"{sl['mode']} successor {dst}"
                self.specs[dst].preds.append((n, sl["mode"], int(sl.get("positions", 1))))
                if sl.get("residual"):
                    residual_into.setdefault(dst, []).append(n)
            if self.specs[n].groups > 1:
                self.specs[n].fixed_reason = "grouped convolution"
        for srcs in residual_into.values():
            for s in srcs[1:]:
                ra, rb = find(srcs[0]), find(s)
                if ra != rb:
                    parent[rb] = ra
        self.order = order
        self.tie = {n: find(n) for n in order}
        self.base = {n: self.specs[n].out for n in order}
        for n in order:  # a tie group is fixed if any member is
            if self.specs[n].fixed_reason:
                for m in order:
                    if self.tie[m] == self.tie[n] and not self.specs[m].fixed_reason:
                        self.specs[m].fixed_reason = f"tied to {n} ({self.specs[n].fixed_reason})"

    def in_features(self, name: str, widths: dict[str, int]) -> int:
        s = self.specs[name]
        if not s.preds:
            return s.in_fixed
        src, mode, pos = s.preds[0]
        return widths[src] * (pos if mode == "flatten" else 1)

    def macs(self, widths: dict[str, int]) -> int:
        total = 0
        for n, s in self.specs.items():
            total += widths[n] * (self.in_features(n, widths) // s.groups) * s.kernel * s.positions
        return int(total)

    def flops(self, widths: dict[str, int]) -> int:
        return 2 * self.macs(widths)

    def params(self, widths: dict[str, int]) -> int:
        total = 0
        for n, s in self.specs.items():
            w = widths[n]
            total += w * (self.in_features(n, widths) // s.groups) * s.kernel
            total += w if s.has_bias else 0
            total += 2 * w * s.n_norm
        return int(total)

    def ties(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.order:
            out.setdefault(self.tie[n], []).append(n)
        return out


def _round(w: float, multiple: int, min_width: int) -> int:
    m = max(1, int(multiple))
    return max(int(min_width), int(round(w / m)) * m, m)


def make_plan(
    analysis: WidthAnalysis,
    meta: dict,
    *,
    grow: float = 2.0,
    target: float = 1.0,
    min_scale: float = 0.25,
    multiple: int = 1,
    min_width: int = 4,
) -> dict:
    """The width plan as a JSON-ready dict (see the module docstring)."""
    if grow < 1:
        raise UserError("grow must be >= 1")
    if not 0 < min_scale <= 1:
        raise UserError("min_scale must be in (0, 1]")
    g = WidthGraph(meta)
    rows = {r["layer"]: r for r in analysis.layers}
    ties = g.ties()
    action: dict[str, str] = {}
    reason: dict[str, str] = {}
    for root, members in ties.items():
        fixed = [m for m in members if g.specs[m].fixed_reason]
        verdicts = [rows.get(m, {}).get("verdict", "undecided") for m in members]
        if fixed:
            act, why = "fixed", g.specs[fixed[0]].fixed_reason
        elif any(rows.get(m, {}).get("bottleneck") for m in members):
            act, why = "widen", "DS bottleneck"
        elif all(v == "IS" for v in verdicts):
            act, why = "narrow", "IS"
        else:
            nb = [rows[m]["ds_neighbour_of"] for m in members if rows.get(m, {}).get("ds_neighbour_of")]
            act = "keep"
            why = f"DS next to bottleneck {nb[0]}" if nb else ("undecided" if "undecided" in verdicts else "mixed verdicts")
        for m in members:
            action[m], reason[m] = act, why
    base = dict(g.base)

    def widths_for(s: float) -> dict[str, int]:
        w = {}
        for n in g.order:
            if action[n] == "widen":
                w[n] = _round(base[n] * grow, multiple, min_width)
            elif action[n] == "narrow":
                w[n] = min(base[n], _round(base[n] * s, multiple, min_width))
            else:
                w[n] = base[n]
        return w

    flops0 = g.flops(base)
    goal = target * flops0
    notes = []
    lo, hi = min_scale, 1.0
    if g.flops(widths_for(1.0)) <= goal:
        s = 1.0
        if any(a == "widen" for a in action.values()):
            notes.append("no narrowing needed to stay within the FLOPs target")
    elif g.flops(widths_for(min_scale)) > goal:
        s = min_scale
        notes.append(f"narrowing the IS layers to {min_scale:g}x does not pay for the widening; FLOPs grow")
    else:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if g.flops(widths_for(mid)) > goal:
                hi = mid
            else:
                lo = mid
        # choose whichever rounding lands closer to the goal
        s = min((lo, hi), key=lambda t: abs(g.flops(widths_for(t)) - goal))
    widths = widths_for(s)
    # rounding leaves the total off the goal: nudge narrowed tie groups one step at a time
    step = max(1, int(multiple))
    narrow_roots = [r for r, ms in ties.items() if action[ms[0]] == "narrow"]
    for _ in range(200):
        best, best_gap = None, abs(g.flops(widths) - goal)
        for r in narrow_roots:
            for d in (step, -step):
                cand = dict(widths)
                for m in ties[r]:
                    cand[m] = widths[m] + d
                if any(cand[m] > base[m] or cand[m] < min_width for m in ties[r]):
                    continue
                gap = abs(g.flops(cand) - goal)
                if gap < best_gap - 1e-9:
                    best, best_gap = cand, gap
        if best is None:
            break
        widths = best
    if not g.positions_known:
        notes.append("conv output positions unknown (no forward pass seen): FLOPs count one position per conv")
    if not any(a == "widen" for a in action.values()):
        notes.append("no DS bottleneck: nothing to widen")
    flops1, p0, p1 = g.flops(widths), g.params(base), g.params(widths)
    ids = {root: i for i, root in enumerate(ties)}
    layers = []
    for n in g.order:
        r = rows.get(n, {})
        layers.append(
            {
                "layer": n,
                "verdict": r.get("verdict"),
                "confidence": r.get("confidence"),
                "bottleneck": bool(r.get("bottleneck")),
                "ds_neighbour_of": r.get("ds_neighbour_of"),
                "tie_group": ids[g.tie[n]],
                "width": base[n],
                "new_width": widths[n],
                "action": action[n] if widths[n] != base[n] or action[n] in ("fixed", "keep") else "keep",
                "reason": reason[n],
            }
        )
    return {
        "format": PLAN_FORMAT,
        "model": meta.get("model"),
        "rule": analysis.options,
        "grow": grow,
        "target_flops_ratio": target,
        "scale_is": s,
        "flops_before": flops0,
        "flops_after": flops1,
        "flops_ratio": flops1 / flops0 if flops0 else float("nan"),
        "params_before": p0,
        "params_after": p1,
        "params_ratio": p1 / p0 if p0 else float("nan"),
        "positions_known": g.positions_known,
        "layers": layers,
        "notes": notes,
    }


def plan_widths(plan: dict) -> dict[str, int]:
    if plan.get("format") != PLAN_FORMAT:
        raise UserError("not a width plan (format netanatomy.width-plan/1)")
    return {r["layer"]: int(r["new_width"]) for r in plan["layers"]}
