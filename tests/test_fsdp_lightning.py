"""EWCCallback under Lightning's ModelParallelStrategy (FSDP2) on two gloo processes.

The processes come from the gloo spawn helper (Lightning sees ``LOCAL_RANK`` and takes them as
created externally); the module applies ``fully_shard`` in ``configure_model``. Task 1 is
consolidated on both ranks (the Fisher of all the data, as DTensor shards); one step of task 2
with the injected penalty must equal the step computed by hand in one process.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import spawn_gloo
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ewc

pl = pytest.importorskip("lightning.pytorch")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)

LAM = 3.0
LR = 0.5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _task(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def configure_model(self) -> None:
        if isinstance(self.net, fsdp.FSDPModule):
            return  # the second fit: already sharded
        mesh = self.device_mesh["data_parallel"]
        fsdp.fully_shard(self.net[0], mesh=mesh)
        fsdp.fully_shard(self.net[2], mesh=mesh)
        fsdp.fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _fit(module, callback, seed, tmp, steps) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    x, y = _task(seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[callback],
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))


def _full(module) -> dict[str, torch.Tensor]:
    return {n: ewc._fsdp.total(p).detach().clone() for n, p in module.net.named_parameters()}


def _worker(rank: int, outdir: str) -> None:
    os.environ.update(
        LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
    )  # fmt: skip
    from ewc.integrations.lightning import EWCCallback

    module = _Module()
    callback = EWCCallback(lam=LAM, kind="exact")
    _fit(module, callback, 1, outdir, 1)
    out = {f"after1/{n}": t for n, t in _full(module).items()}
    reg = callback.ewc
    assert reg is not None and reg.num_tasks == 1
    assert all(ewc._fsdp.is_sharded(t) for t in reg.precision.values())
    out.update({f"precision/{n[4:]}": ewc._fsdp.total(t) for n, t in reg.precision.items()})
    state = callback.state_dict()  # full tensors, for checkpoints at any world size
    assert not any(ewc._fsdp.is_sharded(t) for t in state["ewc"]["tensors"].values())
    _fit(module, callback, 2, outdir, 2)  # the second step has a non-zero penalty
    out.update({f"after2/{n}": t for n, t in _full(module).items()})
    save_file(out, os.path.join(outdir, f"rank{rank}.safetensors"))


def test_model_parallel_strategy_consolidates_and_penalises_like_one_process(tmp_path):
    spawn_gloo(_worker, 2, tmp_path, timeout=90)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    got = ranks[0]
    net = _net()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(got[f"after1/{n}"])
    x, y = _task(1)
    fisher = ewc.fisher_diagonal(net, [(x, y)], kind="exact")
    for n in fisher:
        torch.testing.assert_close(got[f"precision/{n}"], fisher[n], rtol=1e-9, atol=1e-14)
    x2, y2 = _task(2)
    anchor = {n: got[f"after1/{n}"] for n in fisher}
    for _ in range(2):  # every step sees both ranks' batches: all 8 samples
        net.zero_grad()
        nn.functional.cross_entropy(net(x2), y2).backward()
        with torch.no_grad():
            for n, p in net.named_parameters():
                p -= LR * (p.grad + LAM * fisher[n] * (p - anchor[n]))
    assert any(not torch.equal(p.detach(), anchor[n]) for n, p in net.named_parameters())
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[f"after2/{n}"], p.detach(), rtol=1e-9, atol=1e-12)
