"""KFAC-EWC in the sequential trainer: runs, checkpoints and resumes like the other methods."""

import pytest
import torch

from ewc.experiments import trainer


@pytest.fixture(autouse=True)
def _float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def tiny(**kw):
    base = dict(
        tasks=2,
        methods=["online-kfac-ewc"],
        hidden=[16],
        epochs=0.3,
        batch_size=64,
        fisher_samples=200,
        gamma=0.9,
    )
    base.update(kw)
    return trainer.Config.from_dict(base)


def test_kfac_methods_run_and_resume_matches_uninterrupted(tmp_path):
    full = trainer.run_experiment(tiny(), tmp_path / "a", progress=False)
    r = full["methods"]["online-kfac-ewc"]["accuracy_matrix"]
    assert len(r) == 2 and all(0.0 <= a <= 1.0 for row in r for a in row)
    with pytest.raises(trainer.Interrupted):
        trainer.run_experiment(tiny(), tmp_path / "b", progress=False, stop_after_tasks=1)
    resumed = trainer.run_experiment(tiny(), tmp_path / "b", resume=True, progress=False)
    assert resumed["methods"] == full["methods"]


def test_kfac_penalty_protects_the_first_task_more_than_finetuning(tmp_path):
    res = trainer.run_experiment(
        tiny(methods=["finetune", "kfac-ewc"], lam={"kfac-ewc": [1000.0]}, tasks=2, epochs=1),
        tmp_path,
        progress=False,
    )
    first = {m: v["accuracy_matrix"][-1][0] for m, v in res["methods"].items()}
    assert first["kfac-ewc"] > first["finetune"]
