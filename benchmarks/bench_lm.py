"""Language-model Fisher cost as a ratio to one ordinary forward+backward pass (the LM loss).

A small GPT-2-style causal LM built from a config (random weights, nothing downloaded). Each
round times the baseline (forward + backward of the model's own token-mean loss over the same
batches) right before the method; the table reports the median ratio over rounds, so the figures
are side-by-side ratios on a noisy machine. Rows: the sampled per-sequence Fisher of all
parameters (GPT-2's tied token embedding and its position embedding, broadcast over the batch,
have closed forms too), of the transformer blocks only (``params="transformer.h.*"``), the same
with bfloat16 storage, and one EWC penalty step (``add_penalty_grad()`` and the value plus
backward of ``penalty()``) with the merged precision stored in bfloat16. ``--preset gpt2``
is GPT-2 small (124M parameters, 1024-token context; for a GPU).

Usage::

    python benchmarks/bench_lm.py [--rounds 5] [--layers 4] [--width 256] [--vocab 8192]
        [--seq 128] [--n 32] [--batch 8] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import ewc
from ewc.integrations.lm import hf_fisher


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict], Callable[[], None]]:
    """The model (random weights, from a config), its batches and the baseline pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=max(1, args.width // 64),
        vocab_size=args.vocab,
        n_positions=max(args.seq, 1024 if args.preset else args.seq),
        bos_token_id=0,
        eos_token_id=0,
    )
    dtype = getattr(torch, args.dtype)
    model = GPT2LMHeadModel(cfg).to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.n, args.seq), generator=g)
    batches = [
        {
            "input_ids": ids[i : i + args.batch].to(args.device),
            "attention_mask": torch.ones_like(ids[i : i + args.batch]).to(args.device),
        }
        for i in range(0, args.n, args.batch)
    ]

    def base() -> None:
        for b in batches:
            model(**b, labels=b["input_ids"], use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    return model, batches, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n", type=int, default=32, help="sequences")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model dtype (float32 or bfloat16)")
    ap.add_argument("--preset", choices=["gpt2"], help="GPT-2 small: 12 x 768, vocab 50257")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    if args.preset == "gpt2":
        args.layers, args.width, args.vocab = 12, 768, 50257

    model, batches, base = setup(args)
    n_params = sum(p.numel() for p in model.parameters())

    reg = ewc.EWC(model, lam=1.0, fisher_dtype=torch.bfloat16)
    reg.consolidate(fisher=hf_fisher(model, batches[:1], dtype=torch.bfloat16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)  # away from the anchor

    def penalty_grad() -> None:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        reg.add_penalty_grad()

    def penalty_backward() -> None:
        reg.penalty().backward()
        model.zero_grad(set_to_none=True)

    methods: dict[str, Callable[[], object]] = {
        "fisher sampled, all parameters": lambda: hf_fisher(model, batches),
        "fisher sampled, blocks only": lambda: hf_fisher(model, batches, params="transformer.h.*"),
        "fisher sampled, blocks only, bf16 storage": lambda: hf_fisher(
            model, batches, params="transformer.h.*", dtype=torch.bfloat16
        ),
        "EWC add_penalty_grad (bf16 precision)": penalty_grad,
        "EWC penalty() + backward (bf16 precision)": penalty_backward,
    }
    rows = []
    base()  # warm-up
    print(
        f"GPT-2-style LM: {n_params / 1e6:.1f}M parameters, {args.n} sequences of {args.seq} "
        f"tokens, batch {args.batch}, {args.device}, {args.dtype}, torch {torch.__version__}"
    )
    print(f"{'method':45s} {'ratio':>7s} {'seconds':>8s}  peak MiB")
    for name, fn in methods.items():
        fn()  # warm-up
        ratios, secs, peak = [], [], 0.0
        for _ in range(args.rounds):
            _sync(args.device)
            t0 = time.perf_counter()
            base()
            _sync(args.device)
            t1 = time.perf_counter()
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            fn()
            _sync(args.device)
            t2 = time.perf_counter()
            if args.device.startswith("cuda"):
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
            ratios.append((t2 - t1) / (t1 - t0))
            secs.append(t2 - t1)
        row = {
            "method": name,
            "ratio": statistics.median(ratios),
            "seconds": statistics.median(secs),
            "peak_mib": peak or None,
        }
        rows.append(row)
        peak_s = f"{peak:9.0f}" if peak else "        -"
        print(f"{name:45s} {row['ratio']:6.2f}x {row['seconds']:8.3f} {peak_s}")
    if args.json:
        meta = {
            "args": vars(args),
            "params": n_params,
            "torch": torch.__version__,
            "machine": platform.platform(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
