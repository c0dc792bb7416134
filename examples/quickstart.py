"""Two tasks in a plain PyTorch loop: fine-tuning forgets task A, EWC keeps it.

Each task is a synthetic 10-class problem whose signal lives in its own random subset of the 64
input features (like the pixels of a permuted MNIST digit); the other features are zero. Both
tasks share every weight of the network. Runs in seconds, offline.
"""

import torch
from torch import nn

import ewc

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


def batches(x, y, bs=64, shuffle=True):
    idx = torch.randperm(len(y)) if shuffle else torch.arange(len(y))
    for i in range(0, len(y), bs):
        j = idx[i : i + bs]
        yield x[j], y[j]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, x, y, reg=None, epochs=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(epochs):
        model.train()
        for xb, yb in batches(x, y):
            loss = nn.functional.cross_entropy(model(xb), yb)
            if reg is not None:
                loss = loss + reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()


task_a, task_b = make_task(), make_task()
for name, lam in [("fine-tuning", None), ("EWC", 100.0)]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 200), nn.ReLU(), nn.Linear(200, C))
    train(model, *task_a)
    reg = None
    if lam is not None:
        reg = ewc.EWC(model, lam=lam)
        reg.consolidate(batches(*task_a, bs=256, shuffle=False))  # sampled Fisher, eval mode
    acc_a_before = accuracy(model, *task_a)
    train(model, *task_b, reg=reg)
    print(
        f"{name:12s} task A: {acc_a_before:.3f} -> {accuracy(model, *task_a):.3f}   "
        f"task B: {accuracy(model, *task_b):.3f}"
    )
