"""Peak memory of merging: netanatomy's streaming TIES / task arithmetic against
the naive way (load the base and every member, then merge).

Generates a base and ``--members`` fine-tuned-looking members (base plus noise)
of ``--layers`` fp32 tensors of ``--dim`` x ``--dim`` as safetensors files in a
temporary folder (deleted at the end), then measures, each in a fresh
subprocess so the peaks do not mix:

* streaming TIES: ``netanatomy.synthesis.ties(base, members, density)`` written
  to disk (tensor by tensor, float64, each member read twice per tensor), and
  again with one member only, to see that the peak does not grow with members;
* streaming task arithmetic: ``netanatomy.synthesis.task_arithmetic``;
* naive TIES: every file loaded fully (safetensors ``load_file``), then per key
  the task vectors stacked in float64, trimmed, sign-elected and averaged over
  the agreeing members, the result saved with ``save_file``.

The streaming and naive TIES outputs are compared. Peak RSS is each child's
``ru_maxrss``. Timings are wall-clock on a shared machine: noisy; the memory
numbers are what this benchmark is about.

    python benchmarks/merge_memory.py            # base + 3 members of 8 x 2048^2 fp32 (134 MB each)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, math, resource, sys, time
import torch
torch.set_num_threads(1)
mode, density, out, base, members = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
import safetensors.torch, netanatomy.synthesis  # imports count in the baseline
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if mode == "ties":
    digest = netanatomy.synthesis.ties(base, members, density, out=out).sha256
elif mode == "task_arithmetic":
    digest = netanatomy.synthesis.task_arithmetic(base, members, out=out).sha256
else:
    from safetensors.torch import load_file, save_file
    b = load_file(base)
    ms = [load_file(m) for m in members]            # every model in memory
    merged = {}
    for k in b:
        base64 = b[k].double()
        taus = torch.stack([m[k].double() - base64 for m in ms]).reshape(len(ms), -1)
        n = taus.shape[1]
        keep = max(1, math.ceil(round(density * n, 6)))
        cut = taus.abs().kthvalue(n - keep + 1, dim=1, keepdim=True).values
        mask = taus.abs() > cut
        for r in range(len(ms)):  # equal magnitudes at the cut: first by position, as netanatomy does
            short = keep - int(mask[r].sum())
            if short > 0:
                mask[r, (taus[r].abs() == cut[r]).nonzero().squeeze(1)[:short]] = True
        taus = taus * mask
        elect = torch.sign(taus.sum(0))
        agree = (torch.sign(taus) == elect) & (taus != 0)
        mean = (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
        merged[k] = (base64 + mean.reshape(base64.shape)).to(b[k].dtype)
        del base64, taus, cut, mask, elect, agree, mean
    save_file(merged, out)
    digest = None
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "baseline": start, "work": peak - start, "seconds": dt, "sha": digest}))
"""


def mb(x: float) -> str:
    return f"{x / 1e6:.0f} MB"


GENERATE = r"""
import sys
import torch
from netanatomy.io import SafetensorsWriter
folder, members, layers, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
entries = [(f"blocks.{i}.weight", torch.float32, (dim, dim)) for i in range(layers)]
g = torch.Generator().manual_seed(0)
paths = [f"{folder}/base.safetensors"] + [f"{folder}/member{j}.safetensors" for j in range(members)]
writers = [SafetensorsWriter(p, entries, sidecar=False) for p in paths]
for w in writers:
    w.__enter__()
for name, _, shape in entries:  # one tensor of each model in memory at a time
    base = torch.randn(shape, generator=g)
    writers[0].write(name, base)
    for w in writers[1:]:
        w.write(name, base + 0.01 * torch.randn(shape, generator=g))
for w in writers:
    w.__exit__(None, None, None)
print(writers[0].num_bytes)
"""


def make_models(folder: Path, members: int, layers: int, dim: int) -> tuple[Path, list[Path], int]:
    """Written by a child process: Linux carries a parent's peak RSS into the ``ru_maxrss``
    of the children it starts, so the parent stays small (no torch) until the end."""
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(folder), str(members), str(layers), str(dim)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"generating the models failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    size = int(proc.stdout.strip().splitlines()[-1])
    return folder / "base.safetensors", [folder / f"member{j}.safetensors" for j in range(members)], size


def measure(mode: str, density: float, out: Path, base: Path, members: list[Path]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", CHILD, mode, str(density), str(out), str(base), *map(str, members)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048, help="8 x 2048^2 fp32 = 134 MB per model")
    ap.add_argument("--density", type=float, default=0.5, help="TIES: fraction of each task vector kept")
    ap.add_argument("--dir", default=None, help="where to put the temporary models (default: system temp)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="netanatomy-mergebench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        base, members, size = make_models(tmp, args.members, args.layers, args.dim)
        n_in = 1 + args.members
        print(f"model size: {mb(size)} (fp32, {args.layers} tensors of {args.dim}x{args.dim}); base + {args.members} members "
              f"({mb(n_in * size)} of inputs) written in {time.perf_counter() - t0:.0f} s to {tmp}")
        one = 4 * args.dim * args.dim
        s = measure("ties", args.density, tmp / "ties.safetensors", base, members)
        print(f"python + torch after imports (baseline of every run): {mb(s['baseline'])}")
        print(f"streaming TIES (density {args.density}): peak RSS {mb(s['peak_rss'])} (above baseline: {mb(s['work'])} = "
              f"{s['work'] / size:.2f} x model size = {s['work'] / one:.1f} x one fp32 tensor); {s['seconds']:.1f} s")
        s1 = measure("ties", args.density, tmp / "ties1.safetensors", base, members[:1])
        print(f"streaming TIES of the base and 1 member (the peak should not depend on the number of members): "
              f"peak RSS {mb(s1['peak_rss'])} (above baseline: {mb(s1['work'])}); {s1['seconds']:.1f} s")
        ta = measure("task_arithmetic", args.density, tmp / "ta.safetensors", base, members)
        print(f"streaming task arithmetic: peak RSS {mb(ta['peak_rss'])} (above baseline: {mb(ta['work'])} = "
              f"{ta['work'] / size:.2f} x model size = {ta['work'] / one:.1f} x one fp32 tensor); {ta['seconds']:.1f} s")
        nv = measure("naive", args.density, tmp / "naive.safetensors", base, members)
        print(f"naive load-all TIES: peak RSS {mb(nv['peak_rss'])} (above baseline: {mb(nv['work'])} = "
              f"{nv['work'] / size:.2f} x model size); {nv['seconds']:.1f} s")
        import torch  # only now: the parent's own peak must not reach the children's ru_maxrss
        from safetensors.torch import load_file

        a, b = load_file(tmp / "ties.safetensors"), load_file(tmp / "naive.safetensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in b)
        same = sum(torch.equal(a[k], b[k]) for k in b)
        print(f"streaming and naive TIES: {same}/{len(b)} tensors bit-identical, max |difference| {diff:.3g}")
        print(f"ratio naive/streaming TIES peak RSS: {nv['peak_rss'] / s['peak_rss']:.2f}x (total); "
              f"{nv['work'] / s['work']:.2f}x (above baseline)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")


if __name__ == "__main__":
    main()
