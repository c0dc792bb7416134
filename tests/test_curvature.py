"""``ewc curvature`` on a tiny setting: files written, and the numbers say what they should."""

from __future__ import annotations

import json

import pytest
import torch

from ewc import cli
from ewc.experiments.curvature import compare

pytest.importorskip("matplotlib")


def run(tmp_path, activation):
    out = tmp_path / activation
    args = ["curvature", "--out", str(out), "--hidden", "8", "--samples", "40"]
    assert cli.main([*args, "--epochs", "0.2", "--activation", activation]) == 0
    result = json.loads((out / "curvature.json").read_text())
    assert (out / "curvature.png").stat().st_size > 10_000
    return result


def test_cli_curvature_relu(tmp_path, capsys):
    relu = run(tmp_path, "relu")
    assert [s["stage"] for s in relu["stages"]] == ["init", "midway", "end"]
    assert relu["config"]["parameters"] == 784 * 8 + 8 + 8 * 10 + 10
    for s in relu["stages"]:
        assert set(s["fisher"]) == {"sampled", "empirical", "exact"}
        # ReLU + softmax cross-entropy: the exact Fisher is the Hessian diagonal
        assert s["fisher"]["exact"]["relative_error"] < 1e-4
        assert s["hessian"]["negative_fraction"] == 0.0
        assert s["hutchinson"]["probes"] == 20 and s["hutchinson"]["relative_error"] > 0
        assert s["fisher"]["empirical"]["relative_error"] > 1e-2
        assert all(v["seconds"] >= 0 for v in s["fisher"].values())
    assert relu["stages"][-1]["train_loss"] < relu["stages"][0]["train_loss"]
    assert "wrote" in capsys.readouterr().out


def test_cli_curvature_tanh(tmp_path):
    tanh = run(tmp_path, "tanh")
    assert any(s["hessian"]["negative_fraction"] > 0 for s in tanh["stages"])
    assert all(s["fisher"]["exact"]["relative_error"] > 1e-4 for s in tanh["stages"])


def test_compare_metrics_by_hand():
    h = {"w": torch.tensor([1.0, 2.0, -1.0])}
    f = {"w": torch.tensor([1.0, 2.0, 1.0])}
    m = compare(f, h)
    assert m["relative_error"] == pytest.approx(2.0 / 6**0.5)
    assert m["log_correlation"] == pytest.approx(1.0)  # on the positive pairs only
    assert m["trace"] == pytest.approx(4.0)
    assert compare(h, h)["correlation"] == pytest.approx(1.0)


def test_cli_curvature_rejects_bad_options(tmp_path, capsys):
    assert cli.main(["curvature", "--out", str(tmp_path), "--samples", "1"]) == 2
    assert "--samples" in capsys.readouterr().err
