"""hessian_diagonal against the dense float64 autograd Hessian, and what it shows about the Fisher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ewc
from ewc import hessian as hessian_mod


# --- The dense reference ----------------------------------------------------------------------
def dense_hessian(model, x, y, nll):
    """The full Hessian of the per-sample-mean NLL over every trainable parameter (flattened)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    was = model.training
    model.eval()

    def f(flat):
        parts = dict(
            zip(
                names,
                [t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)],
                strict=True,
            )
        )
        out = torch.func.functional_call(model, parts, (x,))
        return nll(out, y) / x.shape[0]

    h = torch.autograd.functional.hessian(f, flat0, vectorize=True)
    model.train(was)
    return h, names, shapes, sizes


def as_dict(vec, names, shapes, sizes):
    return {n: t.reshape(s) for n, t, s in zip(names, vec.split(sizes), shapes, strict=True)}


def dense_diag(model, x, y, nll):
    h, names, shapes, sizes = dense_hessian(model, x, y, nll)
    return as_dict(h.diagonal(), names, shapes, sizes)


def ce(z, y):
    z = z.reshape(-1, z.shape[-1])
    return nn.functional.cross_entropy(z, y.reshape(-1), reduction="sum", ignore_index=-100)


def max_err(got, want):
    assert set(got) == set(want)
    return max(float((got[n] - want[n]).abs().max()) for n in want)


def scale(d):
    return max(float(v.abs().max()) for v in d.values())


# --- Cases: small models of real parts --------------------------------------------------------
class Seq(nn.Module):
    """Embedding -> Linear on (N, T, d) -> tanh -> GRU -> head, per-position classes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)
        self.rnn = nn.GRU(4, 3, batch_first=True)
        self.head = nn.Linear(3, 5)

    def forward(self, tokens):
        h = torch.tanh(self.proj(self.emb(tokens)))
        h, _ = self.rnn(h)
        return self.head(h)


def mlp(act):
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3))


def case(name):
    torch.manual_seed(3)
    if name in ("mlp-tanh", "mlp-relu"):
        model = mlp(nn.Tanh if name == "mlp-tanh" else nn.ReLU)
        x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
        return model, x, y, "classification", ce
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
        )
        x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
        return model, x, y, "classification", ce
    if name == "sequence":
        model = Seq()
        x = torch.randint(0, 7, (4, 5))
        y = torch.randint(0, 5, (4, 5))
        y[0, :2] = -100  # ignored positions
        return model, x, y, "classification", ce
    if name == "regression":
        model = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 2))
        x, y = torch.randn(7, 3), torch.randn(7, 2)
        sigma = 0.7
        lik = ewc.Gaussian(sigma)
        return model, x, y, lik, lambda z, t: 0.5 * (z - t).square().sum() / sigma**2
    if name == "custom":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        x, y = torch.randn(6, 3), torch.rand(6, 1)

        def huberish(z, t):  # a smooth per-sample nll (N,)
            return torch.log(torch.cosh(z - t)).sum(-1)

        return model, x, y, huberish, lambda z, t: huberish(z, t).sum()
    raise KeyError(name)


CASES = ["mlp-tanh", "mlp-relu", "cnn", "sequence", "regression", "custom"]


@pytest.mark.parametrize("name", CASES)
def test_exact_equals_dense_autograd_hessian(name):
    model, x, y, lik, nll = case(name)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # several batches of unequal size
    got = ewc.hessian_diagonal(model, batches, likelihood=lik)
    want = dense_diag(model, x, y, nll)
    assert got.kind == "hessian" and got.n_samples == x.shape[0]
    assert max_err(got, want) <= 1e-10 * max(1.0, scale(want))
    assert scale(want) > 1e-3  # the comparison is not between zeros


def test_linear_layers_take_the_closed_form_not_per_entry_products(monkeypatch):
    model, x, y, lik, nll = case("mlp-tanh")
    entries = []
    real = hessian_mod._diag_by_entries
    monkeypatch.setattr(
        hessian_mod, "_diag_by_entries", lambda g, p: entries.append(p.numel()) or real(g, p)
    )
    got = ewc.hessian_diagonal(model, [(x, y)])
    assert entries == []  # every parameter of the MLP took the per-layer closed form
    assert max_err(got, dense_diag(model, x, y, nll)) < 1e-10


class TiedUse(nn.Module):
    """A Linear whose weight is also used outside the layer (the closed form would be wrong)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(torch.tanh(h @ self.fc.weight))


def test_a_weight_used_outside_its_layer_takes_the_exact_path_and_the_check_is_load_bearing(
    monkeypatch,
):
    torch.manual_seed(0)
    model = TiedUse()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    want = dense_diag(model, x, y, ce)
    assert max_err(ewc.hessian_diagonal(model, [(x, y)]), want) < 1e-10
    monkeypatch.setattr(hessian_mod, "_closed_form_holds", lambda *a: True)
    broken = ewc.hessian_diagonal(model, [(x, y)])
    assert max_err(broken, want) > 1e-3


class TableRows(nn.Module):
    """A Linear applied to a parameter table that has as many rows as the batch has samples.

    The rows of the layer's output are not samples: every output depends on all of them, so the
    Hessian with respect to that output has terms between rows and the closed form is wrong.
    """

    def __init__(self, rows):
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, 3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        keys = torch.tanh(self.lin(self.table))  # (rows, 3)
        return x @ keys.T @ keys  # (N, 3): row n depends on x_n only


def test_rows_that_are_not_samples_take_the_exact_path_and_the_check_is_load_bearing(
    monkeypatch,
):
    torch.manual_seed(0)
    model = TableRows(4)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))  # N == rows: the coincidence
    want = dense_diag(model, x, y, ce)
    assert max_err(ewc.hessian_diagonal(model, [(x, y)]), want) < 1e-10
    monkeypatch.setattr(hessian_mod, "_rows_independent", lambda *a: True)
    assert max_err(ewc.hessian_diagonal(model, [(x, y)]), want) > 1e-3


def test_params_selection_and_frozen_parameters():
    model, x, y, lik, nll = case("mlp-tanh")
    model[0].bias.requires_grad_(False)
    got = ewc.hessian_diagonal(model, [(x, y)], params=["0.*", "4.weight"])
    assert set(got) == {"0.weight", "4.weight"}
    want = dense_diag(model, x, y, nll)
    assert max(float((got[n] - want[n]).abs().max()) for n in got) < 1e-10


def test_hutchinson_converges_to_exact_within_its_standard_error():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    h, names, shapes, sizes = dense_hessian(model, x, y, ce)
    exact = h.diagonal()
    # one probe's variance of v_i (H v)_i is Σ_{j≠i} H_ij² (Rademacher v)
    var = (h.square().sum(1) - exact.square()).clamp_min(0)
    k = 600
    gen = torch.Generator().manual_seed(0)
    est = ewc.hessian_diagonal(model, [(x, y)], method="hutchinson", n_probes=k, generator=gen)
    got = torch.cat([est[n].reshape(-1) for n in names])
    z = (got - exact).abs() / (var / k).sqrt().clamp_min(1e-12)
    assert float(z.max()) < 5.0  # every entry within 5 standard errors
    assert float((got - exact).abs().max()) < 0.2 * float(exact.abs().max())
    few = ewc.hessian_diagonal(
        model, [(x, y)], method="hutchinson", n_probes=3, generator=torch.Generator().manual_seed(0)
    )
    err_few = float((torch.cat([few[n].reshape(-1) for n in names]) - exact).abs().max())
    assert err_few > float((got - exact).abs().max())  # more probes, closer


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # a Linear regression with one output: the bias' Hessian is 1/σ², the weights' 1-D blocks
    # are coupled, but a single-parameter model has no off-diagonal term at all
    model = nn.Linear(1, 1, bias=False)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    est = ewc.hessian_diagonal(
        model, [(x, y)], likelihood="regression", method="hutchinson", n_probes=1
    )
    assert torch.allclose(est["weight"], (x.square().mean()).reshape(1, 1), rtol=1e-12)


# --- Facts about the Fisher, demonstrated ---------------------------------------------------
def rel(a, b):
    num = sum(float((a[n] - b[n]).square().sum()) for n in b)
    return math.sqrt(num / sum(float(b[n].square().sum()) for n in b))


@pytest.mark.parametrize("net", ["relu-mlp", "relu-cnn"])
def test_piecewise_linear_nets_exact_fisher_equals_hessian_at_any_theta(net):
    torch.manual_seed(4)
    if net == "relu-mlp":
        model = mlp(nn.ReLU)
        x = torch.randn(12, 5)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
        x = torch.randn(6, 1, 6, 6)
    for std in (0.5, 1.0):  # random, not trained, parameters (far from any minimum)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
        y = torch.randint(0, 3, (x.shape[0],))
        h = ewc.hessian_diagonal(model, [(x, y)])
        f = ewc.fisher_diagonal(model, [(x, y)], kind="exact")
        assert h.trace() > 1e-2  # not a saturated softmax: the comparison means something
        assert rel(f, h) < 1e-10
        e = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
        assert rel(e, h) > 0.1  # the empirical Fisher is a different matrix here


def teacher_student(n, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.5)
    x = torch.randn(n, 2)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    y = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
    return model, x, y


def test_smooth_nets_fisher_differs_from_hessian_and_the_gap_shrinks_near_the_minimum():
    # labels drawn from the model itself: the teacher's weights are the population minimum
    model, x, y = teacher_student(4000)
    data = [(x, y)]
    h_min = ewc.hessian_diagonal(model, data)
    f_min = ewc.fisher_diagonal(model, data, kind="exact")
    e_min = ewc.fisher_diagonal(model, data, kind="empirical")
    with torch.no_grad():  # away from the minimum: the same net with other weights
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    h_far = ewc.hessian_diagonal(model, data)
    f_far = ewc.fisher_diagonal(model, data, kind="exact")
    e_far = ewc.fisher_diagonal(model, data, kind="empirical")
    gap_min, gap_far = rel(f_min, h_min), rel(f_far, h_far)
    assert gap_far > 0.2  # tanh: the residual term is not zero
    assert gap_min < 0.5 * gap_far  # and shrinks at the minimum (O(1/√N) there)
    # the empirical Fisher differs from both away from the minimum, and agrees near it
    assert rel(e_far, h_far) > 0.5 and rel(e_far, f_far) > 0.5
    assert rel(e_min, f_min) < 0.5 * rel(e_far, f_far)


def test_fisher_is_never_negative_while_the_hessian_diagonal_can_be():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 2.0)
    x, y = torch.randn(30, 3), torch.randint(0, 3, (30,))
    h = ewc.hessian_diagonal(model, [(x, y)])
    neg = sum(int((v < 0).sum()) for v in h.values())
    assert neg > 0
    with pytest.raises(ValueError, match="negative"):
        h.validate()
    for kind in ("exact", "empirical", "sampled"):
        f = ewc.fisher_diagonal(model, [(x, y)], kind=kind)
        assert all(bool((v >= 0).all()) for v in f.values())


# --- Contracts ------------------------------------------------------------------------------
def test_model_is_left_as_it_was():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    for method in ("exact", "hutchinson"):
        ewc.hessian_diagonal(model, [(x, y)], method=method, n_probes=2)
    assert model.training and model[1].training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


class MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        z = self.fc(x)
        return z - z.mean(0, keepdim=True)


class WithTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, table):
        return torch.tanh(self.fc(x)) * table.sum(0)[:2]  # table: shared, (4, 3)


def test_a_shared_input_whose_leading_dimension_equals_the_batch_size_is_not_refused():
    torch.manual_seed(0)
    model = WithTable()
    x, y, table = torch.randn(4, 3), torch.randint(0, 2, (4,)), torch.randn(4, 3)
    got = ewc.hessian_diagonal(model, [((x, table), y)])

    class Bound(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = model.fc

        def forward(self, x):
            return WithTable.forward(self, x, table)

    assert max_err(got, dense_diag(Bound(), x, y, ce)) < 1e-10


def test_errors_name_what_to_fix():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="method must be one of"):
        ewc.hessian_diagonal(model, [(x, y)], method="dense")
    with pytest.raises(ValueError, match="n_probes"):
        ewc.hessian_diagonal(model, [(x, y)], method="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="needs \\(inputs, targets\\)"):
        ewc.hessian_diagonal(model, [x])
    with pytest.raises(ValueError, match="no samples"):
        ewc.hessian_diagonal(model, [])
    with pytest.raises(ValueError, match="depend on the other samples"):
        ewc.hessian_diagonal(MixesSamples(), [(x, y)])
    with pytest.raises(ValueError, match="labels out of range"):
        ewc.hessian_diagonal(model, [(x, y + 5)])


def test_n_samples_caps_the_data():
    model, x, y, lik, nll = case("mlp-relu")
    got = ewc.hessian_diagonal(model, [(x[:4], y[:4]), (x[4:], y[4:])], n_samples=6)
    assert got.n_samples == 6
    assert max_err(got, dense_diag(model, x[:6], y[:6], nll)) < 1e-10


def test_chunking_and_the_unbatched_fallback_give_the_same_numbers(monkeypatch):
    model, x, y, lik, nll = case("sequence")  # Linear closed forms and per-entry products

    def both():
        gen = torch.Generator().manual_seed(5)
        return (
            ewc.hessian_diagonal(model, [(x, y)]),
            ewc.hessian_diagonal(model, [(x, y)], method="hutchinson", n_probes=7, generator=gen),
        )

    ref_exact, ref_hutch = both()
    monkeypatch.setattr(hessian_mod, "_CHUNK_ELEMENTS", 1)  # one product per pass
    exact, hutch = both()
    assert max_err(exact, ref_exact) < 1e-12 and max_err(hutch, ref_hutch) < 1e-12
    monkeypatch.undo()
    real = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("pretend vmap cannot batch this op")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    exact, hutch = both()
    assert max_err(exact, ref_exact) < 1e-12 and max_err(hutch, ref_hutch) < 1e-12
