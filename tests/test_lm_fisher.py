"""Sequence Fisher (one sequence = one sample), ignored positions, parameter subsets, storage dtypes.

Every estimate is checked in float64 against a naive loop that runs one sequence at a time, sums
its counted token log-likelihoods and squares the gradient of that sum.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_fisher_close
from torch import nn

import ewc
from ewc._route import Partition
from ewc.integrations.lm import LMBatches, causal_shift, hf_fisher

IGNORE = -100


# --- Naive reference ------------------------------------------------------------------------
def naive_sequence_fisher(forward, params, batches, kind, seed=0):
    """(1/N) Σ_n E[(∂ Σ_{t counted} log p(y_nt | x_n)/∂θ)²], one sequence at a time.

    ``forward(inputs_of_one_sequence) -> (1, T, C) or (1, C)`` logits; ``batches`` yields
    ``(inputs_dict, targets)`` with ``IGNORE`` at positions left out.
    """
    names = list(params)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    total = 0
    g = torch.Generator().manual_seed(seed)
    for inputs, targets in batches:
        n_seq = targets.shape[0]
        if kind == "sampled":  # the same draws as the estimator: row-major over (n, t)
            with torch.no_grad():
                probs = torch.softmax(forward(inputs), -1)
            flat = probs.reshape(-1, probs.shape[-1]).double()
            u = torch.rand(flat.shape[0], generator=g, dtype=torch.float64)
            labels = torch.tensor(
                [
                    next((c for c, v in enumerate(row.cumsum(0).tolist()) if v >= x), len(row) - 1)
                    for row, x in zip(flat, u.tolist(), strict=True)
                ]
            ).reshape(probs.shape[:-1])
        for i in range(n_seq):
            one = {
                k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
            }
            logp = torch.log_softmax(forward(one)[0], -1)  # (T, C) or (C,)
            tgt = targets[i]
            if logp.dim() == 1:
                logp, tgt = logp.unsqueeze(0), tgt.reshape(1)
            counted = (tgt != IGNORE).nonzero().flatten().tolist()
            if kind == "exact":  # positions are independent: Σ_t Σ_c p_tc (∂ log p_tc)²
                terms = [
                    (float(logp[t, c].exp()), logp[t, c])
                    for t in counted
                    for c in range(logp.shape[-1])
                ]
            else:
                lab = tgt if kind == "empirical" else labels[i].reshape(-1)
                terms = [(1.0, sum(logp[t, lab[t]] for t in counted))] if counted else []
            for w, ll in terms:
                grads = torch.autograd.grad(ll, [params[n] for n in names], retain_graph=True)
                for n, gr in zip(names, grads, strict=True):
                    acc[n] += w * gr.square()
        total += n_seq
    return {n: v / total for n, v in acc.items()}


# --- A plain sequence model (no transformers needed) ----------------------------------------
class TinyTagger(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear head on every position, plus a fallback scale."""

    def __init__(self, vocab=7, d=5, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.gain = nn.Parameter(torch.rand(classes) + 0.5)  # no closed form: torch.func

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        h = h.cumsum(1)  # position t sees the prefix ≤ t (a causal mix)
        return self.head(self.ln(h)) * self.gain


def _tagger_batches(seed=0, n=6, t=5, vocab=7, classes=4, bs=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = torch.randint(0, classes, (n, t), generator=g)
    labels[0, :2] = IGNORE
    labels[3] = IGNORE  # a sequence with nothing counted still counts in N
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 3:] = 0
    return [
        {
            "input_ids": ids[i : i + bs],
            "attention_mask": mask[i : i + bs],
            "labels": labels[i : i + bs],
        }
        for i in range(0, n, bs)
    ]


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
def test_sequence_fisher_sums_tokens_inside_the_square_and_ignores_positions(kind):
    torch.manual_seed(0)
    model = TinyTagger()
    batches = _tagger_batches()
    pairs = list(LMBatches(batches, shift=0))
    gen = torch.Generator().manual_seed(5) if kind == "sampled" else None
    got = hf_fisher(model, batches, kind=kind, shift=0, generator=gen)
    want = naive_sequence_fisher(
        lambda inp: model(**inp), dict(model.named_parameters()), pairs, kind, seed=5
    )
    assert_fisher_close(got, want)
    assert got.n_samples == 6


def test_sum_inside_square_differs_from_per_token_units():
    """Guard: treating each token as its own sample gives a different (wrong) Fisher."""
    torch.manual_seed(0)
    model = TinyTagger()
    batches = _tagger_batches()
    got = hf_fisher(model, batches, kind="empirical", shift=0)
    per_token = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for inputs, targets in LMBatches(batches):
        for i in range(targets.shape[0]):
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            logp = torch.log_softmax(model(**one)[0], -1)
            for t in (targets[i] != IGNORE).nonzero().flatten().tolist():
                grads = torch.autograd.grad(
                    logp[t, targets[i, t]], list(model.parameters()), retain_graph=True
                )
                for (n, _), gr in zip(model.named_parameters(), grads, strict=True):
                    per_token[n] += gr.square() / 6
    assert not torch.allclose(got["head.weight"], per_token["head.weight"], rtol=1e-3)


def test_ignore_index_with_plain_tuples_and_none():
    """Categorical(ignore_index) on (inputs, targets) tuples; ignore_index=None counts all."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    x = torch.randn(4, 6, 3)
    y = torch.randint(0, 5, (4, 6))
    y[1, 2:] = IGNORE
    got = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": x}, y)], "empirical"
    )
    assert_fisher_close(got, want)
    with pytest.raises(ValueError, match="labels out of range"):
        ewc.fisher_diagonal(model, [(x, y)], kind="empirical", likelihood=ewc.Categorical(None))
    # the exact kind takes the expectation only at counted positions
    got_exact = ewc.fisher_diagonal(model, [(x, y)], kind="exact")
    want_exact = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": x}, y)], "exact"
    )
    assert_fisher_close(got_exact, want_exact)
    all_counted = ewc.fisher_diagonal(model, [x], kind="exact")
    assert not torch.allclose(all_counted["2.weight"], got_exact["2.weight"])


# --- Parameter subsets and storage dtype ----------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update B A."""

    def __init__(self, d_in, d_out, r=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def _lora_model():
    torch.manual_seed(2)
    return nn.Sequential(LoRALinear(4, 6), nn.Tanh(), LoRALinear(6, 3))


def test_frozen_base_weights_are_left_out_and_adapters_match_naive():
    model = _lora_model()
    x = torch.randn(9, 4)
    y = torch.randint(0, 3, (9,))
    got = ewc.fisher_diagonal(model, [(x, y)], kind="empirical")
    assert sorted(got) == [
        "0.lora_A.weight",
        "0.lora_B.weight",
        "2.lora_A.weight",
        "2.lora_B.weight",
    ]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = naive_sequence_fisher(lambda inp: model(inp["x"]), params, [({"x": x}, y)], "empirical")
    assert_fisher_close(got, want)


@pytest.mark.parametrize(
    "selector",
    ["2.*", ["2.lora_A.weight", "2.lora_B.weight"], lambda name, p: name.startswith("2.")],
    ids=["pattern", "names", "predicate"],
)
def test_params_subset_equals_the_full_fisher_restricted(selector):
    model = _lora_model()
    x = torch.randn(9, 4)
    full = ewc.fisher_diagonal(model, [x], kind="exact")
    sub = ewc.fisher_diagonal(model, [x], kind="exact", params=selector)
    assert sorted(sub) == ["2.lora_A.weight", "2.lora_B.weight"]
    assert_fisher_close(sub, {k: full[k] for k in sub})


def test_params_subset_of_a_layer_drops_its_other_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    full = ewc.fisher_diagonal(model, [x], kind="exact")
    sub = ewc.fisher_diagonal(model, [x], kind="exact", params=["0.bias", "2.weight"])
    assert sorted(sub) == ["0.bias", "2.weight"]
    assert_fisher_close(sub, {k: full[k] for k in sub})


def test_bad_params_selection_is_a_clear_error():
    model = _lora_model()
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="matches only frozen parameters"):
        ewc.fisher_diagonal(model, [x], params="*.base.*")
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        ewc.fisher_diagonal(model, [x], params=["nope.*"])
    with pytest.raises(ValueError, match="selected no trainable parameter"):
        ewc.fisher_diagonal(model, [x], params=lambda n, p: False)
    with pytest.raises(ValueError, match="params must be"):
        ewc.fisher_diagonal(model, [x], params=[3])
    with pytest.raises(ValueError, match="dtype must be"):
        ewc.fisher_diagonal(model, [x], dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_storage_dtype_is_the_rounded_full_precision_estimate(dtype):
    model = _lora_model()
    x = torch.randn(9, 4)
    full = ewc.fisher_diagonal(model, [x], kind="exact")
    low = ewc.fisher_diagonal(model, [x], kind="exact", dtype=dtype)
    for k in full:
        assert low[k].dtype == dtype
        assert torch.equal(low[k], full[k].to(dtype))


def test_half_precision_model_accumulates_in_float32():
    """A bfloat16 model's Fisher is summed in float32: many tiny squares do not vanish."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(4096, 4)
    ref = ewc.fisher_diagonal(model, [x], kind="exact")
    model_bf16 = nn.Linear(4, 3).to(torch.bfloat16)
    model_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    low = ewc.fisher_diagonal(
        model_bf16, [x[i : i + 64].bfloat16() for i in range(0, 4096, 64)], kind="exact"
    )
    torch.testing.assert_close(low["weight"].double(), ref["weight"], rtol=3e-2, atol=0)


# --- Models vmap cannot trace, layers applied without the batch dimension --------------------
class ItemModel(nn.Module):
    """Data-dependent Python control flow (``.item()``): torch.func.vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.tensor([1.3, 0.7, 1.1, 0.9]))

    def forward(self, x):
        h = self.lin(x)
        if float(h.abs().sum()) >= 0:  # always true, but not traceable
            h = h * self.scale
        return h


def test_untraceable_model_falls_back_to_a_per_sample_loop_and_is_exact():
    torch.manual_seed(0)
    model = ItemModel()
    x = torch.randn(7, 3)
    y = torch.randint(0, 4, (7,))
    with pytest.warns(UserWarning, match="one pass per sample"):
        got = ewc.fisher_diagonal(model, [(x[:4], y[:4]), (x[4:], y[4:])], kind="empirical")
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": x}, y)], "empirical"
    )
    assert_fisher_close(got, want)


class PositionNet(nn.Module):
    """Position embeddings looked up with (1, T) indices and broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(5, 3)
        self.pos = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.tok(input_ids) + self.pos(pos)))


def test_layer_called_without_batch_dimension_goes_to_exact_path():
    torch.manual_seed(0)
    model = PositionNet()
    ids = torch.randint(0, 5, (6, 4))
    y = torch.randint(0, 2, (6, 4))
    plan = Partition.of(model, dict(model.named_parameters()), {})
    assert "pos" in plan.fast  # its (1, T) lookup is expanded to the batch while capturing
    got = ewc.fisher_diagonal(model, [(ids, y)], kind="empirical")
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": ids}, y)], "empirical"
    )
    assert_fisher_close(got, want)


def test_output_fn_selects_the_tensor_and_bad_values_are_errors():
    torch.manual_seed(0)
    inner = nn.Linear(3, 4)

    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x), "aux": x.sum()}

    x = torch.randn(5, 3)
    got = ewc.fisher_diagonal(Returns(), [x], kind="exact", output_fn=lambda o: o["logits"])
    want = ewc.fisher_diagonal(inner, [x], kind="exact")
    assert_fisher_close(got, {f"inner.{k}": v for k, v in want.items()})
    with pytest.raises(ValueError, match="output_fn must be callable"):
        ewc.fisher_diagonal(inner, [x], output_fn="logits")


def test_lm_batches_shift_mask_and_errors():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, 2, 3, 4], [5, 6, 7, 0]])
    [(inputs, targets)] = list(
        LMBatches([{"input_ids": ids, "attention_mask": mask, "labels": labels}], shift=1)
    )
    assert "labels" not in inputs
    assert targets.tolist() == [[2, 3, 4], [6, 7, -100]]
    [(_, targets)] = list(LMBatches([{"input_ids": ids, "attention_mask": mask}], shift=1))
    assert targets.tolist() == [[2, 3, 4], [6, 7, -100]]
    with pytest.raises(TypeError, match="expected a dict"):
        list(LMBatches([(ids, labels)]))


# --- Hugging Face models built from configs (nothing downloaded) ----------------------------
@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def test_import_ewc_imports_no_integration_framework():
    import subprocess
    import sys

    code = (
        "import sys, ewc, ewc.integrations.lm; "
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate') "
        "if m in sys.modules]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _gpt2(transformers):
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=8, n_head=2, vocab_size=11, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _lm_batches(vocab=11, n=5, t=6, bs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[4, 2:] = 0
    labels = ids.clone()
    labels[0, :3] = IGNORE  # a prompt left out of the loss
    return [
        {
            "input_ids": ids[i : i + bs],
            "attention_mask": mask[i : i + bs],
            "labels": labels[i : i + bs],
        }
        for i in range(0, n, bs)
    ]


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
def test_gpt2_causal_lm_fisher_matches_naive(kind, transformers):
    model = _gpt2(transformers)
    assert causal_shift(model) == 1
    batches = _lm_batches()
    pairs = list(LMBatches(batches, shift=1))
    gen = torch.Generator().manual_seed(3) if kind == "sampled" else None
    got = hf_fisher(model, batches, kind=kind, generator=gen)

    def forward(inp):
        return model(**inp).logits[:, :-1]

    want = naive_sequence_fisher(forward, dict(model.named_parameters()), pairs, kind, seed=3)
    assert_fisher_close(got, want, rtol=1e-8, atol=1e-14)


def test_gpt2_every_parameter_has_a_closed_form(transformers):
    model = _gpt2(transformers)
    plan = Partition.of(model, dict(model.named_parameters()), {})
    assert "transformer.h.0.attn.c_attn" in plan.fast and "transformer.h.1.mlp.c_proj" in plan.fast
    assert plan.rest == ()
    assert plan.ties == (("transformer.wte.weight", "lm_head", "transformer.wte"),)
    batches = _lm_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-sample loop: tied and position embeddings too
        sub = hf_fisher(
            model, batches, kind="empirical", params="transformer.h.*", dtype=torch.bfloat16
        )
        full = hf_fisher(model, batches, kind="empirical")
    assert sub and all(k.startswith("transformer.h.") for k in sub)
    for k in sub:
        assert torch.equal(sub[k], full[k].to(torch.bfloat16))


def test_bert_sequence_classifier_fisher_matches_naive(transformers):
    cfg = transformers.BertConfig(
        vocab_size=13,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    assert causal_shift(model) == 0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 13, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[2, 3:] = 0
    labels = torch.randint(0, 3, (5,), generator=g)
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = hf_fisher(model, batches, kind="empirical")
    pairs = list(LMBatches(batches))
    want = naive_sequence_fisher(
        lambda inp: model(**inp).logits, dict(model.named_parameters()), pairs, "empirical"
    )
    assert_fisher_close(got, want, rtol=1e-8, atol=1e-14)


# --- Tied input/output embeddings -----------------------------------------------------------
class TiedNet(nn.Module):
    """Token embedding tied to the output head, per position or pooled (2-D head input)."""

    def __init__(self, vocab=9, d=4, pooled=False, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight
        self.pooled = pooled

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return self.head(h.mean(1) if self.pooled else h)


@pytest.mark.parametrize("pooled", [False, True], ids=["per-position", "pooled"])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_tied_embedding_and_head_match_naive(pooled, padding_idx, kind):
    torch.manual_seed(0)
    model = TiedNet(pooled=pooled, padding_idx=padding_idx)
    plan = Partition.of(model, dict(model.named_parameters()), {})
    assert plan.ties == (("emb.weight", "head", "emb"),) and plan.rest == ()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 9, (7, 5), generator=g)
    ids[0, :2] = 4  # a repeated token
    y = torch.randint(0, 9, (7,) if pooled else (7, 5), generator=g)
    got = ewc.fisher_diagonal(model, [(ids[:4], y[:4]), (ids[4:], y[4:])], kind=kind)
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": ids}, y)], kind
    )
    assert_fisher_close(got, want)


def test_lm_batches_expose_the_distributed_sampler():
    """The padding a DistributedSampler adds stays recognisable through the batch adapter."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from ewc import distributed as ewc_dist

    rows = [{"input_ids": torch.tensor([i, i + 1])} for i in range(5)]
    sampler = DistributedSampler(rows, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(rows, batch_size=2, sampler=sampler)
    assert ewc_dist.find_sampler(LMBatches(loader)) is sampler
    assert ewc_dist.local_limit(LMBatches(loader), None, None) == 2  # 3 indices, 1 padded


class BatchReducingPositions(PositionNet):
    """Reduces the position embedding over its batch dimension: expanding it would change the
    outputs, so the estimator must notice and use the exact generic path."""

    def forward(self, input_ids):
        pos = self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0)).sum(0, keepdim=True)
        return self.head(torch.tanh(self.tok(input_ids) + pos))


def test_expanded_lookup_that_would_change_the_outputs_is_not_used():
    torch.manual_seed(0)
    model = BatchReducingPositions()
    ids = torch.randint(0, 5, (6, 4))
    y = torch.randint(0, 2, (6, 4))
    got = ewc.fisher_diagonal(model, [(ids[:3], y[:3]), (ids[3:], y[3:])], kind="empirical")
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": ids}, y)], "empirical"
    )
    assert_fisher_close(got, want)


# --- Modules without a closed form: per-sample VJPs of the module alone ---------------------
class MyRMSNorm(nn.Module):
    """A model's own RMSNorm class (as in Llama-style models): no closed form registered."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LeafItem(nn.Module):
    """A leaf module with data-dependent control flow: vmap cannot trace it."""

    def __init__(self, d):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.alpha if float(x.abs().sum()) >= 0 else x


class KwargLeaf(MyRMSNorm):
    def forward(self, x, *, eps=1e-6):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class NormNet(nn.Module):
    def __init__(self, leaf, by_keyword=False):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.norm = leaf
        self.head = nn.Linear(4, 3)
        self.by_keyword = by_keyword

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(h, eps=1e-5) if self.by_keyword else self.norm(h)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize(
    "leaf, by_keyword, warns",
    [(MyRMSNorm(4), False, False), (LeafItem(4), False, True), (KwargLeaf(4), True, False)],
    ids=["rmsnorm-leaf-vjp", "untraceable-leaf", "called-with-kwargs"],
)
def test_modules_without_closed_form_match_naive(leaf, by_keyword, warns):
    torch.manual_seed(0)
    model = NormNet(leaf, by_keyword)
    ids = torch.randint(0, 6, (7, 5))
    y = torch.randint(0, 3, (7, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ewc.fisher_diagonal(model, [(ids[:4], y[:4]), (ids[4:], y[4:])], kind="empirical")
    assert any("one pass per sample" in str(w.message) for w in caught) == warns
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": ids}, y)], "empirical"
    )
    assert_fisher_close(got, want)


def test_llama_style_model_has_no_per_sample_loop_and_matches_naive(transformers):
    cfg = transformers.LlamaConfig(
        vocab_size=13,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    batches = _lm_batches(vocab=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hf_fisher(model, batches, kind="empirical")
    want = naive_sequence_fisher(
        lambda inp: model(**inp).logits[:, :-1],
        dict(model.named_parameters()),
        list(LMBatches(batches, shift=1)),
        "empirical",
    )
    assert_fisher_close(got, want, rtol=1e-8, atol=1e-14)


def test_model_returning_a_dict_without_output_fn_is_a_clear_error():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    with pytest.raises(TypeError, match="output_fn="):
        ewc.fisher_diagonal(Returns(), [torch.randn(4, 3)])


def test_peft_lora_adapters_only(transformers):
    """A real LoRA model (peft): the Fisher covers the trainable adapters, every one fast."""
    peft = pytest.importorskip("peft")
    base = _gpt2(transformers)
    model = (
        peft.get_peft_model(
            base,
            peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.1),
        )
        .double()
        .eval()
    )
    for p in model.parameters():  # LoRA B starts at zero: move it so every gradient is non-zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert type(model).__name__ == "PeftModel" and causal_shift(model) == 1  # unwrapped
    plan = Partition.of(model, trainable, {})
    assert plan.rest == ()
    batches = _lm_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hf_fisher(model, batches, kind="empirical")  # shift 1: PeftModelForCausalLM
    assert sorted(got) == sorted(trainable)

    def forward(inp):
        return model(**inp).logits[:, :-1]

    want = naive_sequence_fisher(forward, trainable, list(LMBatches(batches, shift=1)), "empirical")
    assert_fisher_close(got, want, rtol=1e-8, atol=1e-14)
    reg = ewc.EWC(model, lam=1.0)  # the penalty covers the adapters only
    reg.consolidate(fisher=got)
    assert sorted(reg.precision) == sorted(trainable)


class TiedSharedBias(TiedNet):
    """The head's bias is also a second layer's bias (shared, not tieable), so the head cannot
    take its closed form; the tied weight must then leave the embedding's closed form too."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(9, 9)
        self.head.bias = self.extra.bias

    def forward(self, ids):
        return self.extra(torch.tanh(super().forward(ids)))


def test_tied_weight_whose_head_cannot_be_fast_goes_to_the_generic_path():
    torch.manual_seed(0)
    model = TiedSharedBias()
    plan = Partition.of(model, dict(model.named_parameters()), {})
    assert "head" not in plan.fast and "emb" not in plan.fast and "emb.weight" in plan.rest
    ids = torch.randint(0, 9, (5, 4))
    y = torch.randint(0, 9, (5, 4))
    got = ewc.fisher_diagonal(model, [(ids, y)], kind="empirical")
    want = naive_sequence_fisher(
        lambda inp: model(inp["x"]), dict(model.named_parameters()), [({"x": ids}, y)], "empirical"
    )
    assert_fisher_close(got, want)


def test_exact_fisher_of_a_vocabulary_is_refused_with_advice():
    model = nn.Linear(4, 1000)
    x = torch.randn(8, 64, 4)
    with pytest.raises(ValueError, match="use kind='sampled'"):
        ewc.fisher_diagonal(model, [x], kind="exact")
