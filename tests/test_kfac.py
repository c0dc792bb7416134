"""KFAC estimator against dense float64 references (per-sample loops, Jacobians, outer products)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import ewc
from ewc.kfac import KFAC


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 3)
    )


class SeqNet(nn.Module):
    """A token tagger: Linear on (N, T, I), a LayerNorm (diagonal) and a per-sample mean head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x)))).mean(1)


class ConvNet(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 2, dilation=2, groups=groups, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(h.mean((2, 3)))


def _data(shape: tuple[int, ...], n: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _batches(x, y, bs):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def _per_sample(model, layer_names, x1, y1=None, cotangent=None):
    """One sample: each layer's input and output gradient of log p(y1) (or of <c, z>)."""
    mods = dict(model.named_modules())
    seen = {}
    hooks = [
        mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
        for n in layer_names
    ]
    z = model(x1)
    for h in hooks:
        h.remove()
    outs = [seen[n][1] for n in layer_names]
    if cotangent is None:
        obj = F.log_softmax(z, -1)[0, y1]
        gs = torch.autograd.grad(obj, outs)
    else:
        gs = torch.autograd.grad(z, outs, cotangent)
    return {n: (seen[n][0].detach(), g) for n, g in zip(layer_names, gs, strict=True)}


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Unfolded patches by explicit slicing (no F.unfold): (L, C·kh·kw) for one sample (C,H,W)."""
    p, s, d, k = conv.padding, conv.stride, conv.dilation, conv.kernel_size
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    h_out = (xp.shape[1] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (xp.shape[2] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    rows = []
    for i in range(h_out):
        for j in range(w_out):
            hi, wj = i * s[0], j * s[1]
            patch = xp[
                :, hi : hi + d[0] * (k[0] - 1) + 1 : d[0], wj : wj + d[1] * (k[1] - 1) + 1 : d[1]
            ]
            rows.append(patch.reshape(-1))
    return torch.stack(rows)


def _rows(module, x, g):
    """(R, I') inputs with a ones column for the bias, (R, O) output gradients, one sample."""
    if isinstance(module, nn.Conv2d):
        a = _patches(x[0], module)
        go = g[0].reshape(g.shape[1], -1).T
    else:
        a = x[0].reshape(-1, x.shape[-1])
        go = g[0].reshape(-1, g.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
    return a, go


def _brute(model, layer_names, x, y):
    """(1/N) Σ_n (1/R) Σ_r ã ãᵀ and (1/N) Σ_n Σ_r g gᵀ (empirical), by a per-sample loop."""
    mods = dict(model.named_modules())
    a_sum = {n: 0.0 for n in layer_names}
    g_sum = {n: 0.0 for n in layer_names}
    for i in range(len(x)):
        rec = _per_sample(model, layer_names, x[i : i + 1], y[i])
        for n in layer_names:
            a, g = _rows(mods[n], *rec[n])
            a_sum[n] = a_sum[n] + a.T @ a / a.shape[0]
            g_sum[n] = g_sum[n] + g.T @ g
    return {n: (a_sum[n] / len(x), g_sum[n] / len(x)) for n in layer_names}


def _grad_matrix(model, block, x1, y1):
    """That sample's gradient of log p as the (O, I') matrix [∂W | ∂b]."""
    params = dict(model.named_parameters())
    z = model(x1)
    keys = block.keys
    gs = torch.autograd.grad(F.log_softmax(z, -1)[0, y1], [params[k] for k in keys])
    return block.matrix(dict(zip(keys, gs, strict=True)), torch.float64)


def _vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)  # stack columns


@pytest.mark.parametrize(
    "make, shape", [(_mlp, (5,)), (lambda: ConvNet(), (2, 3, 3))], ids=["mlp", "conv-one-position"]
)
def test_one_sample_block_is_the_gradient_outer_product(make, shape):
    model = make()
    if isinstance(model, ConvNet):  # one output position per layer: KFC is exact there too
        model.c1 = nn.Conv2d(2, 4, 3)
        model.c2 = nn.Conv2d(4, 4, 1, bias=False)
    x, y = _data(shape, n=1)
    kfac = ewc.fisher_kfac(model, [(x, y)], kind="empirical")
    assert len(kfac) == 3 and len(kfac.rest) == 0
    for name, block in kfac.items():
        ((a, g),) = block.terms
        v = _vec(_grad_matrix(model, block, x, y[0]))
        dense = torch.outer(v, v)
        assert torch.allclose(torch.kron(a, g), dense, atol=1e-12), name


@pytest.mark.parametrize(
    "make, shape, layers",
    [
        (_mlp, (5,), ["0", "2", "4"]),
        (SeqNet, (3, 4), ["inp", "out"]),
        (ConvNet, (2, 6, 5), ["c1", "c2", "fc"]),
    ],
    ids=["mlp", "sequence", "conv"],
)
@pytest.mark.parametrize("bs", [1, 4, 6])
def test_factors_equal_brute_force_sums(make, shape, layers, bs):
    model = make()
    x, y = _data(shape)
    kfac = ewc.fisher_kfac(model, _batches(x, y, bs), kind="empirical")
    assert sorted(kfac) == sorted(layers)
    ref = _brute(model, layers, x, y)
    for n in layers:
        ((a, g),) = kfac[n].terms
        assert torch.allclose(a, ref[n][0], atol=1e-12), n
        assert torch.allclose(g, ref[n][1], atol=1e-12), n
    assert kfac.n_samples == len(x) and kfac.kind == "empirical"


def test_exact_kind_is_the_expectation_over_labels():
    """G of kind='exact': (1/N) Σ_n J_nᵀ (diag p − p pᵀ) J_n, J_n = ∂z_n/∂(layer output)."""
    model = _mlp()
    x, _ = _data((5,), n=4)
    kfac = ewc.fisher_kfac(model, [x[:3], x[3:]], kind="exact")
    for n in ["0", "2", "4"]:
        ref = 0.0
        for i in range(len(x)):
            p = F.softmax(model(x[i : i + 1]), -1)[0].detach()
            fout = torch.diag(p) - torch.outer(p, p)
            rows = []
            for c in range(3):
                cot = torch.zeros(1, 3)
                cot[0, c] = 1.0
                rows.append(_per_sample(model, [n], x[i : i + 1], cotangent=cot)[n][1][0])
            jac = torch.stack(rows)  # (C, O)
            ref = ref + jac.T @ fout @ jac
        ((a, g),) = kfac[n].terms
        assert torch.allclose(g, ref / len(x), atol=1e-12), n


def test_sampled_is_batch_size_independent_and_mc_averages():
    model = _mlp()
    x, _ = _data((5,), n=7)
    runs = [
        ewc.fisher_kfac(
            model,
            [x[i : i + bs] for i in range(0, 7, bs)],
            generator=torch.Generator().manual_seed(3),
        )
        for bs in (1, 3, 7)
    ]
    for other in runs[1:]:
        for n in runs[0]:
            for (a0, g0), (a1, g1) in zip(runs[0][n].terms, other[n].terms, strict=True):
                assert torch.allclose(a0, a1) and torch.allclose(g0, g1)
    # many draws approach the exact expectation
    many = ewc.fisher_kfac(model, [x], mc_samples=4000, generator=torch.Generator().manual_seed(0))
    exact = ewc.fisher_kfac(model, [x], kind="exact")
    g_mc, g_ex = many["4"].terms[0][1], exact["4"].terms[0][1]
    assert (g_mc - g_ex).abs().max() < 0.05 * g_ex.abs().max()


def test_other_parameters_fall_back_to_the_diagonal():
    """LayerNorm, a grouped conv and unselected layers: the same numbers as fisher_diagonal."""
    for model, shape in [(SeqNet(), (3, 4)), (ConvNet(groups=2), (2, 6, 5))]:
        x, y = _data(shape)
        kfac = ewc.fisher_kfac(model, _batches(x, y, 4), kind="exact")
        rest = list(kfac.rest)
        assert rest, type(model).__name__
        diag = ewc.fisher_diagonal(model, _batches(x, y, 4), kind="exact", params=rest)
        for n in rest:
            assert torch.allclose(kfac.rest[n], diag[n], atol=1e-12), n
    assert "c2.weight" in kfac.rest  # groups=2
    assert set(kfac.params) == {n for n, _ in model.named_parameters()}


def test_params_selects_layers_and_bias():
    model = _mlp()
    x, y = _data((5,))
    kfac = ewc.fisher_kfac(model, [(x, y)], kind="empirical", params=["0.weight", "4.*"])
    assert sorted(kfac) == ["0", "4"] and kfac["0"].bias is None and kfac["4"].bias == "4.bias"
    assert kfac["0"].terms[0][0].shape == (5, 5)
    full = ewc.fisher_kfac(model, [(x, y)], kind="empirical")
    assert torch.allclose(kfac["0"].terms[0][0], full["0"].terms[0][0][:5, :5])
    # only a bias selected: no Kronecker block, the diagonal covers it
    only_bias = ewc.fisher_kfac(model, [(x, y)], kind="empirical", params="0.bias")
    assert len(only_bias) == 0 and list(only_bias.rest) == ["0.bias"]


class SeqFirst(nn.Module):
    """Runs its first Linear on (T, N, I): rows are positions, not samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.transpose(0, 1)).transpose(0, 1)  # (N, T, 4)
        return self.b(torch.tanh(h).mean(1))


def test_a_layer_whose_route_fails_takes_the_diagonal():
    model = SeqFirst()
    x, y = _data((3, 4), n=4)
    kfac = ewc.fisher_kfac(model, [(x, y)], kind="empirical")
    assert list(kfac) == ["b"] and sorted(kfac.rest) == ["a.bias", "a.weight"]
    ref = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    for n in kfac.rest:
        assert torch.allclose(kfac.rest[n], ref[n], atol=1e-12)


def _dense_block(block):
    return sum(torch.kron(a, g) for a, g in block.terms)


def test_quadratic_arithmetic_and_diagonal_against_dense():
    model = ConvNet(groups=2)
    x, y = _data((2, 6, 5))
    k1 = ewc.fisher_kfac(model, _batches(x, y, 3), kind="empirical")
    k2 = ewc.fisher_kfac(model, _batches(x, y, 2), kind="exact")
    combo = 0.5 * k1 + k2 * 2.0
    assert isinstance(combo, KFAC) and len(combo["c1"].terms) == 2
    torch.manual_seed(0)
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for k in (k1, combo):
        want = sum(
            _vec(b.matrix(delta, torch.float64))
            @ _dense_block(b)
            @ _vec(b.matrix(delta, torch.float64))
            for b in k.values()
        ) + sum((k.rest[n] * delta[n] ** 2).sum() for n in k.rest)
        assert torch.allclose(k.quadratic(delta), want)
        diag = k.diagonal()
        for b in k.values():
            d = torch.diagonal(_dense_block(b)).reshape(-1, b.shape[0]).T  # (O, I')
            got = b.matrix(dict(diag), torch.float64)
            assert torch.allclose(got, d)
        assert set(diag) == set(k.params)


def test_diagonal_of_one_sample_equals_fisher_diagonal():
    model = _mlp()
    x, y = _data((5,), n=1)
    kd = ewc.fisher_kfac(model, [(x, y)], kind="empirical").diagonal()
    fd = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    for n in fd:
        assert torch.allclose(kd[n], fd[n], atol=1e-12)


def test_float32_model_accumulates_in_float32_and_stores_dtype():
    model = _mlp().float()
    x, y = _data((5,))
    k = ewc.fisher_kfac(model, [(x.float(), y)], kind="empirical", dtype=torch.bfloat16)
    assert k["0"].terms[0][0].dtype == torch.bfloat16
    k32 = ewc.fisher_kfac(model, [(x.float(), y)], kind="empirical")
    k64 = ewc.fisher_kfac(model.double(), [(x, y)], kind="empirical")
    assert torch.allclose(k32["0"].terms[0][1].double(), k64["0"].terms[0][1], rtol=1e-4, atol=1e-7)


def test_errors_are_clear():
    model = _mlp()
    with pytest.raises(ValueError, match="no samples"):
        ewc.fisher_kfac(model, [])
    with pytest.raises(ValueError, match="kind"):
        ewc.fisher_kfac(model, [torch.randn(2, 5)], kind="bogus")
    k = ewc.fisher_kfac(model, [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="PSD"):
        _ = k * -1.0
    other = ewc.fisher_kfac(model, [torch.randn(2, 5)], params="0.*")
    with pytest.raises(KeyError, match="different layers"):
        _ = k + other


def test_wide_layers_take_the_blocked_upper_triangle_product():
    """Inputs and outputs of 300 and 260 units: the row-blocked Gram products (nb > 1)."""
    from ewc.kfac import _gram_upper_, _symmetric

    rows = torch.randn(7, 300)
    acc = torch.zeros(300, 300)
    _gram_upper_(acc, rows, 0.5)
    assert torch.allclose(_symmetric(acc), 0.5 * rows.T @ rows, atol=1e-12)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 260), nn.Tanh(), nn.Linear(260, 3))
    x, y = _data((300,), n=5)
    kfac = ewc.fisher_kfac(model, _batches(x, y, 2), kind="empirical")
    ref = _brute(model, ["0", "2"], x, y)
    for n in ["0", "2"]:
        ((a, g),) = kfac[n].terms
        assert torch.allclose(a, ref[n][0], atol=1e-12) and torch.allclose(g, ref[n][1], atol=1e-12)
