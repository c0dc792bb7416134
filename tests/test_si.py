"""SI against hand-computed path integrals (plain SGD, exact) and a reference loop (Adam)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ewc


class Quad(nn.Module):
    """``L = ½ Σ_i h_i (w_i − a_i)²``: SGD's trajectory and path integral in closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))

    def loss(self, h, a):
        return 0.5 * (h * (self.w - a) ** 2).sum()


H = torch.tensor([1.0, 0.5], dtype=torch.float64)
LR, STEPS = 0.5, 3


def _train(model, si, h, a, steps, lr=LR, via="penalty"):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with si.attach(opt):
        for _ in range(steps):
            if via == "closure":  # the gradient is computed inside step(), after the pre-hook

                def closure():
                    opt.zero_grad()
                    loss = model.loss(h, a) + si.penalty()
                    loss.backward()
                    return loss

                opt.step(closure)
                continue
            opt.zero_grad()
            loss = model.loss(h, a)
            if via == "penalty":
                loss = loss + si.penalty()
            loss.backward()
            if via == "add_penalty_grad":
                si.add_penalty_grad()
            opt.step()


def test_plain_sgd_path_integral_is_exact():
    """ω = Σ_t η g_t² with g_t = h q^t r_0, q = 1 − η h; Δ = r_0 (q^T − 1)."""
    model = Quad()
    si = ewc.SI(model, c=1.0, xi=0.1)
    _train(model, si, H, torch.zeros(2, dtype=torch.float64), STEPS)
    r0, q = torch.tensor([1.0, 2.0], dtype=torch.float64), 1 - LR * H
    omega = LR * H**2 * r0**2 * sum(q ** (2 * t) for t in range(STEPS))
    assert torch.equal(omega, torch.tensor([0.65625, 0.939453125], dtype=torch.float64))
    assert torch.equal(si.omega["w"], omega)
    delta = r0 * (q**STEPS - 1)
    want = omega / (delta**2 + 0.1)
    assert torch.allclose(si.importance()["w"], want, rtol=1e-15, atol=0)
    added = si.consolidate()
    assert torch.allclose(added["w"], want, rtol=1e-15, atol=0) and added.kind == "si"
    assert torch.equal(si.anchor["w"], model.w.detach()) and torch.equal(
        si.precision["w"], added["w"]
    )
    assert not si.start and float(si.omega["w"].abs().max()) == 0.0
    # the paper's penalty c Σ Ω (θ − θ̃)²
    with torch.no_grad():
        model.w.add_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    assert torch.allclose(si.penalty(), (added["w"] * torch.tensor([0.09, 0.04])).sum())


@pytest.mark.parametrize("via", ["penalty", "add_penalty_grad", "closure"])
def test_second_task_uses_the_task_gradient_only(via):
    """With the penalty in the loss, ω sums −g_task ⊙ Δθ (the step itself uses the total)."""
    c, xi = 0.7, 0.05
    model = Quad()
    si = ewc.SI(model, c=c, xi=xi)
    _train(model, si, H, torch.zeros(2, dtype=torch.float64), STEPS, via=via)
    omega1 = si.consolidate()["w"]
    anchor = model.w.detach().clone()
    h2, b = torch.tensor([0.4, 1.2], dtype=torch.float64), torch.tensor([-1.0, 0.5])
    _train(model, si, h2, b, 4, via=via)
    # reference: by hand
    w = anchor.clone()
    omega2 = torch.zeros(2, dtype=torch.float64)
    for _ in range(4):
        g_task = h2 * (w - b)
        g_pen = 2 * c * omega1 * (w - anchor)
        w_new = w - LR * (g_task + g_pen)
        omega2 -= g_task * (w_new - w)
        w = w_new
    assert torch.allclose(model.w.detach(), w, rtol=1e-14)
    assert torch.allclose(si.omega["w"], omega2, rtol=1e-12)
    want = omega1 + (omega2 / ((w - anchor) ** 2 + xi)).clamp_min(0)
    si.consolidate()
    assert torch.allclose(si.precision["w"], want, rtol=1e-12)
    assert torch.equal(si.anchor["w"], w.to(si.anchor["w"].dtype)) or torch.allclose(
        si.anchor["w"], w
    )
    assert [t["kind"] for t in si.tasks] == ["si", "si"]


def _mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _reference_adam(model, c, xi, tasks, steps):
    """Hsu et al.'s loop: the un-regularised gradients by a separate backward pass."""
    params = dict(model.named_parameters())
    omega_total = {n: torch.zeros_like(p) for n, p in params.items()}
    anchor = None
    for x, y in tasks:
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        start = {n: p.detach().clone() for n, p in params.items()}
        w = {n: torch.zeros_like(p) for n, p in params.items()}
        for s in range(steps):
            xb, yb = x[s::steps], y[s::steps]
            old = {n: p.detach().clone() for n, p in params.items()}
            task_loss = nn.functional.cross_entropy(model(xb), yb)
            unreg = torch.autograd.grad(task_loss, list(params.values()), retain_graph=True)
            loss = task_loss
            if anchor is not None:
                loss = loss + c * sum(
                    (omega_total[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items()
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            for (n, p), g in zip(params.items(), unreg, strict=True):
                w[n] -= g * (p.detach() - old[n])
        for n, p in params.items():
            omega_total[n] += (w[n] / ((p.detach() - start[n]) ** 2 + xi)).clamp_min(0)
        anchor = {n: p.detach().clone() for n, p in params.items()}
    return omega_total, anchor


def test_adam_matches_the_reference_loop_over_tasks():
    torch.manual_seed(0)
    model = _mlp().double()
    ref_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    tasks = [
        (torch.randn(24, 3, generator=gen), torch.randint(0, 2, (24,), generator=gen))
        for _ in range(3)
    ]
    c, xi, steps = 0.5, 0.1, 8
    si = ewc.SI(model, c=c, xi=xi)
    negative = 0
    for x, y in tasks:
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        si.attach(opt)
        for s in range(steps):
            loss = nn.functional.cross_entropy(model(x[s::steps]), y[s::steps]) + si.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        raw = {n: w.clone() for n, w in si.omega.items()}
        added = si.consolidate()
        negative += sum(int((w < 0).sum()) for w in raw.values())
        assert all(bool((added[n][raw[n] < 0] == 0).all()) for n in raw)  # clipped to 0
    assert negative > 0  # Adam moved some parameters uphill for the task loss
    want, anchor = _reference_adam(ref_model, c, xi, tasks, steps)
    for n, p in model.named_parameters():
        assert torch.allclose(p, dict(ref_model.named_parameters())[n], rtol=1e-10, atol=1e-12)
        assert torch.allclose(si.precision[n], want[n], rtol=1e-8, atol=1e-12), n
        assert torch.allclose(si.anchor[n], anchor[n])


def test_frozen_and_unstepped_parameters_and_params_selection():
    torch.manual_seed(0)
    model = _mlp().double()
    model[0].bias.requires_grad_(False)
    si = ewc.SI(model, c=1.0, params="2.*")
    assert set(si.omega) == {"2.weight", "2.bias"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with si.attach(opt):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])
            ).backward()
            opt.step()
    imp = si.consolidate()
    assert set(imp) == {"2.weight", "2.bias"} and float(imp["2.weight"].sum()) > 0
    with pytest.raises(ValueError, match="none of the parameters"):
        si.attach(torch.optim.SGD([model[0].weight], lr=0.1))
    hooks = si.attach(opt)
    with pytest.raises(ValueError, match="already attached"):
        si.attach(opt)
    hooks.remove()
    si.attach(opt).remove()


def test_bad_arguments_are_named():
    model = _mlp()
    with pytest.raises(ValueError, match="c must be"):
        ewc.SI(model, c=-1.0)
    with pytest.raises(ValueError, match="xi must be"):
        ewc.SI(model, c=1.0, xi=0.0)
    si = ewc.SI(model, c=1.0)
    with pytest.raises(ValueError, match="takes no data"):
        si.consolidate([torch.randn(2, 3)])
    with pytest.raises(ValueError, match="kind"):
        si.kind = "sampled"


def test_save_mid_task_and_resume_exactly(tmp_path):
    torch.manual_seed(0)
    model = _mlp().double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, generator=gen), torch.randint(0, 2, (16,), generator=gen)

    def steps(m, si, opt, idx):
        for s in idx:
            loss = nn.functional.cross_entropy(m(x[s::4]), y[s::4]) + si.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()

    si = ewc.SI(model, c=2.0, xi=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    steps(model, si, opt, range(4))
    si.consolidate()
    steps(model, si, opt, range(2))  # mid-task 2: ω and the start are state
    path = tmp_path / "si.safetensors"
    si.save(str(path))
    twin = copy.deepcopy(model)
    back = ewc.SI.load(str(path), twin)
    assert back.c == 2.0 and back.xi == 0.2 and back.tasks == si.tasks
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    back.attach(opt2)
    steps(model, si, opt, range(2, 4))
    steps(twin, back, opt2, range(2, 4))
    a, b = si.consolidate(), back.consolidate()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-12, atol=0)
    assert torch.equal(si.penalty(), back.penalty())


def test_state_validation(tmp_path):
    model = _mlp().double()
    si = ewc.SI(model, c=1.0)
    si.consolidate(importance={n: torch.ones_like(p) for n, p in model.named_parameters()})
    path = tmp_path / "si.safetensors"
    si.save(str(path))
    with pytest.raises(ValueError, match="saved by 'SI'"):
        ewc.MAS.load(str(path), model)
    with pytest.raises(ValueError, match="saved by 'SI'"):
        ewc.EWC.load(str(path), model)
    state = si.state_dict()
    state["metadata"]["xi"] = -1
    with pytest.raises(ValueError, match="xi must be"):
        ewc.SI(model, c=1.0).load_state_dict(state)
    state = si.state_dict()
    del state["tensors"]["si_omega.0.weight"]
    with pytest.raises(ValueError, match="path integral does not cover"):
        ewc.SI(model, c=1.0).load_state_dict(state)
    state = si.state_dict()
    state["tensors"]["si_omega.0.weight"] = state["tensors"]["si_omega.0.weight"].float()
    with pytest.raises(ValueError, match="dtype"):
        ewc.SI(model, c=1.0).load_state_dict(state)
    state = si.state_dict()
    state["metadata"]["kind"] = "mas"
    fresh = ewc.SI(model, c=1.0)
    with pytest.raises(ValueError, match="unknown kind 'mas'"):
        fresh.load_state_dict(state)
    assert fresh.num_tasks == 0  # unchanged on error


def test_lightning_callback_gathers_the_path_integral():
    """EWCCallback(si): the same ω and importance as the plain loop (Lightning steps with a
    closure, and the callback adds the penalty by add_penalty_grad inside it)."""
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
            return torch.optim.SGD(self.parameters(), lr=0.3)

    gen = torch.Generator().manual_seed(3)
    tasks = [
        (torch.randn(12, 3, generator=gen), torch.randint(0, 2, (12,), generator=gen))
        for _ in range(2)
    ]
    module = Net()
    plain = copy.deepcopy(module.net)
    si = ewc.SI(module, c=0.5, xi=0.1)
    cb = EWCCallback(si)
    for x, y in tasks:
        pl.Trainer(
            callbacks=[cb],
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_epochs=1,
        ).fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    ref = ewc.SI(plain, c=0.5, xi=0.1)
    for x, y in tasks:
        opt = torch.optim.SGD(plain.parameters(), lr=0.3)
        with ref.attach(opt):
            for i in range(0, 12, 4):
                opt.zero_grad()
                (F.cross_entropy(plain(x[i : i + 4]), y[i : i + 4]) + ref.penalty()).backward()
                opt.step()
        ref.consolidate()
    assert si.num_tasks == 2
    for n, p in plain.named_parameters():
        assert torch.allclose(si.precision["net." + n], ref.precision[n], rtol=1e-10, atol=1e-14)
        assert torch.allclose(
            dict(module.named_parameters())["net." + n], p, rtol=1e-10, atol=1e-14
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = _mlp().double()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    sis = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        si = ewc.SI(m, c=1.0)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with si.attach(opt):
            for i in range(0, 8, 2):
                opt.zero_grad()
                nn.functional.cross_entropy(
                    m(x[i : i + 2].to(dev)), y[i : i + 2].to(dev)
                ).backward()
                opt.step()
        si.consolidate()
        sis.append(si)
    mas_cpu = ewc.mas_importance(cpu, [x])
    mas_gpu = ewc.mas_importance(gpu, [x.cuda()])
    for n in sis[0].precision:
        assert torch.allclose(sis[0].precision[n], sis[1].precision[n].cpu(), rtol=1e-9, atol=1e-12)
        assert torch.allclose(mas_cpu[n], mas_gpu[n].cpu(), rtol=1e-9, atol=1e-12)
        assert sis[1].precision[n].is_cuda and mas_gpu[n].is_cuda


def test_second_derivatives_through_the_si_penalty_are_autograds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    si = ewc.SI(model, c=0.7)
    x = torch.randn(6, 3, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with si.attach(opt):
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    si.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = list(model.parameters())

    def written():
        pairs = model.named_parameters()
        return (
            0.5 * si.lam * sum((si.precision[n] * (p - si.anchor[n]) ** 2).sum() for n, p in pairs)
        )

    got = {}
    for name, penalty in (("written", written), ("ours", si.penalty)):
        model.zero_grad(set_to_none=True)
        (model(x).sum() + penalty()).backward(create_graph=True)
        first = [p.grad.detach().clone() for p in params]
        norm = sum((p.grad**2).sum() for p in params)
        model.zero_grad(set_to_none=True)
        norm.backward()
        got[name] = first + [p.grad.clone() for p in params]
    for a, b in zip(got["written"], got["ours"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
