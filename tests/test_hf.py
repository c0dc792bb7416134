"""EWCTrainer (ewc.integrations.hf): the penalty counts once per optimizer step, Fisher, resume."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from conftest import spawn_gloo  # noqa: E402

import ewc  # noqa: E402
from ewc.integrations import hf  # noqa: E402
from ewc.integrations.hf import EWCTrainer  # noqa: E402

LR = 0.1
LAM = 2.0


@pytest.fixture(autouse=True)
def _one_thread():
    # tensors this small run fastest on one thread (and the machine is shared)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- tiny models and data ------------------------------------------------------------------
def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).double()


def _bert(seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double()


def _lm_data(n: int, length: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids
    ]


def _cls_data(n: int, length: int = 8, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    ys = torch.randint(0, 3, (n,), generator=g)
    return [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y}
        for x, y in zip(ids, ys, strict=True)
    ]


def _with_ewc(model: torch.nn.Module, seed: int = 3) -> ewc.EWC:
    """An EWC object with a positive precision, anchored at θ, after which θ is moved away."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in params.items()}
    reg = ewc.EWC(model, lam=LAM)
    reg.consolidate(fisher=fisher)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert float(reg.penalty().detach()) > 0
    return reg


def _args(tmp_path: Path, **kw: object) -> transformers.TrainingArguments:
    opts: dict[str, object] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": LR,
        "optim": "sgd",
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,  # no clipping: the update is -lr * gradient
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "logging_strategy": "no",
    }
    opts.update(kw)
    return transformers.TrainingArguments(**opts)  # type: ignore[arg-type]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


class _ExplicitlyUnscaled(EWCTrainer):
    loss_is_scaled_for_ga = False  # the Trainer must divide by the accumulation steps


def _setup(path: str, use_ewc: bool = True):
    """Model, data, trainer class and model preparation for the three GA paths.

    ``"causal"``: GPT-2, the Trainer passes num_items_in_batch and does not divide the loss.
    ``"divides"``: BERT classifier with ``accepts_loss_kwargs = False``: the Trainer divides.
    ``"explicit"``: BERT classifier with ``loss_is_scaled_for_ga = False``: the Trainer divides.
    """
    if path == "causal":
        model, data, cls = _gpt2(), _lm_data(6), EWCTrainer
    elif path == "divides":
        model, data, cls = _bert(), _cls_data(6), EWCTrainer
        model.accepts_loss_kwargs = False
    else:
        model, data, cls = _bert(), _cls_data(6), _ExplicitlyUnscaled
    reg = _with_ewc(model)  # moves θ away from the anchor in both cases
    return model, data, cls, (reg if use_ewc else None)


def _train(path: str, tmp_path: Path, ga: int, use_ewc: bool = True, **kw: object):
    model, data, cls, reg = _setup(path, use_ewc)
    theta0 = _params(model)
    trainer = cls(
        model=model,
        args=_args(
            tmp_path, per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga, **kw
        ),
        train_dataset=data,
        ewc=reg,
    )
    if path == "causal":
        assert trainer.model_accepts_loss_kwargs is True
        assert trainer.compute_loss_func is None
    else:
        assert trainer._trainer_divides(torch.tensor(1)) is True
    with warnings.catch_warnings():
        # the safety net must not be needed: the Trainer's scaling is predicted right
        warnings.filterwarnings("error", message="EWCTrainer", category=RuntimeWarning)
        trainer.train()
    assert trainer._ewc_divides is None
    return theta0, _params(model), reg, trainer


# --- 1. gradient accumulation does not change the update -------------------------------------
@pytest.mark.parametrize("path", ["causal", "divides", "explicit"])
def test_gradient_accumulation_gives_the_same_updates(path: str, tmp_path: Path) -> None:
    # 6 samples: with GA=4 (batch 1) the second optimizer step has 2 micro-batches (remainder)
    _, theta_1, _, t1 = _train(path, tmp_path / "ga1", ga=1, num_train_epochs=1)
    _, theta_4, _, t4 = _train(path, tmp_path / "ga4", ga=4, num_train_epochs=1)
    assert t1.state.global_step == t4.state.global_step == 2
    assert _max_diff(theta_1, theta_4) < 1e-12


# --- 2. the penalty's gradient enters exactly once -----------------------------------------
@pytest.mark.parametrize(
    ("path", "ga"), [("causal", 1), ("causal", 4), ("divides", 4), ("explicit", 4)]
)
def test_penalty_counts_exactly_once(path: str, ga: int, tmp_path: Path) -> None:
    theta0, with_ewc, reg, _ = _train(path, tmp_path / "a", ga=ga, max_steps=1)
    theta0_b, without, _, _ = _train(path, tmp_path / "b", ga=ga, max_steps=1, use_ewc=False)
    assert reg is not None
    assert _max_diff(theta0, theta0_b) == 0  # both runs start from the same (moved) parameters
    worst = 0.0
    for n, p0 in theta0.items():
        if n not in reg.precision:
            continue
        expected = -LR * LAM * reg.precision[n] * (p0 - reg.anchor[n])
        got = (with_ewc[n] - theta0[n]) - (without[n] - theta0_b[n])
        worst = max(worst, float((got - expected).abs().max()))
    assert worst < 1e-12
    # and the reference is the autograd gradient of the penalty
    model = _setup(path)[0]
    reg2 = _with_ewc(model)
    grads = torch.autograd.grad(reg2.penalty(), [p for _, p in model.named_parameters()])
    for (n, _), g in zip(model.named_parameters(), grads, strict=True):
        ref = LAM * reg.precision[n] * (theta0[n] - reg.anchor[n])
        assert torch.allclose(g, ref, rtol=1e-12, atol=1e-14)


def test_penalty_is_logged(tmp_path: Path) -> None:
    model, data, _, reg = _setup("causal")
    assert reg is not None
    expected = float(reg.penalty().detach())
    trainer = EWCTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1, logging_strategy="steps", logging_steps=1),
        train_dataset=data,
        ewc=reg,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "ewc_penalty" in h]
    assert len(logged) == 1
    assert logged[0]["ewc_penalty"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("path", "wrong"), [("divides", False), ("causal", True)])
def test_mispredicted_scaling_is_corrected(
    path: str, wrong: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend our replica of the Trainer's rule is wrong (`wrong` is the predicted "divides"):
    # the safety net must still give the update of a penalty counted once, warn, and use the
    # observed rule afterwards.
    _, ref, _, _ = _train(path, tmp_path / "ref", ga=4, max_steps=2)

    def predict(self: EWCTrainer, num_items: object) -> bool:
        return wrong if self._ewc_divides is None else self._ewc_divides

    monkeypatch.setattr(EWCTrainer, "_trainer_divides", predict)
    with pytest.warns(RuntimeWarning, match="differently than predicted"):
        model, data, cls, reg = _setup(path)
        trainer = cls(
            model=model,
            args=_args(
                tmp_path / "bad",
                per_device_train_batch_size=1,
                gradient_accumulation_steps=4,
                max_steps=2,
            ),
            train_dataset=data,
            ewc=reg,
        )
        trainer.train()
    assert trainer._ewc_divides is (not wrong)
    assert _max_diff(ref, _params(model)) < 1e-12


def test_penalty_is_not_scaled_with_the_tokens_across_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With average_tokens_across_devices, Trainer.compute_loss multiplies the task loss by
    # num_processes // tp_size. Make that factor 2 on one process: the task part of the update
    # changes, the penalty's part must stay -lr λ A (θ − μ).
    monkeypatch.setattr(transformers.Trainer, "get_tp_size", lambda self: 0.5)
    theta0, with_ewc, reg, t = _train("causal", tmp_path / "a", ga=4, max_steps=1)
    assert t.args.average_tokens_across_devices
    _, without, _, _ = _train("causal", tmp_path / "b", ga=4, max_steps=1, use_ewc=False)
    assert reg is not None
    for n in reg.precision:
        expected = -LR * LAM * reg.precision[n] * (theta0[n] - reg.anchor[n])
        assert torch.allclose(with_ewc[n] - without[n], expected, rtol=0, atol=1e-12), n


# --- 3. no penalty in evaluation -------------------------------------------------------------
def test_no_penalty_in_evaluate(tmp_path: Path) -> None:
    data = _cls_data(6)
    model, _, _, reg = _setup("divides")
    assert reg is not None and float(reg.penalty().detach()) > 0
    plain = transformers.Trainer(model=model, args=_args(tmp_path / "p"), eval_dataset=data)
    with_ewc = EWCTrainer(model=model, args=_args(tmp_path / "e"), eval_dataset=data, ewc=reg)
    a = plain.evaluate()["eval_loss"]
    b = with_ewc.evaluate()["eval_loss"]
    assert a == b
    out = with_ewc.predict(data)
    assert out.metrics["test_loss"] == a
    # the model's own loss, without the penalty
    with torch.no_grad():
        batch = transformers.default_data_collator(data)
        assert float(model(**batch).loss) == pytest.approx(a, rel=1e-12)


# --- 4. consolidate: the Fisher against brute force ----------------------------------------
def _pad_collate(features: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)  # type: ignore[arg-type]
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        x = torch.as_tensor(f["input_ids"])
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(x)] = x, 1, x
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _brute_lm_fisher(model: torch.nn.Module, seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n (∇ Σ_t log p(x_{t+1} | x_≤t))², one sequence at a time, no padding."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    model.eval()
    for x in seqs:
        logits = model(input_ids=x[None]).logits[0]
        ll = torch.log_softmax(logits[:-1], -1).gather(1, x[1:, None]).sum()
        for a, g in zip(acc, torch.autograd.grad(ll, params), strict=True):
            a += g.square()
    return {n: a / len(seqs) for n, a in zip(names, acc, strict=True)}


def _brute_cls_exact(
    model: torch.nn.Module, data: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n Σ_c p_c (∇ log p_c)², one example at a time."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    model.eval()
    for ex in data:
        logp = torch.log_softmax(model(input_ids=ex["input_ids"][None]).logits[0], -1)
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for a, g in zip(acc, grads, strict=True):
                a += logp[c].exp().detach() * g.square()
    return {n: a / len(data) for n, a in zip(names, acc, strict=True)}


def test_consolidate_lm_matches_brute_force(tmp_path: Path) -> None:
    model = _gpt2()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 64, (int(n),), generator=g) for n in (5, 8, 3, 8, 6)]
    # an extra column the model's forward does not take: removed as the Trainer does
    data = [{"input_ids": s.tolist(), "idx": i} for i, s in enumerate(seqs)]
    reg = ewc.EWC(model, lam=1.0)
    trainer = EWCTrainer(model=model, args=_args(tmp_path), data_collator=_pad_collate, ewc=reg)
    fisher = trainer.consolidate(data, batch_size=2, kind="empirical")
    ref = _brute_lm_fisher(model, seqs)
    assert set(fisher) == set(ref) == set(reg.precision)
    for n in ref:
        assert torch.allclose(fisher[n], ref[n], rtol=1e-9, atol=1e-13), n
        assert torch.equal(reg.precision[n], fisher[n])
        assert torch.equal(reg.anchor[n], dict(model.named_parameters())[n].detach())
    assert fisher.n_samples == 5
    # the module-level helper on a ready DataLoader gives the same estimate
    reg2 = ewc.EWC(model, lam=1.0)
    loader = torch.utils.data.DataLoader(
        [{"input_ids": s.tolist()} for s in seqs], batch_size=3, collate_fn=_pad_collate
    )
    f2 = hf.consolidate(reg2, model, loader, kind="empirical")
    for n in ref:
        assert torch.allclose(f2[n], fisher[n], rtol=1e-10, atol=1e-14)


def _dist_worker(rank: int, outdir: str) -> None:
    from safetensors.torch import save_file

    model = _gpt2()
    data = [{"input_ids": s.tolist(), "idx": i} for i, s in enumerate(_dist_seqs())]
    reg = ewc.EWC(model, lam=1.0)
    trainer = EWCTrainer(
        model=model,
        args=_args(Path(outdir) / f"out{rank}"),
        data_collator=_pad_collate,
        ewc=reg,
    )
    f_trainer = trainer.consolidate(data, batch_size=2, kind="empirical")
    f_helper = hf.consolidate(
        ewc.EWC(model, lam=1.0),
        model,
        [{"input_ids": d["input_ids"]} for d in data],
        batch_size=2,
        collate_fn=_pad_collate,
        kind="empirical",
    )
    out = {f"trainer/{n}": t for n, t in f_trainer.items()}
    out.update({f"helper/{n}": t for n, t in f_helper.items()})
    out["n"] = torch.tensor([f_trainer.n_samples, f_helper.n_samples])
    save_file(out, os.path.join(outdir, f"rank{rank}.safetensors"))


def _dist_seqs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return [torch.randint(0, 64, (int(n),), generator=g) for n in (6, 4, 8, 5, 7)]


def test_consolidate_under_torch_distributed(tmp_path: Path) -> None:
    # 5 sequences on 2 ranks: the DistributedSampler pads rank 1 with a repeat of sequence 0,
    # which must not be counted; every rank gets the single-process Fisher.
    from safetensors.torch import load_file

    spawn_gloo(_dist_worker, 2, tmp_path)
    ref = _brute_lm_fisher(_gpt2(), _dist_seqs())
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got["n"].tolist() == [5, 5]
        for which in ("trainer", "helper"):
            for n in ref:
                assert torch.allclose(got[f"{which}/{n}"], ref[n], rtol=1e-9, atol=1e-13), (
                    rank,
                    which,
                    n,
                )


def test_consolidate_classifier_exact_default_dataset(tmp_path: Path) -> None:
    model = _bert()
    data = _cls_data(5)
    reg = ewc.EWC(model, lam=1.0, kind="exact")
    trainer = EWCTrainer(
        model=model, args=_args(tmp_path, per_device_eval_batch_size=2), train_dataset=data, ewc=reg
    )
    fisher = trainer.consolidate()  # the train data set, kind from the EWC object
    assert fisher.kind == "exact"
    ref = _brute_cls_exact(model, data)
    for n in ref:
        assert torch.allclose(fisher[n], ref[n], rtol=1e-9, atol=1e-13), n
    # a second task: the estimate covers the same parameters and merges
    fisher2 = trainer.consolidate(data[:3], kind="empirical")
    assert set(fisher2) == set(fisher) and reg.num_tasks == 2
    # a penalty over a subset of the parameters gets a Fisher over that subset
    sub = ewc.EWC(model, lam=1.0, kind="exact", params="classifier.*")
    t_sub = EWCTrainer(model=model, args=_args(tmp_path), train_dataset=data, ewc=sub)
    f_sub = t_sub.consolidate()
    assert set(f_sub) == {"classifier.weight", "classifier.bias"} == set(sub.precision)
    for n in f_sub:
        assert torch.allclose(f_sub[n], ref[n], rtol=1e-9, atol=1e-13), n


def test_constructor_options(tmp_path: Path) -> None:
    model = _gpt2()
    t = EWCTrainer(model=model, args=_args(tmp_path), ewc_lam=3.0)
    assert isinstance(t.ewc, ewc.EWC) and t.ewc.lam == 3.0 and t.ewc.model is model
    with pytest.raises(ValueError, match="not the Trainer's model"):
        EWCTrainer(model=model, args=_args(tmp_path), ewc=ewc.EWC(_gpt2(1), lam=1.0))
    with pytest.raises(ValueError, match="either"):
        EWCTrainer(model=model, args=_args(tmp_path), ewc=ewc.EWC(model, lam=1.0), ewc_lam=1.0)
    with pytest.raises(ValueError, match="no EWC object"):
        EWCTrainer(model=model, args=_args(tmp_path)).consolidate(_lm_data(2))


# --- 5. checkpoints keep the EWC state ------------------------------------------------------
def _resume_args(tmp_path: Path) -> transformers.TrainingArguments:
    return _args(
        tmp_path, per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2
    )


def test_resume_restores_the_ewc_state_bit_identically(tmp_path: Path) -> None:
    data = _lm_data(8)
    model, _, _, reg = _setup("causal")
    assert reg is not None
    state = reg.state_dict()
    trainer = EWCTrainer(
        model=model, args=_resume_args(tmp_path / "run"), train_dataset=data, ewc=reg
    )
    trainer.train()
    final = _params(model)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / hf.EWC_STATE_NAME).is_file()
    saved = ewc.EWC.load(str(ckpt / hf.EWC_STATE_NAME), model).state_dict()
    for k, v in state["tensors"].items():
        assert torch.equal(saved["tensors"][k], v), k
    assert saved["metadata"] == state["metadata"]

    # a new trainer whose EWC object knows nothing: resuming restores the state and the run
    model2 = _gpt2(seed=7)
    reg2 = ewc.EWC(model2, lam=99.0)
    t2 = EWCTrainer(model=model2, args=_resume_args(tmp_path / "run"), train_dataset=data, ewc=reg2)
    t2.train(resume_from_checkpoint=str(ckpt))
    assert reg2.lam == LAM and reg2.num_tasks == 1
    for k, v in state["tensors"].items():
        assert torch.equal(reg2.state_dict()["tensors"][k], v), k
    assert all(torch.equal(final[n], p) for n, p in _params(model2).items())

    # without an EWC object, resume_from_checkpoint=True creates one from the last checkpoint
    model3 = _gpt2(seed=8)
    t3 = EWCTrainer(model=model3, args=_resume_args(tmp_path / "run"), train_dataset=data)
    t3.train(resume_from_checkpoint=True)  # checkpoint-4: nothing left to train
    assert t3.ewc is not None and t3.ewc.model is model3
    for k, v in state["tensors"].items():
        assert torch.equal(t3.ewc.state_dict()["tensors"][k], v), k
