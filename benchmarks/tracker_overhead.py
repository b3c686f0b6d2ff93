"""Training-step time of a ResNet-style CNN on CPU with and without the width tracker.

    python benchmarks/tracker_overhead.py [--block 50] [--rounds 3] [--threads 1] [--batch 32]

Measured in one run, in interleaved rounds so that drifting machine load hits every
variant alike: no tracker (the peer), tracker every 50 steps, tracker every step.
Each round times one block of 50 steps per variant (so every block of the every-50
variant holds exactly one record point). Prints the best and median block time per
step and their ratios to no tracker, and the cost of one record point alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict

import torch
from torch import nn

from netanatomy.dynamics import WidthTracker


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return torch.relu(s + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def resnet(width=16):
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, width, 3, padding=1, bias=False), bn=nn.BatchNorm2d(width), act=nn.ReLU(),
        l1=Block(width, width), l2=Block(width, 2 * width, 2), l3=Block(2 * width, 4 * width, 2),
        l4=Block(4 * width, 4 * width), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4 * width, 10),
    ))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=50, help="steps per timed block (one every-50 record per block)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each times one block per variant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32)
    y = torch.randint(0, 10, (a.batch,))
    variants = {"no tracker": None, "tracker every 50 steps": 50, "tracker every step": 1}
    models, opts, trackers = {}, {}, {}
    for name, every in variants.items():
        torch.manual_seed(0)
        models[name] = resnet()
        opts[name] = torch.optim.SGD(models[name].parameters(), lr=0.01, momentum=0.9)
        trackers[name] = WidthTracker(models[name], every=every) if every else None
    lossf = nn.CrossEntropyLoss()

    def run(name, steps):
        m, opt, tr = models[name], opts[name], trackers[name]
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = lossf(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if tr is not None:
                tr.step()
        return (time.perf_counter() - t0) / steps

    for name in variants:  # warm-up (and aligns every tracker to a block boundary)
        run(name, a.block)
    per = {n: [] for n in variants}
    for _ in range(a.rounds):
        for name in variants:
            per[name].append(run(name, a.block))
    for tr in trackers.values():
        if tr is not None:
            tr.flush()
            assert tr.enabled, tr.disabled_reason
    # the cost of one record point alone (the least noisy number here)
    tr = trackers["tracker every step"]
    t0 = time.perf_counter()
    for _ in range(20):
        tr.compute_point()
    point = (time.perf_counter() - t0) / 20
    base_min, base_med = min(per["no tracker"]), statistics.median(per["no tracker"])
    n_params = sum(p.numel() for p in models["no tracker"].parameters())
    print(f"ResNet-style CNN ({n_params:,} parameters, {len(tr.groups)} tracked layers), batch {a.batch} of 3x32x32, "
          f"{a.threads} thread(s); {a.rounds} interleaved rounds of one {a.block}-step block per variant")
    print(f"{'variant':26s} {'best block ms/step':>19s} {'median ms/step':>15s} {'ratio (best)':>13s} {'ratio (median)':>15s}")
    for name in variants:
        b, md = min(per[name]), statistics.median(per[name])
        print(f"{name:26s} {1e3 * b:19.2f} {1e3 * md:15.2f} {b / base_min:13.4f} {md / base_med:15.4f}")
    print(f"one record point alone: {1e3 * point:.2f} ms = {point / base_min:.2%} of a step (best block); "
          f"expected overhead every step {point / base_min:.2%}, every 50 steps {point / base_min / 50:.3%}")


if __name__ == "__main__":
    main()
