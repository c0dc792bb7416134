"""Continual fine-tuning of a tiny BERT-style classifier with the Hugging Face Trainer and EWC.

Two synthetic "text" tasks over integer token ids (no tokenizer, nothing downloaded), sequences
``[CLS] w_1 ... w_15`` of random filler words:

* task A, labels 0/1: three copies of marker token 2 mean label 0, of marker 3 label 1;
* task B, labels 2/3: three copies of marker 4 mean label 2, of marker 5 label 3; every sequence
  also carries three copies of a random task-A marker, which says nothing about B's label.

One classifier with four outputs learns both tasks in turn; a task's accuracy is the argmax over
that task's two labels (the task is known at test time). A model that reads each task's own
markers solves both, but plain fine-tuning on B, where the A-markers are noise, learns to ignore
them and forgets task A. EWC (:class:`ewc.integrations.hf.EWCTrainer`: task B's loss plus
``(λ/2) Σ_i F_i (θ_i − θ*_A,i)²`` with the Fisher of task A) keeps what A needs.

Run: ``python examples/hf_text_classification.py`` (about 20 s on two CPU cores).
"""

from __future__ import annotations

import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from ewc.integrations.hf import EWCTrainer  # noqa: E402

SEED = 1
VOCAB, LENGTH, CLS, FILLER = 40, 16, 1, (8, 40)
COPIES = 3  # marker copies per sequence
TASK_A = {"markers": (2, 3), "first_label": 0, "noise": None}
TASK_B = {"markers": (4, 5), "first_label": 2, "noise": (2, 3)}
N_TRAIN, N_TEST, EPOCHS, LR = 1024, 512, 5, 1e-3
LAM = 3e3


def make_task(task: dict, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` examples ``{"input_ids": (LENGTH,), "labels": ()}`` of ``task``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(*FILLER, (n, LENGTH), generator=g)
    ids[:, 0] = CLS
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        pos = torch.randperm(LENGTH - 1, generator=g)[: 2 * COPIES] + 1
        ids[i, pos[:COPIES]] = task["markers"][int(labels[i])]
        if task["noise"] is not None:
            ids[i, pos[COPIES:]] = task["noise"][int(torch.randint(0, 2, (), generator=g))]
    labels = labels + task["first_label"]
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels, strict=True)]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: list[dict[str, torch.Tensor]], task: dict) -> float:
    """Accuracy of the argmax over the task's own two labels."""
    model.eval()
    lo = task["first_label"]
    logits = model(input_ids=torch.stack([d["input_ids"] for d in data])).logits[:, lo : lo + 2]
    labels = torch.stack([d["labels"] for d in data])
    return float((logits.argmax(-1) + lo == labels).float().mean())


def training_args(out: str) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=32,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
    )


def train(trainer: transformers.Trainer) -> None:
    trainer.remove_callback(transformers.PrinterCallback)  # keep stdout for the table
    trainer.train()


def main() -> None:
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tensors this small: more threads only add overhead
    train_a, test_a = make_task(TASK_A, N_TRAIN, seed=1), make_task(TASK_A, N_TEST, seed=3)
    train_b, test_b = make_task(TASK_B, N_TRAIN, seed=2), make_task(TASK_B, N_TEST, seed=4)
    torch.manual_seed(SEED)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.1,  # larger than BERT's 0.02: a tiny model then learns in few steps
        attn_implementation="eager",  # the fastest on a CPU at this size
    )
    model = transformers.BertForSequenceClassification(config)

    with tempfile.TemporaryDirectory() as out:
        # Task A (a plain Trainer run).
        train(transformers.Trainer(model=model, args=training_args(out), train_dataset=train_a))
        before = accuracy(model, test_a, TASK_A)

        # Fine-tuning on B.
        plain = copy.deepcopy(model)
        train(transformers.Trainer(model=plain, args=training_args(out), train_dataset=train_b))
        rows = [("fine-tuning", plain)]

        # EWC: the Fisher of task A at the trained weights, then B with the penalty.
        protected = copy.deepcopy(model)
        trainer = EWCTrainer(
            model=protected, args=training_args(out), train_dataset=train_a, ewc_lam=LAM
        )
        trainer.consolidate(kind="exact")  # the train data set, the Trainer's collator
        trainer.train_dataset = train_b
        train(trainer)
        rows.append(("EWC", protected))

    for name, net in rows:
        after, b = accuracy(net, test_a, TASK_A), accuracy(net, test_b, TASK_B)
        print(f"{name:12s} task A: {before:.3f} -> {after:.3f}   task B: {b:.3f}")


if __name__ == "__main__":
    main()
