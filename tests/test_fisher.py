import pytest
import torch
from conftest import CASES, assert_fisher_close, loader, make_case, naive_fisher
from torch import nn

import ewc


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("name", CASES)
def test_every_layer_matches_naive_per_sample_loop(name, kind):
    model, x, y = make_case(name)
    gen = torch.Generator().manual_seed(3)
    got = ewc.fisher_diagonal(model, loader(x, y, 5), kind=kind, generator=gen)
    want = naive_fisher(model, x, y, kind, seed=3)
    assert_fisher_close(got, want)
    assert got.n_samples == x.shape[0] and got.kind == kind


def test_fast_path_is_actually_used():
    """The closed forms cover the supported layers; only the rest goes through torch.func."""
    for name in ["mlp", "seq_linear", "conv2d", "conv1d", "embedding"]:
        model, x, y = make_case(name)
        route = ewc.fisher_route(model, x)
        assert route.rest == (), (name, str(route))
    model, x, y = make_case("fallback")
    route = ewc.fisher_route(model, x)
    # the layer called twice and the weight tied between two Linear layers; inp/out stay fast
    # and Scale (no closed form) takes the per-sample VJP of that module alone
    assert sorted(route.rest) == ["shared.bias", "shared.weight", "tied.weight"]
    assert {"inp", "out", "scale"} <= set(route.fast)
    assert "called 2 times" in route.excluded["shared"]


def test_multi_sample_sampled_matches_naive():
    model, x, y = make_case("mlp")
    got = ewc.fisher_diagonal(
        model,
        loader(x, y, 4),
        kind="sampled",
        mc_samples=3,
        generator=torch.Generator().manual_seed(1),
    )
    assert_fisher_close(got, naive_fisher(model, x, y, "sampled", seed=1, mc=3))


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
def test_gaussian_regression_matches_naive(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(9, 3), torch.randn(9, 2)
    lik = ewc.Gaussian(sigma=0.7)
    got = ewc.fisher_diagonal(
        model,
        loader(x, y, 4),
        kind=kind,
        likelihood=lik,
        generator=torch.Generator().manual_seed(2),
    )
    want = naive_fisher(model, x, y, kind, likelihood="regression", sigma=0.7, seed=2)
    assert_fisher_close(got, want)


def test_custom_nll_matches_classification_empirical():
    model, x, y = make_case("conv2d")

    def nll(out, t):
        return nn.functional.cross_entropy(out, t, reduction="none")

    got = ewc.fisher_diagonal(model, loader(x, y, 5), kind="empirical", likelihood=nll)
    assert_fisher_close(got, naive_fisher(model, x, y, "empirical"))


def test_sequence_outputs_sum_inside_the_square():
    """Outputs (N, T, C), targets (N, T): one sample is one sequence."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    x, y = torch.randn(6, 2, 3), torch.randint(0, 5, (6, 2))
    for kind in ["empirical", "exact"]:
        got = ewc.fisher_diagonal(model, loader(x, y, 4), kind=kind)
        acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for n in range(6):
            logp = torch.log_softmax(model(x[n]), -1)  # (T, C)
            if kind == "empirical":
                terms = [(1.0, logp[0, y[n, 0]] + logp[1, y[n, 1]])]
            else:  # positions independent: E over each position's label
                p = logp.exp().detach()
                terms = [(float(p[t, c]), logp[t, c]) for t in range(2) for c in range(5)]
            for w, ll in terms:
                gs = torch.autograd.grad(ll, list(model.parameters()), retain_graph=True)
                for (k, _), g in zip(model.named_parameters(), gs, strict=True):
                    acc[k] += w * g**2
        assert_fisher_close(got, {k: v / 6 for k, v in acc.items()})


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
def test_batch_size_independence(kind):
    model, x, y = make_case("conv2d", n=17)
    results = [
        ewc.fisher_diagonal(
            model, loader(x, y, bs), kind=kind, generator=torch.Generator().manual_seed(5)
        )
        for bs in (1, 4, 17)
    ]
    for r in results[1:]:
        assert_fisher_close(r, results[0])


def test_fisher_is_not_squared_batch_mean():
    """A batch-mean gradient squared would shrink roughly by the batch size; ours does not."""
    model, x, y = make_case("mlp", n=32)
    f = ewc.fisher_diagonal(model, loader(x, y, 32), kind="empirical")
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    gs = torch.autograd.grad(loss, list(model.parameters()))
    squared_mean = sum(float((g**2).sum()) for g in gs)
    assert f.trace() > 3 * squared_mean


def test_softmax_linear_exact_fisher_equals_hessian_diagonal():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    f = ewc.fisher_diagonal(model, [(x, y)], kind="exact")
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()

    def nll(flat):
        w, b = flat[:12].reshape(3, 4), flat[12:]
        return nn.functional.cross_entropy(x @ w.T + b, y)  # mean NLL

    h = torch.autograd.functional.hessian(nll, torch.cat([w0.reshape(-1), b0]))
    diag = torch.diagonal(h)
    torch.testing.assert_close(f["weight"].reshape(-1), diag[:12], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f["bias"], diag[12:], rtol=1e-10, atol=1e-12)


def test_sampled_converges_to_exact():
    model, x, y = make_case("mlp", n=20)
    exact = ewc.fisher_diagonal(model, [(x, y)], kind="exact")

    def rel_err(mc):
        s = ewc.fisher_diagonal(
            model,
            [(x, y)],
            kind="sampled",
            mc_samples=mc,
            generator=torch.Generator().manual_seed(0),
        )
        num = sum(float((s[k] - exact[k]).abs().sum()) for k in exact)
        return num / exact.trace()

    e1, e_many = rel_err(1), rel_err(4000)
    assert e_many < 0.03
    assert e_many < e1 / 5


def test_n_samples_limits_the_data():
    model, x, y = make_case("mlp", n=20)
    f = ewc.fisher_diagonal(model, loader(x, y, 6), kind="empirical", n_samples=9)
    assert f.n_samples == 9
    assert_fisher_close(f, naive_fisher(model, x[:9], y[:9], "empirical"))


def test_model_state_left_as_it_was():
    model, x, y = make_case("conv2d")
    model.train()
    model.bn.eval()  # a deliberately mixed mode must come back as it was
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    f = ewc.fisher_diagonal(model, loader(x, y, 5), kind="empirical")
    assert {k: m.training for k, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k  # buffers (BatchNorm running stats) included
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
    # eval mode was used: dropout/BatchNorm in train mode would give another value
    model.eval()
    assert_fisher_close(f, naive_fisher(model, x, y, "empirical"))


def test_dropout_is_off_during_estimate():
    model, x, y = make_case("mlp")
    model.train()
    a = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    b = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    assert_fisher_close(a, b, rtol=0, atol=0)
    assert model.training


def test_frozen_parameters_are_left_out():
    model, x, y = make_case("mlp")
    model[0].weight.requires_grad_(False)
    f = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    assert set(f) == {"0.bias", "3.weight", "3.bias"}
    full = naive_fisher(model, x, y, "empirical")
    assert_fisher_close(f, full)


def test_dict_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    torch.manual_seed(0)
    m = Two()
    u, v, y = torch.randn(5, 3), torch.randn(5, 4), torch.randint(0, 2, (5,))
    f1 = ewc.fisher_diagonal(m, [((u, v), y)], kind="exact")
    f2 = ewc.fisher_diagonal(m, [({"u": u, "v": v}, y)], kind="exact")
    assert_fisher_close(f1, f2, rtol=0, atol=0)


def test_fisher_arithmetic():
    a = ewc.Fisher({"w": torch.tensor([1.0, 2.0])})
    b = ewc.Fisher({"w": torch.tensor([3.0, 5.0])})
    c = 0.5 * a + b * 2
    assert torch.equal(c["w"], torch.tensor([6.5, 11.0]))
    assert (a / 2)["w"].tolist() == [0.5, 1.0]
    assert a.trace() == 3.0
    with pytest.raises(KeyError):
        a + ewc.Fisher({"v": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        a + ewc.Fisher({"w": torch.ones(3)})


def test_softmax_factor_is_exact_and_rank_c_minus_1():
    from ewc.likelihoods import _softmax_fisher_factor

    torch.manual_seed(0)
    for c in (2, 3, 10):
        logits = torch.randn(7, 4, c) * 3
        logits[0, 0, 0] = 40.0  # a nearly one-hot row
        p = torch.softmax(logits, -1)
        s = _softmax_fisher_factor(p)
        assert s.shape == (c - 1, 7, 4, c)
        got = torch.einsum("k...i,k...j->...ij", s, s)
        want = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_low_precision_parameters_accumulate_in_float32():
    model, x, y = make_case("mlp", n=64)
    ref = ewc.fisher_diagonal(model, loader(x, y, 16), kind="exact")
    low = ewc.fisher_diagonal(model.to(torch.bfloat16), loader(x.bfloat16(), y, 16), kind="exact")
    for k in ref:
        assert low[k].dtype == torch.bfloat16
        torch.testing.assert_close(
            low[k].double(), ref[k], rtol=0.1, atol=1e-3 * float(ref[k].max())
        )


def test_fallback_with_non_tensor_arguments():
    """A model taking a Python int besides the batch (e.g. a task id) through the generic path."""
    from conftest import Scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale(4)
            self.fc = nn.Linear(4, 6)

        def forward(self, x, task):  # scale called twice: the whole-model generic path
            return self.fc(torch.tanh(self.scale(self.scale(x))))[:, 3 * task : 3 * task + 3]

    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    got = ewc.fisher_diagonal(model, [((x, 1), y)], kind="exact")
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for n in range(7):
        logp = torch.log_softmax(model(x[n : n + 1], 1)[0], -1)
        for c in range(3):
            gs = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True)
            for (k, _), g in zip(model.named_parameters(), gs, strict=True):
                acc[k] += float(logp[c].exp()) * g**2
    assert_fisher_close(got, {k: v / 7 for k, v in acc.items()})
