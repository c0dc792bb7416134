"""torch.distributed: sharded Fisher estimates, DistributedSampler padding and DDP-wrapped models.

One spawn of two gloo processes runs every distributed scenario (``_worker``) and writes each
rank's tensors to a file; the tests compare them with single-process references computed here.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import assert_fisher_close, loader, spawn_gloo
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import ewc
from ewc import distributed as ewc_dist

WORLD = 2
LAM = 3.0
LR = 0.5


# --- Shared problem -------------------------------------------------------------------------
def _problem(n: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _gen(seed: int, skip: int = 0) -> torch.Generator:
    """A generator for sampled labels, advanced past ``skip`` samples' draws (mc_samples=1)."""
    g = torch.Generator().manual_seed(seed)
    if skip:
        torch.rand((skip, 1), generator=g, dtype=torch.float64)
    return g


def _ddp_steps(model: nn.Module, reg: ewc.EWC, x: torch.Tensor, y: torch.Tensor, out: dict) -> None:
    """One SGD step on the task loss, then the penalty, its injected and its autograd gradients."""
    params = dict(reg.model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["penalty"] = reg.penalty().detach().reshape(1)
    reg.add_penalty_grad()
    out.update({f"injected/{n}": p.grad.clone() for n, p in params.items()})
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    out.update({f"task/{n}": p.grad.clone() for n, p in params.items()})
    opt.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(model(x), y) + reg.penalty()).backward()
    out.update({f"grad/{n}": p.grad.clone() for n, p in params.items()})
    out.update({f"param/{n}": p.detach().clone() for n, p in params.items()})


# --- The distributed worker -----------------------------------------------------------------
def _put(out: dict, prefix: str, fisher: ewc.Fisher) -> None:
    out.update({f"{prefix}/{k}": v.contiguous() for k, v in fisher.items()})
    out[f"{prefix}/n_samples"] = torch.tensor([fisher.n_samples])


def _scenarios(rank: int) -> dict[str, torch.Tensor]:
    model, x, y = _problem()
    out: dict[str, torch.Tensor] = {}
    fd = ewc.fisher_diagonal
    even = loader(x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6], 4)
    for kind in ("empirical", "exact"):
        _put(out, f"even_{kind}", fd(model, even, kind=kind))
    _put(out, "even_sampled", fd(model, even, kind="sampled", generator=_gen(5, 6 * rank)))
    _put(out, "local", fd(model, even, kind="exact", distributed=False))
    _put(out, "forced", fd(model, even, kind="exact", distributed=True, group=dist.group.WORLD))

    uneven = loader(x[:8], y[:8], 3) if rank == 0 else loader(x[8:11], y[8:11], 2)
    for kind in ("empirical", "exact"):
        _put(out, f"uneven_{kind}", fd(model, uneven, kind=kind))
    _put(out, "uneven_n7", fd(model, uneven, kind="empirical", n_samples=7))
    _put(out, "empty_rank", fd(model, loader(x[:11], y[:11], 4) if rank == 0 else [], kind="exact"))

    ds = TensorDataset(x[:11], y[:11])  # 11 samples on 2 ranks: rank 1's last index is padding
    for kind in ("empirical", "exact"):
        shuffled = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, seed=3))
        _put(out, f"sampler_{kind}", fd(model, shuffled, kind=kind))
    batches = BatchSampler(DistributedSampler(ds, shuffle=False), 5, drop_last=False)
    _put(out, "sampler_batch", fd(model, DataLoader(ds, batch_sampler=batches), kind="empirical"))
    ordered = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, shuffle=False))
    _put(out, "sampler_n5", fd(model, ordered, kind="empirical", n_samples=5))

    inner = _problem()[0]
    ddp = nn.parallel.DistributedDataParallel(inner)
    _put(out, "ddp_wrapped", fd(ddp, even, kind="exact"))
    _put(out, "ddp_inner", fd(inner, even, kind="exact"))
    reg = ewc.EWC(ddp, lam=LAM, kind="exact")
    assert reg.model is inner
    _put(out, "ddp_consolidated", reg.consolidate(even))
    xs, ys = x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6]
    step: dict[str, torch.Tensor] = {}
    _ddp_steps(ddp, reg, xs, ys, step)
    out.update({f"ddp_step/{k}": v for k, v in step.items()})
    # gradients as views of DDP's buckets: the penalty's in-place addition must reach them
    inner = _problem()[0]
    ddp = nn.parallel.DistributedDataParallel(inner, gradient_as_bucket_view=True)
    reg = ewc.EWC(ddp, lam=LAM, kind="exact")
    reg.consolidate(even)
    step = {}
    _ddp_steps(ddp, reg, xs, ys, step)
    out.update({f"ddp_view_step/{k}": v for k, v in step.items()})
    return out


def _worker(rank: int, outdir: str) -> None:
    save_file(_scenarios(rank), os.path.join(outdir, f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    outdir = tmp_path_factory.mktemp("dist")
    spawn_gloo(_worker, WORLD, outdir, timeout=60)
    return [load_file(str(outdir / f"rank{r}.safetensors")) for r in range(WORLD)]


def _get(result: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], int]:
    fisher = {
        k.split("/", 1)[1]: v
        for k, v in result.items()
        if k.startswith(prefix + "/") and not k.endswith("/n_samples")
    }
    return fisher, int(result[f"{prefix}/n_samples"])


def _check(
    ranks: list[dict[str, torch.Tensor]], prefix: str, want: ewc.Fisher, n: int | None = None
) -> None:
    """Both ranks hold the same Fisher (bit for bit), equal to the single-process ``want``."""
    fishers = [_get(r, prefix) for r in ranks]
    for fisher, count in fishers:
        assert count == (n if n is not None else want.n_samples)
        assert_fisher_close(fisher, dict(want))
    for k in fishers[0][0]:
        assert torch.equal(fishers[0][0][k], fishers[1][0][k]), k


def _single(x: torch.Tensor, y: torch.Tensor, kind: str, **kw) -> ewc.Fisher:
    model = _problem()[0]
    return ewc.fisher_diagonal(model, loader(x, y, 5), kind=kind, **kw)


# --- Distributed tests ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empirical", "exact", "sampled"])
def test_even_shards_equal_the_single_process_fisher(ranks, kind):
    _, x, y = _problem()
    gen = {"generator": _gen(5)} if kind == "sampled" else {}
    _check(ranks, f"even_{kind}", _single(x, y, kind, **gen))


def test_distributed_true_and_an_explicit_group(ranks):
    _, x, y = _problem()
    _check(ranks, "forced", _single(x, y, "exact"))


def test_distributed_false_is_local_only(ranks):
    _, x, y = _problem()
    for rank, result in enumerate(ranks):
        fisher, count = _get(result, "local")
        assert count == 6
        shard = slice(6 * rank, 6 * rank + 6)
        assert_fisher_close(fisher, dict(_single(x[shard], y[shard], "exact")))


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_uneven_shards_weight_every_sample_equally(ranks, kind):
    _, x, y = _problem()
    _check(ranks, f"uneven_{kind}", _single(x[:11], y[:11], kind))


def test_n_samples_is_the_total_over_ranks(ranks):
    """n_samples=7 on 2 ranks: rank 0 reads 4 of its 8 samples, rank 1 its 3 (share 3)."""
    _, x, y = _problem()
    idx = torch.tensor([0, 1, 2, 3, 8, 9, 10])
    _check(ranks, "uneven_n7", _single(x[idx], y[idx], "empirical"))


def test_a_rank_with_no_data_still_joins_the_reduction(ranks):
    _, x, y = _problem()
    _check(ranks, "empty_rank", _single(x[:11], y[:11], "exact"))


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_distributed_sampler_padding_is_not_counted(ranks, kind):
    """11 samples, 2 ranks: the sampler pads rank 1 with a 12th index, a repeated sample."""
    _, x, y = _problem()
    _check(ranks, f"sampler_{kind}", _single(x[:11], y[:11], kind))
    _check(ranks, "sampler_batch", _single(x[:11], y[:11], "empirical"))


def test_n_samples_with_a_distributed_sampler_is_a_prefix_of_its_order(ranks):
    _, x, y = _problem()
    _check(ranks, "sampler_n5", _single(x[:5], y[:5], "empirical"))


def test_ddp_model_is_unwrapped(ranks):
    _, x, y = _problem()
    want = _single(x, y, "exact")
    for result in ranks:
        wrapped, _ = _get(result, "ddp_wrapped")
        inner, _ = _get(result, "ddp_inner")
        assert set(wrapped) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for k in inner:
            assert torch.equal(wrapped[k], inner[k])
    _check(ranks, "ddp_wrapped", want)
    _check(ranks, "ddp_consolidated", want)


def test_ewc_penalty_and_gradients_under_ddp(ranks):
    """Identical on both ranks, and equal to one process training on all the data."""
    model, x, y = _problem()
    reg = ewc.EWC(model, lam=LAM, kind="exact")
    reg.consolidate(loader(x, y, 5))
    want: dict[str, torch.Tensor] = {}
    _ddp_steps(model, reg, x, y, want)
    for prefix in ("ddp_step", "ddp_view_step"):
        for key, value in want.items():
            got = [r[f"{prefix}/{key}"] for r in ranks]
            assert torch.equal(got[0], got[1]), (prefix, key)
            torch.testing.assert_close(got[0], value, rtol=1e-9, atol=1e-12, msg=f"{prefix} {key}")
        for n in dict(model.named_parameters()):  # autograd's = the task's + the injected form's
            r = ranks[0]
            both = r[f"{prefix}/task/{n}"] + r[f"{prefix}/injected/{n}"]
            torch.testing.assert_close(r[f"{prefix}/grad/{n}"], both, rtol=1e-12, atol=1e-14)


# --- Single-process tests -------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_real_samples_counts_every_index_once(shuffle, drop_last):
    for size in range(1, 14):
        for world in range(1, 6):
            kept: list[int] = []
            for rank in range(world):
                sampler = DistributedSampler(
                    list(range(size)), world, rank, shuffle=shuffle, seed=2, drop_last=drop_last
                )
                order = list(sampler)
                real = ewc_dist.real_samples(sampler)
                kept += order[:real]
                assert set(order[real:]) <= set(range(size))
            assert len(kept) == len(set(kept))  # no sample twice
            if not drop_last:
                assert sorted(kept) == list(range(size))  # every sample once
            else:
                assert len(kept) == world * len(sampler)


def test_sampler_padding_is_dropped_without_a_process_group():
    """Rank 1 of 2 over 11 samples iterates 1, 3, 5, 7, 9 and the padding index 0."""
    _, x, y = _problem()
    ds = TensorDataset(x[:11], y[:11])
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    data = DataLoader(ds, batch_size=4, sampler=sampler)
    got = ewc.fisher_diagonal(_problem()[0], data, kind="exact")
    idx = torch.tensor([1, 3, 5, 7, 9])
    assert got.n_samples == 5
    assert_fisher_close(got, dict(_single(x[idx], y[idx], "exact")))
    got = ewc.fisher_diagonal(_problem()[0], data, kind="exact", n_samples=3)  # a local cap
    assert got.n_samples == 3
    assert_fisher_close(got, dict(_single(x[idx[:3]], y[idx[:3]], "exact")))


def test_data_parallel_is_unwrapped():
    model, x, y = _problem()
    wrapped = nn.DataParallel(model)
    got = ewc.fisher_diagonal(wrapped, loader(x, y, 5), kind="exact")
    assert_fisher_close(got, dict(ewc.fisher_diagonal(model, loader(x, y, 5), kind="exact")))
    reg = ewc.EWC(wrapped, lam=1.0)
    assert reg.model is model
    reg.consolidate(fisher=got)
    assert set(reg.precision) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("nest", ["compile", "compile(DataParallel)", "DataParallel(compile)"])
def test_a_compiled_model_is_unwrapped(nest, tmp_path):
    model, x, y = _problem()
    wrap = {
        "compile": lambda m: torch.compile(m, backend="eager"),
        "compile(DataParallel)": lambda m: torch.compile(nn.DataParallel(m), backend="eager"),
        "DataParallel(compile)": lambda m: nn.DataParallel(torch.compile(m, backend="eager")),
    }[nest]
    compiled = wrap(model)
    names = {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert {n for n, _ in compiled.named_parameters()} != names  # "_orig_mod." / "module."
    got = ewc.fisher_diagonal(compiled, loader(x, y, 5), kind="exact")
    assert set(got) == names
    assert_fisher_close(got, dict(ewc.fisher_diagonal(model, loader(x, y, 5), kind="exact")))
    reg = ewc.EWC(compiled, lam=1.0)
    assert reg.model is model
    reg.consolidate(loader(x, y, 5))
    reg.save(tmp_path / "s.safetensors")
    for target in (model, compiled):  # the state loads into the plain and the compiled model
        back = ewc.EWC.load(tmp_path / "s.safetensors", target)
        assert set(back.precision) == names
        assert float(back.penalty()) == float(reg.penalty())


def test_no_process_group_means_no_collectives(monkeypatch):
    assert not (dist.is_available() and dist.is_initialized())

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called without a process group")

    if dist.is_available():
        monkeypatch.setattr(dist, "all_reduce", forbidden)
    model, x, y = _problem()
    assert ewc_dist.resolve(None) is None and ewc_dist.resolve(False) is None
    got = ewc.fisher_diagonal(model, loader(x, y, 5), kind="exact")
    assert got.n_samples == 12


@pytest.mark.parametrize(
    ("value", "match"),
    [(True, "initialised process group"), ("yes", "True, False or None")],
)
def test_distributed_argument_is_checked(value, match):
    model, x, y = _problem()
    with pytest.raises(ValueError, match=match):
        ewc.fisher_diagonal(model, loader(x, y, 5), distributed=value)


def test_unwrap_leaves_other_modules_alone():
    model = nn.Linear(2, 2)
    assert ewc_dist.unwrap(model) is model
    assert ewc_dist.unwrap(nn.DataParallel(nn.DataParallel(model))) is model


# --- A failing rank stops every rank, at once -------------------------------------------------
class _Raising:
    """A loader whose second batch raises (a corrupt file, a worker crash)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield self.x[:3], self.y[:3]
        raise OSError("cannot read shard 7")


def _broken_inputs(x: torch.Tensor, y: torch.Tensor):
    """Rank 0's 60 counted batches (it must stop after the failing rank's round), a label out
    of range and a NaN input for rank 1; ``read`` counts rank 0's batches."""
    read: list[int] = []

    class Counted:
        def __iter__(self):
            for batch in loader(x.repeat(20, 1), y.repeat(20), 4):
                read.append(1)
                yield batch

    bad_labels = y[:6].clone()
    bad_labels[4] = 9
    nan_x = x[:6].clone()
    nan_x[1, 2] = float("nan")
    return read, Counted(), bad_labels, nan_x


def _failing(rank: int, outdir: str) -> None:
    """Rank 1 breaks in three ways; each call must raise the same RankFailure on both ranks."""
    import json
    import time

    model, x, y = _problem()
    read, many, bad_labels, nan_x = _broken_inputs(x, y)
    cases = {
        "labels": (many if rank == 0 else loader(x[:6], bad_labels, 3), "empirical"),
        "nonfinite": (many if rank == 0 else loader(nan_x, y[:6], 3), "exact"),
        "loader": (many if rank == 0 else _Raising(x, y), "empirical"),
    }
    report = {}
    for name, (data, kind) in cases.items():
        start = time.monotonic()
        try:
            ewc.fisher_diagonal(model, data, kind=kind)
            report[name] = {"error": None}
        except ewc_dist.RankFailure as e:
            report[name] = {"error": str(e), "ranks": e.ranks, "type": "RankFailure"}
        report[name]["seconds"] = time.monotonic() - start
        report[name]["read"] = len(read)
        read.clear()
    # the group still works afterwards: a correct estimate on both ranks
    ok = ewc.fisher_diagonal(
        model, loader(x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6], 4)
    )
    report["after"] = ok.n_samples
    with open(os.path.join(outdir, f"fail{rank}.json"), "w") as f:
        json.dump(report, f)


def test_a_failing_rank_makes_every_rank_raise_the_same_error(tmp_path):
    import json

    spawn_gloo(_failing, WORLD, tmp_path, timeout=60)
    reports = [json.loads((tmp_path / f"fail{r}.json").read_text()) for r in range(WORLD)]
    causes = {"labels": "label", "nonfinite": "non-finite", "loader": "OSError: cannot read"}
    for name, cause in causes.items():
        got = [r[name] for r in reports]
        assert got[0]["error"] is not None and got[0]["error"] == got[1]["error"], name
        assert got[0]["ranks"] == [1]
        assert got[0]["error"].startswith("rank 1 of 2 failed:"), got[0]["error"]
        assert cause in got[0]["error"], got[0]["error"]
        assert got[0]["read"] <= 3, got  # rank 0 stopped at once, not after its 60 batches
        assert max(g["seconds"] for g in got) < 30, got
    assert [r["after"] for r in reports] == [12, 12]


# --- KFAC and MAS estimates stop every rank too; mismatched accumulators are refused ---------
def _failing_others(rank: int, outdir: str) -> None:
    """Rank 1 breaks the KFAC and MAS estimates; rank 0 has 60 batches to read."""
    import json
    import time

    model, x, y = _problem()
    read, many, bad_labels, nan_x = _broken_inputs(x, y)
    kfac = ewc.fisher_kfac
    cases = {
        "kfac labels": (kfac, many if rank == 0 else loader(x[:6], bad_labels, 3), "empirical"),
        "kfac loader": (kfac, many if rank == 0 else _Raising(x, y), "sampled"),
        "kfac empty": (kfac, loader(x[:6], y[:6], 3) if rank == 0 else [], "sampled"),
        "mas nonfinite": (ewc.mas_importance, many if rank == 0 else loader(nan_x, y[:6], 3), None),
        "mas loader": (ewc.mas_importance, many if rank == 0 else _Raising(x, y), None),
    }
    report = {}
    for name, (fn, data, kind) in cases.items():
        start = time.monotonic()
        try:
            fn(model, data, **({} if kind is None else {"kind": kind}))
            report[name] = {"error": None}
        except ewc_dist.RankFailure as e:
            report[name] = {"error": str(e), "ranks": e.ranks}
        report[name]["seconds"] = time.monotonic() - start
        report[name]["read"] = len(read)
        read.clear()
    # accumulators of different layouts are refused on every rank, whatever their total size
    red = ewc_dist.Reduction(group=None, rank=rank, world_size=WORLD)
    sums = {"a": torch.zeros(6)} if rank == 0 else {"a": torch.zeros(2, 3)}
    try:
        red.all_reduce(sums, 1)
        report["layout"] = None
    except ValueError as e:
        report["layout"] = str(e)
    ok = ewc.fisher_kfac(model, loader(x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6], 4))
    report["after"] = ok.n_samples
    with open(os.path.join(outdir, f"fail{rank}.json"), "w") as f:
        json.dump(report, f)


def test_kfac_and_mas_stop_every_rank_when_one_fails(tmp_path):
    import json

    spawn_gloo(_failing_others, WORLD, tmp_path, timeout=60)
    reports = [json.loads((tmp_path / f"fail{r}.json").read_text()) for r in range(WORLD)]
    causes = {
        "kfac labels": "label",
        "kfac loader": "OSError: cannot read",
        "kfac empty": "no batches",
        "mas nonfinite": "non-finite",
        "mas loader": "OSError: cannot read",
    }
    for name, cause in causes.items():
        got = [r[name] for r in reports]
        assert got[0]["error"] is not None and got[0]["error"] == got[1]["error"], (name, got)
        assert got[0]["ranks"] == [1], (name, got)
        assert got[0]["error"].startswith("rank 1 of 2 failed:"), got[0]["error"]
        assert cause in got[0]["error"], got[0]["error"]
        assert got[0]["read"] <= 3, (name, got)  # rank 0 stopped at once, not after 60 batches
        assert max(g["seconds"] for g in got) < 30, got
    for r in reports:
        assert r["layout"] is not None and "accumulators differ (ranks [1]" in r["layout"]
    assert [r["after"] for r in reports] == [12, 12]
