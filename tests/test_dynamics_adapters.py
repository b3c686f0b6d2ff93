"""The Lightning and Hugging Face adapters run a few real training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from netanatomy.dynamics import WidthRecord


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning")
    from netanatomy.dynamics.lightning import WidthCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    torch.manual_seed(0)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cb = WidthCallback(every=2, out=str(tmp_path / "run"), attr="net")
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path / "logs"))
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", enable_checkpointing=True,
                        default_root_dir=str(tmp_path))
    model = Net()
    trainer.fit(model, loader)
    assert cb.tracker.enabled
    rec = WidthRecord.load(tmp_path / "run")
    fc = rec.curves[rec.curves.layer == "0"]
    assert fc.kind.tolist().count("epoch") == 3
    assert fc.kind.tolist().count("step") == 6  # 12 optimiser steps, every 2
    assert fc.sign_changed.iloc[-1] > 0
    # the last point equals a direct computation on the trained weights
    w0, w1 = model.net[0].weight.detach(), model.net[2].weight.detach()
    norms = w0.norm(dim=1) * w1.norm(dim=0)
    np.testing.assert_allclose(fc.iloc[-1]["norms"], norms.numpy(), rtol=1e-5)
    assert "train_loss" in set(rec.metrics.name)
    # scalars reached the framework's logger
    import glob

    text = open(glob.glob(str(tmp_path / "logs" / "**" / "metrics.csv"), recursive=True)[0]).read()
    assert "width/0/var_ratio" in text
    # resume from the Lightning checkpoint continues the curves
    ckpt = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)[0]
    cb2 = WidthCallback(every=2, out=str(tmp_path / "run2"), attr="net")
    trainer2 = L.Trainer(max_epochs=4, callbacks=[cb2], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer2.fit(Net(), loader, ckpt_path=ckpt)
    rec2 = WidthRecord.load(tmp_path / "run2")
    fc2 = rec2.curves[rec2.curves.layer == "0"]
    assert fc2.kind.tolist().count("epoch") == 4 and fc2.kind.tolist().count("init") == 1
    assert fc2.epoch.max() == 4


def test_hf_trainer_callback(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from netanatomy.dynamics.hf import WidthTrainerCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 12)
            self.fc2 = nn.Linear(12, 2)

        def forward(self, x, labels=None):
            logits = self.fc2(torch.relu(self.fc1(x)))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    class DS(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = _data()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=16, num_train_epochs=3,
                             learning_rate=0.1, logging_steps=2, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):  # stands in for a reporting integration (TensorBoard, W&B)
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs or {}))

    cb = WidthTrainerCallback(every=2)
    reporter = Reporter()
    model = Net()
    trainer = Trainer(model=model, args=args, train_dataset=DS(), callbacks=[reporter, cb])
    cb.attach_first(trainer)
    trainer.train()
    assert cb.tracker.enabled
    rec = WidthRecord.load(tmp_path / "hf" / "width")
    c = rec.curves[rec.curves.layer == "fc1"]
    assert c.kind.tolist().count("epoch") == 3
    assert c.kind.tolist().count("step") == 6
    norms = model.fc1.weight.detach().norm(dim=1) * model.fc2.weight.detach().norm(dim=0)
    np.testing.assert_allclose(c.iloc[-1]["norms"], norms.numpy(), rtol=1e-5)
    assert "loss" in set(rec.metrics.name)
    # the epoch scalars reached the reporting callback that runs after this one
    assert any("width/fc1/var_ratio" in h for h in reporter.seen)
