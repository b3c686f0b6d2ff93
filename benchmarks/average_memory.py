"""Peak memory of averaging many checkpoints: netanatomy's streaming average
against the naive way (torch.load every checkpoint, then average).

Generates N random safetensors checkpoints of a ~1 GB fp32 model in a temporary
folder (deleted at the end), then measures, each in a fresh subprocess so the
peaks do not mix:

* streaming: ``netanatomy.synthesis.average`` over all N files (float64
  accumulation, output streamed to disk);
* naive: load every checkpoint fully (safetensors ``load_file``, i.e. what a
  ``torch.load`` of each does), accumulate in float64, save. Its memory grows with
  the number of checkpoints, so it runs on ``--naive-n`` of them (default 4) to
  stay inside this machine's RAM; its peak for N is extrapolated linearly and
  labelled so.

Both outputs are compared (same numbers). Peak RSS is each child's ``ru_maxrss``.
Timings are wall-clock on a shared machine: noisy; the memory numbers are what
this benchmark is about.

    python benchmarks/average_memory.py            # 20 checkpoints of ~1 GB
    python benchmarks/average_memory.py --quick    # 6 checkpoints of ~64 MB
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
import json, resource, sys, time
import torch
torch.set_num_threads(1)
mode, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
import safetensors.torch, netanatomy.synthesis  # imports count in the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if mode == "stream":
    from netanatomy.synthesis import average
    res = average(files, out)
    digest = res.sha256
else:
    from safetensors.torch import load_file, save_file
    states = [load_file(f) for f in files]          # every checkpoint in memory
    avg = {}
    for k in states[0]:
        acc = torch.zeros(states[0][k].shape, dtype=torch.float64)
        for s in states:
            acc += s[k].double()
        avg[k] = (acc / len(states)).to(states[0][k].dtype)
        del acc
    save_file(avg, out)
    digest = None
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "baseline": base, "work": peak - base, "seconds": dt, "sha": digest}))
"""


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def make_checkpoints(folder: Path, n: int, layers: int, dim: int) -> int:
    import torch

    from netanatomy.io import SafetensorsWriter

    entries = []
    for i in range(layers):
        entries += [(f"blocks.{i}.weight", torch.float32, (dim, dim)), (f"blocks.{i}.bias", torch.float32, (dim,))]
    entries.append(("num_batches_tracked", torch.int64, ()))
    size = 0
    g = torch.Generator().manual_seed(0)
    for j in range(n):
        with SafetensorsWriter(folder / f"ckpt{j:02d}.safetensors", entries, sidecar=False) as w:
            for name, dtype, shape in entries:
                t = torch.tensor(j, dtype=dtype) if dtype == torch.int64 else torch.randn(shape, generator=g)
                w.write(name, t)
        size = w.num_bytes
    return size


def measure(mode: str, out: Path, files: list[Path]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(out), *map(str, files)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="checkpoints for the streaming average")
    ap.add_argument("--naive-n", type=int, default=4, help="checkpoints for the naive average (RAM-bound)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=4096, help="16 x 4096^2 fp32 = 1.07 GB")
    ap.add_argument("--quick", action="store_true", help="6 checkpoints of 4 x 2048^2 (64 MB)")
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoints (default: system temp)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.naive_n, args.layers, args.dim = 6, 3, 4, 2048
    import torch

    import netanatomy.synthesis as syn  # noqa: F401  (fail early if missing)

    tmp = Path(tempfile.mkdtemp(prefix="netanatomy-avgbench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        size = make_checkpoints(tmp, args.n, args.layers, args.dim)
        print(f"model size: {gb(size)} (fp32, {args.layers} tensors of {args.dim}x{args.dim} + biases); "
              f"{args.n} checkpoints written in {time.perf_counter() - t0:.0f} s to {tmp}")
        files = sorted(tmp.glob("ckpt*.safetensors"))
        s = measure("stream", tmp / "stream.safetensors", files)
        print(f"python + torch after imports (baseline of every run): {gb(s['baseline'])}")
        print(f"streaming average of {args.n}: peak RSS {gb(s['peak_rss'])} = {s['peak_rss'] / size:.2f} x model size "
              f"(above baseline: {gb(s['work'])} = {s['work'] / size:.2f} x); {s['seconds']:.1f} s")
        s_small = measure("stream", tmp / "stream_small.safetensors", files[: args.naive_n])
        print(f"streaming average of {args.naive_n}: peak RSS {gb(s_small['peak_rss'])} = {s_small['peak_rss'] / size:.2f} x model size "
              f"(above baseline: {gb(s_small['work'])}); {s_small['seconds']:.1f} s")
        nv = measure("naive", tmp / "naive.safetensors", files[: args.naive_n])
        print(f"naive load-all average of {args.naive_n} (fewer checkpoints: RAM): peak RSS {gb(nv['peak_rss'])} = {nv['peak_rss'] / size:.2f} x model size "
              f"(above baseline: {gb(nv['work'])} = {nv['work'] / size:.2f} x); {nv['seconds']:.1f} s")
        from safetensors.torch import load_file

        a = load_file(tmp / "stream_small.safetensors")
        b = load_file(tmp / "naive.safetensors")
        same = all(torch.equal(a[k], b[k]) for k in b if b[k].is_floating_point())
        print(f"streaming and naive float tensors for {args.naive_n} checkpoints identical: {same} "
              f"(num_batches_tracked: naive averages it to {int(b['num_batches_tracked'])}, netanatomy takes the last, {int(a['num_batches_tracked'])})")
        per_ckpt = size  # each extra checkpoint the naive way holds is one more model in memory
        naive_n_est = nv["peak_rss"] + per_ckpt * (args.n - args.naive_n)
        print(f"naive peak for {args.n} checkpoints, extrapolated (not run): ~{gb(naive_n_est)}")
        print(f"ratio naive/streaming peak RSS: {nv['peak_rss'] / s_small['peak_rss']:.1f}x at {args.naive_n} checkpoints (measured), "
              f"~{naive_n_est / s['peak_rss']:.0f}x at {args.n} (extrapolated)")
        print(f"streaming peak <= 2 x model size: {s['peak_rss'] <= 2 * size} (total RSS); "
              f"{s['work'] <= 2 * size} (above the interpreter's baseline)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")


if __name__ == "__main__":
    main()
