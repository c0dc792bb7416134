"""Two tasks with a Lightning Trainer: fine-tuning forgets task A, EWCCallback keeps it.

The problem of examples/quickstart.py (two synthetic 10-class tasks, each with its signal in its
own random subset of the 64 input features; the network shares every weight) trained by
``lightning.pytorch.Trainer``, one ``fit`` per task. ``EWCCallback`` consolidates each task at the
end of its fit (sampled Fisher over the fit's training dataloader) and adds the penalty's
gradient before every optimizer step. Runs in seconds, offline.
"""

import logging
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ewc.integrations.lightning import EWCCallback

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated")  # Lightning 2.6 with torch 2.13

# A tiny model: extra threads cost more than they save (several times more on a busy machine)
torch.set_num_threads(1)
torch.manual_seed(0)
D, C, N = 64, 10, 2000
K = 24  # active features per task


def make_task():
    active = torch.randperm(D)[:K]
    centers = torch.randn(C, K) * 0.8
    y = torch.randint(0, C, (N,))
    x = torch.zeros(N, D)
    x[:, active] = centers[y] + torch.randn(N, K)
    return x, y


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 200), nn.ReLU(), nn.Linear(200, C))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(x, y):
    g = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g)


def fit(model, x, y, callbacks):
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(x, y))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()  # Lightning 2.x keeps the modules' modes when a fit starts
    return acc


task_a, task_b = make_task(), make_task()
for name, lam in [("fine-tuning", None), ("EWC", 100.0)]:
    torch.manual_seed(1)
    model = Classifier()
    callbacks = [] if lam is None else [EWCCallback(lam=lam)]  # one callback for both tasks
    fit(model, *task_a, callbacks)  # with EWC: task A is consolidated as this fit ends
    acc_a_before = accuracy(model, *task_a)
    fit(model, *task_b, callbacks)  # with EWC: the penalty keeps task A's important weights
    print(
        f"{name:12s} task A: {acc_a_before:.3f} -> {accuracy(model, *task_a):.3f}   "
        f"task B: {accuracy(model, *task_b):.3f}"
    )
