"""fisher_kfac under torch.distributed: sharded factors equal the single-process ones."""

from __future__ import annotations

import os

import torch
from conftest import spawn_gloo
from safetensors.torch import load_file, save_file
from torch import nn

import ewc

WORLD = 2


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    return model, x, y


def _flat(kfac: ewc.KFAC) -> dict[str, torch.Tensor]:
    out = {f"{n}.{f}": t for n, b in kfac.items() for f, t in zip("AG", b.terms[0], strict=True)}
    out.update({f"rest.{n}": t for n, t in kfac.rest.items()})
    return out


def _worker(rank: int, outdir: str) -> None:
    model, x, y = _problem()
    shard = slice(0, 7) if rank == 0 else slice(7, 11)  # uneven shards
    xs, ys = x[shard], y[shard]
    kfac = ewc.fisher_kfac(model, [(xs[:3], ys[:3]), (xs[3:], ys[3:])], kind="empirical")
    save_file(
        {k: v.contiguous() for k, v in _flat(kfac).items()},
        os.path.join(outdir, f"rank{rank}.safetensors"),
    )


def test_sharded_factors_equal_the_single_process_factors(tmp_path):
    spawn_gloo(_worker, WORLD, tmp_path, timeout=60)
    model, x, y = _problem()
    want = _flat(ewc.fisher_kfac(model, [(x, y)], kind="empirical"))
    assert any(k.startswith("rest.") for k in want)
    for rank in range(WORLD):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert set(got) == set(want)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-10, atol=1e-13), (rank, k)
