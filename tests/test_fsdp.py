"""FSDP2 (``fully_shard``, DTensor parameters) on gloo: Fisher shards, the EWC penalty, state.

One spawn of two gloo processes runs the scenarios (``_worker2``), one of three processes a
second set (``_worker3``). Each rank checks in place that every Fisher entry is a DTensor with
its parameter's mesh and placements and writes the gathered (``full_tensor()``) values; the
tests compare them with single-process float64 references computed here.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_fisher_close, loader, spawn_gloo
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import ewc
from ewc import _rules
from ewc import distributed as ewc_dist

fsdp = pytest.importorskip("torch.distributed.fsdp")
fully_shard = getattr(fsdp, "fully_shard", None)
if fully_shard is None:
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)

LAM = 3.0
LR = 0.5


# --- Problems ----------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _sharded_mlp(root: bool = True) -> nn.Module:
    model = _mlp()
    fully_shard(model[0])
    if root:
        fully_shard(model[2])
        fully_shard(model)
    return model


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(100, 3)
    ).double()


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).double()


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 32, (6, 5), generator=g), torch.randint(0, 32, (6, 5), generator=g)


def _logits(out):
    return out.logits


def _gen(seed: int, skip: int = 0) -> torch.Generator:
    """A generator for sampled labels, advanced past ``skip`` samples' draws (mc_samples=1)."""
    g = torch.Generator().manual_seed(seed)
    if skip:
        torch.rand((skip, 1), generator=g, dtype=torch.float64)
    return g


# --- Helpers run on every rank -------------------------------------------------------------------
def _put(out: dict, prefix: str, fisher: ewc.Fisher, model: nn.Module) -> None:
    """Check placements against the parameters; store the gathered values."""
    params = dict(model.named_parameters())
    for k, v in fisher.items():
        p = params[k]
        if ewc._fsdp.is_sharded(p):
            assert ewc._fsdp.is_sharded(v), (prefix, k)
            assert v.device_mesh == p.device_mesh and v.placements == p.placements, (prefix, k)
            assert v.to_local().shape == p.to_local().shape, (prefix, k)
        else:
            assert not ewc._fsdp.is_sharded(v), (prefix, k)
        out[f"{prefix}/{k}"] = ewc._fsdp.total(v).detach().clone()
    out[f"{prefix}/n_samples"] = torch.tensor([fisher.n_samples])


def _steps(model: nn.Module, reg: ewc.EWC, x, y, out: dict, prefix: str) -> None:
    """One SGD step on the task loss, then the penalty, its injected and its autograd gradients."""
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out[f"{prefix}/penalty"] = reg.penalty().detach().reshape(1)
    reg.add_penalty_grad()
    grads = {n: ewc._fsdp.total(p.grad) for n, p in params.items() if p.grad is not None}
    out.update({f"{prefix}/injected/{n}": g.clone() for n, g in grads.items()})
    opt.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(model(x), y) + reg.penalty()).backward()
    grads = {n: ewc._fsdp.total(p.grad) for n, p in params.items() if p.grad is not None}
    out.update({f"{prefix}/grad/{n}": g.clone() for n, g in grads.items()})


def _worker2(rank: int, outdir: str) -> None:
    x, y = _data()
    out: dict[str, torch.Tensor] = {}
    fd = ewc.fisher_diagonal
    model = _sharded_mlp()
    assert type(model[0]).__name__ == "FSDPLinear"
    assert _rules.rule_for(model[0]) is _rules.RULES[nn.Linear]  # seen through FSDP's subclass
    even = loader(x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6], 4)
    for kind in ("empirical", "exact"):
        _put(out, f"even_{kind}", fd(model, even, kind=kind), model)
    _put(out, "even_sampled", fd(model, even, generator=_gen(5, 6 * rank)), model)
    uneven = loader(x[:8], y[:8], 3) if rank == 0 else loader(x[8:11], y[8:11], 2)
    for kind in ("empirical", "exact"):
        _put(out, f"uneven_{kind}", fd(model, uneven, kind=kind), model)
    ds = TensorDataset(x[:11], y[:11])  # rank 1's last index is the sampler's padding
    padded = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, seed=3))
    _put(out, "sampler", fd(model, padded, kind="empirical"), model)
    _put(
        out, "empty", fd(model, loader(x[:11], y[:11], 4) if rank == 0 else [], kind="exact"), model
    )
    _put(
        out, "subset_bf16", fd(model, even, kind="exact", params="2.*", dtype=torch.bfloat16), model
    )
    partial = _sharded_mlp(root=False)  # 2.* outside any FSDP unit: plain, all-reduced
    _put(out, "partial", fd(partial, even, kind="exact"), partial)
    with pytest.raises(ValueError, match="before fully_shard"):
        ewc.fisher_route(model, x[:2])

    reg = ewc.EWC(model, lam=LAM, kind="exact")
    reg.consolidate(even)
    assert all(ewc._fsdp.is_sharded(t) for t in (*reg.precision.values(), *reg.anchor.values()))
    xs, ys = x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6]
    _steps(model, reg, xs, ys, out, "ewc")
    small = _sharded_mlp()
    reg2 = ewc.EWC(small, lam=LAM, kind="exact", params="0.*", fisher_dtype=torch.bfloat16)
    reg2.consolidate(even)
    assert all(t.dtype == torch.bfloat16 for t in reg2.precision.values())
    _steps(small, reg2, xs, ys, out, "ewc_bf16")

    cnn = _cnn()
    fully_shard(cnn[0])
    fully_shard(cnn)
    images = torch.randn(
        10, 1, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    mine_img = images[:6] if rank == 0 else images[6:]
    _put(
        out, "cnn", fd(cnn, loader(mine_img, y[:6] if rank == 0 else y[6:10], 4), kind="exact"), cnn
    )

    gpt = _gpt2()
    for block in gpt.transformer.h:
        fully_shard(block)
    fully_shard(gpt)
    ids, labels = _tokens()
    mine = slice(0, 4) if rank == 0 else slice(4, 6)  # uneven: 4 and 2 sequences
    lm = loader(ids[mine], labels[mine], 2)
    held = []  # per batch: the most full-shape sum bytes held at once, and the sink's budget
    close = ewc._fsdp.ShardSums.close

    def recorded(sink):
        close(sink)
        held.append((sink.peak, sink.budget, sink.flushes))

    checked = []  # the probe: elements of autograd's full gradients formed at once
    group = ewc._verify._Squares.group

    def counted(sq, keys, grads, trainable):
        checked.append(sum(g.numel() for g in grads if g is not None))
        group(sq, keys, grads, trainable)

    ewc._fsdp.ShardSums.close = recorded
    ewc._verify._Squares.group = counted
    try:
        _put(out, "gpt2", fd(gpt, lm, kind="empirical", output_fn=_logits), gpt)
    finally:
        ewc._fsdp.ShardSums.close = close
        ewc._verify._Squares.group = group
    out["memory/gpt2"] = torch.tensor(held, dtype=torch.int64)
    out["memory/gpt2_probe"] = torch.tensor(checked, dtype=torch.int64)

    reg.save(os.path.join(outdir, "fsdp_state"))  # the sharded layout, gathered tensor by tensor
    back = ewc.EWC.load(os.path.join(outdir, "plain.safetensors"), _sharded_mlp())
    assert all(ewc._fsdp.is_sharded(t) for t in back.precision.values())
    out["load/penalty"] = back.penalty().detach().reshape(1)

    bad = y[:6].clone()
    bad[4] = 9
    try:
        fd(model, even if rank == 0 else loader(x[:6], bad, 3), kind="empirical")
        report = {"error": None}
    except ewc_dist.RankFailure as e:
        report = {"error": str(e), "ranks": e.ranks}
    with open(os.path.join(outdir, f"fail{rank}.json"), "w") as f:
        json.dump(report, f)
    save_file(out, os.path.join(outdir, f"rank{rank}.safetensors"))


def _worker3(rank: int, outdir: str, saved_by_two: str) -> None:
    x, y = _data()
    out: dict[str, torch.Tensor] = {}
    model = _sharded_mlp()
    shard = [slice(0, 7), slice(7, 11), slice(11, 12)][rank]  # 7 / 4 / 1 samples
    data = loader(x[shard], y[shard], 3)
    _put(out, "uneven3", ewc.fisher_diagonal(model, data, kind="exact"), model)
    reg = ewc.EWC(model, lam=LAM, kind="exact")
    reg.consolidate(loader(x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4], 3))
    _steps(model, reg, x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4], out, "ewc3")
    saved = ewc.EWC.load(os.path.join(saved_by_two, "fsdp_state"), _sharded_mlp())  # 2 -> 3
    for n, t in saved.precision.items():
        assert (
            ewc._fsdp.is_sharded(t) and t.placements == dict(model.named_parameters())[n].placements
        )
        out[f"load3/precision.{n}"] = ewc._fsdp.total(t)
        out[f"load3/anchor.{n}"] = ewc._fsdp.total(saved.anchor[n])
    save_file(out, os.path.join(outdir, f"rank{rank}.safetensors"))


def _plain_ewc() -> ewc.EWC:
    """An EWC state whose anchors differ from ``_mlp()``'s parameters (a non-zero penalty)."""
    x, y = _data()
    model = _mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    reg = ewc.EWC(model, lam=LAM, kind="exact")
    reg.consolidate(loader(x, y, 5))
    return reg


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("fsdp2")
    _plain_ewc().save(str(outdir / "plain.safetensors"))
    spawn_gloo(_worker2, 2, outdir, timeout=60)
    return outdir, [load_file(str(outdir / f"rank{r}.safetensors")) for r in range(2)]


@pytest.fixture(scope="module")
def three(tmp_path_factory, two):
    outdir = tmp_path_factory.mktemp("fsdp3")
    spawn_gloo(_worker3, 3, outdir, str(two[0]), timeout=60)
    return [load_file(str(outdir / f"rank{r}.safetensors")) for r in range(3)]


# --- Comparisons with one process ------------------------------------------------------------
def _get(result: dict, prefix: str) -> tuple[dict[str, torch.Tensor], int]:
    fisher = {
        k.split("/", 1)[1]: v
        for k, v in result.items()
        if k.startswith(prefix + "/") and not k.endswith("/n_samples")
    }
    return fisher, int(result[f"{prefix}/n_samples"])


def _check(ranks: list[dict], prefix: str, want: ewc.Fisher, **tol) -> None:
    for result in ranks:
        fisher, count = _get(result, prefix)
        assert count == want.n_samples
        assert_fisher_close(fisher, dict(want), **tol)


def _single(x, y, kind, model=None, **kw) -> ewc.Fisher:
    return ewc.fisher_diagonal(model or _mlp(), loader(x, y, 5), kind=kind, **kw)


@pytest.mark.parametrize("kind", ["empirical", "exact", "sampled"])
def test_even_shards_give_the_single_process_fisher(two, kind):
    x, y = _data()
    gen = {"generator": _gen(5)} if kind == "sampled" else {}
    _check(two[1], f"even_{kind}", _single(x, y, kind, **gen))


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_uneven_shards_and_sampler_padding(two, kind):
    x, y = _data()
    _check(two[1], f"uneven_{kind}", _single(x[:11], y[:11], kind))
    _check(two[1], "sampler", _single(x[:11], y[:11], "empirical"))


def test_a_rank_with_an_empty_shard_joins_in_lockstep(two):
    x, y = _data()
    _check(two[1], "empty", _single(x[:11], y[:11], "exact"))


def test_params_subset_and_bfloat16_storage(two):
    x, y = _data()
    want = _single(x, y, "exact", params="2.*", dtype=torch.bfloat16)
    _check(two[1], "subset_bf16", want, rtol=0, atol=0)  # the same float32 sums, cast once


def test_parameters_outside_fsdp_units_are_all_reduced(two):
    x, y = _data()
    _check(two[1], "partial", _single(x, y, "exact"))


def test_convolution(two):
    _, y = _data()
    images = torch.randn(
        10, 1, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    _check(two[1], "cnn", _single(images, y[:10], "exact", model=_cnn()))


def test_gpt2_style_model(two):
    ids, labels = _tokens()
    want = ewc.fisher_diagonal(_gpt2(), loader(ids, labels, 3), kind="empirical", output_fn=_logits)
    _check(two[1], "gpt2", want, rtol=1e-8, atol=1e-14)


def test_no_rank_holds_the_models_full_sums(two):
    """Each batch's full-shape sums are reduce-scattered a layer at a time, never all held."""
    model = _gpt2()
    sizes = [
        sum(p.numel() * 8 for p in m.parameters(recurse=False))  # float64 accumulators
        for m in model.modules()
    ]
    total = sum(p.numel() * 8 for p in model.parameters())
    for result in two[1]:
        held = result["memory/gpt2"]
        assert held.shape[0] == 2  # two rounds on each rank (4 and 2 sequences, batches of 2)
        for peak, budget, flushes in held.tolist():
            assert 0 < peak <= budget <= max(sizes) < total / 4
            assert flushes >= len(list(model.parameters()))  # every shard got its sums
        # the probe's check: autograd's gradients one FSDP unit (a block, the root) at a time
        probe = result["memory/gpt2_probe"].tolist()
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        assert len(probe) == 3 and sum(probe) == total // 8  # two blocks and the root
        assert 0 < max(probe) <= block < total / 2


def _ewc_reference(prefix: str, x, y, **kw) -> dict[str, torch.Tensor]:
    model = _mlp()
    reg = ewc.EWC(model, lam=LAM, kind="exact", **kw)
    reg.consolidate(loader(x, y, 5))
    out: dict[str, torch.Tensor] = {}
    # FSDP averages the task gradient over ranks: the single process takes the mean of the
    # per-rank mean losses, which is the loss over all samples for equal shards
    _steps(model, reg, x, y, out, prefix)
    return out


@pytest.mark.parametrize(
    "prefix, kw", [("ewc", {}), ("ewc_bf16", {"params": "0.*", "fisher_dtype": torch.bfloat16})]
)
def test_penalty_and_its_gradients_equal_one_process(two, prefix, kw):
    x, y = _data()
    want = _ewc_reference(prefix, x, y, **kw)
    for result in two[1]:
        assert set(k for k in result if k.startswith(prefix + "/")) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(result[key], value, rtol=1e-9, atol=1e-12, msg=key)
    assert torch.equal(two[1][0][f"{prefix}/penalty"], two[1][1][f"{prefix}/penalty"])


def test_a_failing_rank_stops_every_rank_under_fsdp(two):
    reports = [json.loads((two[0] / f"fail{r}.json").read_text()) for r in range(2)]
    assert reports[0]["error"] is not None and reports[0] == reports[1]
    assert reports[0]["ranks"] == [1] and "label" in reports[0]["error"]


def _worker_pass_fails(rank: int, outdir: str, failing: int) -> None:
    """Rank ``failing``'s model raises inside its forward pass on its last batch."""
    import time

    x, y = _data()
    model = _sharded_mlp()
    last = x[6 * failing + 4 : 6 * failing + 6]

    def hook(module, args):
        if rank == failing and torch.equal(args[0], last):
            raise ValueError(f"a user hook on rank {rank} rejects this batch")

    model[0].register_forward_pre_hook(hook)
    start = time.monotonic()
    try:
        ewc.fisher_diagonal(
            model, loader(x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6], 2)
        )
        report = {"error": None}
    except ewc_dist.RankFailure as e:
        report = {"error": str(e), "ranks": e.ranks, "chained": type(e.__cause__).__name__}
    report["seconds"] = time.monotonic() - start
    with open(os.path.join(outdir, f"pass{rank}.json"), "w") as f:
        json.dump(report, f)


def test_a_rank_failing_inside_fsdps_passes_stops_every_rank(tmp_path):
    """FSDP's collectives run inside the passes: no status round can reach the waiting rank.

    The failing rank posts its error and raises at once; the other rank's collective breaks
    when the failing process exits, and it raises the same error, read from the store.
    """
    spawn_gloo(_worker_pass_fails, 2, tmp_path, 1, timeout=60)
    reports = [json.loads((tmp_path / f"pass{r}.json").read_text()) for r in range(2)]
    for r in reports:
        assert r["ranks"] == [1], reports
        assert "rank 1 of 2 failed: ValueError: a user hook on rank 1 rejects" in r["error"]
        assert r["seconds"] < 30  # not the process group's timeout (60 s here)
    assert reports[1]["chained"] == "ValueError"  # the failing rank: its own error
    assert reports[0]["chained"] != "ValueError"  # the waiting rank: its broken collective


def test_a_failing_store_host_leaves_a_clear_error_too(tmp_path):
    """Rank 0 hosts the store here (torchrun's agent hosts it there): it goes with rank 0."""
    spawn_gloo(_worker_pass_fails, 2, tmp_path, 0, timeout=60)
    reports = [json.loads((tmp_path / f"pass{r}.json").read_text()) for r in range(2)]
    assert reports[0]["ranks"] == [0] and "a user hook on rank 0" in reports[0]["error"]
    assert reports[1]["seconds"] < 30, reports
    err = reports[1]["error"]  # rank 0's own report if its store still answered, else:
    assert "a user hook on rank 0" in err or "another rank failed inside a pass" in err, reports


def test_three_ranks(three):
    x, y = _data()
    _check(three, "uneven3", _single(x, y, "exact"))
    want = _ewc_reference("ewc3", x, y)
    for result in three:
        for key, value in want.items():
            torch.testing.assert_close(result[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_distributed_false_is_refused_for_sharded_parameters():
    """Without a process group FSDP cannot be built; the check itself needs none."""
    with pytest.raises(ValueError, match="every rank"):
        ewc._fsdp.estimate(nn.Linear(2, 2), [], ewc._options.FisherOptions(), {}, None, None)


# --- State: the sharded layout, across world sizes -------------------------------------------
def _reference_ewc() -> ewc.EWC:
    x, y = _data()
    reg = ewc.EWC(_mlp(), lam=LAM, kind="exact")
    reg.consolidate(loader(x, y, 5))
    return reg


def test_sharded_state_layout_and_two_ranks_to_one_process(two):
    from safetensors import safe_open

    folder = two[0] / "fsdp_state"
    index = json.loads((folder / "ewc.safetensors.index.json").read_text())
    assert json.loads(index["metadata"]["ewc"])["format"] == "ewc"
    want = _reference_ewc()
    model = _mlp()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for key, file in index["weight_map"].items():
        with safe_open(str(folder / file), framework="pt") as f:
            if key != "offset":  # whole tensors, not shards
                assert tuple(f.get_slice(key).get_shape()) == shapes[key.split(".", 1)[1]]
    loaded = ewc.EWC.load(str(folder), model)
    for n in want.precision:
        torch.testing.assert_close(loaded.precision[n], want.precision[n], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(loaded.anchor[n], want.anchor[n], rtol=0, atol=0)


def test_one_process_state_into_two_ranks_and_two_into_three(two, three):
    plain = ewc.EWC.load(str(two[0] / "plain.safetensors"), _mlp())
    for result in two[1]:
        torch.testing.assert_close(result["load/penalty"][0], plain.penalty().detach())
    want = _reference_ewc()
    for result in three:
        for n in want.precision:
            torch.testing.assert_close(
                result[f"load3/precision.{n}"], want.precision[n], rtol=1e-9, atol=1e-14
            )
            assert torch.equal(result[f"load3/anchor.{n}"], want.anchor[n])


def test_sharded_layout_without_fsdp_round_trips_and_checks_its_files(tmp_path):
    reg = _plain_ewc()
    reg.save(str(tmp_path / "state"), max_shard_bytes=200)
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert len(files) > 2 and "ewc.safetensors.index.json" in files
    back = ewc.EWC.load(str(tmp_path / "state" / "ewc.safetensors.index.json"), _mlp())
    assert torch.equal(back.penalty(), ewc.EWC.load(str(tmp_path / "state"), _mlp()).penalty())
    reg.save(str(tmp_path / "state"), max_shard_bytes=200)  # replaces the directory
    (tmp_path / "state" / files[0]).write_bytes(b"junk")
    with pytest.raises(ValueError, match="unreadable"):
        ewc.EWC.load(str(tmp_path / "state"), _mlp())


def test_fsdp1_is_refused_with_a_pointer_to_fully_shard(monkeypatch):
    class Flat(nn.Module):  # stands in for FullyShardedDataParallel (it needs a process group)
        pass

    monkeypatch.setattr(fsdp, "FullyShardedDataParallel", Flat)
    model = nn.Sequential(Flat(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fully_shard"):
        ewc.fisher_diagonal(model, [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="FSDP1"):
        ewc.EWC(model, lam=1.0)
