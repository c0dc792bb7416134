"""KFAC-EWC penalty against dense float64 references (explicit Kronecker products)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ewc
from ewc.kfac import KFAC, KronBlock
from ewc.kfac_penalty import KFACEWC


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Net(nn.Module):
    """Two Linear layers (Kronecker blocks) and a LayerNorm (diagonal part)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.b = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 2, (5,), generator=g))]


def _move(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _vec(m):
    return m.T.reshape(-1)


def _dense_quadratic(kfac: KFAC, delta) -> torch.Tensor:
    total = sum((kfac.rest[n] * delta[n] ** 2).sum() for n in kfac.rest)
    for b in kfac.values():
        v = _vec(b.matrix(delta, torch.float64))
        total = total + sum(v @ torch.kron(a, g) @ v for a, g in b.terms)
    return total


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _delta(model, anchor):
    return {n: p - anchor[n] for n, p in model.named_parameters()}


def _train_tasks(pen, model, tasks=3):
    """Consolidate ``tasks`` tasks at moved parameters; return (kfacs, anchors)."""
    kfacs, anchors = [], []
    for t in range(tasks):
        _move(model, 10 + t)
        kfacs.append(pen.consolidate(_data(t), kind="exact"))
        anchors.append(_snapshot(model))
    _move(model, 99)
    return kfacs, anchors


def test_dispatch_and_errors():
    model = Net()
    pen = ewc.EWC(model, 1.0, curvature="kfac")
    assert isinstance(pen, KFACEWC) and isinstance(pen, ewc.EWC) and pen.merge == "exact"
    assert type(ewc.EWC(model, 1.0)) is ewc.EWC
    with pytest.raises(ValueError, match="curvature must be one of"):
        ewc.EWC(model, 1.0, curvature="full")
    with pytest.raises(ValueError, match="merge must be one of"):
        ewc.EWC(model, 1.0, curvature="kfac", merge="sum")
    with pytest.raises(TypeError, match="ewc.KFAC"):
        pen.consolidate(fisher=ewc.fisher_diagonal(model, _data(0)))
    assert float(pen.penalty()) == 0.0


def test_separate_exact_equals_the_sum_of_dense_kronecker_quadratics():
    model = Net()
    pen = ewc.EWC(model, 3.0, curvature="kfac")
    kfacs, anchors = _train_tasks(pen, model)
    want = sum(_dense_quadratic(k, _delta(model, a)) for k, a in zip(kfacs, anchors, strict=True))
    got = pen.penalty()
    assert torch.allclose(got, 1.5 * want)
    assert sorted(pen.layers) == ["a", "b"] and sorted(pen.precision) == [
        "norm.bias",
        "norm.weight",
    ]
    # the gradient: autograd of penalty() == add_penalty_grad() == autograd of the dense form
    params = dict(model.named_parameters())
    auto = torch.autograd.grad(got, list(params.values()))
    dense = torch.autograd.grad(1.5 * want, list(params.values()))
    model.zero_grad(set_to_none=True)
    pen.add_penalty_grad()
    for (n, p), ga, gd in zip(params.items(), auto, dense, strict=True):
        assert torch.allclose(ga, gd), n
        assert torch.allclose(p.grad, ga), n


def test_online_exact_is_the_decayed_sum_at_the_latest_optimum():
    model = Net()
    pen = ewc.EWC(model, 2.0, curvature="kfac", mode="online", gamma=0.7)
    kfacs, anchors = _train_tasks(pen, model)
    total = 0.49 * kfacs[0] + 0.7 * kfacs[1] + kfacs[2]
    want = _dense_quadratic(total, _delta(model, anchors[-1]))
    assert torch.allclose(pen.penalty(), want)


def _commuting(model, seed, qa, qg):
    """A KFAC over Net's blocks whose factors are diagonal in the fixed bases ``qa``, ``qg``."""
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, i, o, bias in (("a", 5, 3, "a.bias"), ("b", 3, 2, None)):
        a = qa[name] @ torch.diag(torch.rand(i, generator=g) + 0.1) @ qa[name].T
        gg = qg[name] @ torch.diag(torch.rand(o, generator=g) + 0.1) @ qg[name].T
        blocks[name] = KronBlock(f"{name}.weight", bias, (o, i - (bias is not None)), ((a, gg),))
    rest = ewc.Fisher({n: torch.rand(3, generator=g) for n in ("norm.weight", "norm.bias")})
    return KFAC(blocks, rest)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_eigenbasis_merge_is_exact_for_commuting_factors(mode):
    torch.manual_seed(5)
    qa = {"a": torch.linalg.qr(torch.randn(5, 5))[0], "b": torch.linalg.qr(torch.randn(3, 3))[0]}
    qg = {"a": torch.linalg.qr(torch.randn(3, 3))[0], "b": torch.linalg.qr(torch.randn(2, 2))[0]}
    model = Net()
    exact = ewc.EWC(model, 1.0, curvature="kfac", mode=mode, gamma=0.5)
    eig = ewc.EWC(model, 1.0, curvature="kfac", mode=mode, gamma=0.5, merge="eigenbasis")
    for t in range(4):
        _move(model, t)
        k = _commuting(model, t, qa, qg)
        exact.consolidate(fisher=k)
        eig.consolidate(fisher=k)
    _move(model, 50)
    assert torch.allclose(eig.penalty(), exact.penalty(), rtol=1e-9)
    # constant memory: one set of tensors per layer whatever the number of tasks
    assert {k: tuple(v.shape) for k, v in eig.kron["a"].items()}["S"] == (3, 5)


def test_eigenbasis_merge_one_task_is_exact_and_general_tasks_are_close():
    model = Net()
    exact = ewc.EWC(model, 1.0, curvature="kfac")
    eig = ewc.EWC(model, 1.0, curvature="kfac", merge="eigenbasis")
    for t in range(3):
        _move(model, 20 + t)
        k = ewc.fisher_kfac(model, _data(t), kind="exact")
        exact.consolidate(fisher=k)
        eig.consolidate(fisher=k)
        if t == 0:
            _move(model, 7)
            assert torch.allclose(eig.penalty(), exact.penalty(), rtol=1e-9)
    _move(model, 8)
    # non-commuting factors: an approximation, checked against the exact sum (loose)
    e, x = float(eig.penalty().detach()), float(exact.penalty().detach())
    assert abs(e - x) <= 0.5 * x
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    auto = torch.autograd.grad(eig.penalty(), params)
    eig.add_penalty_grad()
    for p, ga in zip(params, auto, strict=True):
        assert torch.allclose(p.grad, ga)


@pytest.mark.parametrize("merge", ["exact", "eigenbasis"])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_round_trip(tmp_path, merge, mode):
    model = Net()
    pen = ewc.EWC(model, 2.0, curvature="kfac", merge=merge, mode=mode, gamma=0.9)
    _train_tasks(pen, model, tasks=2)
    path = str(tmp_path / "kfac.safetensors")
    pen.save(path)
    loaded = ewc.EWC.load(path, model)
    assert isinstance(loaded, KFACEWC) and loaded.merge == merge and loaded.num_tasks == 2
    assert torch.allclose(loaded.penalty(), pen.penalty())
    fresh = ewc.EWC(model, 2.0, curvature="kfac")  # merge comes from the state
    fresh.load_state_dict(pen.state_dict())
    assert fresh.merge == merge and torch.allclose(fresh.penalty(), pen.penalty())


def test_state_validation_names_the_problem():
    model = Net()
    pen = ewc.EWC(model, 2.0, curvature="kfac")
    _train_tasks(pen, model, tasks=2)
    good = pen.state_dict()

    def broken(fn):
        st = {"tensors": dict(good["tensors"]), "metadata": dict(good["metadata"])}
        fn(st)
        return st

    fresh = ewc.EWC(model, 2.0, curvature="kfac")
    cases = [
        (lambda s: s["tensors"].pop("kfac.a.G"), "lacks"),
        (lambda s: s["tensors"].__setitem__("kfac.a.G", -s["tensors"]["kfac.a.G"]), "negative"),
        (lambda s: s["tensors"].__setitem__("kfac.a.A", s["tensors"]["kfac.a.A"][:, :2]), "shape"),
        (lambda s: s["tensors"].__setitem__("kfac.a.extra", torch.zeros(1)), "unexpected"),
        (lambda s: s["tensors"].__setitem__("kron_offset", torch.tensor(float("nan"))), "corrupt"),
        (lambda s: s["metadata"].__setitem__("merge", "sum"), "merge"),
        (
            lambda s: s["metadata"].__setitem__(
                "layers", {"a": {"weight": "a.weight", "bias": None, "shape": [9, 9]}}
            ),
            "another model",
        ),
        (lambda s: s["tensors"].pop("precision.norm.weight"), "precision and anchor"),
        (lambda s: s["metadata"].pop("curvature"), "curvature"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(broken(fn))
        assert fresh.num_tasks == 0 and not fresh.layers
    diag = ewc.EWC(model, 2.0)
    with pytest.raises(ValueError, match="KFACEWC"):
        diag.load_state_dict(good)


def test_frozen_parameters_get_no_gradient_and_params_filter():
    model = Net()
    pen = ewc.EWC(model, 1.0, curvature="kfac")
    _train_tasks(pen, model, tasks=1)
    model.a.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    pen.add_penalty_grad()
    assert model.a.weight.grad is None and model.a.bias.grad is not None
    model.zero_grad(set_to_none=True)
    pen.add_penalty_grad([model.b.weight])
    assert model.a.bias.grad is None and model.b.weight.grad is not None


def test_layers_must_match_across_tasks():
    model = Net()
    pen = ewc.EWC(model, 1.0, curvature="kfac")
    pen.consolidate(_data(0))
    other = ewc.fisher_kfac(model, _data(1), params=["a.*", "norm.*"])
    with pytest.raises(ValueError):
        pen.consolidate(fisher=other)


def test_truncated_eigenbasis_keeps_the_leading_directions():
    """rank=r, one task: Σ over the r×r leading eigenpairs of λ_G,o λ_A,i (q_G,oᵀ Δ q_A,i)²."""
    model = Net()
    r = 2
    pen = ewc.EWC(model, 1.0, curvature="kfac", merge="eigenbasis", rank=r)
    k = pen.consolidate(_data(0), kind="exact")
    anchor = _snapshot(model)
    _move(model, 3)
    delta = _delta(model, anchor)
    want = sum((k.rest[n] * delta[n] ** 2).sum() for n in k.rest)
    for b in k.values():
        ((a, g),) = b.terms
        ea, qa = torch.linalg.eigh(a)
        eg, qg = torch.linalg.eigh(g)
        ea, qa, eg, qg = ea.flip(0)[:r], qa.flip(1)[:, :r], eg.flip(0)[:r], qg.flip(1)[:, :r]
        rot = qg.T @ b.matrix(delta, torch.float64) @ qa
        want = want + (torch.outer(eg, ea) * rot**2).sum()
    assert torch.allclose(pen.penalty(), 0.5 * want)
    assert pen.kron["a"]["Q_A"].shape == (5, r) and pen.kron["a"]["S"].shape == (r, r)
    # a second task and a state round trip keep the truncated shapes
    _move(model, 4)
    pen.consolidate(_data(1), kind="exact")
    fresh = ewc.EWC(model, 1.0, curvature="kfac")
    fresh.load_state_dict(pen.state_dict())
    assert fresh.rank == r and torch.allclose(fresh.penalty(), pen.penalty())
    with pytest.raises(ValueError, match="rank"):
        ewc.EWC(model, 1.0, curvature="kfac", merge="eigenbasis", rank=0)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_exact_merge_with_rank_keeps_each_tasks_leading_eigenpairs(mode, tmp_path):
    """rank=r, merge='exact': Σ_t of each task's top-r × top-r eigenpair terms (dense reference)."""
    model = Net()
    r = 2
    pen = ewc.EWC(model, 2.0, curvature="kfac", rank=r, mode=mode, gamma=0.6)
    kfacs, anchors = _train_tasks(pen, model, tasks=3)
    weights = [0.36, 0.6, 1.0] if mode == "online" else [1.0, 1.0, 1.0]
    want = 0.0
    for k, anchor, c in zip(kfacs, anchors, weights, strict=True):
        delta = _delta(model, anchors[-1] if mode == "online" else anchor)
        want = want + c * sum((k.rest[n] * delta[n] ** 2).sum() for n in k.rest)
        for b in k.values():
            ((a, g),) = b.terms
            ea, qa = torch.linalg.eigh(a)
            eg, qg = torch.linalg.eigh(g)
            ea, qa, eg, qg = ea.flip(0)[:r], qa.flip(1)[:, :r], eg.flip(0)[:r], qg.flip(1)[:, :r]
            rot = qg.T @ b.matrix(delta, torch.float64) @ qa
            want = want + c * (torch.outer(eg, ea) * rot**2).sum()
    assert torch.allclose(pen.penalty(), want)  # λ/2 = 1
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    auto = torch.autograd.grad(pen.penalty(), params)
    pen.add_penalty_grad()
    assert all(torch.allclose(p.grad, ga) for p, ga in zip(params, auto, strict=True))
    path = str(tmp_path / "s.safetensors")
    pen.save(path)
    loaded = ewc.EWC.load(path, model)
    assert loaded.rank == r and torch.allclose(loaded.penalty(), pen.penalty())


@pytest.mark.parametrize("merge", ["exact", "eigenbasis"])
def test_a_float16_models_kfac_penalty_is_summed_in_float32(merge):
    # a quadratic: the value at θ* + Δ is 16 times the value at θ* + Δ/4; at θ* + Δ it is past
    # float16's 65504, at θ* + Δ/4 it is not
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 3)).to(torch.float16)
    x, y = (torch.randn(64, 40) * 5).to(torch.float16), torch.randint(0, 3, (64,))
    pen = KFACEWC(model, lam=1.0, merge=merge)
    pen.consolidate([(x, y)])
    anchor = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(p.shape, generator=gen).to(p.dtype) * 60 for p in model.parameters()]
    values = {}
    for k in (1, 4):
        with torch.no_grad():
            for p, d, a in zip(model.parameters(), deltas, anchor, strict=True):
                p.copy_(a + d / k)
        values[k] = pen.penalty()
    assert values[1].dtype == torch.float32 and bool(torch.isfinite(values[1]))
    assert float(values[1].detach()) > 65504 > float(values[4].detach())
    assert float(values[1].detach()) == pytest.approx(16 * float(values[4].detach()), rel=2e-2)


def test_second_derivatives_through_the_kfac_penalty_are_autograds():
    model = Net()
    pen = ewc.EWC(model, 3.0, curvature="kfac")
    kfacs, anchors = _train_tasks(pen, model)
    params = list(model.parameters())
    x = _data(7)[0][0]

    def dense():
        return 1.5 * sum(
            _dense_quadratic(k, _delta(model, a)) for k, a in zip(kfacs, anchors, strict=True)
        )

    got = {}
    for name, penalty in (("dense", dense), ("ours", pen.penalty)):
        model.zero_grad(set_to_none=True)
        (model(x).pow(2).sum() + penalty()).backward(create_graph=True)
        norm = sum((p.grad**2).sum() for p in params)
        model.zero_grad(set_to_none=True)
        norm.backward()  # d/dθ ‖∇‖²: the penalty's Hessian times ∇, and the task's
        got[name] = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
    for (n, _), a, b in zip(model.named_parameters(), got["dense"], got["ours"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=n)
