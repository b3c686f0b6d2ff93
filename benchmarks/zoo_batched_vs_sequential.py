"""Zoo training throughput: K nets stacked in one grouped-convolution model
(netanatomy.zoo.train.train_stack) versus the same K nets trained one after the
other as plain nn.Modules with torch.optim (train_sequential), in one run, on
one thread, on Fashion-MNIST.

    python benchmarks/zoo_batched_vs_sequential.py [--nets 16] [--steps 40] [--repeats 1]

Prints nets/second for both and the ratio. Both paths do the same work: the same
hyper-parameters, mini-batches, dropout masks and step count, and the same
evaluation (epoch 0 and after each epoch) on the same images. On a shared
machine the absolute numbers are noisy; the ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from netanatomy.zoo.train import ZooConfig, load_data, sample_hparams, train_sequential, train_stack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", type=int, default=16, help="nets per group (one activation / optimiser)")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per epoch")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-test", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ZooConfig(nets=args.nets * 6, epochs=args.epochs, steps_per_epoch=args.steps, eval_test=args.eval_test,
                    eval_train=200)
    data = load_data()
    # one combination (relu + adam): net indices 1, 7, 13, ... share it
    combos = len(cfg.activations) * len(cfg.optimizers)
    hps = [sample_hparams(cfg, 1 + combos * i) for i in range(args.nets)]
    assert len({(h["activation"], h["optimizer"]) for h in hps}) == 1
    best_b, best_s = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        snaps, _ = train_stack(hps, cfg, data)
        best_b = min(best_b, time.perf_counter() - t0)
        t0 = time.perf_counter()
        seq = [train_sequential(hp, cfg, data)[0] for hp in hps]
        best_s = min(best_s, time.perf_counter() - t0)
    diffs = [max(float((snaps[-1][k][n] - seq[k][-1][n]).abs().max()) for n in seq[k][-1]) for k in range(len(hps))]
    agree = sum(d < 1e-4 for d in diffs)
    print(f"{args.nets} nets x {args.epochs * args.steps} steps (batch {cfg.batch_size}), {args.eval_test} test images, 1 thread")
    print(f"batched (grouped conv): {best_b:8.2f} s  {args.nets / best_b:7.3f} nets/s")
    print(f"sequential (nn.Module): {best_s:8.2f} s  {args.nets / best_s:7.3f} nets/s")
    print(f"speed-up batched / sequential: {best_s / best_b:.2f}x")
    print(f"final weights agree within 1e-4 for {agree}/{len(hps)} nets (max |difference| {max(diffs):.2e}; Adam with a "
          "tiny init amplifies rounding differences, see tests/test_zoo.py)")


if __name__ == "__main__":
    main()
