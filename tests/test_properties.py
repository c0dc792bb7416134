"""Property suite: small models built from the parts real code is made of, every result against a
naive per-sample loop in float64.

Each case is data (a factory with an id); every case runs with batches whose size equals the
sequence length (``N == T``) and differs from it, in both orders within one estimate, for every
kind. The parts: batch-first and sequence-first linear layers, attention and encoder layers;
position tables broadcast (``wpe(arange(T))``), expanded (``wpe(arange(T)[None])``), gathered by
per-sample position ids, and expanded then indexed or reduced over the batch; module-tied and
functionally tied output heads; forward hooks and pre-hooks; activations with parameters
(``nn.PReLU``, a learnable slope); layers under ``torch.no_grad()`` and frozen layers; a shared
``(T, T)`` mask that is not per sample; and half-precision models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import ewc

D, T, V = 4, 5, 3  # width, sequence length, vocabulary (= classes, so a head can be tied)


class LearnedSlope(nn.Module):
    """An activation with a parameter and no closed form (the module-local VJP path)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([0.7, 1.3, 0.4, 2.0]))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class Block(nn.Module):
    """One middle block of shape (N, T, D) -> (N, T, D), by name."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind in ("linear-bf", "linear-sf"):
            self.lin = nn.Linear(D, D)
        elif kind in ("attn-bf", "attn-sf"):
            self.attn = nn.MultiheadAttention(D, 2, batch_first=kind == "attn-bf")
        elif kind in ("encoder-bf", "encoder-sf"):
            self.enc = nn.TransformerEncoderLayer(
                D, 2, 8, dropout=0.0, batch_first=kind == "encoder-bf"
            )
        elif kind == "prelu":
            self.lin = nn.Linear(D, D)
            self.act = nn.PReLU(D)
            self.slope = LearnedSlope()
        elif kind in ("masked", "masked-generic"):
            self.q = nn.Linear(D, D)
        elif kind == "nograd":
            self.feat = nn.Linear(D, D)
            self.lin = nn.Linear(D, D)
        elif kind == "frozen":
            self.feat = nn.Linear(D, D).requires_grad_(False)
            self.lin = nn.Linear(D, D)
        else:
            raise KeyError(kind)

    def forward(self, h, mask=None):
        k = self.kind
        if k == "linear-bf":
            return torch.tanh(self.lin(h))
        if k == "linear-sf":
            return torch.tanh(self.lin(h.transpose(0, 1))).transpose(0, 1)
        if k == "attn-bf":
            return self.attn(h, h, h, need_weights=False)[0] + h
        if k == "attn-sf":
            hs = h.transpose(0, 1)
            return (self.attn(hs, hs, hs, need_weights=False)[0] + hs).transpose(0, 1)
        if k == "encoder-bf":
            return self.enc(h)
        if k == "encoder-sf":
            return self.enc(h.transpose(0, 1)).transpose(0, 1)
        if k == "prelu":
            return self.slope(self.act(self.lin(h).transpose(1, 2)).transpose(1, 2))
        if k in ("masked", "masked-generic"):  # attention with a shared (T, T) additive mask
            q = self.q(h) if k == "masked" else self.q(torch.tanh(self.q(h)))  # twice: generic
            w = torch.softmax(q @ h.transpose(1, 2) / math.sqrt(D) + mask, -1)
            return w @ h + h
        if k == "nograd":
            with torch.no_grad():
                f = self.feat(h)
            return torch.tanh(self.lin(h) + f)
        if k == "frozen":
            return torch.tanh(self.lin(torch.tanh(self.feat(h))))
        raise KeyError(k)


class Net(nn.Module):
    """Input stage, optional position table, a block, and a head over the pooled sequence."""

    def __init__(self, inp="dense", pos=None, block="linear-bf", head="pool"):
        super().__init__()
        self.inp, self.pos, self.head_kind = inp, pos, head
        if inp == "dense":
            self.proj = nn.Linear(D, D)
        else:
            self.wte = nn.Embedding(V, D)
        if pos is not None:
            self.wpe = nn.Embedding(T, D)
        self.block = Block(block)
        if head == "tied":
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.wte.weight
        elif head != "functional":
            self.head = nn.Linear(D, 3)
        if head == "hooked":
            self.head.register_forward_hook(lambda m, a, out: 2.0 * out)
            self.block.register_forward_pre_hook(lambda m, a: (a[0] * 0.5, *a[1:]))

    def forward(self, x, extra=None):
        h = self.proj(x) if self.inp == "dense" else self.wte(x)
        t = h.shape[1]
        if self.pos == "arange":  # nanoGPT: a (T, D) table broadcast over the batch
            h = h + self.wpe(torch.arange(t))
        elif self.pos == "expanded":
            h = h + self.wpe(torch.arange(t)[None])
        elif self.pos == "gathered":  # per-sample position ids, an input of shape (N, T)
            h = h + self.wpe(extra)
        elif self.pos == "index0":  # expanded, then indexed: the forward value is the same
            h = h + self.wpe(torch.arange(t)[None])[0]
        elif self.pos == "mean0":
            h = h + self.wpe(torch.arange(t)[None]).mean(0)
        h = self.block(h, extra if self.block.kind.startswith("masked") else None)
        pooled = h.mean(1)
        if self.head_kind == "functional":  # fairseq / GPT codebases: F.linear(h, wte.weight)
            return F.linear(pooled, self.wte.weight)
        return self.head(torch.tanh(pooled))


# id -> (constructor kwargs, extra input: None | "mask" | "positions")
CASES = {
    "linear-batch-first": (dict(block="linear-bf"), None),
    "linear-sequence-first": (dict(block="linear-sf"), None),
    "attention-batch-first": (dict(block="attn-bf"), None),
    "attention-sequence-first": (dict(block="attn-sf"), None),
    "encoder-batch-first": (dict(block="encoder-bf"), None),
    "encoder-sequence-first": (dict(block="encoder-sf"), None),
    "position-broadcast": (dict(inp="tokens", pos="arange"), None),
    "position-expanded": (dict(inp="tokens", pos="expanded"), None),
    "position-gathered": (dict(inp="tokens", pos="gathered"), "positions"),
    "position-expanded-indexed": (dict(inp="tokens", pos="index0"), None),
    "position-expanded-reduced": (dict(inp="tokens", pos="mean0"), None),
    "tied-module": (dict(inp="tokens", pos="arange", head="tied"), None),
    "tied-functional": (dict(inp="tokens", head="functional"), None),
    "tied-functional-sequence-first": (
        dict(inp="tokens", block="linear-sf", head="functional"),
        None,
    ),
    "hooks": (dict(head="hooked"), None),
    "activations-with-parameters": (dict(block="prelu"), None),
    "no-grad-layer": (dict(block="nograd"), None),
    "frozen-layer": (dict(block="frozen"), None),
    "shared-mask": (dict(block="masked"), "mask"),
    "shared-mask-tokens-tied": (dict(inp="tokens", block="masked", head="tied"), "mask"),
    "shared-mask-generic-path": (dict(block="masked-generic"), "mask"),
}


def make_inputs(case, n, gen):
    """Return ``(args, batched)``: the model's positional inputs and which are per sample."""
    kwargs, extra = CASES[case]
    if kwargs.get("inp") == "tokens":
        x = torch.randint(0, V, (n, T), generator=gen)
    else:
        x = torch.randn(n, T, D, generator=gen, dtype=torch.float64)
    if extra == "mask":
        return (x, torch.triu(torch.full((T, T), -1e4, dtype=torch.float64), 1)), (True, False)
    if extra == "positions":
        shift = torch.randint(0, 2, (n, 1), generator=gen)
        return (x, (torch.arange(T) + shift).clamp(max=T - 1)), (True, True)
    return (x,), (True,)


def build(case, seed=0):
    torch.manual_seed(seed)
    model = Net(**CASES[case][0]).double()
    with torch.no_grad():  # PReLU slopes away from their default, so a wrong rule shows
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.9)
    return model.eval()


def naive(model, batches, kind, seed):
    """(1/N) Σ_n E_y[(∂ log p(y|x_n)/∂θ)²], one sample at a time, shared inputs passed whole.

    Sampled labels use the estimator's convention: one uniform per sample, drawn in order.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for args, batched, y in batches:
        n = args[0].shape[0]
        u = torch.rand(n, 1, generator=gen, dtype=torch.float64)
        for i in range(n):
            one = [a[i : i + 1] if b else a for a, b in zip(args, batched, strict=True)]
            logp = torch.log_softmax(model(*one)[0].double(), -1)
            if kind == "exact":
                p = logp.detach().exp()
                terms = [(float(p[c]), logp[c]) for c in range(logp.shape[-1])]
            elif kind == "empirical":
                terms = [(1.0, logp[y[i]])]
            else:
                cdf = logp.detach().exp().cumsum(0)
                label = min(int(torch.searchsorted(cdf, u[i])), logp.shape[-1] - 1)
                terms = [(1.0, logp[label])]
            for w, ll in terms:
                gs = torch.autograd.grad(ll, params, retain_graph=True, allow_unused=True)
                for a, g in zip(acc, gs, strict=True):
                    if g is not None:
                        a += w * g.double().square()
        total += n
    return {k: a / total for k, a in zip(names, acc, strict=True)}


def estimate(model, batches, kind, seed, **kwargs):
    data = [(a if len(a) > 1 else a[0], y) for a, _, y in batches]
    gen = torch.Generator().manual_seed(seed)
    return ewc.fisher_diagonal(model, data, kind=kind, generator=gen, **kwargs)


def rel_err(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    return max(
        float((got[k].double() - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-30)
        for k in want
    )


def batches_for(case, sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        args, batched = make_inputs(case, n, gen)
        out.append((args, batched, torch.randint(0, 3, (n,), generator=gen)))
    return out


ORDERS = {"N==T-then-N!=T": (T, T + 2), "N!=T-then-N==T": (T + 2, T), "N==T": (T,)}


@pytest.mark.parametrize("kind", ["sampled", "empirical", "exact"])
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_part_matches_the_per_sample_loop(case, order, kind):
    model = build(case)
    batches = batches_for(case, ORDERS[order])
    got = estimate(model, batches, kind, seed=7)
    want = naive(model, batches, kind, seed=7)
    assert rel_err(got, want) < 1e-9, str(ewc.fisher_route(model, batches[0][0]))


def test_the_fast_paths_are_still_taken():
    """Verification sends only what is wrong to the generic path, not every layer."""

    def route(case, n=T):
        model = build(case)
        return ewc.fisher_route(model, batches_for(case, (n,))[0][0])

    r = route("position-broadcast")  # nanoGPT's table: expanded to the batch, closed form
    assert "wpe" in r.fast and r.rest == ()
    r = route("tied-module")
    assert r.rest == () and r.partition.ties
    r = route("tied-functional")  # the embedding's weight is also the head: generic path
    assert (
        "wte" not in r.fast and "block.lin" in r.fast and "closed form differs" in r.excluded["wte"]
    )
    r = route("linear-sequence-first")  # rows are positions when N == T: generic path
    assert "block.lin" not in r.fast and "proj" in r.fast and "head" in r.fast
    r = route("hooks")  # the capture runs before the user's hooks: the closed form is right
    assert "head" in r.fast and "block.lin" in r.fast
    r = route("activations-with-parameters")
    assert {"block.act", "block.slope", "block.lin"} <= set(r.fast)
    r = route("shared-mask")
    assert r.rest == () and r.layout.batched == (True, False)
    r = route("position-expanded-indexed")
    assert "wpe" not in r.fast and "wte" in r.fast


# --- Half precision ---------------------------------------------------------------------
HALF_CASES = [
    "linear-batch-first",
    "position-broadcast",
    "tied-module",
    "activations-with-parameters",
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_half_precision_models_match_float64(case, dtype):
    model = build(case)
    batches = batches_for(case, (T, T + 2))
    want = naive(model, batches, "empirical", seed=0)
    low = build(case).to(dtype)
    low_batches = [
        (tuple(a.to(dtype) if a.is_floating_point() else a for a in args), b, y)
        for args, b, y in batches
    ]
    got = estimate(low, low_batches, "empirical", seed=0, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert rel_err(got, want) < (0.05 if dtype == torch.float16 else 0.1)


def test_float16_squares_do_not_underflow():
    """Per-sample gradients of about 1e-4 are representable in float16; their squares (1e-8)
    are not. The estimate must still find them (squares are formed in float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    x = torch.randn(6, 4, dtype=torch.float64) * 1e-1
    y = torch.randint(0, 3, (6,))
    want = naive(model, [((x,), (True,), y)], "empirical", seed=0)
    assert float(want["0.weight"].max()) < 6e-8  # below float16's smallest subnormal
    got = ewc.fisher_diagonal(model.half(), [(x.half(), y)], kind="empirical", dtype=torch.float32)
    assert rel_err(got, want) < 0.05
