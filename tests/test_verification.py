"""The estimator's checks against autograd: what each one catches, and that each is needed.

Every test in the second half breaks one safeguard on purpose (a monkeypatch) and shows that the
property suite's reference comparison then fails: a check that could be removed without any
test noticing would be a defect.
"""

from __future__ import annotations

import pytest
import torch
from test_properties import CASES, T, batches_for, build, estimate, naive, rel_err
from torch import nn

import ewc
from ewc import _probe, _rules, _verify
from ewc._batches import Layout
from ewc._options import FisherOptions
from ewc._probe import Router


def _probe_verdicts(case, n=T, groups=None):
    """Run the first two checks of a fresh probe by hand: (route, [verdict per sample])."""
    model = build(case)
    args = batches_for(case, (n,))[0][0]
    inputs = args if len(args) > 1 else args[0]
    router = Router(model, dict(model.named_parameters()), FisherOptions())
    layout = Layout.of(inputs, 2)
    route = router.candidate(layout)
    sub = layout.take(inputs, 2)
    z, capture = router.run(route, sub, 2)
    records = {k: v[0] for k, v in capture.records.items() if len(v) == 1}
    route = router.candidate(layout)  # the same route; records of every fast layer
    verdicts = [
        _verify.check_sample(
            model,
            route,
            router.trainable,
            sub,
            z,
            records,
            router._column(z, i),
            i,
            None,
            groups=groups and groups(router.trainable),
        )
        for i in range(2)
    ]
    return route, verdicts


# --- What each check catches -------------------------------------------------------------
GROUPINGS = {
    "one parameter at a time": lambda t: [[k] for k in t],
    "one group, reversed": lambda t: [list(t)[::-1]],
    "interleaved halves": lambda t: [list(t)[1::2], list(t)[::2]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_square_checks_do_not_depend_on_the_grouping_of_gradients(case, monkeypatch):
    """FSDP forms autograd's gradients one unit at a time: the routes must be the same."""
    args = batches_for(case, (T,))[0][0]
    inputs = args if len(args) > 1 else args[0]
    whole = str(ewc.fisher_route(build(case), inputs))
    for name, groups in GROUPINGS.items():
        monkeypatch.setattr(Router, "check_groups", lambda self, g=groups: g(self.trainable))
        assert str(ewc.fisher_route(build(case), inputs)) == whole, (case, name)


def test_the_grouping_test_sees_failures():
    _, verdicts = _probe_verdicts("tied-functional", groups=GROUPINGS["one parameter at a time"])
    assert "closed form differs" in verdicts[0].failed["wte"]
    _, verdicts = _probe_verdicts("tied-functional", groups=GROUPINGS["interleaved halves"])
    assert "closed form differs" in verdicts[0].failed["wte"]


def test_locality_catches_an_expanded_table_that_is_indexed():
    """wpe(arange(T)[None])[0]: forward values are right, every sample's gradient lands on row
    0 of the expanded lookup. Only the locality check sees it (the squares agree)."""
    _, verdicts = _probe_verdicts("position-expanded-indexed")
    assert verdicts[1].failed.get("wpe") == _verify.LEAK


def test_squares_catch_a_functionally_tied_head():
    _, verdicts = _probe_verdicts("tied-functional")
    assert "closed form differs" in verdicts[0].failed["wte"]
    assert "block.lin" not in verdicts[0].failed


def test_squares_catch_a_wrong_module_local_vjp(monkeypatch):
    """A leaf rule that gives wrong numbers (not an exception) is caught and rerouted."""
    real = _rules.leaf_vjp

    def wrong(module, x, g):
        return {k: 1.5 * v for k, v in real(module, x, g).items()}

    monkeypatch.setattr(
        _rules, "LEAF", _rules.LayerRule("module-local VJP", wrong, (), native=True)
    )
    case = "activations-with-parameters"
    model = build(case)
    batches = batches_for(case, (T, T + 2))
    got = estimate(model, batches, "empirical", seed=0)
    assert rel_err(got, naive(model, batches, "empirical", seed=0)) < 1e-9
    route = ewc.fisher_route(model, batches[0][0][0])
    assert "closed form differs" in route.excluded["block.slope"]


def test_nested_vmap_would_be_wrong_for_prelu():
    """The reason the module-local VJP loops over columns: vmap(vmap(vjp)) of nn.PReLU."""
    from torch.func import functional_call, vjp, vmap

    torch.manual_seed(0)
    m = nn.PReLU(5).double()
    with torch.no_grad():
        m.weight.uniform_(0.1, 0.9)
    x, g = torch.randn(6, 5, dtype=torch.float64), torch.randn(1, 6, 5, dtype=torch.float64)
    params = {"weight": m.weight.detach()}

    def one(xn, gn):
        _, fn = vjp(lambda p: functional_call(m, p, (xn.unsqueeze(0),)).squeeze(0), params)
        return vmap(fn)(gn)[0]["weight"].square().sum(0)

    nested = vmap(one)(x, g.movedim(0, 1)).sum(0)
    ours = _rules.leaf_vjp(m, x, g)["weight"]
    want = sum(
        torch.autograd.grad((m(x[i : i + 1])[0] * g[0, i]).sum(), m.weight)[0].square()
        for i in range(6)
    )
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-14)
    assert float((nested - want).abs().max()) > 1e-3  # PyTorch's batching rule is wrong here


def test_a_model_that_mixes_samples_is_refused():
    class BatchCentred(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x - x.mean(0, keepdim=True))  # batch statistics in eval mode

    model = BatchCentred().double()
    with pytest.raises(ValueError, match="mixes the samples of a batch"):
        ewc.fisher_diagonal(model, [torch.randn(6, 3, dtype=torch.float64)], kind="exact")


def test_route_is_verified_once_per_signature(monkeypatch):
    calls = []
    real = _probe.check_sample
    monkeypatch.setattr(_probe, "check_sample", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    case = "position-broadcast"
    model = build(case)
    batches = batches_for(case, (T + 2, T, T + 2, T + 1, 1, 1))
    estimate(model, batches, "sampled", seed=0)
    # two checks (one per probe sample) for batches of >= 2 samples, one for batches of 1
    assert len(calls) == 3


# --- Each safeguard is load-bearing --------------------------------------------------------
def _wrong(case, kind="empirical", sizes=(T, T + 2)):
    model = build(case)
    batches = batches_for(case, sizes)
    return rel_err(estimate(model, batches, kind, seed=0), naive(model, batches, kind, seed=0))


def test_without_the_checks_the_suite_fails(monkeypatch):
    monkeypatch.setattr(_probe, "check_sample", lambda *a, **k: _verify.Verdict())
    for case in ["tied-functional", "position-expanded-reduced", "position-expanded-indexed"]:
        assert _wrong(case) > 1e-3, case


def test_without_the_probe_the_suite_fails(monkeypatch):
    import dataclasses

    monkeypatch.setattr(
        Router, "probe", lambda self, route, *a: dataclasses.replace(route, verified="skipped")
    )
    for case in ["shared-mask-generic-path", "position-broadcast", "encoder-sequence-first"]:
        assert _wrong(case, sizes=(T,)) > 1e-3, case


def test_without_the_square_check_a_functional_tie_is_wrong(monkeypatch):
    monkeypatch.setattr(_verify, "rel_err", lambda *a, **k: 0.0)
    monkeypatch.setattr(_verify, "square_err", lambda *a, **k: 0.0)
    assert _wrong("tied-functional") > 1e-3
    assert _wrong("linear-sequence-first") < 1e-9  # the locality check still catches this


def test_without_the_locality_check_an_indexed_table_is_wrong(monkeypatch):
    monkeypatch.setattr(_verify, "_leaks", lambda *a, **k: False)
    assert _wrong("position-expanded-indexed") > 1e-3
    assert _wrong("tied-functional") < 1e-9  # the square check still catches this


def test_without_prepended_hooks_a_hooked_layer_loses_its_closed_form(monkeypatch):
    real = nn.Module.register_forward_hook

    def appended(self, hook, *, prepend=False, **kw):
        return real(self, hook, prepend=False, **kw)

    monkeypatch.setattr(nn.Module, "register_forward_hook", appended)
    model = build("hooks")
    route = ewc.fisher_route(model, batches_for("hooks", (T,))[0][0][0])
    assert "head" not in route.fast  # still right (verification), but no longer fast
    assert _wrong("hooks") < 1e-9


def test_without_fixed_expansions_the_table_is_wrong_when_n_equals_t(monkeypatch):
    real = Router.probe

    def unfixed(self, route, *a, **k):
        checked = real(self, route, *a, **k)
        if checked is None:
            return None
        return type(checked)(
            checked.partition,
            checked.layout,
            checked.clone,
            {n: "auto" for n in checked.expand},
            checked.generic,
            checked.excluded,
            checked.verified,
        )

    monkeypatch.setattr(Router, "probe", unfixed)
    assert _wrong("position-broadcast", sizes=(T + 2, T)) > 1e-3


def test_without_float32_squares_float16_underflows(monkeypatch):
    from test_properties import test_float16_squares_do_not_underflow

    monkeypatch.setattr(_rules, "acc_dtype", lambda dtype: dtype)
    monkeypatch.setattr(ewc.estimate, "acc_dtype", lambda dtype: dtype)
    with pytest.raises(AssertionError):
        test_float16_squares_do_not_underflow()
