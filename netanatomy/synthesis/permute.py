"""Permutation alignment by weight matching (Ainsworth et al. 2023, "Git Re-Basin").

Hidden units can be reordered without changing what a network computes: permute
a layer's output units (rows of its weight, its bias, the following norm's
parameters and statistics) and the next layer's input units the same way. Two
independently trained networks are usually far apart in weight space only
because of such an arbitrary order; aligning one to the other before averaging
or interpolating removes that.

**Which axes move together** is a :class:`PermutationSpec`. :func:`spec_from_module`
derives it from the package's ``torch.fx`` trace of the module
(:func:`netanatomy.io.trace.trace`), building the *channel spaces* of
:mod:`netanatomy.channels` with its :class:`~netanatomy.channels.ChannelUnion`
at the finer grain alignment needs (tensor layouts, flattened blocks): every
conv / linear output opens a channel space; norms, activations, dropout and pooling keep it;
``add`` / ``sub`` / ``mul`` of two tensors merge the spaces of their operands
(so a residual stream is one space with one permutation, shared by every block
that writes to it); a flatten from ``(N, C, H, W)`` into a linear layer moves
groups of ``H*W`` inputs with each channel. Spaces that reach the network's
input or output, or pass through anything not understood (``cat``, indexing,
attention, grouped convs, unknown modules), are *fixed*: never permuted. A
fixed space can cost alignment quality but never correctness.

**Weight matching** (:func:`weight_matching`) maximises
``sum_l <W_l^A, P_l W_l^B P_{l-1}^T>`` by coordinate ascent: for one permutation at
a time, with the others held, the best choice is a linear assignment problem
(``scipy.optimize.linear_sum_assignment``) on ``sum over its axes of
W^A (W^B)^T``; sweep over the permutations in random order until a whole sweep
improves nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..channels import ChannelUnion
from ..errors import UserError
from ..io.trace import TraceError, trace
from .chain import infer_chain
from .spec import PermutationSpec


# ---------------------------------------------------------------------------
# spec from a module


_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)
_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POINTWISE_FUNCS = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "celu",
    "hardswish", "hardsigmoid", "hardtanh", "mish", "softplus", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "alpha_dropout", "contiguous", "clone", "max_pool1d", "max_pool2d", "max_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "neg", "abs", "detach", "float", "to", "type_as",
}
_BINARY = {"add", "sub", "mul", "iadd", "isub", "imul", "add_", "sub_", "mul_"}
_SCALAR_ONLY = {"truediv", "div", "floordiv", "pow"}  # fine when the other operand is a number
_SIZE_FUNCS = {"size", "dim", "numel"}
_SPATIAL_REDUCE = {"mean", "sum", "amax", "amin"}


@dataclass
class _Val:
    sid: int
    layout: str  # "nc" (features last of 2-D), "nchw" (channels at dim 1 of a map), "flat" (C*H*W flattened)


def spec_from_module(module: nn.Module) -> PermutationSpec:
    """Derive the permutation spec of ``module`` from a ``torch.fx`` trace."""
    try:
        graph = trace(module)
    except TraceError as exc:
        raise UserError(
            f"cannot trace {type(module).__name__} with torch.fx ({type(exc.exc).__name__}); "
            "build a PermutationSpec by hand for it"
        ) from None
    mods = dict(module.named_modules())
    params = {k: v for k, v in module.state_dict().items()}
    uf = ChannelUnion()
    vals: dict[fx.Node, _Val | None] = {}
    bindings: list[tuple[int, str, int, str]] = []  # (sid, key, axis, kind: out/in/norm)

    def tensor_args(node) -> list[_Val]:
        found: list[_Val] = []

        def visit(a):
            if isinstance(a, fx.Node):
                v = vals.get(a)
                if v is not None:
                    found.append(v)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return found

    def opaque(node, label: str) -> _Val:
        for v in tensor_args(node):
            uf.fix(v.sid)
        return _Val(uf.new(None, label, fixed=True), "nchw")

    def has(key: str) -> bool:
        return key in params

    for node in graph.nodes:
        op = node.op
        if op == "placeholder":
            vals[node] = _Val(uf.new(None, "input", fixed=True), "nchw")
            continue
        if op == "output":
            for v in tensor_args(node):
                uf.fix(v.sid)
            continue
        if op == "get_attr":
            vals[node] = _Val(uf.new(None, f"attribute {node.target}", fixed=True), "nchw")
            continue
        args = tensor_args(node)
        if op == "call_module":
            m = mods[node.target]
            name = node.target
            x = args[0] if args else None
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and x is not None and len(args) == 1:
                is_conv = not isinstance(m, nn.Linear)
                n_in = m.in_channels if is_conv else m.in_features
                n_out = m.out_channels if is_conv else m.out_features
                groups = getattr(m, "groups", 1)
                if is_conv and groups > 1:
                    if groups == n_in == n_out:  # depthwise: output channel i reads input channel i only
                        bindings.append((x.sid, f"{name}.weight", 0, "out"))
                        if has(f"{name}.bias"):
                            bindings.append((x.sid, f"{name}.bias", 0, "out"))
                        vals[node] = _Val(x.sid, "nchw")
                    else:
                        vals[node] = opaque(node, f"grouped conv {name}")
                    continue
                in_size = uf.size[uf.find(x.sid)]
                if in_size is None and not uf.fixed[uf.find(x.sid)]:
                    uf.size[uf.find(x.sid)] = in_size = n_in
                if in_size is not None and in_size != n_in:
                    if not is_conv and x.layout == "flat" and n_in % in_size == 0:
                        bindings.append((x.sid, f"{name}.weight", 1, f"in:{n_in // in_size}"))
                    else:
                        uf.fix(x.sid)
                elif in_size is not None:
                    bindings.append((x.sid, f"{name}.weight", 1, "in:1"))
                out = uf.new(n_out, name)
                bindings.append((out, f"{name}.weight", 0, "out"))
                if has(f"{name}.bias"):
                    bindings.append((out, f"{name}.bias", 0, "out"))
                vals[node] = _Val(out, "nchw" if is_conv else "nc")
                continue
            if x is not None and len(args) == 1 and _norm_ok(m, x, uf):
                for leaf in ("weight", "bias", "running_mean", "running_var"):
                    if has(f"{name}.{leaf}"):
                        bindings.append((x.sid, f"{name}.{leaf}", 0, "norm" if leaf in ("weight", "bias") else "stat"))
                vals[node] = x
                continue
            if isinstance(m, _POINTWISE_MODULES) and x is not None and len(args) == 1:
                vals[node] = x
                continue
            if isinstance(m, _GLOBAL_POOL_MODULES) and x is not None and len(args) == 1:
                vals[node] = x
                continue
            if isinstance(m, nn.Flatten) and x is not None and m.start_dim in (1, -3):
                vals[node] = _Val(x.sid, "flat" if x.layout == "nchw" else x.layout)
                continue
            vals[node] = opaque(node, f"module {name} ({type(m).__name__})")
            continue
        # call_function / call_method
        target = node.target
        fname = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if fname in _SIZE_FUNCS or fname == "getattr" or (fname == "getitem" and not args):
            vals[node] = None
            continue
        if not args:
            vals[node] = None  # arithmetic on sizes
            continue
        if target in (operator.add, operator.sub, operator.mul, operator.iadd, torch.add, torch.sub, torch.mul) or fname in _BINARY:
            sid = args[0].sid
            layouts = {a.layout for a in args}
            for a in args[1:]:
                sid = uf.union(sid, a.sid)
            if len(layouts) > 1:
                uf.fix(sid)
            vals[node] = _Val(uf.find(sid), args[0].layout)
            continue
        if (fname in _POINTWISE_FUNCS or fname in _SCALAR_ONLY or target in (operator.truediv, operator.neg)) and len(args) == 1:
            vals[node] = args[0]
            continue
        if fname == "flatten" and len(args) == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start == 1:
                vals[node] = _Val(args[0].sid, "flat" if args[0].layout == "nchw" else args[0].layout)
                continue
        if fname in ("view", "reshape") and len(args) == 1 and len(node.args) == 3 and node.args[2] == -1:
            vals[node] = _Val(args[0].sid, "flat" if args[0].layout == "nchw" else args[0].layout)
            continue
        if fname in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d") and len(args) == 1:
            vals[node] = args[0]
            continue
        if fname in _SPATIAL_REDUCE and len(args) == 1 and args[0].layout == "nchw":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) and d not in (0, 1) for d in dims):
                keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
                vals[node] = _Val(args[0].sid, "nchw" if keep else "nc")
                continue
        vals[node] = opaque(node, f"operation {fname}")

    groups: dict[int, list[tuple[str, int, int]]] = {}
    cost: set[str] = set()
    fixed_desc: set[str] = set()
    for sid, key, axis, kind in bindings:
        r = uf.find(sid)
        if uf.fixed[r]:
            fixed_desc.add(uf.label[r])
            continue
        inner = int(kind.split(":")[1]) if kind.startswith("in:") else 1
        groups.setdefault(r, []).append((key, axis, inner))
        if kind != "stat":
            cost.add(key)
    sizes, axes = {}, {}
    for r, items in groups.items():
        name = uf.label[r]
        if name in sizes:
            name = f"{name}#{r}"
        sizes[name] = int(uf.size[r])
        axes[name] = items
    return PermutationSpec(sizes, axes, cost, sorted(fixed_desc))


def _norm_ok(m: nn.Module, x: _Val, uf: ChannelUnion) -> bool:
    """Norm layers whose output stays equivariant when channels are permuted."""
    n = uf.size[uf.find(x.sid)]
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return n is None or m.num_features == n
    if isinstance(m, nn.LayerNorm):
        return x.layout == "nc" and len(m.normalized_shape) == 1 and (n is None or m.normalized_shape[0] == n)
    if isinstance(m, nn.GroupNorm):
        return m.num_groups in (1, m.num_channels) and x.layout == "nchw"
    return False


# ---------------------------------------------------------------------------
# applying and finding permutations


def _block_index(perm: torch.Tensor, inner: int) -> torch.Tensor:
    if inner == 1:
        return perm
    return (perm[:, None] * inner + torch.arange(inner)).reshape(-1)


def permute_axis(t: torch.Tensor, axis: int, perm: torch.Tensor, inner: int = 1) -> torch.Tensor:
    return t.index_select(axis, _block_index(perm.to(torch.long), inner))


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with unit ``i`` of every permuted axis taken from ``perm[i]``."""
    spec.check(state)
    out = {}
    ka = spec.key_axes()
    for key, t in state.items():
        for axis, p, inner in ka.get(key, ()):
            t = permute_axis(t, axis, perms[p], inner)
        out[key] = t
    return out


def random_permutations(spec: PermutationSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}


def invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


def _rows(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(n, -1)


def matching_objective(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``sum over cost tensors of <a, b>`` (float64): what weight matching maximises."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in spec.cost_keys))


@dataclass
class AlignResult:
    perms: dict[str, torch.Tensor]
    aligned: dict[str, torch.Tensor]
    sweeps: int
    objective_before: float
    objective_after: float
    distance_before: float
    distance_after: float
    spec: PermutationSpec

    def summary(self) -> dict:
        moved = {p: int((v != torch.arange(len(v))).sum()) for p, v in self.perms.items()}
        return {
            "permutations": len(self.perms),
            "units_moved": sum(moved.values()),
            "units": sum(len(v) for v in self.perms.values()),
            "sweeps": self.sweeps,
            "objective_before": self.objective_before,
            "objective_after": self.objective_after,
            "l2_distance_before": self.distance_before,
            "l2_distance_after": self.distance_after,
            "fixed_spaces": self.spec.fixed,
        }


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations of ``b``'s units that best match ``a`` (coordinate ascent).

    Returns ``(perms, sweeps)``; ``apply_permutation(spec, perms, b)`` is ``b``
    aligned to ``a``.
    """
    from scipy.optimize import linear_sum_assignment

    from .._util import default_device

    spec.check(a, "model A")
    spec.check(b, "model B")
    dev = torch.device(device) if device is not None else default_device()
    A = {k: a[k].detach().to(dev, torch.float64) for k in spec.cost_keys}
    B = {k: b[k].detach().to(dev, torch.float64) for k in spec.cost_keys}
    for what, tensors in (("model A", A), ("model B", B)):
        for k in sorted(tensors):
            if not bool(torch.isfinite(tensors[k]).all()):
                raise UserError(f"{what}: {k!r} holds NaN/Inf values; cannot match weights")
    ka = spec.key_axes()
    perms = {p: torch.arange(n, device=dev) for p, n in spec.sizes.items()}
    names = sorted(spec.sizes)
    rng = np.random.default_rng(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        progress = False
        for idx in rng.permutation(len(names)):
            p = names[idx]
            n = spec.sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64, device=dev)
            for key, axis, inner in spec.axes[p]:
                if key not in spec.cost_keys:
                    continue
                wb = B[key]
                for ax2, q, inner2 in ka[key]:
                    if q == p and ax2 == axis:
                        continue
                    wb = permute_axis(wb, ax2, perms[q], inner2)
                cost += _rows(A[key], axis, n) @ _rows(wb, axis, n).T
            _, col = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
            col_t = torch.as_tensor(col, device=dev)
            ar = torch.arange(n, device=dev)
            old = float(cost[ar, perms[p]].sum())
            new = float(cost[ar, col_t].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[p] = col_t
                progress = True
        if not progress:
            break
    return {p: v.cpu() for p, v in perms.items()}, sweeps


def align(
    reference: Mapping[str, torch.Tensor] | nn.Module | str,
    other: Mapping[str, torch.Tensor] | nn.Module | str,
    spec: PermutationSpec | nn.Module | None = None,
    **kw,
) -> AlignResult:
    """Align ``other`` to ``reference`` by weight matching.

    ``spec`` is a :class:`PermutationSpec`, a module of the architecture (traced
    with fx), a :class:`netanatomy.Model` loaded from a module, or None: then
    the spec is inferred from ``reference``'s weights as a plain sequential
    chain (:mod:`netanatomy.synthesis.chain`), and anything that cannot be told
    apart from a chain is refused with a :class:`UserError`.
    """
    from ..io import open_store

    ra, rb = open_store(reference, "model A"), open_store(other, "model B")
    if spec is None and isinstance(reference, nn.Module):
        spec = reference
    elif spec is None and isinstance(other, nn.Module):
        spec = other
    if spec is not None and not isinstance(spec, (PermutationSpec, nn.Module)):
        module = getattr(spec, "module", None)  # a netanatomy Model
        if isinstance(module, nn.Module):
            spec = module
        elif hasattr(spec, "layers"):
            spec = None  # a Model read from a file: its weights are what the chain inference reads
        else:
            raise UserError(f"spec must be a PermutationSpec, an nn.Module or None, not {type(spec).__name__}")
    if isinstance(spec, nn.Module):
        spec = spec_from_module(spec)
    elif spec is None:
        spec = infer_chain(ra)[1]
    a = {k: ra.get(k) for k in ra.keys()}
    b = {k: rb.get(k) for k in rb.keys()}
    if not spec.sizes:
        raise UserError("nothing to align: the architecture has no permutable hidden units" + (f" (fixed: {', '.join(spec.fixed[:3])})" if spec.fixed else ""))
    perms, sweeps = weight_matching(spec, a, b, **kw)
    aligned = apply_permutation(spec, perms, b)
    return AlignResult(
        perms=perms,
        aligned=aligned,
        sweeps=sweeps,
        objective_before=matching_objective(spec, a, b),
        objective_after=matching_objective(spec, a, aligned),
        distance_before=_dist(a, b),
        distance_after=_dist(a, aligned),
        spec=spec,
    )


def _dist(a, b) -> float:
    s = 0.0
    for k in a:
        if k in b and a[k].is_floating_point():
            s += float(((a[k].double() - b[k].double()) ** 2).sum())
    return s**0.5
