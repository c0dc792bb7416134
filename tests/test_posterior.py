"""The Laplace view: DiagonalGaussian, EWC.posterior and predictive, against brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import ewc
from ewc import DiagonalGaussian, predictive


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def data(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))]


def perturb(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def consolidated(mode, cls=ewc.EWC):
    model = net()
    reg = cls(model, lam=7.0, mode=mode, gamma=0.5 if mode == "online" else 1.0, kind="exact")
    for t in range(2):  # two tasks at two optima
        reg.consolidate(data(t)) if cls is ewc.EWC else reg.consolidate()
        perturb(model, 0.3, 10 + t)
    return model, reg


def penalty_at(reg, model, theta):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])
    return float(reg.penalty().detach())


@pytest.mark.parametrize(
    ("mode", "cls"), [("separate", ewc.EWC), ("online", ewc.EWC), ("separate", ewc.L2)]
)
def test_log_prob_differences_equal_penalty_differences(mode, cls):
    model, reg = consolidated(mode, cls)
    q = reg.posterior()
    theta1 = params_of(model)
    perturb(model, 0.5, 99)
    theta2 = params_of(model)
    lhs = float(q.log_prob(theta1) - q.log_prob(theta2))
    rhs = penalty_at(reg, model, theta2) - penalty_at(reg, model, theta1)
    assert abs(rhs) > 1e-2
    assert math.isclose(lhs, rhs, rel_tol=1e-10, abs_tol=1e-12)


def test_posterior_mean_and_precision_are_the_merged_quadratic():
    model, reg = consolidated("separate")
    # by hand: two tasks' Fishers and optima
    model2 = net()
    f0 = ewc.fisher_diagonal(model2, data(0), kind="exact")
    th0 = params_of(model2)
    perturb(model2, 0.3, 10)
    f1 = ewc.fisher_diagonal(model2, data(1), kind="exact")
    th1 = params_of(model2)
    q = reg.posterior(prior_precision=0.25)
    for n in th0:
        a = f0[n] + f1[n]
        mu = (f0[n] * th0[n] + f1[n] * th1[n]) / a
        assert torch.allclose(q.mean[n], mu, rtol=1e-10, atol=1e-12)
        assert torch.allclose(q.precision[n], 7.0 * a + 0.25, rtol=1e-12)
        assert torch.allclose(q.variance[n], 1.0 / (7.0 * a + 0.25), rtol=1e-12)
    _, l2 = consolidated("separate", ewc.L2)
    assert all(
        torch.allclose(v, torch.full_like(v, 14.0)) for v in l2.posterior().precision.values()
    )
    model = net()
    latest = ewc.L2(model, lam=3.0, anchor="latest")
    for t in range(2):
        latest.consolidate()
        perturb(model, 0.3, 20 + t)
    q_latest = latest.posterior()
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in q_latest.precision.values())
    assert all(torch.equal(q_latest.mean[n], latest.anchor[n]) for n in latest.anchor)
    _, online = consolidated("online")
    assert all(torch.equal(online.posterior().mean[n], online.anchor[n]) for n in online.anchor)


def gaussian(seed=0, zero=False):
    g = torch.Generator().manual_seed(seed)
    mean = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    prec = {"a": torch.rand(3, 2, generator=g) * 3 + 0.2, "b": torch.rand(4, generator=g) + 0.5}
    if zero:
        prec["b"][1] = 0.0
    return DiagonalGaussian(mean, prec)


def normal(q):
    mu = torch.cat([q.mean[n].reshape(-1) for n in q.mean])
    sd = torch.cat([q.variance[n].sqrt().reshape(-1) for n in q.mean])
    return Normal(mu, sd)


def flat(d):
    return torch.cat([d[n].reshape(-1) for n in d])


def test_log_prob_entropy_and_kl_match_torch_distributions():
    q, r = gaussian(0), gaussian(1)
    x = {n: v + 0.3 for n, v in q.mean.items()}
    assert torch.allclose(q.log_prob(x), normal(q).log_prob(flat(x)).sum(), rtol=1e-12)
    assert torch.allclose(q.entropy(), normal(q).entropy().sum(), rtol=1e-12)
    assert torch.allclose(q.kl(r), kl_divergence(normal(q), normal(r)).sum(), rtol=1e-12)
    assert float(q.kl(q)) == pytest.approx(0.0, abs=1e-12)
    assert float(q.kl(r)) > 0 and float(r.kl(q)) != pytest.approx(float(q.kl(r)))


def test_log_prob_is_differentiable_and_its_gradient_is_minus_the_penalty_gradient():
    model, reg = consolidated("separate")
    q = reg.posterior()
    perturb(model, 0.2, 5)
    lp = q.log_prob(dict(model.named_parameters()))
    g_lp = torch.autograd.grad(lp, list(model.parameters()))
    g_pen = torch.autograd.grad(reg.penalty(), list(model.parameters()))
    for a, b in zip(g_lp, g_pen, strict=True):
        assert torch.allclose(a, -b, rtol=1e-10, atol=1e-14)


def test_sample_moments_converge_to_mean_and_inverse_precision():
    q = gaussian(2)
    n = 4000
    draws = q.sample(n, generator=torch.Generator().manual_seed(0))
    assert len(draws) == n and set(draws[0]) == {"a", "b"}
    x = torch.stack([flat(d) for d in draws])
    mu, var = flat(q.mean), flat(q.variance)
    # 5 standard errors: of the mean sqrt(σ²/n), of the variance σ² sqrt(2/(n-1))
    assert bool(((x.mean(0) - mu).abs() < 5 * (var / n).sqrt()).all())
    assert bool(((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all())


def test_sample_n_equals_n_single_draws_and_is_reproducible():
    q = gaussian(3)
    many = q.sample(3, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ones = [q.sample(1, generator=g)[0] for _ in range(3)]
    for a, b in zip(many, ones, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_zero_precision_needs_a_prior():
    q = gaussian(0, zero=True)
    for call in (lambda: q.sample(), lambda: q.log_prob(q.mean), q.entropy, lambda: q.kl(q)):
        with pytest.raises(ValueError, match="prior_precision"):
            call()
    assert math.isinf(float(q.variance["b"][1]))
    # an EWC whose Fisher is zero somewhere (a parameter the data never reach)
    model = net()
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    fisher["2.bias"] = torch.zeros(3)
    reg = ewc.EWC(model, lam=1.0)
    reg.consolidate(fisher=fisher)
    with pytest.raises(ValueError, match="2.bias.*prior_precision"):
        reg.posterior().sample()
    reg.posterior(prior_precision=1e-2).sample()


def test_construction_errors_name_what_to_fix():
    with pytest.raises(ValueError, match="same keys"):
        DiagonalGaussian({"a": torch.zeros(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        DiagonalGaussian({"a": torch.zeros(2)}, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match=">= 0"):
        DiagonalGaussian({"a": torch.zeros(2)}, {"a": -torch.ones(2)})
    with pytest.raises(ValueError, match="consolidate"):
        ewc.EWC(net(), lam=1.0).posterior()
    _, reg = consolidated("separate")
    with pytest.raises(ValueError, match="prior_precision"):
        reg.posterior(prior_precision=-1.0)
    with pytest.raises(KeyError, match="missing"):
        reg.posterior().log_prob({})
    with pytest.raises(ValueError, match="n must be"):
        gaussian().sample(0)


def test_predictive_is_the_average_softmax_over_samples_and_leaves_the_model_alone():
    model, reg = consolidated("separate")
    model.append(nn.Dropout(0.5))  # a mode-dependent layer: it must run in eval mode
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = reg.posterior(prior_precision=1.0)
    x = torch.randn(6, 4)
    got = predictive(model, q, x, n_samples=5, generator=torch.Generator().manual_seed(3))
    # brute force: load each draw into a copy of the model
    draws = q.sample(5, generator=torch.Generator().manual_seed(3))
    ref = torch.zeros(6, 3)
    for d in draws:
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(d[n])
            ref += torch.softmax(m(x), -1) / 5
    assert torch.allclose(got, ref, rtol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(6))
    assert model.training and model[-1].training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_predictive_with_a_sharp_posterior_is_the_point_prediction_and_keeps_uncovered_params():
    model = net()
    reg = ewc.EWC(model, lam=1e12, params="0.*")  # only the first layer is covered
    reg.consolidate(fisher={"0.weight": torch.ones(5, 4), "0.bias": torch.ones(5)})
    q = reg.posterior()
    assert set(q.mean) == {"0.weight", "0.bias"}
    x = torch.randn(3, 4)
    got = predictive(model, q, x, n_samples=2)
    with torch.no_grad():
        assert torch.allclose(got, torch.softmax(model(x), -1), atol=1e-5)
    with pytest.raises(ValueError, match="does not have"):
        predictive(nn.Linear(4, 3), q, x)
    with pytest.raises(ValueError, match="n_samples"):
        predictive(model, q, x, n_samples=0)


def test_lambda_n_is_the_laplace_posterior_of_n_points():
    # Bayesian linear-Gaussian regression: the exact posterior precision of N points with
    # unit noise is Σ_n x_n x_nᵀ; its diagonal is N · (our per-sample-mean Fisher)
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(50, 3), torch.randn(50, 1)
    reg = ewc.EWC(model, lam=50.0, kind="exact", likelihood="regression")
    reg.consolidate([(x, y)])
    prec = reg.posterior().precision["weight"].reshape(-1)
    assert torch.allclose(prec, (x.T @ x).diagonal(), rtol=1e-12)
    h = ewc.hessian_diagonal(model, [(x, y)], likelihood="regression")
    assert torch.allclose(50.0 * h["weight"].reshape(-1), prec, rtol=1e-12)


def test_readme_posterior_example_runs():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = net()
    dataset_a = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    loader_a = DataLoader(dataset_a, batch_size=16)
    reg = ewc.EWC(model, lam=len(dataset_a))
    reg.consolidate(loader_a, kind="exact")
    q = reg.posterior(prior_precision=1e-4)
    draws = q.sample(8, generator=torch.Generator().manual_seed(0))
    assert len(draws) == 8
    lp0 = q.log_prob(dict(model.named_parameters()))
    perturb(model, 0.1, 1)
    lp1 = q.log_prob(dict(model.named_parameters()))
    assert float(lp0 - lp1) > 0  # the anchor is the mode
    other = ewc.EWC(net(1), lam=1.0)
    other.consolidate(loader_a, kind="exact")
    assert float(q.kl(other.posterior(prior_precision=1e-4))) > 0
    probs = ewc.predictive(model, q, torch.randn(5, 4), n_samples=32)
    assert probs.shape == (5, 3)
