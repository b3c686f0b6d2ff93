"""Training-step time of a ResNet-style CNN on CPU with and without the width tracker.

    python benchmarks/tracker_overhead.py [--steps 150] [--threads 1] [--batch 64]

Measured in one run, interleaved in rounds so that drifting machine load hits every
variant alike: no tracker (the peer), tracker every 50 steps, tracker every step.
Prints the median step time of each and the overhead ratio against no tracker.
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
    ap.add_argument("--steps", type=int, default=150, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
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
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = lossf(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if tr is not None:
                tr.step()
            times.append(time.perf_counter() - t0)
        return times

    for name in variants:  # warm-up
        run(name, 10)
    per = {n: [] for n in variants}
    for _ in range(a.rounds):
        for name in variants:
            per[name] += run(name, a.steps)
    for tr in trackers.values():
        if tr is not None:
            tr.flush()
            assert tr.enabled, tr.disabled_reason
    # the cost of one record point, alone
    tr = trackers["tracker every step"]
    t0 = time.perf_counter()
    for _ in range(50):
        tr.compute_point()
    point_ms = (time.perf_counter() - t0) / 50 * 1e3
    base = statistics.median(per["no tracker"])
    mean_base = statistics.fmean(per["no tracker"])
    n_params = sum(p.numel() for p in models["no tracker"].parameters())
    print(f"ResNet-style CNN ({n_params:,} parameters, {len(tr.groups)} tracked layers), batch {a.batch} of 3x32x32, "
          f"{a.threads} thread(s), {a.rounds} rounds x {a.steps} steps per variant, interleaved")
    print(f"{'variant':26s} {'median ms/step':>15s} {'mean ms/step':>13s} {'ratio (median)':>15s} {'ratio (mean)':>13s}")
    for name in variants:
        med, mean = statistics.median(per[name]), statistics.fmean(per[name])
        print(f"{name:26s} {1e3 * med:15.2f} {1e3 * mean:13.2f} {med / base:15.4f} {mean / mean_base:13.4f}")
    print(f"one record point (all layers' coupled norms, variances, sign changes): {point_ms:.2f} ms "
          f"= {point_ms / (1e3 * base):.1%} of a step; at every 50 steps that is "
          f"{point_ms / (1e3 * base) / 50:.2%} per step")


if __name__ == "__main__":
    main()
