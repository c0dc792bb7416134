"""The sequential trainer, resume, λ selection and the CLI, on tiny configurations."""

import json

import pytest
import torch

from ewc import cli
from ewc.experiments import trainer
from ewc.experiments.checkpoint import load_checkpoint, save_checkpoint
from ewc.experiments.overlap_experiment import partial_permutation
from ewc.experiments.results import read_results


def tiny(**kw):
    base = dict(
        tasks=3,
        methods=["finetune", "ewc"],
        hidden=[16],
        epochs=0.3,
        batch_size=64,
        eval_every=10,
        eval_samples=50,
        fisher_samples=200,
    )
    base.update(kw)
    return trainer.Config.from_dict(base)


@pytest.fixture(autouse=True)
def _float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def test_run_writes_results_with_square_matrices(tmp_path):
    res = trainer.run_experiment(tiny(), tmp_path, progress=False)
    assert set(res["methods"]) == {"finetune", "ewc"}
    for m in res["methods"].values():
        r = m["accuracy_matrix"]
        assert len(r) == 3 and all(len(row) == 3 for row in r)
        assert all(0.0 <= a <= 1.0 for row in r for a in row)
        assert m["curves"]["task_boundaries"][0] == 0 and len(m["curves"]["task_boundaries"]) == 3
    on_disk = read_results(tmp_path / "results.json")
    assert on_disk["methods"]["ewc"]["accuracy_matrix"] == res["methods"]["ewc"]["accuracy_matrix"]
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 2 * 9


def test_same_seed_same_results_and_resume_matches_uninterrupted(tmp_path):
    cfg = tiny(methods=["ewc"])
    full = trainer.run_experiment(cfg, tmp_path / "a", progress=False)
    again = trainer.run_experiment(tiny(methods=["ewc"]), tmp_path / "b", progress=False)
    assert full["methods"] == again["methods"]
    with pytest.raises(trainer.Interrupted):
        trainer.run_experiment(
            tiny(methods=["ewc"]), tmp_path / "c", progress=False, stop_after_tasks=1
        )
    with pytest.raises(FileExistsError, match="--resume"):
        trainer.run_experiment(tiny(methods=["ewc"]), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        trainer.run_experiment(tiny(methods=["ewc"], lr=0.5), tmp_path / "c", resume=True)
    resumed = trainer.run_experiment(
        tiny(methods=["ewc"]), tmp_path / "c", resume=True, progress=False
    )
    assert resumed["methods"] == full["methods"]


def test_lambda_is_chosen_on_validation(tmp_path):
    cfg = tiny(methods=["ewc"], lam={"ewc": [0.0, 1.0, 1e9]}, epochs=0.2, eval_every=0)
    res = trainer.run_experiment(cfg, tmp_path, progress=False, log=lambda s: None)
    entry = res["methods"]["ewc"]
    sweep = {s["lam"]: s["val_average_accuracy"] for s in entry["lam_sweep"]}
    assert entry["lam"] == max(sweep, key=sweep.get)
    assert entry["val_average_accuracy"] == max(sweep.values())


def test_task_incremental_split_and_online_ewc(tmp_path):
    cfg = tiny(benchmark="split-mnist", scenario="task", tasks=2, methods=["l2", "online-ewc"])
    res = trainer.run_experiment(cfg, tmp_path, progress=False)
    assert len(res["methods"]["online-ewc"]["accuracy_matrix"]) == 2


def test_config_validation():
    for bad, msg in [
        (dict(tasks=0), "--tasks"),
        (dict(methods=["sgd"]), "unknown method"),
        (dict(lr=-1.0), "--lr"),
        (dict(lam={"ewc": [-1.0]}), "λ"),
        (dict(iterations=10), "exactly one"),
        (dict(gamma=2.0), "--gamma"),
    ]:
        with pytest.raises(ValueError, match=msg):
            tiny(**bad).validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        trainer.Config.from_dict({"epochz": 3})


def test_checkpoint_round_trip(tmp_path):
    state = {"a": {0: torch.arange(3), "b": [torch.ones(2), (1, "x", None)]}, "f": 1.5}
    save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["a"][0], state["a"][0]) and back["a"]["b"][1] == (1, "x", None)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_partial_permutation():
    g = torch.Generator().manual_seed(0)
    p = partial_permutation(100, 0.3, g)
    assert sorted(p.tolist()) == list(range(100))
    assert (p != torch.arange(100)).sum() <= 30
    assert torch.equal(partial_permutation(50, 0.0, g), torch.arange(50))


# --- CLI ----------------------------------------------------------------------------------
def test_cli_run_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "--tasks",
        "2",
        "--methods",
        "finetune,l2",
        "--lam",
        "l2=0.001",
        "--hidden",
        "16",
        "--epochs",
        "0.2",
        "--eval-every",
        "10",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "finetune" in text and "results.json" in text
    assert (out / "fig2a.png").stat().st_size > 1000
    assert cli.main(["plot", str(out / "results.json"), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "fig2b.png").exists()


def test_cli_config_file_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"tasks": 2, "methods": ["finetune"], "hidden": [8], "epochs": 0.1}))
    assert (
        cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    )
    capsys.readouterr()
    assert cli.main(["run", "--methods", "sgd", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["run", "--tasks", "1", "--out", str(blocker / "sub")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "run",
                "--data-dir",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "y"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit):
        cli.main(["run", "--lam", "ewc=abc", "--out", str(tmp_path)])


def test_cli_lambda_syntax():
    assert cli._lam("100") == {"*": [100.0]}
    assert cli._lam("ewc=10:100,l2=0.01") == {"ewc": [10.0, 100.0], "l2": [0.01]}


def test_cli_overlap(tmp_path, capsys):
    args = [
        "overlap",
        "--out",
        str(tmp_path),
        "--fractions",
        "0,1",
        "--epochs",
        "0.2",
        "--fisher-samples",
        "100",
    ]
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "fisher_overlap.json").read_text())
    same, different = (c["overlap"] for c in result["curves"])
    assert len(same) == 3 and all(0.0 <= v <= 1.0 for v in same + different)
    # identical tasks: identical Fishers up to sampling noise; a full permutation moves the
    # first layer's important weights elsewhere
    assert same[0] > different[0]
    assert (tmp_path / "fig2c.png").stat().st_size > 1000
    assert "fraction permuted" in capsys.readouterr().out


def test_a_diverging_lambda_candidate_is_recorded_and_skipped(tmp_path):
    cfg = tiny(methods=["ewc"], lam={"ewc": [0.0, 1e12]}, optimizer="sgd", lr=0.5, eval_every=0)
    res = trainer.run_experiment(cfg, tmp_path, progress=False, log=lambda s: None)
    sweep = res["methods"]["ewc"]["lam_sweep"]
    assert res["methods"]["ewc"]["lam"] == 0.0
    assert any(s["lam"] == 1e12 and "diverged" in s["diverged"] for s in sweep)
    cfg1 = tiny(methods=["ewc"], lam={"ewc": [1e12]}, optimizer="sgd", lr=0.5, eval_every=0)
    with pytest.raises(FloatingPointError, match="lower --lr or λ"):
        trainer.run_experiment(cfg1, tmp_path / "single", progress=False)
