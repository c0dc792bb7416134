"""SI and MAS in the sequential trainer and the CLI (tiny configurations)."""

import pytest
import torch

from ewc import cli
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
        methods=["si", "mas"],
        lam={"si": [1.0], "mas": [1.0]},
        hidden=[16],
        epochs=0.1,
        batch_size=64,
        eval_every=0,
        fisher_samples=50,
    )
    base.update(kw)
    return trainer.Config.from_dict(base)


def test_si_and_mas_run_and_resume_exactly(tmp_path):
    full = trainer.run_experiment(tiny(), tmp_path / "a", progress=False)
    assert set(full["methods"]) == {"si", "mas"}
    assert full["methods"]["si"]["lam"] == 1.0
    for m in full["methods"].values():
        assert len(m["accuracy_matrix"]) == 2
    si = dict(methods=["si"], lam={"si": [1.0]})  # SI's state is what is new to resume
    with pytest.raises(trainer.Interrupted):
        trainer.run_experiment(tiny(**si), tmp_path / "b", progress=False, stop_after_tasks=1)
    resumed = trainer.run_experiment(tiny(**si), tmp_path / "b", resume=True, progress=False)
    assert resumed["methods"]["si"] == full["methods"]["si"]


def test_default_grids_and_options():
    cfg = tiny(lam={})
    assert trainer._lams(cfg, "si") == [0.1, 1.0, 10.0, 100.0, 1000.0]
    assert trainer._lams(cfg, "mas") == [0.01, 0.1, 1.0, 10.0, 100.0]
    assert trainer._lams(cfg, "ewc") == [100.0]
    with pytest.raises(ValueError, match="--xi"):
        tiny(xi=0.0).validate()
    args = cli._parser().parse_args(
        ["run", "--methods", "si,mas", "--lam", "si=0.1:1,mas=2", "--xi", "0.001", "--out", "x"]
    )
    cfg = cli._config(args)
    assert cfg.methods == ["si", "mas"] and cfg.xi == 0.001
    args = cli._parser().parse_args(
        ["run", "--methods", "kfac-ewc", "--kfac-rank", "7", "--out", "x"]
    )
    assert cli._config(args).kfac_rank == 7
    with pytest.raises(ValueError, match="--kfac-rank"):
        tiny(kfac_rank=0).validate()
    assert cfg.lam == {"si": [0.1, 1.0], "mas": [2.0]}
    reg = trainer.METHODS["si"](torch.nn.Linear(2, 2), 3.0, cfg)
    assert reg.c == 3.0 and reg.xi == 0.001
