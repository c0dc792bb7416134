"""Shared small problems and brute-force references (float64, per-sample loops)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

torch.set_default_dtype(torch.float64)


# --- Brute-force references -----------------------------------------------------------------
def _grads(model: nn.Module, scalar: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(scalar, params, allow_unused=True, retain_graph=True)
    return {
        n: (g if g is not None else torch.zeros_like(p))
        for n, g, p in zip(names, gs, params, strict=True)
    }


def draw_labels(probs: torch.Tensor, seed: int, mc: int) -> torch.Tensor:
    """Inverse-CDF draws, one sample at a time: (N, mc) labels from (N, C) probabilities."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(probs.shape[0] * mc, generator=g, dtype=torch.float64).tolist()
    labels = torch.empty(probs.shape[0], mc, dtype=torch.long)
    it = iter(u)
    for n in range(probs.shape[0]):
        cdf = probs[n].double().cumsum(0).tolist()
        for m in range(mc):
            x = next(it)
            c = next((i for i, v in enumerate(cdf) if v >= x), len(cdf) - 1)
            labels[n, m] = c
    return labels


def naive_fisher(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    kind: str,
    *,
    likelihood: str = "classification",
    sigma: float = 1.0,
    seed: int = 0,
    mc: int = 1,
) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n E_y[(∂ log p(y|x_n)/∂θ)²], one sample and one label at a time."""
    was = model.training
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    n_total = x.shape[0]
    if kind == "sampled" and likelihood == "classification":
        with torch.no_grad():
            probs = torch.softmax(model(x), -1)
        labels = draw_labels(probs, seed, mc)
    if kind == "sampled" and likelihood == "regression":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out_shape = model(x[:1]).shape[1:]
        u = torch.rand((n_total, 2, mc, *out_shape), generator=g, dtype=torch.float64)
        eps = torch.sqrt(-2 * torch.log1p(-u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])
    for n in range(n_total):
        z = model(x[n : n + 1])[0]
        terms: list[tuple[float, torch.Tensor]] = []  # (weight, log-likelihood)
        if likelihood == "classification":
            logp = torch.log_softmax(z, -1)
            if kind == "exact":
                p = logp.exp().detach()
                terms = [(float(p[c]), logp[c]) for c in range(z.shape[-1])]
            elif kind == "empirical":
                terms = [(1.0, logp[y[n]])]
            else:
                terms = [(1.0 / mc, logp[labels[n, m]]) for m in range(mc)]
        else:
            flat = z.reshape(-1)
            if kind == "exact":
                # E_y[(∂ log p/∂θ)²] = Σ_d (∂z_d/∂θ)² / σ²
                terms = [(1.0 / sigma**2, flat[d]) for d in range(flat.numel())]
            elif kind == "empirical":
                terms = [(1.0, -((flat - y[n].reshape(-1)) ** 2).sum() / (2 * sigma**2))]
            else:
                for m in range(mc):
                    target = (z + sigma * eps[n, m]).detach().reshape(-1)
                    terms.append((1.0 / mc, -((flat - target) ** 2).sum() / (2 * sigma**2)))
        for w, ll in terms:
            for k, g in _grads(model, ll).items():
                acc[k] += w * g.square()
    model.train(was)
    return {k: acc[k] / n_total for k in names}


def loader(x, y, batch_size):
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)
    ]


def assert_fisher_close(got, want, rtol=1e-9, atol=1e-12):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )


# --- Small models covering every layer rule and the fallback ----------------------------
class Scale(nn.Module):
    """A module with no closed-form rule (goes through the torch.func fallback)."""

    def __init__(self, n):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.alpha


class SeqLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6)
        self.b = nn.Linear(4 * 6, 3)

    def forward(self, x):  # (N, 4, 5)
        return self.b(torch.tanh(self.ln(self.a(x))).flatten(1))


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, dilation=1, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.c3 = nn.Conv2d(4, 2, 2, padding="same", bias=False)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):  # (N, 2, 7, 7)
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.tanh(self.gn(self.c2(h)))
        return self.fc(torch.sigmoid(self.c3(h)).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm1d(4)
        self.c2 = nn.Conv1d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 4, 3)

    def forward(self, x):  # (N, 3, 8)
        return self.fc(torch.tanh(self.c2(torch.relu(self.bn(self.c1(x))))).flatten(1))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.RMSNorm(4) if hasattr(nn, "RMSNorm") else nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, idx):  # (N, 5) ints with repeats
        return self.fc(torch.tanh(self.norm(self.emb(idx))).sum(1))


class FallbackNet(nn.Module):
    """Unsupported module, a layer called twice, tied weights and an in-place op."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.scale = Scale(5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied2 = nn.Linear(3, 3, bias=False)
        self.tied2.weight = self.tied.weight

    def forward(self, x):
        h = self.inp(x)
        h = torch.relu_(h)  # in-place on a layer output
        h = self.shared(torch.tanh(self.shared(self.scale(h))))
        z = self.out(h)
        return self.tied2(torch.tanh(self.tied(z)))


def _bn_stats(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model


def make_case(name: str, n: int = 12, seed: int = 0):
    """Return (model, x, y) for a named small problem."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
        x = torch.randn(n, 4)
    elif name == "seq_linear":
        model, x = SeqLinear(), torch.randn(n, 4, 5)
    elif name == "conv2d":
        model, x = Conv2dNet(), torch.randn(n, 2, 7, 7)
    elif name == "conv1d":
        model, x = Conv1dNet(), torch.randn(n, 3, 8)
    elif name == "embedding":
        model, x = EmbedNet(), torch.randint(0, 7, (n, 5))
    elif name == "fallback":
        model, x = FallbackNet(), torch.randn(n, 4)
    elif name == "transformer":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)

        class Enc(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = layer
                self.head = nn.Linear(8, 3)

            def forward(self, x):
                return self.head(self.layer(x).mean(1))

        model, x = Enc(), torch.randn(n, 4, 8)
    else:
        raise KeyError(name)
    _bn_stats(model)
    y = torch.randint(0, 3, (n,))
    return model.double(), x if not x.is_floating_point() else x.double(), y


CASES = ["mlp", "seq_linear", "conv2d", "conv1d", "embedding", "fallback", "transformer"]


@pytest.fixture(params=CASES)
def case(request):
    return request.param


# --- torch.distributed: worker processes on the gloo backend --------------------------------
def _gloo_entry(rank, world, port, outdir, worker, args, dtype, timeout):
    import datetime

    import torch.distributed as dist

    torch.set_default_dtype(dtype)  # as in the parent (float64 here): the same initialisation
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        worker(rank, outdir, *args)
    finally:
        dist.destroy_process_group()
    # A worker that passed leaves without interpreter finalisation. Where something keeps the
    # gloo group alive past destroy_process_group (importing torch.distributed.fsdp or
    # torch._dynamo does, with torch 2.13: the FSDP, Lightning and Hugging Face tests), a gloo
    # worker thread that drops a finished collective's tensors while the interpreter finalises
    # needs the GIL, exits the thread through C++ code and aborts the process ("terminate
    # called without an active exception", SIGABRT) at random. A failing worker raises instead,
    # so torch.multiprocessing.spawn reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(worker, world, outdir, *args, timeout=120):
    """Run ``worker(rank, outdir, *args)`` in ``world`` processes of one gloo process group.

    Skips the test when gloo or a loopback port is not available.
    """
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    except OSError as e:
        pytest.skip(f"cannot bind a local port: {e}")
    torch.multiprocessing.spawn(
        _gloo_entry,
        args=(world, port, str(outdir), worker, args, torch.get_default_dtype(), timeout),
        nprocs=world,
        join=True,
    )
