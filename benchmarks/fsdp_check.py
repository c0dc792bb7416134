"""FSDP2 check (torchrun): Fisher, EWC penalty and state of a GPT-2 model sharded by fully_shard.

    torchrun --nproc_per_node=2 benchmarks/fsdp_check.py                       # CPU, gloo
    torchrun --nproc_per_node=8 benchmarks/fsdp_check.py --device cuda --preset gpt2 \\
        --dtype bfloat16 --seq 512 --n 64 --batch 4

Every rank builds the same model from a config (nothing downloaded), applies ``fully_shard`` to
each block and the root, and estimates the Fisher of its own shard of random token sequences.
Rank 0 prints one JSON line: the estimate's time as a ratio to one forward+backward step of the
sharded model, peak device memory, for ``--preset tiny`` the largest relative difference to an
unsharded copy on the union of the shards, whether ``penalty()`` is the same on every rank and
its gradient equals ``add_penalty_grad()``'s, and whether a save/load round trip of the sharded
state gives the same penalty.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import ewc
from ewc import _fsdp

PRESETS = {
    "tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 64},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
}


def _model(preset: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        **PRESETS[preset], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype)


def _logits(out):
    return out.logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="sequences per rank")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--state-dir", default=os.path.join(tempfile.gettempdir(), "ewc_fsdp_check"))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    model = _model(args.preset, dtype, device)
    plain = copy.deepcopy(model) if args.preset == "tiny" else None
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    vocab = PRESETS[args.preset]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    every = torch.randint(0, vocab, (world * args.n, args.seq), generator=g)
    mine = every[rank * args.n : (rank + 1) * args.n].to(device)
    data = [mine[i : i + args.batch] for i in range(0, args.n, args.batch)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        model(mine[: args.batch], labels=mine[: args.batch]).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    t_step = (time.perf_counter() - t0) * len(data)  # a pass over this rank's data
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fisher = ewc.fisher_diagonal(
        model, data, output_fn=_logits, generator=torch.Generator(device).manual_seed(5)
    )
    sync()
    t_fisher = time.perf_counter() - t0
    row = {
        "world": world,
        "preset": args.preset,
        "dtype": args.dtype,
        "fisher_vs_step": t_fisher / t_step,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "sharded_entries": sum(_fsdp.is_sharded(t) for t in fisher.values()),
        "entries": len(fisher),
    }
    if plain is not None:  # the same labels: one generator over the union, in rank order
        ref = ewc.fisher_diagonal(
            plain,
            [every[i : i + args.batch].to(device) for i in range(0, len(every), args.batch)],
            output_fn=_logits,
            distributed=False,
            kind="exact",
        )
        got = ewc.fisher_diagonal(model, data, output_fn=_logits, kind="exact")
        row["max_rel_diff_exact"] = max(
            float((_fsdp.total(got[k]) - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30))
            for k in ref
        )
    reg = ewc.EWC(model, lam=10.0)
    reg.consolidate(fisher=fisher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    value = reg.penalty()
    values = [torch.zeros_like(value) for _ in range(world)]
    dist.all_gather(values, value.detach())
    row["penalty_same_on_every_rank"] = all(bool(v == values[0]) for v in values)
    value.backward()
    auto = {n: _fsdp.local(p.grad).clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reg.add_penalty_grad()
    row["penalty_grad_max_diff"] = max(
        float((_fsdp.local(p.grad) - auto[n]).abs().max()) for n, p in model.named_parameters()
    )
    path = os.path.join(args.state_dir, "state")  # rank 0 writes, every rank reads
    reg.save(path)
    back = ewc.EWC.load(path, model)
    row["reload_penalty_equal"] = bool(back.penalty().detach() == value.detach())
    if rank == 0:
        print(json.dumps(row))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
