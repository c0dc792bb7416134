"""Metrics, results files, plots and Fisher overlap of ewc.experiments (small hand-made inputs)."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from ewc import Fisher
from ewc.experiments import metrics as M
from ewc.experiments.overlap import fisher_overlap, layer_groups, layer_overlaps, overlap_table
from ewc.experiments.results import (
    format_table,
    method_result,
    read_results,
    validate_results,
    versions,
    write_results,
)

# R[i][j]: accuracy on task j after training task i
R3 = [
    [0.90, 0.10, 0.20],
    [0.80, 0.95, 0.30],
    [0.70, 0.85, 0.97],
]
BASE3 = [0.10, 0.12, 0.08]


# --- independent references: explicit loops over the formulas --------------------------------
def ref_average(R, t):
    s = 0.0
    for j in range(t + 1):
        s += R[t][j]
    return s / (t + 1)


def ref_bwt(R):
    T = len(R)
    if T == 1:
        return 0.0
    s = 0.0
    for i in range(T - 1):
        s += R[T - 1][i] - R[i][i]
    return s / (T - 1)


def ref_fwt(R, b):
    T = len(R)
    if T == 1:
        return 0.0
    s = 0.0
    for i in range(1, T):
        s += R[i - 1][i] - b[i]
    return s / (T - 1)


def ref_forgetting(R):
    T = len(R)
    if T == 1:
        return 0.0
    s = 0.0
    for j in range(T - 1):
        best = -1.0
        for k in range(T - 1):
            best = max(best, R[k][j])
        s += best - R[T - 1][j]
    return s / (T - 1)


# --- metrics ------------------------------------------------------------------------------------
def test_metrics_hand_computed_3x3():
    assert M.average_accuracy(R3) == pytest.approx((0.70 + 0.85 + 0.97) / 3)
    assert M.average_accuracy(R3, after=0) == pytest.approx(0.90)
    assert M.average_accuracy(R3, after=1) == pytest.approx((0.80 + 0.95) / 2)
    assert M.average_accuracy_curve(R3) == pytest.approx([0.90, 0.875, 0.84])
    # BWT: ((0.70 - 0.90) + (0.85 - 0.95)) / 2
    assert M.backward_transfer(R3) == pytest.approx(-0.15)
    # FWT: ((0.10 - 0.12) + (0.30 - 0.08)) / 2
    assert M.forward_transfer(R3, BASE3) == pytest.approx(0.10)
    # forgetting: (max(0.90, 0.80) - 0.70 + max(0.10, 0.95) - 0.85) / 2
    assert M.forgetting(R3) == pytest.approx(0.15)


def test_forgetting_takes_the_best_earlier_accuracy_not_the_diagonal():
    R = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.9]]  # task 0 peaked after task 1
    assert M.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)
    assert M.backward_transfer(R) == pytest.approx(((0.6 - 0.5) + (0.8 - 0.8)) / 2)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_metrics_match_loop_references(T):
    rng = np.random.default_rng(T)
    R = rng.uniform(size=(T, T))
    b = rng.uniform(size=T)
    Rl = R.tolist()
    for t in range(T):
        assert M.average_accuracy(R, after=t) == pytest.approx(ref_average(Rl, t))
    assert M.average_accuracy(Rl) == pytest.approx(ref_average(Rl, T - 1))
    assert M.average_accuracy_curve(R) == pytest.approx([ref_average(Rl, t) for t in range(T)])
    assert M.backward_transfer(R) == pytest.approx(ref_bwt(Rl))
    assert M.forward_transfer(R, b) == pytest.approx(ref_fwt(Rl, b.tolist()))
    assert M.forgetting(Rl) == pytest.approx(ref_forgetting(Rl))
    s = M.summarize(R, b)
    assert set(s) == {"average_accuracy", "average_accuracy_curve", "bwt", "fwt", "forgetting"}
    assert s["bwt"] == pytest.approx(ref_bwt(Rl))
    assert s["fwt"] == pytest.approx(ref_fwt(Rl, b.tolist()))
    assert all(type(v) is float for v in s["average_accuracy_curve"])


def test_single_task_transfer_and_forgetting_are_zero():
    assert M.average_accuracy([[0.7]]) == pytest.approx(0.7)
    assert M.backward_transfer([[0.7]]) == 0.0
    assert M.forward_transfer([[0.7]], [0.1]) == 0.0
    assert M.forgetting([[0.7]]) == 0.0


def test_summarize_without_baseline_has_no_fwt():
    s = M.summarize(R3)
    assert s["fwt"] is None
    assert s["average_accuracy"] == pytest.approx(0.84)


@pytest.mark.parametrize(
    "R, match",
    [
        ([[0.5, 0.5]], "must be square"),
        ([], "must be square"),
        ([[0.5, 0.5], [0.5]], "rows of equal length"),
        ([["a", 0.5], [0.5, 0.5]], "numbers only"),
        ([[0.5, float("nan")], [0.5, 0.5]], "non-finite"),
        ([[0.5, 0.2], [1.5, 0.5]], r"outside \[0, 1\]"),
        ([[-0.1, 0.2], [0.5, 0.5]], r"outside \[0, 1\]"),
        ([[95.0, 20.0], [90.0, 97.0]], "fractions, not percentages"),
    ],
)
def test_invalid_accuracy_matrix(R, match):
    with pytest.raises(ValueError, match=match):
        M.average_accuracy(R)


def test_invalid_after_and_baseline():
    with pytest.raises(ValueError, match=r"after must be a task index in 0..2"):
        M.average_accuracy(R3, after=3)
    with pytest.raises(ValueError, match="after must be"):
        M.average_accuracy(R3, after=-1)
    with pytest.raises(ValueError, match=r"one accuracy per task, shape \(3,\)"):
        M.forward_transfer(R3, [0.1, 0.1])
    with pytest.raises(ValueError, match="baseline"):
        M.summarize(R3, [0.1, 0.1, 2.0])


# --- results files --------------------------------------------------------------------------------
def _curves(T, per_task=4, seed=0):
    rng = np.random.default_rng(seed)
    n = T * per_task + 1
    return {
        "iteration": [10 * k for k in range(n)],
        "accuracy": rng.uniform(size=(n, T)).tolist(),
        "task_boundaries": [10 * per_task * t for t in range(T)],
    }


def _results(T=3):
    rng = np.random.default_rng(1)
    methods = {}
    for k, (name, lam) in enumerate([("sgd", None), ("l2", 1.0), ("ewc", 400.0)]):
        R = rng.uniform(0.05, 1.0, size=(T, T))
        methods[name] = method_result(R, curves=_curves(T, seed=k), baseline=[0.1] * T, lam=lam)
    overlap = {
        "layers": ["layer 1", "layer 2", "layer 3"],
        "curves": [
            {"label": "similar (10% pixels permuted)", "overlap": [0.9, 0.95, 0.99]},
            {"label": "dissimilar (100% pixels permuted)", "overlap": [0.1, 0.4, 0.8]},
        ],
    }
    return {
        "config": {"tasks": T, "seed": 0},
        "versions": versions(),
        "methods": methods,
        "fisher_overlap": overlap,
    }


def test_versions_and_method_result():
    v = versions()
    assert set(v) == {"ewc", "torch", "numpy", "python", "platform"}
    assert v["torch"] == torch.__version__
    curves = _curves(3)
    curves["iteration"] = np.asarray(curves["iteration"])  # arrays are accepted
    entry = method_result(np.asarray(R3), curves=curves, baseline=BASE3, lam=3)
    assert entry["accuracy_matrix"] == R3
    assert entry["average_accuracy"] == pytest.approx(0.84)
    assert entry["bwt"] == pytest.approx(-0.15) and entry["fwt"] == pytest.approx(0.10)
    assert entry["forgetting"] == pytest.approx(0.15)
    assert entry["lam"] == 3.0 and entry["baseline_accuracy"] == BASE3
    assert entry["curves"]["iteration"] == list(range(0, 130, 10))
    json.dumps(entry)  # plain Python types only
    bare = method_result(R3)
    assert bare["fwt"] is None and bare["curves"] is None and bare["lam"] is None


def test_method_result_rejects_bad_curves_and_lam():
    bad = _curves(3)
    bad["task_boundaries"] = [0, 40]
    with pytest.raises(ValueError, match=r"curves.task_boundaries must have 3 entries"):
        method_result(R3, curves=bad)
    bad = _curves(3)
    bad["accuracy"] = bad["accuracy"][:-1]
    with pytest.raises(ValueError, match=r"curves.accuracy must have shape \(13, 3\)"):
        method_result(R3, curves=bad)
    bad = _curves(3)
    del bad["iteration"]
    with pytest.raises(ValueError, match="curves.iteration is missing"):
        method_result(R3, curves=bad)
    with pytest.raises(ValueError, match="lam"):
        method_result(R3, lam=float("inf"))


def test_results_round_trip_and_csv(tmp_path):
    res = _results()
    paths = write_results(res, tmp_path / "run")
    assert set(paths) == {"json", "csv", "curves"}
    assert paths["json"].name == "results.json"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "curves.csv",
        "results.csv",
        "results.json",
    ]  # no temporary files left behind
    back = read_results(paths["json"])
    assert back == json.loads(json.dumps(res))
    assert read_results(tmp_path / "run") == back  # a directory works too
    assert paths["json"].read_text().startswith('{\n  "config"')  # indent 2

    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "after_task", "eval_task", "accuracy"]
    for name, m in res["methods"].items():
        mine = [r for r in rows if r["method"] == name]
        assert len(mine) == 3 * 3
        for r in mine:
            i, j = int(r["after_task"]), int(r["eval_task"])
            assert float(r["accuracy"]) == m["accuracy_matrix"][i][j]

    with paths["curves"].open(newline="") as f:
        crows = list(csv.DictReader(f))
    assert list(crows[0]) == ["method", "iteration", "eval_task", "accuracy"]
    ewc_curves = res["methods"]["ewc"]["curves"]
    mine = [r for r in crows if r["method"] == "ewc"]
    assert len(mine) == len(ewc_curves["iteration"]) * 3
    r = mine[3 * 2 + 1]  # third evaluation point, task 1
    assert int(r["iteration"]) == ewc_curves["iteration"][2]
    assert float(r["accuracy"]) == ewc_curves["accuracy"][2][1]


def test_write_results_overwrites_and_rejects_invalid(tmp_path):
    res = _results()
    write_results(res, tmp_path)
    res["methods"]["ewc"]["lam"] = 7.0
    write_results(res, tmp_path)
    assert read_results(tmp_path)["methods"]["ewc"]["lam"] == 7.0
    bad = _results()
    bad["methods"]["ewc"]["accuracy_matrix"] = [[0.5]]
    with pytest.raises(ValueError, match="methods.ewc"):
        write_results(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def _corrupt(res, edit):
    res = json.loads(json.dumps(res))
    edit(res)
    return res


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.pop("methods"), "results.json: methods is missing"),
        (lambda r: r.pop("config"), "results.json: config is missing"),
        (lambda r: r.update(methods={}), "methods must be a non-empty object"),
        (
            lambda r: r["methods"]["ewc"].update(accuracy_matrix=[[0.5, 0.5]]),
            "results.json: methods.ewc.accuracy_matrix is not a square matrix",
        ),
        (
            lambda r: r["methods"]["l2"].update(accuracy_matrix=[[0.5, 1], [0.5]]),
            "methods.l2.accuracy_matrix is not a square matrix",
        ),
        (
            lambda r: r["methods"]["ewc"]["accuracy_matrix"][1].__setitem__(2, 97.0),
            r"methods.ewc.accuracy_matrix\[1\]\[2\] = 97.0 is not a fraction",
        ),
        (lambda r: r["methods"]["ewc"].pop("bwt"), "methods.ewc.bwt is missing"),
        (lambda r: r["methods"]["ewc"].update(bwt=0.5), "methods.ewc.bwt is 0.5 but the accuracy"),
        (lambda r: r["methods"]["ewc"].update(bwt="x"), "methods.ewc.bwt must be a finite number"),
        (lambda r: r["methods"]["sgd"].update(fwt=None), "methods.sgd.fwt must be null exactly"),
        (
            lambda r: r["methods"]["ewc"].update(baseline_accuracy=[0.1]),
            r"methods.ewc.baseline_accuracy must have shape \(3,\)",
        ),
        (
            lambda r: r["methods"]["ewc"]["curves"].pop("task_boundaries"),
            "methods.ewc.curves.task_boundaries is missing",
        ),
        (
            lambda r: r["methods"]["ewc"]["curves"].update(iteration=[5, 1]),
            "methods.ewc.curves.iteration must be non-decreasing",
        ),
        (lambda r: r["methods"]["ewc"].update(lam="big"), "methods.ewc.lam must be a finite"),
        (
            lambda r: r["fisher_overlap"]["curves"][1].update(overlap=[0.1]),
            r"fisher_overlap.curves\[1\].overlap must have shape \(3,\)",
        ),
    ],
)
def test_read_results_names_the_bad_key(tmp_path, edit, match):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_corrupt(_results(), edit)))
    with pytest.raises(ValueError, match=match):
        read_results(path)


def test_read_results_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "missing.json")
    path = tmp_path / "results.json"
    path.write_text('{"config": {')
    with pytest.raises(ValueError, match="results.json: not valid JSON"):
        read_results(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="the top level must be an object"):
        read_results(path)


def test_extra_keys_are_kept():
    res = _results()
    res["elapsed_seconds"] = 1.5
    res["methods"]["ewc"]["lam_sweep"] = [{"lam": 1.0, "val_average_accuracy": 0.5}]
    validate_results(res)


def test_format_table():
    res = _results()
    res["methods"]["sgd"] = method_result(R3)
    table = format_table(res)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    for name in ("sgd", "l2", "ewc"):
        assert any(line.startswith(name) for line in lines)
    sgd = next(line for line in lines if line.startswith("sgd")).split()
    assert sgd == ["sgd", "—", "84.0", "-15.0", "—", "15.0"]
    ewc_line = next(line for line in lines if line.startswith("ewc")).split()
    assert ewc_line[1] == "400"
    assert ewc_line[2] == f"{100 * res['methods']['ewc']['average_accuracy']:.1f}"


# --- plots --------------------------------------------------------------------------------------
def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024


def test_plots_write_pngs(tmp_path):
    from ewc.experiments import plots

    pyplot_before = "matplotlib.pyplot" in sys.modules
    res = _results()
    paths = plots.plot_all(res, tmp_path / "figs")
    assert [p.name for p in paths] == ["fig2a.png", "fig2b.png", "fig2c.png"]
    for p in paths:
        _assert_png(p)
    p = plots.plot_fisher_overlap(res["fisher_overlap"], tmp_path / "c.png")
    assert p == tmp_path / "c.png"
    _assert_png(p)
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules  # the user's backend is left alone

    del res["fisher_overlap"]
    for m in res["methods"].values():
        m["curves"] = None
    assert [p.name for p in plots.plot_all(res, tmp_path / "b")] == ["fig2b.png"]
    with pytest.raises(ValueError, match="no method has training curves"):
        plots.plot_training_curves(res, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"overlap.curves\[0\].overlap"):
        plots.plot_fisher_overlap(
            {"layers": ["a", "b"], "curves": [{"label": "x", "overlap": [0.5]}]}, tmp_path / "c"
        )


# --- Fisher overlap -------------------------------------------------------------------------------
def test_overlap_identical_and_proportional_is_one():
    f = {"a.weight": torch.tensor([[1.0, 2.0], [0.0, 4.0]]), "a.bias": torch.tensor([0.5, 0.1])}
    assert fisher_overlap(f, f) == pytest.approx(1.0)
    g = {k: 3.0 * v for k, v in f.items()}
    assert fisher_overlap(Fisher(f), Fisher(g)) == pytest.approx(1.0)


def test_overlap_disjoint_support_is_zero():
    f1 = {"w": torch.tensor([1.0, 2.0, 0.0, 0.0])}
    f2 = {"w": torch.tensor([0.0, 0.0, 5.0, 1.0])}
    assert fisher_overlap(f1, f2) == pytest.approx(0.0, abs=1e-12)


def test_overlap_hand_computed_two_elements():
    f1 = {"w": torch.tensor([1.0, 3.0])}  # normalised: [1/4, 3/4]
    f2 = {"w": torch.tensor([6.0, 2.0])}  # normalised: [3/4, 1/4]
    d2 = (math.sqrt(0.25) - math.sqrt(0.75)) ** 2 + (math.sqrt(0.75) - math.sqrt(0.25)) ** 2
    assert fisher_overlap(f1, f2) == pytest.approx(1.0 - 0.5 * d2)
    assert fisher_overlap(f1, f2) == pytest.approx(math.sqrt(3) / 2)


def test_overlap_normalises_over_the_named_group():
    f1 = {"a.weight": torch.tensor([1.0, 1.0]), "b.weight": torch.tensor([100.0])}
    f2 = {"a.weight": torch.tensor([1.0, 1.0]), "b.weight": torch.tensor([1.0])}
    assert fisher_overlap(f1, f2, ["a.weight"]) == pytest.approx(1.0)
    # whole model: normalised [1/102, 1/102, 100/102] vs [1/3, 1/3, 1/3]
    p, q = [1 / 102, 1 / 102, 100 / 102], [1 / 3] * 3
    want = 1.0 - 0.5 * sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(p, q, strict=True))
    assert fisher_overlap(f1, f2) == pytest.approx(want)
    # default: only the shared names
    f3 = dict(f2, extra=torch.tensor([1.0]))
    assert fisher_overlap(f1, f3) == pytest.approx(want)


def test_overlap_errors():
    f = {"w": torch.tensor([1.0, 2.0])}
    with pytest.raises(ValueError, match="shape"):
        fisher_overlap(f, {"w": torch.tensor([1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="share no parameter names"):
        fisher_overlap(f, {"v": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"second Fisher has no entries \['w'\]"):
        fisher_overlap(f, {"v": torch.tensor([1.0])}, names=["w"])
    with pytest.raises(ValueError, match="zero trace"):
        fisher_overlap(f, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="negative or non-finite"):
        fisher_overlap(f, {"w": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match="names is empty"):
        fisher_overlap(f, f, names=[])


def test_layer_groups_and_layer_overlaps():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2, bias=False)
    )
    names = [n for n, _ in model.named_parameters()]
    assert layer_groups(names) == {"0": ["0.weight", "0.bias"], "2": ["2.weight"]}
    nested = ["enc.fc1.weight", "enc.fc1.bias", "lstm.weight_ih_l0", "lstm.bias_ih_l0", "scale"]
    assert layer_groups(nested) == {
        "enc.fc1": ["enc.fc1.weight", "enc.fc1.bias"],
        "lstm": ["lstm.weight_ih_l0", "lstm.bias_ih_l0"],
        "scale": ["scale"],
    }
    assert list(layer_groups(nested)) == ["enc.fc1", "lstm", "scale"]  # order preserved

    g = torch.Generator().manual_seed(0)
    f1 = Fisher({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()})
    f2 = Fisher({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()})
    per_layer = layer_overlaps(f1, f2)
    assert list(per_layer) == ["0", "2"]
    assert per_layer["0"] == pytest.approx(fisher_overlap(f1, f2, ["0.weight", "0.bias"]))
    a = f1["2.weight"].flatten() / f1["2.weight"].sum()
    b = f2["2.weight"].flatten() / f2["2.weight"].sum()
    d2 = sum(
        (math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a.tolist(), b.tolist(), strict=True)
    )
    assert per_layer["2"] == pytest.approx(1.0 - 0.5 * d2)
    assert all(0.0 <= v <= 1.0 for v in per_layer.values())

    with pytest.raises(ValueError, match="different parameters"):
        layer_overlaps(f1, {"0.weight": f2["0.weight"]})
    dead = dict(f2, **{"2.weight": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="layer '2': .*zero trace"):
        layer_overlaps(f1, dead)


def test_overlap_table():
    table = overlap_table({"similar": {"0": 0.9, "2": 0.99}, "different": {"0": 0.2, "2": 0.7}})
    assert table == {
        "layers": ["layer 1", "layer 2"],
        "curves": [
            {"label": "similar", "overlap": [0.9, 0.99]},
            {"label": "different", "overlap": [0.2, 0.7]},
        ],
    }
    with pytest.raises(ValueError, match="covers layers"):
        overlap_table({"a": {"0": 0.5}, "b": {"1": 0.5}})
    with pytest.raises(ValueError, match="layers has 1 names for 2 layers"):
        overlap_table({"a": {"0": 0.5, "1": 0.5}}, layers=["x"])
