"""Peak memory of analysing a sharded safetensors checkpoint.

Writes a sharded checkpoint (default 12 x 4096x4096 float32 = 768 MiB in 4 shards)
to a temporary folder, then measures in fresh subprocesses:

  * baseline : python + torch + netanatomy imported, nothing loaded
  * ours     : netanatomy.load(folder) + the `stats` analysis over every layer
  * naive    : safetensors.torch.load_file on every shard (the whole model in RAM)

    python benchmarks/sharded_memory.py [--layers 12] [--dim 4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = {
    "baseline": """
        import torch, netanatomy
    """,
    "ours": """
        import netanatomy
        m = netanatomy.load(FOLDER)
        (res,) = [r for _, r in netanatomy.run_analyses(m, ["stats"])]
        assert len(res.ok_records) == len(m.layers), res.errors
    """,
    "naive": """
        import glob
        from safetensors.torch import load_file
        tensors = {}
        for f in sorted(glob.glob(FOLDER + "/*.safetensors")):
            tensors.update(load_file(f))
        total = sum(float(t.float().std()) for t in tensors.values())
    """,
}


def peak_rss_mib(code: str, folder: str) -> float:
    src = f"FOLDER = {folder!r}\n" + textwrap.dedent(code) + textwrap.dedent("""
        import resource, json
        print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    """)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per = -(-args.layers // args.shards)
        weight_map = {}
        g = torch.Generator().manual_seed(0)
        for s in range(args.shards):
            part = {}
            for i in range(s * per, min(args.layers, (s + 1) * per)):
                part[f"blocks.{i}.proj.weight"] = torch.randn(args.dim, args.dim, generator=g)
            name = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
            save_file(part, str(folder / name))
            weight_map.update({k: name for k in part})
            del part
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        model_mib = args.layers * args.dim * args.dim * 4 / 2**20
        largest_mib = args.dim * args.dim * 4 / 2**20
        base = peak_rss_mib(CHILD["baseline"], str(folder))
        ours = peak_rss_mib(CHILD["ours"], str(folder))
        naive = peak_rss_mib(CHILD["naive"], str(folder))
    print(f"model size            {model_mib:8.0f} MiB in {args.shards} shards ({args.layers} tensors)")
    print(f"largest tensor        {largest_mib:8.0f} MiB")
    print(f"baseline (imports)    {base:8.0f} MiB peak RSS")
    print(f"netanatomy stats      {ours:8.0f} MiB peak RSS  (+{ours - base:.0f} MiB over baseline = {(ours - base) / largest_mib:.1f}x the largest tensor)")
    print(f"naive load_file all   {naive:8.0f} MiB peak RSS  (+{naive - base:.0f} MiB over baseline = {(naive - base) / model_mib:.2f}x the model)")
    print(f"ratio naive/ours (over baseline): {(naive - base) / max(ours - base, 1):.1f}x")


if __name__ == "__main__":
    main()
