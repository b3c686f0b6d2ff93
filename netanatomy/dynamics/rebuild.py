"""Apply a width plan: build the re-widened model.

Works for models made of ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers with batch /
group / layer / instance norms between them, connected sequentially or through
residual adds (ResNet-style blocks), whose ``forward`` does not hard-code a width.
Every resized layer (and the norms after it, and the layers reading it) is replaced
by a new module of the planned size.

``init``:

* ``"fresh"`` (default): the replaced modules are freshly initialised by their own
  constructors; untouched modules keep their weights. Use it to train the planned
  architecture from scratch (what the width experiment does).
* ``"inherit"``: the replaced modules start from the old weights. A narrowed layer
  merges its channels by iterative feature merging (repeatedly merge the closest pair
  by ``||v_i - v_j||^2`` over the concatenated incoming and outgoing weights of the
  whole tie group; a merged channel's incoming weights, bias and norm parameters are
  the members' mean, its outgoing slices their sum). A widened layer duplicates its
  largest-norm channels (incoming weights copied with a little noise of relative size
  ``noise`` to break the symmetry, outgoing slices split evenly between the copies),
  which keeps the function of a plain ReLU network apart from that noise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError
from .groups import find_channel_groups
from .plan import plan_widths

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _new_layer(m: nn.Module, n_in: int, n_out: int) -> nn.Module:
    w = m.weight
    kw = dict(device=w.device, dtype=w.dtype)
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        if m.groups != 1:
            raise UserError("grouped convolutions cannot be resized by a width plan")
        return type(m)(
            n_in, n_out, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
            groups=1, bias=m.bias is not None, padding_mode=m.padding_mode, **kw,
        )
    if type(m) is nn.Linear:
        return nn.Linear(n_in, n_out, bias=m.bias is not None, **kw)
    raise UserError(f"cannot resize a {type(m).__name__} (only Conv1d/2d/3d and Linear)")


def _new_norm(m: nn.Module, c: int, name: str) -> nn.Module:
    p = next(iter(m.parameters()), None)
    kw = dict(device=p.device, dtype=p.dtype) if p is not None else {}
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return type(m)(c, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats, **kw)
    if isinstance(m, nn.GroupNorm):
        if c % m.num_groups:
            raise UserError(f"{name}: {c} channels do not split into {m.num_groups} groups")
        return nn.GroupNorm(m.num_groups, c, eps=m.eps, affine=m.affine, **kw)
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return nn.LayerNorm(c, eps=m.eps, elementwise_affine=m.elementwise_affine, bias=m.bias is not None, **kw)
    raise UserError(f"{name}: cannot resize a {type(m).__name__}")


def _merge_maps(vectors: torch.Tensor, new: int, noise_gen=None):
    """(M, S) for going from C channels to ``new``: rows of M average the incoming
    side, rows of S sum the outgoing side (both ``new x C``)."""
    C = vectors.shape[0]
    v = vectors.double()
    if new < C:
        members = [[i] for i in range(C)]
        reps = v.clone()
        alive = torch.ones(C, dtype=torch.bool)
        for _ in range(C - new):
            d = torch.cdist(reps, reps).square()
            mask = ~(alive[:, None] & alive[None, :])
            d[mask] = float("inf")
            d.fill_diagonal_(float("inf"))
            flat = int(torch.argmin(d))
            i, j = divmod(flat, C)
            members[i] += members[j]
            members[j] = []
            alive[j] = False
            reps[i] = v[members[i]].mean(0)
        groups = [m for m in members if m]
        M = torch.zeros(new, C, dtype=torch.float64)
        S = torch.zeros(new, C, dtype=torch.float64)
        for r, g in enumerate(groups):
            M[r, g] = 1.0 / len(g)
            S[r, g] = 1.0
        return M, S, [len(g) for g in groups]
    order = torch.argsort(v.norm(dim=1), descending=True).tolist()
    copies = [1] * C
    src = list(range(C))
    for k in range(new - C):
        c = order[k % C]
        copies[c] += 1
        src.append(c)
    M = torch.zeros(new, C, dtype=torch.float64)
    S = torch.zeros(new, C, dtype=torch.float64)
    for r, c in enumerate(src):
        M[r, c] = 1.0
        S[r, c] = 1.0 / copies[c]
    return M, S, src


def _rows(t: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return (M.to(t.dtype) @ t.reshape(t.shape[0], -1)).reshape(M.shape[0], *t.shape[1:])


def _cols(t: torch.Tensor, S: torch.Tensor, mode: str, positions: int, c_old: int) -> torch.Tensor:
    S = S.to(t.dtype)
    if mode == "flatten":
        x = t.reshape(t.shape[0], c_old, positions)
        y = torch.einsum("jc,ocp->ojp", S, x)
        return y.reshape(t.shape[0], -1)
    return torch.einsum("jc,oc...->oj...", S, t)


def apply_plan(
    module: nn.Module, plan: dict | dict[str, int], *, init: str = "fresh", noise: float = 0.01, seed: int = 0
) -> nn.Module:
    """A copy of ``module`` with the planned widths (see the module docstring)."""
    if init not in ("fresh", "inherit"):
        raise UserError("init is 'fresh' or 'inherit'")
    from ..io import load

    widths = plan_widths(plan) if "format" in plan else {k: int(v) for k, v in plan.items()}
    model = load(module, name=type(module).__name__)
    if model.graph is None:
        raise UserError("the model does not trace with torch.fx; a width plan needs its graph")
    groups = {g.layer: g for g in find_channel_groups(model)}
    unknown = set(widths) - set(groups)
    if unknown:
        raise UserError(f"the plan names layers the model does not have: {', '.join(sorted(unknown))}")
    out = {n: widths.get(n, g.channels) for n, g in groups.items()}
    changed = {n for n in groups if out[n] != groups[n].channels}
    preds: dict[str, list] = {}
    for g in groups.values():
        for sl in g.outs:
            preds.setdefault(sl.layer, []).append((g.layer, sl))
        if g.layer in changed:
            bad = [s for s in g.notes if "concatenation" in s or "not match" in s or "grouped" in s]
            if bad or any(sl.mode in ("depthwise", "grouped") for sl in g.outs):
                raise UserError(f"{g.layer}: its width cannot change ({bad[0] if bad else 'grouped successor'})")
            if not g.outs:
                raise UserError(f"{g.layer}: the output layer's width is fixed")
    mods = dict(module.named_modules())
    new_in: dict[str, int] = {}
    for dst, ps in preds.items():
        ins = {out[src] * (sl.positions if sl.mode == "flatten" else 1) for src, sl in ps}
        if len(ins) > 1:
            raise UserError(f"{dst}: the plan gives the layers added into it different widths")
        new_in[dst] = ins.pop()
    # tie groups (same channels through residual adds) must share a width and a map
    ties: dict[str, set[str]] = {}
    for dst, ps in preds.items():
        res = [src for src, sl in ps if sl.residual]
        for a in res:
            ties.setdefault(a, set()).update(res)
    new = copy.deepcopy(module)
    old_sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    touched_norms: dict[str, int] = {}
    for n, g in groups.items():
        m = mods[n]
        n_in = new_in.get(n, m.weight.shape[1] * getattr(m, "groups", 1))
        if n in changed or n_in != m.weight.shape[1] * getattr(m, "groups", 1):
            _set_module(new, n, _new_layer(m, n_in, out[n]))
        if n in changed:
            for nl in g.norm_layers:
                _set_module(new, nl, _new_norm(mods[nl], out[n], nl))
                touched_norms[nl] = out[n]
    if init == "inherit" and changed:
        from . import norms as Nm

        gen = torch.Generator().manual_seed(seed)
        sd = {k: v.clone() for k, v in old_sd.items()}
        maps = {}
        done: set[str] = set()
        get = old_sd.__getitem__
        for n in sorted(changed):
            if n in done:
                continue
            members = sorted(ties.get(n, {n}) | {n})
            if any(out[m] != out[n] for m in members):
                raise UserError(f"{n}: layers tied by a residual add get different widths")
            vecs = torch.cat([Nm.channel_vectors(groups[m], get) for m in members], dim=1)
            M, S, info = _merge_maps(vecs, out[n])
            for m in members:
                maps[m] = (M, S)
                done.add(m)
        for n, (M, S) in maps.items():
            g = groups[n]
            keys = [g.in_key] + ([g.bias_key] if g.bias_key else [])
            for nl in g.norm_layers:
                keys += [k for k in old_sd if k.startswith(nl + ".") and old_sd[k].dim() == 1 and old_sd[k].shape[0] == g.channels]
            for k in keys:
                sd[k] = _rows(sd[k], M)
            if M.shape[0] > M.shape[1] and noise > 0:  # break the symmetry of duplicates
                w = sd[g.in_key]
                sd[g.in_key] = w + noise * w.std() * torch.randn(w.shape, generator=gen, dtype=w.dtype)
        col_done: set[str] = set()
        for dst, ps in preds.items():
            for src, sl in ps:
                if src in maps and dst not in col_done:
                    c_old = groups[src].channels
                    sd[sl.key] = _cols(sd[sl.key], maps[src][1], sl.mode, sl.positions, c_old)
                    col_done.add(dst)
        for k in list(sd):
            if k.endswith("num_batches_tracked"):
                continue
        missing, unexpected = new.load_state_dict(sd, strict=False)
        if unexpected:
            raise UserError(f"internal mismatch while inheriting weights: {unexpected[:3]}")
    return new


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """2 x multiply-accumulates of the conv / linear layers on one example (batch 1)."""
    total = 0
    hooks = []

    def hook(m, inp, outp):
        nonlocal total
        if isinstance(m, nn.modules.conv._ConvNd):
            k = int(torch.tensor(m.kernel_size).prod())
            total += 2 * outp[0].numel() * (m.in_channels // m.groups) * k
        elif isinstance(m, nn.Linear):
            total += 2 * (outp[0].numel() // m.out_features) * m.out_features * m.in_features

    for m in module.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module.eval()
            module(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return int(total)
