"""EWCCallback: the Lightning loop's updates equal a plain PyTorch loop's, step for step.

Every comparison is against a hand-written SGD loop in float64 (the model's gradient of
``loss + ewc.penalty()``, Lightning's accumulation and clipping done by hand), and the consolidated
Fisher against ``ewc.fisher_diagonal`` computed independently.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import ewc  # noqa: E402
from ewc.integrations.lightning import EWCCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAM = 50.0
LR = 0.2
TOL = {"rtol": 0.0, "atol": 1e-12}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and much faster on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]


# --- A tiny problem ---------------------------------------------------------------------------
class Net(pl.LightningModule):
    """A small MLP; ``reg`` (an EWC object) is added to the loss when set (the explicit form)."""

    def __init__(self, seed: int = 0, lr: float = LR, reg_in_loss: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.lr = lr
        self.reg_in_loss = reg_in_loss
        self.reg: ewc.EWC | None = None
        self.skip = False

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.skip:
            return None
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.reg_in_loss:
            loss = loss + self.reg.penalty()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def task(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def dl(x, y, bs):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def trainer(tmp_path, callbacks=(), **kw) -> pl.Trainer:
    opts = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
        "max_epochs": 1,
    }
    opts.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **opts)


def params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def assert_params(got: dict, want: dict, **tol) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def twin(module: Net, reg: ewc.EWC) -> tuple[Net, ewc.EWC]:
    """An independent copy of ``module`` with a copy of ``reg``'s state (for the plain loop)."""
    other = Net()
    other.load_state_dict(module.state_dict())
    reg2 = ewc.EWC(other, lam=reg.lam)
    reg2.load_state_dict(reg.state_dict())
    return other, reg2


def plain_sgd(model, reg, batches, lr=LR, clip=None, inject=False, clip_first=False):
    """One SGD step per element of ``batches`` (a list of micro-batches accumulated as Lightning does)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in batches:
        opt.zero_grad(set_to_none=True)
        for x, y in step:
            loss = F.cross_entropy(model(x), y) / len(step)
            if reg is not None and not inject:
                loss = loss + reg.penalty() / len(step)
            loss.backward()
        if clip is not None and clip_first:
            nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        if reg is not None and inject:
            reg.add_penalty_grad()
        if clip is not None and not clip_first:
            nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        opt.step()
    return params(model)


def anchored(seed: int = 3) -> tuple[Net, ewc.EWC]:
    """A module with a random positive Fisher consolidated, then moved away from its anchor."""
    module = Net()
    g = torch.Generator().manual_seed(seed)
    fisher = {
        n: torch.rand(p.shape, generator=g, dtype=torch.float64)
        for n, p in module.named_parameters()
    }
    reg = ewc.EWC(module, lam=LAM)
    reg.consolidate(fisher=fisher)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module, reg


# --- The penalty gradient ---------------------------------------------------------------------
def test_penalty_gradient_equals_the_plain_loop(tmp_path):
    xa, ya = task(1)
    xb, yb = task(2)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact")
    trainer(tmp_path, [cb]).fit(module, dl(xa, ya, 8))  # task A (2 steps), consolidated
    assert cb.ewc.num_tasks == 1
    plain, reg = twin(module, cb.ewc)
    nopen, _ = twin(module, cb.ewc)

    trainer(tmp_path, [cb], max_steps=3).fit(module, dl(xb, yb, 4))  # 3 steps of task B
    steps = [[(xb[i : i + 4], yb[i : i + 4])] for i in range(0, 12, 4)]
    want = plain_sgd(plain, reg, steps)
    assert_params(params(module), want)
    # the penalty mattered: without it the result is far off
    assert max_diff(plain_sgd(nopen, None, steps), want) > 1e-4


def test_gradient_accumulation_counts_the_penalty_once_per_step(tmp_path):
    x, y = task(4, n=32)
    runs = {}
    for acc, bs in [(4, 4), (1, 16)]:
        module, reg = anchored()
        cb = EWCCallback(reg, consolidate=False)
        trainer(tmp_path, [cb], max_steps=2, accumulate_grad_batches=acc).fit(module, dl(x, y, bs))
        runs[acc] = params(module)
    plain, reg = anchored()
    steps = [[(x[i : i + 16], y[i : i + 16])] for i in (0, 16)]
    want = plain_sgd(plain, reg, steps)
    assert_params(runs[1], want)
    assert_params(runs[4], want, rtol=0.0, atol=1e-10)  # 4 micro-batch sums vs one
    # counting it 4 times would be far off
    p4, r4 = anchored()
    r4.lam *= 4
    assert max_diff(plain_sgd(p4, r4, steps), want) > 1e-3


def test_gradient_clipping_sees_the_penalty_gradient(tmp_path):
    x, y = task(5)
    clip = 0.05
    module, reg = anchored()
    cb = EWCCallback(reg, consolidate=False)
    trainer(tmp_path, [cb], max_steps=2, gradient_clip_val=clip).fit(module, dl(x, y, 8))
    steps = [[(x[i : i + 8], y[i : i + 8])] for i in (0, 8)]
    plain, reg2 = anchored()
    want = plain_sgd(plain, reg2, steps, clip=clip, inject=True)
    assert_params(params(module), want)
    # clipping before adding the penalty gives something else
    other, reg3 = anchored()
    assert (
        max_diff(plain_sgd(other, reg3, steps, clip=clip, inject=True, clip_first=True), want)
        > 1e-3
    )
    # and clipping was active: without it the step differs too
    free, reg4 = anchored()
    assert max_diff(plain_sgd(free, reg4, steps, inject=True), want) > 1e-3


def test_explicit_penalty_in_training_step_gives_the_same_update(tmp_path):
    x, y = task(6)
    m1, reg1 = anchored()
    trainer(tmp_path, [EWCCallback(reg1, consolidate=False)], max_steps=2).fit(m1, dl(x, y, 8))
    m2, reg2 = anchored()
    m2.reg, m2.reg_in_loss = reg2, True
    trainer(tmp_path, [EWCCallback(reg2, penalty=False, consolidate=False)], max_steps=2).fit(
        m2, dl(x, y, 8)
    )
    assert_params(params(m1), params(m2))
    m3, _ = anchored()
    trainer(tmp_path, max_steps=2).fit(m3, dl(x, y, 8))
    assert max_diff(params(m3), params(m1)) > 1e-3


def test_skipped_training_step_moves_nothing(tmp_path):
    x, y = task(7)
    module, reg = anchored()
    module.skip = True
    before = params(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [EWCCallback(reg, consolidate=False)], max_steps=2).fit(
            module, dl(x, y, 8)
        )
    assert_params(params(module), before, rtol=0.0, atol=0.0)


class TwoOptimizers(Net):
    """Manual optimization: the first layer with one SGD, the last with another."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt1, opt2 = self.optimizers()
        opt1.zero_grad()
        opt2.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        opt1.step()  # the penalty of net.0 only
        opt2.step()  # the penalty of net.2 only

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=LR),
            torch.optim.SGD(self.net[2].parameters(), lr=2 * LR),
        )


def test_each_optimizer_gets_the_penalty_of_its_own_parameters(tmp_path):
    x, y = task(8)
    module = TwoOptimizers()
    base, reg = anchored()
    module.load_state_dict(base.state_dict())
    reg_m = ewc.EWC(module, lam=LAM)
    reg_m.load_state_dict(reg.state_dict())
    trainer(tmp_path, [EWCCallback(reg_m, consolidate=False)], max_steps=4).fit(module, dl(x, y, 8))
    # plain loop: one backward, the penalty gradient, each layer with its own learning rate
    plain, reg2 = anchored()
    lr = {n: LR if n.startswith("net.0") else 2 * LR for n, _ in plain.named_parameters()}
    for i in (0, 8):
        plain.zero_grad(set_to_none=True)
        (F.cross_entropy(plain(x[i : i + 8]), y[i : i + 8]) + reg2.penalty()).backward()
        with torch.no_grad():
            for n, p in plain.named_parameters():
                p -= lr[n] * p.grad
    assert_params(params(module), params(plain))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_with_an_optimizer_that_unscales_in_step(fused):
    """Fused optimizers get still-scaled gradients in the hook: the penalty must be scaled too."""
    x, y = task(22)
    module, reg = anchored()
    opt = torch.optim.Adam(module.parameters(), lr=0.01, fused=fused)
    assert getattr(opt, "_step_supports_amp_scaling", False) == fused
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cb = EWCCallback(reg, consolidate=False)
    fake = SimpleNamespace(sanity_checking=False, precision_plugin=SimpleNamespace(scaler=scaler))
    for i in (0, 8):  # what Lightning's MixedPrecision.optimizer_step does
        opt.zero_grad()
        scaler.scale(F.cross_entropy(module(x[i : i + 8]), y[i : i + 8])).backward()
        if not fused:
            scaler.unscale_(opt)
        cb.on_before_optimizer_step(fake, module, opt)
        scaler.step(opt)
        scaler.update()
    plain, reg2 = anchored()
    opt2 = torch.optim.Adam(plain.parameters(), lr=0.01)
    for i in (0, 8):
        opt2.zero_grad()
        F.cross_entropy(plain(x[i : i + 8]), y[i : i + 8]).backward()
        reg2.add_penalty_grad()
        opt2.step()
    assert_params(params(module), params(plain))


def test_log_penalty(tmp_path):
    x, y = task(9)
    module, reg = anchored()
    module.lr = 0.0  # parameters stay put: the logged value is the penalty here
    t = trainer(tmp_path, [EWCCallback(reg, consolidate=False, log_penalty=True)], max_steps=2)
    t.fit(module, dl(x, y, 8))
    torch.testing.assert_close(t.callback_metrics["ewc/penalty"], reg.penalty().detach(), **TOL)


# --- Consolidation ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fit_end_consolidates_with_the_training_loaders_fisher(tmp_path, kind):
    x, y = task(10)
    module = Net()
    cb = EWCCallback(lam=LAM, kind=kind)
    loader = dl(x, y, 5)  # 4 batches, the last one short
    trainer(tmp_path, [cb], max_epochs=2).fit(module, loader)
    assert cb.ewc.num_tasks == 1
    assert cb.ewc.model is module
    want = ewc.fisher_diagonal(module, dl(x, y, 16), kind=kind)
    assert want.n_samples == 16
    for n, p in module.named_parameters():
        torch.testing.assert_close(cb.ewc.precision[n], want[n], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(cb.ewc.anchor[n], p.detach(), rtol=0.0, atol=0.0)
    assert cb.ewc.tasks == [{"n_samples": 16, "kind": kind}]


def test_sampled_fisher_with_a_generator_and_callable_data(tmp_path):
    x, y = task(11)
    module = Net()
    seen = []

    def data(trainer, pl_module):
        seen.append((trainer, pl_module))
        return [{"x": x[:10], "y": y[:10]}, {"x": x[10:], "y": y[10:]}]

    cb = EWCCallback(
        lam=LAM,
        data=data,
        batch_to_fisher=lambda b: (b["x"], b["y"]),
        fisher_kwargs={"generator": torch.Generator().manual_seed(0)},
    )
    t = trainer(tmp_path, [cb], max_steps=1)
    t.fit(module, dl(x, y, 8))
    assert seen == [(t, module)]
    want = ewc.fisher_diagonal(module, dl(x, y, 10), generator=torch.Generator().manual_seed(0))
    for n in want:
        torch.testing.assert_close(cb.ewc.precision[n], want[n], rtol=1e-12, atol=1e-15)


def test_two_tasks_in_sequence(tmp_path):
    (xa, ya), (xb, yb) = task(12), task(13)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact")
    trainer(tmp_path, [cb], max_steps=2).fit(module, dl(xa, ya, 8))
    fa = ewc.fisher_diagonal(module, dl(xa, ya, 16), kind="exact")
    theta_a = params(module)
    trainer(tmp_path, [cb], max_steps=2).fit(module, dl(xb, yb, 8))
    fb = ewc.fisher_diagonal(module, dl(xb, yb, 16), kind="exact")
    theta_b = params(module)
    assert cb.ewc.num_tasks == 2
    # the merged penalty is F_A (θ − θ_A)² + F_B (θ − θ_B)², as a value at a random point
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    theta = params(module)
    brute = sum(
        (fa[n] * (theta[n] - theta_a[n]) ** 2).sum() + (fb[n] * (theta[n] - theta_b[n]) ** 2).sum()
        for n in theta
    )
    torch.testing.assert_close(cb.ewc.penalty().detach(), LAM / 2 * brute, rtol=1e-12, atol=0.0)


class Stop(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("interrupted")


def test_interrupted_fit_does_not_consolidate(tmp_path):
    x, y = task(14)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact")
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer(tmp_path, [cb, Stop()], max_epochs=1).fit(module, dl(x, y, 4))
    assert cb.ewc.num_tasks == 0


def test_consolidate_false_and_by_hand(tmp_path):
    x, y = task(15)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact", consolidate=False)
    t = trainer(tmp_path, [cb], max_steps=1)
    t.fit(module, dl(x, y, 8))
    assert cb.ewc.num_tasks == 0
    f = cb.consolidate_task(t, module, data=dl(x, y, 3))
    want = ewc.fisher_diagonal(module, dl(x, y, 16), kind="exact")
    for n in want:
        torch.testing.assert_close(f[n], want[n], rtol=1e-12, atol=1e-15)
    assert cb.ewc.num_tasks == 1
    f2 = cb.consolidate_task(t, module)  # after the fit: still its training dataloader
    assert f2.n_samples == 16
    assert cb.ewc.num_tasks == 2


def test_batch_to_fisher_keeps_the_loaders_distributed_sampler(tmp_path):
    from torch.utils.data.distributed import DistributedSampler

    x, y = task(21, n=13)
    ds = TensorDataset(x, y)
    # rank 1 of 2 draws indices 1, 3, ..., 11 and one padded index (0): 6 real samples
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(ds, batch_size=4, sampler=sampler)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact", batch_to_fisher=lambda b: (b[0], b[1]), data=loader)
    f = cb.consolidate_task(trainer(tmp_path), module)
    assert f.n_samples == 6
    want = ewc.fisher_diagonal(module, dl(x[1::2], y[1::2], 13), kind="exact")
    for n in want:
        torch.testing.assert_close(f[n], want[n], rtol=1e-12, atol=1e-15)


# --- Checkpoints ------------------------------------------------------------------------------
def assert_state_equal(a: dict, b: dict) -> None:
    assert a["metadata"] == b["metadata"]
    assert set(a["tensors"]) == set(b["tensors"])
    for k, v in a["tensors"].items():
        assert v.dtype == b["tensors"][k].dtype and torch.equal(v, b["tensors"][k]), k


class Probe(pl.Callback):
    """Records the EWC state as the training loop starts (after any checkpoint restore)."""

    def __init__(self, cb):
        self.cb, self.state = cb, None

    def on_train_start(self, trainer, pl_module):
        self.state = copy.deepcopy(self.cb.ewc.state_dict())


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_restores_the_ewc_state_and_the_penalty_continues(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    (xa, ya), (xb, yb) = task(16), task(17)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact")
    trainer(tmp_path, [cb], max_epochs=2).fit(module, dl(xa, ya, 8))
    state_a = copy.deepcopy(cb.ewc.state_dict())  # (its metadata's task list is the live one)

    ckpts = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpts, filename="{epoch}", save_top_k=-1)
    kw = {"max_epochs": 2, "enable_checkpointing": True}
    trainer(tmp_path, [cb, saver], **kw).fit(module, dl(xb, yb, 8))  # 2 epochs of 2 steps
    final = params(module)
    assert cb.ewc.num_tasks == 2
    path = ckpts / "epoch=0.ckpt"

    raw = torch.load(path, weights_only=True)  # plain tensors, dicts, lists, str, numbers
    assert_state_equal(raw["callbacks"]["EWCCallback"]["ewc"], state_a)

    fresh = Net(seed=99)
    cb2 = EWCCallback(lam=1.0, kind="exact")  # λ comes from the checkpoint
    probe = Probe(cb2)
    kw["enable_checkpointing"] = False
    trainer(tmp_path, [cb2, probe], **kw).fit(
        fresh, dl(xb, yb, 8), ckpt_path=path, weights_only=True
    )
    assert_state_equal(probe.state, state_a)  # restored bit for bit
    assert_params(params(fresh), final)  # the penalty continued: same as the uninterrupted run
    assert_state_equal(cb2.ewc.state_dict(), cb.ewc.state_dict())
    # without the EWC state the resumed run ends elsewhere
    other = Net(seed=99)
    with pytest.warns(UserWarning, match="Please add the following callbacks:.*'EWCCallback'"):
        trainer(tmp_path, **kw).fit(other, dl(xb, yb, 8), ckpt_path=path)
    assert max_diff(params(other), final) > 1e-4


def test_ewc_options_pass_through_and_survive_a_checkpoint(tmp_path):
    x, y = task(23)
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact", params=["net.2.*"], fisher_dtype=torch.float32)
    t = trainer(tmp_path, [cb], max_steps=1)
    t.fit(module, dl(x, y, 8))
    assert sorted(cb.ewc.precision) == ["net.2.bias", "net.2.weight"]
    assert all(a.dtype == torch.float32 for a in cb.ewc.precision.values())
    path = tmp_path / "after.ckpt"
    t.save_checkpoint(path)  # after the fit: the consolidated state
    raw = torch.load(path, weights_only=True)
    cb2 = EWCCallback(lam=1.0, params=["net.2.*"], fisher_dtype=torch.float32)
    cb2.load_state_dict(raw["callbacks"]["EWCCallback"])
    assert_state_equal(cb2.ewc_for(Net()).state_dict(), cb.ewc.state_dict())


def test_state_restored_before_the_ewc_object_exists():
    module, reg = anchored()
    cb = EWCCallback(lam=1.0)
    cb.load_state_dict(EWCCallback(reg).state_dict())
    assert cb.ewc is None
    assert_state_equal(cb.state_dict()["ewc"], reg.state_dict())  # kept as it is until then
    created = cb.ewc_for(module)
    assert created is cb.ewc and created.model is module
    assert_state_equal(created.state_dict(), reg.state_dict())
    assert created.lam == LAM


def test_state_key_and_errors(tmp_path):
    assert EWCCallback(lam=1.0).state_key == "EWCCallback"
    assert EWCCallback(lam=1.0, name="a").state_key == "EWCCallback[a]"
    assert EWCCallback(lam=1.0).state_dict() == {}
    module, reg = anchored()
    with pytest.raises(TypeError, match="not both"):
        EWCCallback(reg, lam=1.0)
    with pytest.raises(TypeError, match="lam="):
        EWCCallback()
    with pytest.raises(ValueError, match="not an EWCCallback state"):
        EWCCallback(lam=1.0).load_state_dict({"tensors": {}})
    x, y = task(18)
    cb = EWCCallback(lam=1.0)
    with pytest.raises(ValueError, match="several training dataloaders"):
        trainer(tmp_path, [cb], max_steps=1).fit(
            DictBatches(), {"a": dl(x, y, 8), "b": dl(x, y, 8)}
        )


class DictBatches(Net):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch["a"], batch_idx)


def test_fit_without_training_warns(tmp_path):
    x, y = task(19)
    cb = EWCCallback(lam=1.0)
    with pytest.warns(UserWarning, match="no task was consolidated"):
        trainer(tmp_path, [cb], limit_train_batches=0).fit(Net(), dl(x, y, 8))
    assert cb.ewc.num_tasks == 0


# --- Imports ---------------------------------------------------------------------------------
def _load_copy(monkeypatch, hidden):
    """Execute a fresh copy of the module with the packages ``hidden`` made unimportable."""
    import importlib.util

    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)
    path = ROOT / "src" / "ewc" / "integrations" / "lightning.py"
    spec = importlib.util.spec_from_file_location("ewc.integrations._lightning_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_falls_back_to_pytorch_lightning(monkeypatch):
    pytest.importorskip("pytorch_lightning")
    copy_ = _load_copy(monkeypatch, ["lightning", "lightning.pytorch"])
    assert copy_.pl.__name__ == "pytorch_lightning"
    assert issubclass(copy_.EWCCallback, sys.modules["pytorch_lightning"].Callback)


def test_without_lightning_the_import_error_says_what_to_install(monkeypatch):
    with pytest.raises(ImportError, match=re.escape("pip install 'ewc[lightning]'")):
        _load_copy(monkeypatch, ["lightning", "lightning.pytorch", "pytorch_lightning"])


# --- DDP -------------------------------------------------------------------------------------
class Dump(pl.Callback):
    """Each rank writes what its EWCCallback consolidated (after it, in on_train_end)."""

    def __init__(self, cb, outdir):
        self.cb, self.outdir = cb, str(outdir)

    def on_train_end(self, trainer, pl_module):
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        out = {
            "state": self.cb.ewc.state_dict(),
            "params": params(pl_module),
            "sampler": type(sampler).__name__,
            "world": torch.distributed.get_world_size(),
        }
        torch.save(out, f"{self.outdir}/rank{trainer.global_rank}.pt")


@pytest.mark.skipif(
    not (torch.distributed.is_available() and sys.platform == "linux"),
    reason="ddp_fork on CPU (gloo) needs torch.distributed and fork",
)
def test_ddp_consolidates_on_every_rank_with_the_fisher_of_the_whole_data(tmp_path):
    x, y = task(20, n=13)  # 13 samples on 2 ranks: the DistributedSampler pads one in
    module = Net()
    cb = EWCCallback(lam=LAM, kind="exact")
    t = trainer(tmp_path, [cb, Dump(cb, tmp_path)], devices=2, strategy="ddp_fork", max_steps=2)
    t.fit(module, dl(x, y, 3))  # (the workers warn that their state does not come back)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["sampler"] == "DistributedSampler" and r["world"] == 2
        assert r["state"]["metadata"]["tasks"] == [{"n_samples": 13, "kind": "exact"}]
        assert_params(r["params"], ranks[0]["params"], rtol=0.0, atol=0.0)
    ref = Net()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(ranks[0]["params"][n])
    want = ewc.fisher_diagonal(ref, dl(x, y, 13), kind="exact")  # one process, all 13 samples
    for r in ranks:
        for n in want:
            torch.testing.assert_close(
                r["state"]["tensors"][f"precision.{n}"], want[n], rtol=1e-12, atol=1e-15
            )
