import pytest
import torch
from conftest import loader, make_case
from torch import nn

import ewc


def _random_fisher(model, gen, zero_frac=0.3):
    out = {}
    for n, p in model.named_parameters():
        f = torch.rand(p.shape, generator=gen, dtype=p.dtype) * 3
        f[torch.rand(p.shape, generator=gen) < zero_frac] = 0.0  # exact zeros are common
        out[n] = f
    return ewc.Fisher(out)


def _per_task_sum(model, tasks, lam):
    total = 0.0
    for fisher, anchor in tasks:
        for n, p in model.named_parameters():
            total = total + (fisher[n] * (p - anchor[n]) ** 2).sum()
    return 0.5 * lam * total


def _set_random_params(model, gen, scale=1.0, center=0.0):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(center + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("n_tasks", range(1, 21))
def test_merged_penalty_equals_per_task_sum(n_tasks):
    gen = torch.Generator().manual_seed(n_tasks)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    reg = ewc.EWC(model, lam=3.5)
    tasks = []
    for _ in range(n_tasks):
        _set_random_params(model, gen)
        f = _random_fisher(model, gen)
        reg.consolidate(fisher=f)
        tasks.append((f, {n: p.detach().clone() for n, p in model.named_parameters()}))
    _set_random_params(model, gen)
    got = reg.penalty()
    want = _per_task_sum(model, tasks, 3.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, list(model.parameters()))
    g_want = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    # constant memory: two tensors per parameter whatever the number of tasks
    assert len(reg.state_dict()["tensors"]) == 2 * len(list(model.parameters())) + 1
    assert reg.num_tasks == n_tasks


def test_merged_penalty_is_numerically_sound_in_float32():
    """Anchors near 1 with spreads of 1e-2, stored in float32.

    The merged form keeps (A, μ) and adds a non-negative offset; the textbook expansion
    A θ² − 2 B θ + C subtracts large nearly equal numbers and loses most digits.
    """
    gen = torch.Generator().manual_seed(0)
    model64 = nn.Linear(30, 20).double()
    model32 = nn.Linear(30, 20).float()
    r32 = ewc.EWC(model32, lam=1.0)
    tasks = []
    a_sum = b_sum = c_sum = 0.0
    for _ in range(20):
        _set_random_params(model64, gen, scale=1e-2, center=1.0)
        model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
        f = _random_fisher(model64, gen)
        r32.consolidate(fisher=f.to(torch.float32))
        anchor = {n: p.detach().clone() for n, p in model32.named_parameters()}
        tasks.append((f, {n: a.double() for n, a in anchor.items()}))
        f32 = f.to(torch.float32)
        a_sum = a_sum + f32["weight"]
        b_sum = b_sum + f32["weight"] * anchor["weight"]
        c_sum = c_sum + (f32["weight"] * anchor["weight"] ** 2).sum()
    _set_random_params(model64, gen, scale=1e-2, center=1.0)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    want = _per_task_sum(model64, tasks, 1.0)
    got = r32.penalty()
    assert got.dtype == torch.float32
    err = abs(float(got) - float(want)) / float(want)
    assert err < 1e-4
    g32 = torch.autograd.grad(got, list(model32.parameters()))
    g64 = torch.autograd.grad(want, list(model64.parameters()))
    for a, b in zip(g32, g64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    # the expanded form on the weight alone, against the exact weight part
    w = model32.weight.detach()
    naive = 0.5 * float((a_sum * w**2).sum() - 2 * (b_sum * w).sum() + c_sum)
    exact_w = 0.5 * sum(
        float((f["weight"] * (model64.weight - a["weight"]) ** 2).sum()) for f, a in tasks
    )
    assert abs(naive - exact_w) / exact_w > 100 * err


def test_online_recurrence():
    gen = torch.Generator().manual_seed(1)
    model = nn.Linear(3, 2)
    reg = ewc.EWC(model, lam=2.0, mode="online", gamma=0.5)
    fs, anchors = [], []
    for _ in range(3):
        _set_random_params(model, gen)
        f = _random_fisher(model, gen)
        reg.consolidate(fisher=f)
        fs.append(f)
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
    expected = 0.5 * (0.5 * fs[0] + fs[1]) + fs[2]
    for n in expected:
        torch.testing.assert_close(reg.precision[n], expected[n], rtol=1e-14, atol=0)
        assert torch.equal(reg.anchor[n], anchors[-1][n])
    _set_random_params(model, gen)
    want = (
        0.5
        * 2.0
        * sum((expected[n] * (p - anchors[-1][n]) ** 2).sum() for n, p in model.named_parameters())
    )
    torch.testing.assert_close(reg.penalty(), want, rtol=1e-12, atol=0)


def test_online_with_gamma_one_accumulates_fishers():
    gen = torch.Generator().manual_seed(2)
    model = nn.Linear(3, 2)
    reg = ewc.EWC(model, lam=1.0, mode="online")
    f1, f2 = _random_fisher(model, gen), _random_fisher(model, gen)
    reg.consolidate(fisher=f1)
    reg.consolidate(fisher=f2)
    for n in f1:
        torch.testing.assert_close(reg.precision[n], f1[n] + f2[n])


def test_l2_penalty():
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 2)
    reg = ewc.L2(model, lam=0.7)
    anchors = []
    for _ in range(3):
        _set_random_params(model, gen)
        reg.consolidate()
        anchors.append([p.detach().clone() for p in model.parameters()])
    _set_random_params(model, gen)
    want = (
        0.5
        * 0.7
        * sum(
            ((p - a) ** 2).sum()
            for an in anchors
            for p, a in zip(model.parameters(), an, strict=True)
        )
    )
    torch.testing.assert_close(reg.penalty(), want, rtol=1e-12, atol=0)


def test_penalty_is_zero_before_consolidation_and_at_the_anchor():
    model, x, y = make_case("mlp")
    reg = ewc.EWC(model, lam=10.0)
    assert float(reg.penalty()) == 0.0
    f = reg.consolidate(loader(x, y, 4), kind="exact")
    assert f.kind == "exact" and f.n_samples == x.shape[0]
    assert float(reg.penalty()) == 0.0
    with torch.no_grad():
        model[0].weight[0, 0] += 0.1
    want = 0.5 * 10.0 * float(f["0.weight"][0, 0]) * 0.1**2
    assert float(reg.penalty()) == pytest.approx(want, rel=1e-6)


def test_gradient_injection_equals_penalty_gradient():
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reg = ewc.EWC(model, lam=1.3)
    for _ in range(3):
        _set_random_params(model, gen)
        reg.consolidate(fisher=_random_fisher(model, gen))
    _set_random_params(model, gen)
    x = torch.randn(5, 3, generator=gen)
    model.zero_grad()
    (model(x).sum() + reg.penalty()).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    reg.add_penalty_grad()  # .grad is None: it is created
    model(x).sum().backward()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-14)


def test_consolidate_estimates_at_current_parameters():
    model, x, y = make_case("conv1d")
    reg = ewc.EWC(model, lam=1.0, kind="empirical")
    f = reg.consolidate(loader(x, y, 5))
    direct = ewc.fisher_diagonal(model, loader(x, y, 3), kind="empirical")
    for n in f:
        torch.testing.assert_close(f[n], direct[n])
        assert torch.equal(reg.anchor[n], dict(model.named_parameters())[n].detach())


# --- Parameter subsets and low-precision storage --------------------------------------------
def _two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


def _fake_fisher(model, names, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g, dtype=params[n].dtype) for n in names}


def _move(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_params_subset_penalises_only_the_selected_parameters():
    model = _two_layer()
    reg = ewc.EWC(model, lam=2.0, params="2.*")
    x = torch.randn(7, 3)
    fisher = reg.consolidate([x], kind="exact")
    assert sorted(fisher) == ["2.bias", "2.weight"] and sorted(reg.precision) == sorted(fisher)
    theta_star = {n: p.detach().clone() for n, p in model.named_parameters()}
    _move(model, 1)
    want = sum(
        (fisher[n] * (p - theta_star[n]) ** 2).sum()
        for n, p in model.named_parameters()
        if n in fisher
    )
    pen = reg.penalty()
    torch.testing.assert_close(pen, 1.0 * want, rtol=1e-12, atol=0)
    pen.backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    with pytest.raises(ValueError, match="missing"):
        reg.consolidate(fisher=_fake_fisher(model, [n for n, _ in model.named_parameters()], 0))


def test_bfloat16_precision_storage_keeps_anchors_exact_and_tracks_the_sum():
    model = _two_layer()
    names = [n for n, _ in model.named_parameters()]
    reg = ewc.EWC(model, lam=1.5, fisher_dtype=torch.bfloat16)
    ref = ewc.EWC(model, lam=1.5)
    for t in range(4):
        _move(model, 10 + t)
        f = _fake_fisher(model, names, t)
        reg.consolidate(fisher=f)
        ref.consolidate(fisher=f)
    assert all(a.dtype == torch.bfloat16 for a in reg.precision.values())
    assert all(m.dtype == torch.float64 for m in reg.anchor.values())
    _move(model, 99)
    torch.testing.assert_close(reg.penalty(), ref.penalty(), rtol=2e-2, atol=0)
    # one task: the penalty vanishes exactly at the anchor (anchors are not rounded)
    single = ewc.EWC(model, lam=1.0, fisher_dtype=torch.bfloat16)
    single.consolidate(fisher=_fake_fisher(model, names, 7))
    assert float(single.penalty()) == 0.0
    for p in model.parameters():
        p.grad = None
    single.add_penalty_grad()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_subset_and_dtype_survive_save_and_load(tmp_path):
    model = _two_layer()
    reg = ewc.EWC(model, lam=3.0, params=["2.*"], fisher_dtype=torch.bfloat16)
    reg.consolidate(fisher=_fake_fisher(model, ["2.weight", "2.bias"], 0))
    _move(model, 2)
    path = str(tmp_path / "state.safetensors")
    reg.save(path)
    back = ewc.EWC.load(path, model)
    assert back.params == ["2.*"] and back.fisher_dtype == torch.bfloat16
    for n in reg.precision:
        assert torch.equal(back.precision[n], reg.precision[n])
        assert torch.equal(back.anchor[n], reg.anchor[n])
    assert float(back.penalty()) == float(reg.penalty())
    with pytest.raises(ValueError, match="params= selection"):
        ewc.EWC.load(path, model, params="0.*")
    with pytest.raises(ValueError, match="fisher_dtype"):
        ewc.EWC.load(path, model, fisher_dtype=torch.float16)
    # a predicate is not saved: it must be given again
    pred = ewc.EWC(model, lam=1.0, params=lambda n, p: n.startswith("2."))
    pred.consolidate(fisher=_fake_fisher(model, ["2.weight", "2.bias"], 1))
    pred.save(path)
    with pytest.raises(ValueError, match="another params= selection"):
        ewc.EWC.load(path, model)
    assert ewc.EWC.load(path, model, params=lambda n, p: n.startswith("2.")).num_tasks == 1


def test_add_penalty_grad_on_a_subset_and_scaled():
    model = _two_layer()
    names = [n for n, _ in model.named_parameters()]
    reg = ewc.EWC(model, lam=2.0)
    reg.consolidate(fisher=_fake_fisher(model, names, 0))
    _move(model, 4)
    reg.add_penalty_grad()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    reg.add_penalty_grad(model[2].parameters(), scale=8.0)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    torch.testing.assert_close(model[2].weight.grad, 8.0 * full["2.weight"], rtol=1e-14, atol=0)
    torch.testing.assert_close(model[2].bias.grad, 8.0 * full["2.bias"], rtol=1e-14, atol=0)
    reg.add_penalty_grad([torch.zeros(3)])  # nothing penalised: a no-op


def test_saved_metadata_does_not_change_with_later_tasks():
    model = _two_layer()
    names = [n for n, _ in model.named_parameters()]
    reg = ewc.EWC(model, lam=1.0)
    reg.consolidate(fisher=_fake_fisher(model, names, 0))
    state = reg.state_dict()
    reg.consolidate(fisher=_fake_fisher(model, names, 1))
    assert len(state["metadata"]["tasks"]) == 1 and state["metadata"]["num_tasks"] == 1


def test_frozen_parameters_move_with_neither_form():
    """A backbone frozen after consolidation: add_penalty_grad must not give it a gradient
    (an optimizer over model.parameters() would move it), exactly like penalty().backward()."""
    torch.manual_seed(0)
    updates = []
    for inject in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        reg = ewc.EWC(model, lam=5.0)
        reg.consolidate(fisher={n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)
        model[0].requires_grad_(False)  # freeze the first layer for task B
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        loss = model(torch.randn(5, 3)).square().mean()
        if inject:
            loss.backward()
            reg.add_penalty_grad()
        else:
            (loss + reg.penalty()).backward()
        opt.step()
        assert model[0].weight.grad is None and model[0].bias.grad is None
        updates.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
    for n in updates[0]:
        torch.testing.assert_close(updates[0][n], updates[1][n], rtol=1e-12, atol=1e-14)
    assert float(updates[0]["0.weight"].abs().max()) == 0.0
    assert float(updates[0]["2.weight"].abs().max()) > 0.0


# --- The autograd form writes its gradient in place (issue 12) -------------------------------
def _penalised(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    reg = ewc.EWC(model, lam=2.0)
    reg.consolidate(fisher=_fake_fisher(model, [n for n, _ in model.named_parameters()], 1))
    _move(model, 2)
    want = {
        n: 2.0 * reg.precision[n] * (p.detach() - reg.anchor[n])
        for n, p in model.named_parameters()
    }
    return model, reg, want


def test_penalty_gradient_in_place_matches_autograd_every_way():
    model, reg, want = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    task = {n: g for n, g in zip(dict(model.named_parameters()),
            torch.autograd.grad(model(x).sum(), list(model.parameters())), strict=True)}  # fmt: skip
    # autograd.grad: returned, nothing written into .grad
    got = torch.autograd.grad(reg.penalty(), list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), got, strict=True):
        torch.testing.assert_close(g, want[n], rtol=1e-12, atol=0)
        assert p.grad is None
    # backward with a task loss, accumulated over two micro-batches, with retain_graph
    loss = model(x).sum() + reg.penalty()
    loss.backward(retain_graph=True)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * (task[n] + want[n]), rtol=1e-12, atol=1e-15)
    # a parameter that gets no task gradient still gets the penalty's (end-of-pass callback)
    model.zero_grad(set_to_none=True)
    (model[0](x).sum() + reg.penalty()).backward()
    for n, p in model.named_parameters():
        first = torch.autograd.grad(model[0](x).sum(), p)[0] if n.startswith("0.") else 0.0
        torch.testing.assert_close(p.grad, want[n] + first, rtol=1e-12, atol=1e-15)
    # backward(inputs=...) only touches those inputs
    model.zero_grad(set_to_none=True)
    reg.penalty().backward(inputs=[model[2].weight])
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[2].weight.grad, want["2.weight"], rtol=1e-12, atol=0)


# --- The reused scratch buffers (ewc._quadratic) ---------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _want(model, reg):
    """``λ A ⊙ (θ − μ)`` at the current parameters, formed here from the stored state."""
    params = dict(model.named_parameters())
    return {n: reg.lam * reg.precision[n] * (params[n].detach() - reg.anchor[n]) for n in params}


def test_scratch_is_reused_across_steps_and_every_step_is_right():
    model, reg, _ = _penalised()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = set()
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        want, value = _want(model, reg), 0.0
        for n, p in model.named_parameters():
            value += 0.5 * reg.lam * float((reg.precision[n] * (p - reg.anchor[n]) ** 2).sum())
        pen = reg.penalty()
        torch.testing.assert_close(float(pen), value + 0.5 * reg.lam * float(reg.offset))
        pen.backward()
        for n, g in _grads(model).items():
            torch.testing.assert_close(g, want[n], rtol=1e-12, atol=0)
        seen.update(id(s) for s in reg._pool.free)
        opt.step()  # the parameters move: the next step must not see this step's buffers
    assert len(seen) == 1 and len(reg._pool.free) == 1  # one scratch served every step
    model.zero_grad(set_to_none=True)
    reg.add_penalty_grad()  # the injection form takes the same scratch and gives it back
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, _want(model, reg)[n], rtol=1e-12, atol=0)
    assert {id(s) for s in reg._pool.free} == seen


def test_live_graphs_never_share_a_scratch():
    model, reg, _ = _penalised()
    want = _want(model, reg)
    kept = reg.penalty()  # a graph not yet back-propagated
    (reg.penalty() + reg.penalty()).backward()  # two more live at once
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, 2 * want[n], rtol=1e-12, atol=0)
    with torch.no_grad():  # moving the parameters changes what a new pass writes
        for p in model.parameters():
            p.add_(0.5)
    model.zero_grad(set_to_none=True)
    reg.penalty().backward()
    kept.backward()  # still its own buffers: the gradient at the old parameters
    new = _want(model, reg)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want[n] + new[n], rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        assert float(reg.penalty()) == pytest.approx(float(reg.penalty().detach()), rel=1e-15)


def test_a_retained_graph_whose_buffers_were_reused_is_refused():
    model, reg, _ = _penalised()
    want = _want(model, reg)
    first = reg.penalty()
    first.backward(retain_graph=True)
    first.backward(retain_graph=True)  # again before any other pass: its buffers are intact
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, 2 * want[n], rtol=1e-12, atol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    reg.penalty().backward()  # takes the scratch the first graph gave back, overwrites it
    with pytest.raises(RuntimeError, match="reused its buffers"):
        first.backward()


def test_scratch_sums_every_dtype_group():
    # a float64 layer and a float32 one: θ − μ lives in two flat buffers, one dot product each
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4).double(), nn.Linear(4, 2).float())
    reg = ewc.EWC(model, lam=1.5)
    reg.consolidate(fisher=_fake_fisher(model, [n for n, _ in model.named_parameters()], 1))
    _move(model, 2)
    value = sum(
        0.5 * reg.lam * float((reg.precision[n].double() * (p.double() - reg.anchor[n]) ** 2).sum())
        for n, p in model.named_parameters()
    )
    pen = reg.penalty()
    pen.backward()
    (scratch,) = reg._pool.free
    assert len(scratch.groups) == 2
    assert float(pen) == pytest.approx(value, rel=1e-6)
    for n, g in _grads(model).items():
        assert g.dtype == dict(model.named_parameters())[n].dtype
        torch.testing.assert_close(g, _want(model, reg)[n])


def test_a_replaced_parameter_is_penalised_and_the_old_one_let_go():
    import gc
    import weakref

    model, reg, _ = _penalised()
    reg.penalty().backward()  # the pool now knows each parameter's gradient accumulator
    old = weakref.ref(model[0].weight)
    with torch.no_grad():
        model[0].weight = nn.Parameter(model[0].weight + 0.25)
    model.zero_grad(set_to_none=True)
    reg.penalty().backward()
    torch.testing.assert_close(model[0].weight.grad, _want(model, reg)["0.weight"])
    gc.collect()
    assert old() is None  # no reference kept to the replaced parameter


# --- Hooks on the parameters: the penalty's gradient is seen as autograd would give it -----
def _written_loss(model, reg, x):
    """``Σ model(x) + penalty`` with the penalty written out in plain autograd."""
    loss = model(x).sum()
    for n, p in model.named_parameters():
        loss = loss + 0.5 * reg.lam * (reg.precision[n] * (p - reg.anchor[n]) ** 2).sum()
    return loss


def _reference_grads(model, reg, x, mask=None):
    """``∇ (Σ model(x) + penalty)`` with the penalty written out in plain autograd."""
    grads = torch.autograd.grad(_written_loss(model, reg, x), list(model.parameters()))
    return [g if mask is None else g * mask[i] for i, g in enumerate(grads)]


@pytest.mark.parametrize("penalty_first", [False, True])
def test_a_post_accumulate_hook_sees_the_whole_gradient(penalty_first):
    # PyTorch's "optimizer step in the backward pass" recipe reads .grad in such a hook
    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    want = _reference_grads(model, reg, x)
    seen = {}
    for i, p in enumerate(model.parameters()):
        p.register_post_accumulate_grad_hook(lambda p, i=i: seen.__setitem__(i, p.grad.clone()))
    for _ in range(2):  # the second time with the accumulators remembered
        seen.clear()
        model.zero_grad(set_to_none=True)
        task = model(x).sum()
        (reg.penalty() + task if penalty_first else task + reg.penalty()).backward()
        for i, p in enumerate(model.parameters()):
            torch.testing.assert_close(seen[i], want[i], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(p.grad, want[i], rtol=1e-12, atol=1e-15)


def test_a_gradient_mask_masks_the_penalty_gradient_too():
    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    mask = [(torch.rand(p.shape, generator=gen) < 0.5).double() for p in model.parameters()]
    want = _reference_grads(model, reg, x, mask)
    for m, p in zip(mask, model.parameters(), strict=True):
        p.register_hook(lambda g, m=m: g * m)  # pruning: masked weights get no gradient
    (model(x).sum() + reg.penalty()).backward()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)


def test_an_accumulator_hook_like_ddps_sees_the_whole_gradient():
    # DDP and DeepSpeed hook the gradient accumulator node: it runs after the in-place addition
    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    want = _reference_grads(model, reg, x)
    seen, keep = {}, []
    for i, p in enumerate(model.parameters()):
        node = torch.autograd.graph.get_gradient_edge(p).node
        keep.append(node)
        node.register_hook(lambda gi, go, i=i, p=p: seen.__setitem__(i, p.grad.clone()))
    (model(x).sum() + reg.penalty()).backward()
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(seen[i], want[i], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p.grad, want[i], rtol=1e-12, atol=1e-15)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # none left


def test_a_failed_backward_pass_leaves_nothing_behind():
    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    want = _reference_grads(model, reg, x)
    hidden = model[0](x)

    def fail(g):
        raise RuntimeError("boom")

    hidden.register_hook(fail)  # raises after the penalty's backward has run
    with pytest.raises(RuntimeError, match="boom"):
        (model[2](model[1](hidden)).sum() + reg.penalty()).backward()
    model.zero_grad(set_to_none=True)
    task = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    model(x).sum().backward()  # a pass without the penalty: the failed pass's hooks stay idle
    for p, g in zip(model.parameters(), task, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        (model(x).sum() + reg.penalty()).backward()  # no stale penalty gradient added
        for p, w in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)
        # the next penalty() removed the failed pass's hooks: nothing left on the parameters
        assert not reg._pool.running
        assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize("reentrant", [True, False])
def test_parameters_inside_checkpointed_blocks_get_the_penalty_gradient(reentrant):
    # reentrant checkpointing accumulates the block's gradients in a nested backward pass
    from torch.utils.checkpoint import checkpoint

    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    want = _reference_grads(model, reg, x)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        hidden = checkpoint(lambda t: model[1](model[0](t)), x, use_reentrant=reentrant)
        (model[2](hidden).sum() + reg.penalty()).backward()
        for p, w in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)
        assert not reg._pool.running


def test_without_visible_hooks_every_gradient_goes_through_autograd(monkeypatch):
    from ewc import _quadratic

    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    want = _reference_grads(model, reg, x)
    monkeypatch.setattr(_quadratic, "_HOOKS_VISIBLE", False)  # a torch that hides them
    registered = []
    real = torch.Tensor.register_post_accumulate_grad_hook
    monkeypatch.setattr(
        torch.Tensor,
        "register_post_accumulate_grad_hook",
        lambda self, hook: registered.append(hook) or real(self, hook),
    )
    (model(x).sum() + reg.penalty()).backward()
    assert not registered
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_models_penalty_is_summed_in_float32(dtype):
    # Σ A (θ − μ)² here is ~4e5: float16 (max 65504) would make the loss inf
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Linear(300, 10)).to(dtype)
    reg = ewc.EWC(model, lam=1.0)
    fisher = {n: torch.rand(p.shape, dtype=dtype) * 100 for n, p in model.named_parameters()}
    reg.consolidate(fisher=fisher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    params = dict(model.named_parameters())
    weighted = {n: reg.precision[n] * (params[n].detach() - reg.anchor[n]) for n in params}
    want = sum(
        0.5 * float((weighted[n].double() * (params[n].double() - reg.anchor[n].double())).sum())
        for n in params
    )
    assert want > 65504
    pen = reg.penalty()
    assert pen.dtype == torch.float32
    # θ − μ and d ⊙ w are rounded to the parameters' dtype (8 bits of mantissa for bfloat16)
    rel = 1e-4 if dtype == torch.float16 else 1e-3
    assert float(pen.detach()) == pytest.approx(want, rel=rel)
    with torch.no_grad():
        assert float(reg.penalty()) == pytest.approx(want, rel=rel)
    pen.backward()
    for n, p in params.items():  # the gradient in the parameters' dtype, A ⊙ (θ − μ) rounded once
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, weighted[n], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "fisher_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_precisions_stored_in_another_dtype_than_the_parameters(dtype, fisher_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)).to(dtype)
    reg = ewc.EWC(model, lam=2.0, fisher_dtype=fisher_dtype)
    reg.consolidate(fisher={n: torch.rand(p.shape) for n, p in model.named_parameters()})
    _move(model, 2)
    params = dict(model.named_parameters())
    want = sum(
        float((reg.precision[n].double() * (p.double() - reg.anchor[n].double()) ** 2).sum())
        for n, p in params.items()
    )
    pen = reg.penalty()
    assert float(pen.detach()) == pytest.approx(want, rel=1e-2)
    pen.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    reg.add_penalty_grad()
    for n, p in params.items():
        assert grads[n].dtype == dtype
        torch.testing.assert_close(grads[n], p.grad)


def test_a_model_changed_after_consolidation_gets_a_clear_error():
    model, reg, _ = _penalised()
    model[2] = nn.Linear(4, 3).double()  # the penalised layer had 2 outputs
    for form in (reg.penalty, reg.add_penalty_grad):
        with pytest.raises(ValueError, match=r"'2.weight' has shape \(3, 4\) but the state was"):
            form()
    del model[2]
    for form in (reg.penalty, reg.add_penalty_grad):
        with pytest.raises(
            ValueError, match=r"no longer has the penalised parameters \['2.weight'"
        ):
            form()


def test_second_derivatives_through_the_penalty_are_autograds():
    model, reg, _ = _penalised()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = list(model.parameters())

    # a gradient-norm term from backward(create_graph=True): d/dθ Σ ‖∇‖² includes λ A ⊙ ∇
    got = {}
    forms = (
        ("ref", lambda: _written_loss(model, reg, x)),
        ("ours", lambda: model(x).sum() + reg.penalty()),
    )
    for name, loss in forms:
        model.zero_grad(set_to_none=True)
        loss().backward(create_graph=True)
        norm = sum((p.grad**2).sum() for p in params)
        model.zero_grad(set_to_none=True)
        norm.backward()
        got[name] = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
    for a, b in zip(got["ref"], got["ours"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    # a Hessian-vector product of the penalty alone: λ A ⊙ v
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    g = torch.autograd.grad(reg.penalty(), params, create_graph=True)
    hv = torch.autograd.grad(g, params, v)
    for (n, _), h, vi in zip(model.named_parameters(), hv, v, strict=True):
        torch.testing.assert_close(h, reg.lam * reg.precision[n] * vi, rtol=1e-12, atol=1e-15)
