"""MAS importances against a naive float64 per-sample loop, and the MAS penalty's state.

The models are the property suite's parts (tests/test_properties.py: batch- and sequence-first
layers with N == T, attention, position tables, tied heads, hooks, no_grad and frozen layers,
shared masks), plus an MLP, a CNN and a sequence-output model.
"""

from __future__ import annotations

import pytest
import torch
from test_properties import CASES, ORDERS, T, batches_for, build
from torch import nn

import ewc
from ewc import mas as mas_mod
from ewc._verify import Verdict


def naive_mas(model, batches):
    """(1/N) Σ_n |∂‖f(x_n)‖²/∂θ|, one sample at a time, shared inputs passed whole."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    total = 0
    for args, batched in batches:
        n = args[0].shape[0]
        for i in range(n):
            one = [a[i : i + 1] if b else a for a, b in zip(args, batched, strict=True)]
            q = model(*one).double().pow(2).sum()
            gs = torch.autograd.grad(q, [p for _, p in named], allow_unused=True)
            for (name, _), g in zip(named, gs, strict=True):
                if g is not None:
                    acc[name] += g.double().abs()
        total += n
    return {k: v / total for k, v in acc.items()}


def rel_err(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    return max(
        float((got[k].double() - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-30)
        for k in want
    )


def as_data(batches):
    return [(a if len(a) > 1 else a[0], None) for a, _ in batches]


def strip(batches):
    return [(args, batched) for args, batched, _ in batches]


@pytest.mark.parametrize("order", ["N==T-then-N!=T", "N!=T-then-N==T"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_part_matches_the_per_sample_loop(case, order):
    model = build(case)
    batches = strip(batches_for(case, ORDERS[order]))
    data = [((a if len(a) > 1 else a[0]), torch.zeros(a[0].shape[0])) for a, _ in batches]
    got = ewc.mas_importance(model, data)
    assert got.kind == "mas" and got.n_samples == sum(a[0].shape[0] for a, _ in batches)
    assert rel_err(got, naive_mas(model, batches)) < 1e-9


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(h)).flatten(1))


class SeqOut(nn.Module):
    """Outputs ``(N, T, C)`` (or ``(T, N, C)`` inside, sequence-first): ‖f‖² sums over both."""

    def __init__(self, sequence_first):
        super().__init__()
        self.sf = sequence_first
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.emb(x)
        if self.sf:
            h = h.transpose(0, 1)  # (T, N, D): the linear layer's rows are positions
        h = self.norm(torch.tanh(self.lin(h)))
        if self.sf:
            h = h.transpose(0, 1)
        return self.out(h)


def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_mlp_cnn_and_sequence_outputs_match_the_loop():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = _mlp().double()
    xs = [torch.randn(n, 4, generator=gen) for n in (5, 3)]
    assert (
        rel_err(ewc.mas_importance(mlp, xs), naive_mas(mlp, [((x,), (True,)) for x in xs])) < 1e-12
    )
    cnn = CNN().double().eval()
    with torch.no_grad():
        cnn.bn.running_mean.uniform_(-0.5, 0.5)
        cnn.bn.running_var.uniform_(0.5, 2.0)
    xs = [torch.randn(n, 2, 6, 6, generator=gen) for n in (4, 2)]
    assert (
        rel_err(ewc.mas_importance(cnn, xs), naive_mas(cnn, [((x,), (True,)) for x in xs])) < 1e-10
    )
    for sf in (False, True):
        seq = SeqOut(sf).double()
        xs = [torch.randint(0, 6, (n, T), generator=gen) for n in (T, T + 1)]  # N == T first
        want = naive_mas(seq, [((x,), (True,)) for x in xs])
        assert rel_err(ewc.mas_importance(seq, xs), want) < 1e-10, sf


def test_layers_never_reach_the_generic_path(monkeypatch):
    """An MLP (the |g|ᵀ|a| closed form), a CNN with BatchNorm and a sequence model (module-local
    VJPs of convolutions, norms, embeddings, linear layers over positions) need no whole-model
    per-sample pass."""

    def boom(*a, **k):
        raise AssertionError("generic path taken")

    monkeypatch.setattr("ewc._probe.vmap_squares", boom)
    monkeypatch.setattr("ewc._probe.loop_squares", boom)
    torch.manual_seed(0)
    mlp = _mlp().double()
    x = torch.randn(6, 4)
    assert rel_err(ewc.mas_importance(mlp, [x]), naive_mas(mlp, [((x,), (True,))])) < 1e-12
    cnn = CNN().double().eval()
    x = torch.randn(3, 2, 6, 6)
    assert rel_err(ewc.mas_importance(cnn, [x]), naive_mas(cnn, [((x,), (True,))])) < 1e-10
    seq = SeqOut(False).double()
    x = torch.randint(0, 6, (T, T))
    assert rel_err(ewc.mas_importance(seq, [x]), naive_mas(seq, [((x,), (True,))])) < 1e-10


def test_verification_is_load_bearing(monkeypatch):
    """Forget that a head's weight is tied to the input embedding: the MAS check finds the head's
    closed form wrong and routes it generic; without the check the result is wrong."""
    model = build("tied-module")
    batches = strip(batches_for("tied-module", (T, T + 2)))
    want = naive_mas(model, batches)

    def untied(route, records):
        part = route.partition
        return tuple((n, part.rules[n].factorised and records[n].x.dim() == 2) for n in part.fast)

    monkeypatch.setattr(mas_mod, "_layer_paths", untied)
    assert rel_err(ewc.mas_importance(model, as_data(batches)), want) < 1e-9
    monkeypatch.setattr(mas_mod, "check_sample", lambda *a, **k: Verdict())
    assert rel_err(ewc.mas_importance(model, as_data(batches)), want) > 1e-3


class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot trace it, so the generic path loops."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor([0.5, 1.5, -1.0, 2.0]))

    def forward(self, x):
        h = self.lin(x)
        if float(h.abs().max()) > 1e6:
            h = h * 0
        return torch.tanh(h) * self.scale


def test_the_loop_fallback_matches_the_per_sample_loop():
    torch.manual_seed(0)
    model = Branchy().double()
    xs = [torch.randn(n, 4) for n in (3, 4)]
    with pytest.warns(UserWarning, match="one pass per sample"):
        got = ewc.mas_importance(model, xs)
    assert rel_err(got, naive_mas(model, [((x,), (True,)) for x in xs])) < 1e-12


def test_frozen_parameters_and_params_selection():
    torch.manual_seed(0)
    mlp = _mlp().double()
    mlp[2].requires_grad_(False)
    x = torch.randn(5, 4)
    got = ewc.mas_importance(mlp, [x])
    assert "2.weight" not in got and "2.bias" not in got
    assert rel_err(got, naive_mas(mlp, [((x,), (True,))])) < 1e-12
    sub = ewc.mas_importance(mlp, [x], params="4.*")
    assert set(sub) == {"4.weight", "4.bias"}
    assert torch.equal(sub["4.weight"], got["4.weight"])
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        ewc.mas_importance(mlp, [x], params="nope*")


def test_independent_of_the_batch_size_and_n_samples():
    torch.manual_seed(0)
    model = build("encoder-batch-first")
    x = batches_for("encoder-batch-first", (12,))[0][0][0]
    whole = ewc.mas_importance(model, [x])
    parts = ewc.mas_importance(model, [x[i : i + 5] for i in range(0, 12, 5)])
    assert rel_err(parts, whole) < 1e-12
    first = ewc.mas_importance(model, [x[:4], x[4:]], n_samples=7)
    assert first.n_samples == 7
    assert rel_err(first, ewc.mas_importance(model, [x[:7]])) < 1e-12


def test_bad_input_is_named():
    mlp = _mlp()
    with pytest.raises(ValueError, match="no samples"):
        ewc.mas_importance(mlp, [])
    with pytest.raises(ValueError, match="non-finite"):
        ewc.mas_importance(mlp, [torch.full((2, 4), float("nan"))])
    with pytest.raises(ValueError, match="n_samples"):
        ewc.mas_importance(mlp, [torch.randn(2, 4)], n_samples=0)


def test_mode_and_grad_are_left_alone_and_dtype():
    mlp = _mlp().float().train()
    mlp[0].weight.grad = torch.ones_like(mlp[0].weight)
    out = ewc.mas_importance(mlp, [torch.randn(3, 4).float()], dtype=torch.bfloat16)
    assert mlp.training and torch.equal(mlp[0].weight.grad, torch.ones_like(mlp[0].weight))
    assert all(v.dtype == torch.bfloat16 for v in out.values())


# --- The penalty --------------------------------------------------------------------------
def test_penalty_accumulates_importances_at_the_latest_anchor():
    torch.manual_seed(0)
    mlp = _mlp().double()
    xa, xb = torch.randn(6, 4), torch.randn(6, 4)
    mas = ewc.MAS(mlp, lam=3.0)
    oa = mas.consolidate([xa])
    theta_a = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ob = mas.consolidate([(xb, torch.zeros(6))])
    theta_b = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    assert rel_err(ob, naive_mas(mlp, [((xb,), (True,))])) < 1e-12
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = dict(mlp.named_parameters())
    want = 1.5 * sum(((oa[n] + ob[n]) * (params[n] - theta_b[n]) ** 2).sum() for n in params)
    assert torch.allclose(mas.penalty(), want)
    assert theta_a  # the first anchor is replaced (online, γ = 1)
    assert [t["kind"] for t in mas.tasks] == ["mas", "mas"] and mas.kind == "mas"
    # add_penalty_grad gives the same gradient as the penalty's backward
    mas.penalty().backward()
    by_autograd = {n: p.grad.clone() for n, p in params.items()}
    mlp.zero_grad(set_to_none=True)
    mas.add_penalty_grad()
    for n, p in params.items():
        assert torch.allclose(p.grad, by_autograd[n])


def test_consolidate_arguments():
    mlp = _mlp()
    mas = ewc.MAS(mlp, lam=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        mas.consolidate()
    with pytest.raises(TypeError, match="importance="):
        mas.consolidate(fisher={})
    ones = {n: torch.ones_like(p) for n, p in mlp.named_parameters()}
    mas.consolidate(importance=ones)
    with pytest.raises(ValueError, match="negative"):
        mas.consolidate(importance={n: -v for n, v in ones.items()})
    with pytest.raises(ValueError, match="kind"):
        mas.kind = "sampled"


def test_save_load_round_trip_and_validation(tmp_path):
    torch.manual_seed(0)
    mlp = _mlp().double()
    mas = ewc.MAS(mlp, lam=2.0, params="0.*")
    mas.consolidate([torch.randn(5, 4)])
    path = tmp_path / "mas.safetensors"
    mas.save(str(path))
    back = ewc.MAS.load(str(path), mlp)
    assert back.lam == 2.0 and back.mode == "online" and back.kind == "mas"
    assert back.tasks == mas.tasks and set(back.precision) == {"0.weight", "0.bias"}
    assert torch.equal(back.penalty(), mas.penalty())
    with pytest.raises(ValueError, match="saved by 'MAS'"):
        ewc.EWC.load(str(path), mlp)
    state = mas.state_dict()
    state["metadata"]["kind"] = "sampled"
    with pytest.raises(ValueError, match="unknown kind 'sampled'"):
        ewc.MAS(mlp, lam=1.0, params="0.*").load_state_dict(state)
    e = ewc.EWC(mlp, lam=1.0)
    e.consolidate(fisher={n: torch.ones_like(p) for n, p in mlp.named_parameters()})
    state = e.state_dict()
    state["metadata"]["method"] = "MAS"
    with pytest.raises(ValueError, match="unknown kind 'sampled'"):
        ewc.MAS(mlp, lam=1.0).load_state_dict(state)
    state = e.state_dict()
    state["metadata"]["kind"] = "mas"
    with pytest.raises(ValueError, match="unknown kind 'mas'"):
        ewc.EWC(mlp, lam=1.0).load_state_dict(state)


def test_lightning_callback_consolidates_mas_on_the_training_data():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from ewc.integrations.lightning import EWCCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = _mlp().double()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    module = Net()
    mas = ewc.MAS(module, lam=2.0)
    pl.Trainer(
        callbacks=[EWCCallback(mas)],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    ).fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert mas.num_tasks == 1
    want = naive_mas(module.net, [((x,), (True,))])
    got = {n[len("net.") :]: v for n, v in mas.precision.items()}
    assert rel_err(got, want) < 1e-10


# --- torch.distributed ----------------------------------------------------------------------
def _dist_problem():
    torch.manual_seed(0)
    model = _mlp().double()
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def _dist_worker(rank, outdir):
    import os

    from safetensors.torch import save_file

    model, x = _dist_problem()
    shard = [x[0:3], x[3:6], x[6:7]] if rank == 0 else [x[7:9], x[9:12]]  # uneven shards
    got = ewc.mas_importance(model, shard)
    out = {f"imp/{k}": v.contiguous() for k, v in got.items()}
    out["n"] = torch.tensor([got.n_samples])
    save_file(out, os.path.join(outdir, f"rank{rank}.safetensors"))


def test_distributed_shards_give_the_importance_of_their_union(tmp_path):
    from conftest import spawn_gloo
    from safetensors.torch import load_file

    spawn_gloo(_dist_worker, 2, tmp_path, timeout=60)
    model, x = _dist_problem()
    want = naive_mas(model, [((x,), (True,))])
    for r in range(2):
        res = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert int(res["n"]) == 12
        assert rel_err({k[4:]: v for k, v in res.items() if k.startswith("imp/")}, want) < 1e-12


def test_dict_inputs_and_output_fn():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, pixels, scale):
            return {"logits": self.body(pixels) * scale}

    torch.manual_seed(0)
    model = Wrapped().double()
    x = torch.randn(5, 4)
    got = ewc.mas_importance(
        model, [({"pixels": x, "scale": 2.0}, None)], output_fn=lambda out: out["logits"]
    )
    want = naive_mas(model.body, [((x,), (True,))])
    assert (
        rel_err({k[len("body.") :]: v for k, v in got.items()}, {k: 4 * v for k, v in want.items()})
        < 1e-12
    )


def test_mas_route_shows_each_layers_path():
    cnn = CNN().double()
    route = ewc.mas_route(cnn, torch.randn(3, 2, 6, 6))
    assert route.partition.rules["fc"].name == "linear" and route.rest == ()
    assert {route.partition.rules[n].name for n in ("c1", "c2", "bn")} == {"module-local VJP"}
    assert "MAS" in route.verified and cnn.training
    tied = ewc.mas_route(build("tied-module"), batches_for("tied-module", (T,))[0][0])
    assert "wte.weight" in tied.rest and "tied" in str(tied)
