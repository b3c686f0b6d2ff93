"""Train the built-in demo CNN on Fashion-MNIST and write its weights into the package.

    python scripts/train_demo.py            # 3 epochs; demo_cnn.json records accuracy and time

Writes netanatomy/data/demo_cnn.safetensors and demo_cnn.json (accuracy, recipe).
Needs Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from netanatomy.datasets import fashion_mnist, normalize_images
from netanatomy.demo import DemoCNN, INFO, WEIGHTS


def evaluate(net, x, y, batch=1000):
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "netanatomy" / "data")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    xtr, xte = normalize_images(xtr), normalize_images(xte)
    net = DemoCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * (len(xtr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        for i in range(len(xtr) // args.batch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            xb = xtr[idx]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)  # horizontal flips keep up/down structure intact
            loss = F.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {evaluate(net, xte, yte):.4f}, {time.time() - t0:.0f}s")
    acc = evaluate(net, xte, yte)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(args.out / WEIGHTS), metadata={"dataset": "fashion-mnist", "test_accuracy": f"{acc:.4f}"})
    info = {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "test_accuracy": acc,
        "epochs": args.epochs,
        "optimizer": f"AdamW lr {args.lr} one-cycle, weight decay 5e-4, batch {args.batch}",
        "seed": args.seed,
        "seconds": round(time.time() - t0, 1),
        "command": "python scripts/train_demo.py",
    }
    (args.out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
