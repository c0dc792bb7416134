"""Routes verified by one estimate and reused by the next (``ewc._memo``).

The probe's verdicts are remembered per model and per fingerprint of what they depend on; each
test here changes one such thing between two estimates and checks that the second estimate is
probed again and right against the per-sample loop of ``test_properties``. The last tests make
the fingerprint blind to one of them on purpose and show that the result is then wrong: each
part of the fingerprint is load-bearing.
"""

from __future__ import annotations

import gc

import pytest
import torch
from test_properties import T, batches_for, build, estimate, naive, rel_err

import ewc
from ewc import _memo, _probe


@pytest.fixture
def probes(monkeypatch):
    """Count the probes (one per verified route)."""
    calls = []
    real = _probe.Router.probe

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_probe.Router, "probe", counted)
    return calls


def _right(model, case, sizes=(T, T + 2), kind="empirical"):
    batches = batches_for(case, sizes)
    return rel_err(estimate(model, batches, kind, seed=0), naive(model, batches, kind, seed=0))


def test_a_second_estimate_reuses_the_verified_route_and_gives_the_same_fisher(probes):
    model = build("position-broadcast")
    batches = batches_for("position-broadcast", (T + 2, T))
    first = estimate(model, batches, "sampled", seed=0)
    assert len(probes) == 1
    again = estimate(model, batches, "sampled", seed=0)
    assert len(probes) == 1  # remembered
    for k in first:
        assert torch.equal(first[k], again[k]), k
    assert rel_err(again, naive(model, batches, "sampled", seed=0)) < 1e-9
    estimate(model, batches, "exact", seed=0)  # the kind does not enter the checks
    ewc.mas_importance(model, [a[0] for a, _, _ in batches])
    ewc.fisher_kfac(model, [(a[0], y) for a, _, y in batches], kind="empirical")
    assert len(probes) == 1  # the same route serves the diagonal, MAS and KFAC
    ewc.clear_route_cache(model)
    estimate(model, batches, "sampled", seed=0)
    assert len(probes) == 2


def test_a_changed_attribute_is_probed_again(probes):
    model = build("linear-batch-first")
    assert _right(model, "linear-batch-first", sizes=(T,)) < 1e-9
    model.block.kind = "linear-sf"  # the same layers, now applied time-major: N == T fools shapes
    assert _right(model, "linear-batch-first", sizes=(T,)) < 1e-9
    assert len(probes) == 2


def test_a_new_hook_that_mixes_the_samples_is_refused_not_reused(probes):
    model = build("linear-batch-first")
    assert _right(model, "linear-batch-first") < 1e-9
    model.block.lin.register_forward_hook(lambda m, a, out: out + out.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="mixes the samples"):
        estimate(model, batches_for("linear-batch-first", (T + 2,)), "empirical", seed=0)


def test_tying_a_weight_after_an_estimate_gets_the_cross_term(probes):
    model = build("position-broadcast")  # tokens in, Linear(D, 3) head: tie a (3, D) table
    model.wte = torch.nn.Embedding(3, 4).double()
    assert _right(model, "position-broadcast") < 1e-9
    model.head.weight = model.wte.weight
    assert _right(model, "position-broadcast") < 1e-9
    assert len(probes) == 2


def test_freezing_a_layer_and_changing_output_fn(probes):
    model = build("linear-batch-first")
    x = batches_for("linear-batch-first", (T + 2,))
    data = [(x[0][0][0], x[0][2])]
    for scale in (1.0, 1.0, 2.0):  # the same code: by the captured value
        ewc.fisher_diagonal(model, data, output_fn=lambda out, s=scale: out * s)
    assert len(probes) == 2
    model.proj.requires_grad_(False)
    f = ewc.fisher_diagonal(model, data)
    assert len(probes) == 3 and "proj.weight" not in f


def _switch_case():
    class Switch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, time_major):
            return self.lin(x.transpose(0, 1)).mean(0) if time_major else self.lin(x).mean(1)

    torch.manual_seed(0)
    model = Switch().double()
    x = torch.randn(T, T, 4, dtype=torch.float64)  # N == T: shapes cannot tell the two apart
    y = torch.randint(0, 3, (T,))
    ewc.fisher_diagonal(model, [((x, False), y)], kind="exact")
    got = ewc.fisher_diagonal(model, [((x, True), y)], kind="exact")
    # the reference: one sample at a time
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n in range(T):
        logp = torch.log_softmax(model(x[n : n + 1], True)[0], -1)
        for c in range(3):
            gs = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True)
            for (k, _), g in zip(model.named_parameters(), gs, strict=True):
                want[k] += logp[c].exp().detach() * g.square() / T
    return rel_err(got, want)


def test_plain_non_tensor_inputs_count_by_value(probes):
    assert _switch_case() < 1e-9
    assert len(probes) == 2


def test_nothing_keeps_a_model_alive():
    model = build("linear-batch-first")
    _right(model, "linear-batch-first")
    assert model in _memo._CACHE
    gc.collect()
    before = len(_memo._CACHE)
    del model
    gc.collect()
    assert len(_memo._CACHE) == before - 1


# --- Each part of the fingerprint is load-bearing --------------------------------------------
def test_blind_to_attributes_the_second_estimate_is_wrong(monkeypatch):
    monkeypatch.setattr(_memo, "plain", lambda v: "?")
    model = build("linear-batch-first")
    assert _right(model, "linear-batch-first", sizes=(T,)) < 1e-9
    model.block.kind = "linear-sf"
    assert _right(model, "linear-batch-first", sizes=(T,)) > 1e-3


def test_blind_to_hooks_a_mixing_hook_goes_unnoticed(monkeypatch):
    monkeypatch.setattr(_memo, "_HOOKS", ())
    model = build("linear-batch-first")
    assert _right(model, "linear-batch-first") < 1e-9
    model.block.lin.register_forward_hook(lambda m, a, out: out + out.mean(0, keepdim=True))
    # a Fisher that is not defined, returned without an error
    estimate(model, batches_for("linear-batch-first", (T + 2,)), "empirical", seed=0)


def test_blind_to_plain_input_values_the_other_branch_is_wrong(monkeypatch):
    from ewc import _batches

    monkeypatch.setattr(_batches, "_plain", lambda v: None)
    assert _switch_case() > 1e-3
