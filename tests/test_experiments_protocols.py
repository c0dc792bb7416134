"""Seeds, devices, protocol options, the L2 anchor and the published-protocol configs."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc import L2, cli
from ewc.data import make_stream
from ewc.experiments import protocols, trainer
from ewc.experiments.checkpoint import load_checkpoint
from ewc.experiments.models import MLP
from ewc.experiments.results import format_table, read_results

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PENDING = {"si", "mas"}  # methods of the regularisers work, registered when it is merged


def tiny(**kw):
    base = dict(
        tasks=2,
        methods=["finetune", "ewc"],
        hidden=[16],
        epochs=0.2,
        batch_size=64,
        eval_every=0,
        fisher_samples=100,
    )
    base.update(kw)
    return trainer.Config.from_dict(base)


@pytest.fixture(autouse=True)
def _float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


# --- seeds --------------------------------------------------------------------------------
def test_seeds_keep_every_run_and_give_mean_and_std(tmp_path):
    cfg = tiny(seeds=[0, 1], methods=["finetune", "l2"], lam={"l2": [0.0, 10.0]}, hidden=[8])
    res = trainer.run_experiment(cfg, tmp_path / "two", progress=False)
    assert res["seeds"] == [0, 1]
    for m in res["methods"].values():
        per = m["seeds"]
        assert set(per) == {"0", "1"}
        accs = [per[s]["average_accuracy"] for s in ("0", "1")]
        assert m["mean"]["average_accuracy"] == pytest.approx(np.mean(accs))
        assert m["std"]["average_accuracy"] == pytest.approx(np.std(accs, ddof=1))
        mean_matrix = np.mean([per[s]["accuracy_matrix"] for s in ("0", "1")], axis=0)
        np.testing.assert_allclose(m["accuracy_matrix"], mean_matrix)
        assert {per[s]["lam"] for s in per} == {m["lam"]}  # one λ for every seed
    sweep = res["methods"]["l2"]["lam_sweep"]
    best = max(sweep, key=lambda s: s["val_average_accuracy"])
    assert res["methods"]["l2"]["lam"] == best["lam"]
    assert " ± " in format_table(res) and "seeds" in format_table(res)
    assert read_results(tmp_path / "two")["methods"].keys() == res["methods"].keys()
    # a seed run alone gives exactly that seed's results (same seed, same device)
    one = trainer.run_experiment(
        replace(cfg, seeds=[1], lam={"l2": [res["methods"]["l2"]["lam"]]}),
        tmp_path / "one",
        progress=False,
    )
    for name in ("finetune", "l2"):
        a, b = one["methods"][name]["seeds"]["1"], res["methods"][name]["seeds"]["1"]
        assert a["accuracy_matrix"] == b["accuracy_matrix"]
        assert one["methods"][name]["std"]["average_accuracy"] is None


def test_seeds_draw_their_own_permutations(tmp_path):
    res = trainer.run_experiment(tiny(seeds=[0, 3], methods=["finetune"]), tmp_path, progress=False)
    per = res["methods"]["finetune"]["seeds"]
    assert per["0"]["accuracy_matrix"] != per["3"]["accuracy_matrix"]


def test_resume_of_a_several_seed_run_matches(tmp_path):
    cfg = tiny(seeds=[0, 1], methods=["ewc"], reset_optimizer=False, optimizer="adam")
    full = trainer.run_experiment(cfg, tmp_path / "a", progress=False)
    with pytest.raises(trainer.Interrupted):
        trainer.run_experiment(cfg, tmp_path / "b", progress=False, stop_after_tasks=1)
    again = trainer.run_experiment(cfg, tmp_path / "b", resume=True, progress=False)
    assert again["methods"] == full["methods"]


# --- devices ------------------------------------------------------------------------------
def test_device_choices():
    assert trainer.resolve_device("cpu") == torch.device("cpu")
    assert trainer.resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            trainer.resolve_device("cuda")
    with pytest.raises(ValueError, match="--device"):
        tiny(device="tpu").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_are_reproducible_and_near_the_cpu(tmp_path):
    cfg = tiny(device="cuda", methods=["finetune", "ewc", "l2"], fisher_kind="sampled")
    a = trainer.run_experiment(cfg, tmp_path / "a", progress=False)
    b = trainer.run_experiment(cfg, tmp_path / "b", progress=False)
    assert a["methods"] == b["methods"]
    assert a["versions"]["device"].startswith("cuda")
    cpu = trainer.run_experiment(replace(cfg, device="cpu"), tmp_path / "c", progress=False)
    for m in a["methods"]:
        assert (
            abs(a["methods"][m]["average_accuracy"] - cpu["methods"][m]["average_accuracy"]) < 0.1
        )


# --- protocol options ---------------------------------------------------------------------
def test_padding_and_normalisation():
    plain = make_stream("split-mnist", n_tasks=5)[0]
    padded = make_stream("split-mnist", n_tasks=5, pad=2)[0]
    normed = make_stream("split-mnist", n_tasks=5, pad=2, normalize=(0.1, 0.2752))[0]
    x, xp, xn = plain.x_test, padded.x_test, normed.x_test
    assert xp.shape == (x.shape[0], 32 * 32)
    img = xp.reshape(-1, 32, 32)
    assert torch.equal(img[:, 2:30, 2:30].reshape(x.shape), x)
    assert img[:, :2].abs().sum() == 0 and img[:, :, -2:].abs().sum() == 0
    torch.testing.assert_close(xn, (xp - 0.1) / 0.2752)
    with pytest.raises(ValueError, match="std > 0"):
        make_stream("split-mnist", normalize=(0.1, 0.0))
    with pytest.raises(ValueError, match="pad"):
        make_stream("split-mnist", pad=-1)


def test_padded_permutations_cover_the_padded_image_and_choose_the_unpermuted_task():
    s = make_stream("permuted-mnist", n_tasks=3, pad=2, unpermuted_task=1)
    assert s[1].permutation is None and s[0].permutation is not None
    assert len(s[0].permutation) == 1024
    plain = make_stream("permuted-mnist", n_tasks=3, pad=2, first_identity=False)
    assert np.array_equal(plain[2].permutation, s[2].permutation)  # the others are unchanged
    with pytest.raises(ValueError, match="unpermuted_task"):
        make_stream("permuted-mnist", n_tasks=3, unpermuted_task=3)


def test_kept_optimizer_changes_training_and_is_checkpointed(tmp_path):
    keep = trainer.run_experiment(tiny(reset_optimizer=False), tmp_path / "k", progress=False)
    reset = trainer.run_experiment(tiny(), tmp_path / "r", progress=False)
    assert (
        keep["methods"]["ewc"]["accuracy_matrix"][1]
        != reset["methods"]["ewc"]["accuracy_matrix"][1]
    )
    assert (
        keep["methods"]["ewc"]["accuracy_matrix"][0]
        == reset["methods"]["ewc"]["accuracy_matrix"][0]
    )

    saved = load_checkpoint(next((tmp_path / "k" / "checkpoints").glob("ewc-*/task-1.safetensors")))
    assert "optimizer" in saved and saved["optimizer"]["state"]


def test_output_mask_trains_and_estimates_over_the_seen_classes_only(tmp_path):
    stream = make_stream("split-mnist", scenario="class")
    seen = trainer._seen_outputs(stream, 1, torch.device("cpu"))
    assert seen.tolist() == [True] * 4 + [False] * 6
    torch.manual_seed(0)
    net = MLP(784, (8,), 10)
    net.active_outputs = torch.tensor([True, True] + [False] * 8)
    x, y = stream[0].x_train[:64], stream[0].y_train[:64]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert net.head.weight.grad[2:].abs().sum() == 0 and net.head.weight.grad[:2].abs().sum() > 0
    ref = torch.log_softmax(net.head(net.body(x))[:, :2], 1)  # the sliced head of Hsu et al.
    torch.testing.assert_close(torch.log_softmax(net(x), 1)[:, :2], ref)
    # the Fisher under the mask: finite, and zero on the rows of unseen classes
    from ewc import EWC

    reg = EWC(net, 1.0, kind="exact")
    reg.consolidate([(x, y)])
    prec = reg.precision["head.weight"]
    assert torch.isfinite(prec).all() and prec[2:].abs().sum() == 0 and prec[:2].sum() > 0
    cfg = tiny(benchmark="split-mnist", scenario="class", tasks=5, output_mask="seen")
    res = trainer.run_experiment(cfg, tmp_path, progress=False)
    assert len(res["methods"]["ewc"]["accuracy_matrix"]) == 5
    with pytest.raises(ValueError, match="class-incremental"):
        tiny(output_mask="seen").validate()


def test_protocol_option_validation():
    for bad, msg in [
        (dict(seeds=[0, 0]), "--seeds"),
        (dict(seeds=[]), "--seeds"),
        (dict(pad=-2), "--pad"),
        (dict(normalize=[0.1]), "--normalize"),
        (dict(output_mask="all"), "--output-mask"),
        (dict(l2_anchor="first"), "--l2-anchor"),
        (dict(unpermuted_task=5), "--unpermuted-task"),
        (dict(val_fraction=0.0, lam={"ewc": [1.0, 10.0]}), "nothing to choose"),
        (dict(val_fraction=0.0, early_stopping=True), "validation split"),
        (dict(method_options={"sgd": {}}), "method_options"),
    ]:
        with pytest.raises(ValueError, match=msg):
            tiny(**bad).validate()


def test_no_validation_split_runs(tmp_path):
    res = trainer.run_experiment(tiny(val_fraction=0.0), tmp_path, progress=False)
    assert res["methods"]["ewc"]["val_average_accuracy"] is None


# --- the L2 anchor ------------------------------------------------------------------------
def _two_optima():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    optima = []
    regs = {a: L2(net, 0.7, anchor=a) for a in ("all", "latest")}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        optima.append([p.detach().clone() for p in net.parameters()])
        for r in regs.values():
            r.consolidate()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net, optima, regs


def test_l2_anchor_all_and_latest_against_the_sum_of_pulls():
    net, optima, regs = _two_optima()
    params = list(net.parameters())

    def pull(opt):
        return sum(((p - o) ** 2).sum() for p, o in zip(params, opt, strict=True))

    torch.testing.assert_close(regs["all"].penalty(), 0.35 * sum(pull(o) for o in optima))
    torch.testing.assert_close(regs["latest"].penalty(), 0.35 * pull(optima[-1]))
    assert regs["latest"].num_tasks == 3
    g = torch.autograd.grad(regs["latest"].penalty(), params)
    for gi, p, o in zip(g, params, optima[-1], strict=True):
        torch.testing.assert_close(gi, 0.7 * (p - o))


def test_l2_anchor_is_saved_and_validated(tmp_path):
    net, _, regs = _two_optima()
    regs["latest"].save(tmp_path / "l2.safetensors")
    back = L2.load(str(tmp_path / "l2.safetensors"), net)
    assert back.anchor_kind == "latest"
    torch.testing.assert_close(back.penalty(), regs["latest"].penalty())
    into = L2(net, 1.0)  # anchor="all" adopts the file's anchor, as λ and mode are adopted
    into.load_state_dict(regs["latest"].state_dict())
    assert into.anchor_kind == "latest"
    bad = regs["latest"].state_dict()
    bad["metadata"]["anchor"] = "first"
    with pytest.raises(ValueError, match="unknown L2 anchor"):
        into.load_state_dict(bad)
    stiff = regs["all"].state_dict()
    stiff["metadata"]["anchor"] = "latest"
    fresh = L2(net, 1.0)
    with pytest.raises(ValueError, match="not 1 everywhere"):
        fresh.load_state_dict(stiff)
    assert fresh.num_tasks == 0 and fresh.anchor_kind == "all"  # unchanged on error
    old = regs["all"].state_dict()
    del old["metadata"]["anchor"]  # a file written before the anchor existed
    fresh.load_state_dict(old)
    assert fresh.anchor_kind == "all"
    with pytest.raises(ValueError, match="anchor must be one of"):
        L2(net, 1.0, anchor="first")
    with pytest.raises(ValueError, match="does not combine"):
        L2(net, 1.0, anchor="latest", mode="online")


def test_trainer_uses_the_configured_anchor():
    net = MLP(4, (3,), 2)
    cfg = tiny(l2_anchor="latest")
    assert trainer.METHODS["l2"](net, 1.0, cfg).anchor_kind == "latest"


# --- protocol files -----------------------------------------------------------------------
def test_every_config_loads_and_lists_only_known_or_pending_methods():
    protos = protocols.list_protocols(CONFIGS)
    names = {p.name for p in protos}
    assert {
        "hsu2018-split-mnist-task",
        "hsu2018-split-mnist-domain",
        "hsu2018-split-mnist-class",
        "vandeven2019-split-mnist-task",
        "kirkpatrick2017-fig2a",
        "kirkpatrick2017-fig2b",
        "demo",
    } <= names
    for p in protos:
        methods = set(p.config["methods"])
        assert methods <= set(trainer.METHODS) | PENDING, p.name
        assert p.notes and p.reference
        if p.published:
            assert set(p.published["values"]) <= methods
    hsu = {p.name: p for p in protos if p.name.startswith("hsu2018")}
    for p in hsu.values():
        assert p.config["l2_anchor"] == "latest" and p.config["reset_optimizer"] is False
        assert p.config["pad"] == 2 and p.config["normalize"] == [0.1, 0.2752]
        assert set(p.config["methods"]) == {"finetune", "l2", "ewc", "online-ewc", "si", "mas"}
    assert hsu["hsu2018-split-mnist-class"].config["output_mask"] == "seen"
    assert hsu["hsu2018-split-mnist-domain"].config["lam"]["l2"] == [1.0]  # 2 × reg_coef 0.5


def test_demo_config_is_the_demo():
    demo = protocols.load_protocol(CONFIGS / "demo.json")
    assert trainer.Config.from_dict(demo.config) == trainer.Config.from_dict(dict(cli.DEMO))


def _write(tmp_path, **changes):
    d = json.loads((CONFIGS / "demo.json").read_text())
    d.update(changes)
    d["name"] = d.get("name", "demo")
    path = tmp_path / f"{d['name']}.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"extra": 1}, "unknown keys"),
        ({"title": ""}, "'title'"),
        ({"name": "other"}, "but the file is"),
        ({"config": {"epochz": 1}}, "unknown config keys"),
        ({"config": {"methods": ["sgd"]}}, "unknown method"),
        (
            {"published": {"metric": "average_accuracy", "unit": "%", "values": {"mas": [1, 2]}}},
            "does not run",
        ),
        ({"published": {"metric": "acc", "unit": "%", "values": {}}}, "'metric'"),
        ({"published": {"metric": "bwt", "unit": "%", "values": {"ewc": [1]}}}, "spread"),
    ],
)
def test_bad_protocol_files_are_named(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    if changes.get("name") == "other":
        path = path.rename(tmp_path / "demo.json")
    with pytest.raises(ValueError, match=message):
        protocols.load_protocol(path)


def test_unknown_methods_are_refused_unless_pending_is_allowed(tmp_path):
    d = json.loads((CONFIGS / "demo.json").read_text())
    d["config"]["methods"] = ["finetune", "not-a-method"]
    d["config"]["lam"] = {"not-a-method": [1.0]}
    d["published"] = {}
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"unknown method\(s\) \[.not-a-method.\]"):
        protocols.load_protocol(path)
    assert protocols.load_protocol(path, check_methods=False).config["methods"] == [
        "finetune",
        "not-a-method",
    ]


def test_compare_gives_the_difference():
    proto = protocols.load_protocol(CONFIGS / "demo.json")
    entry = {
        "lam": 100.0,
        "average_accuracy": 0.8,
        "mean": {"average_accuracy": 0.85},
        "std": {"average_accuracy": 0.01},
        "seeds": {"0": {}, "1": {}},
    }
    text, rows = protocols.compare(proto, {"methods": {"ewc": entry}})
    (row,) = rows
    assert row["ours"] == pytest.approx(85.0) and row["published"] == 84.1
    assert row["difference"] == pytest.approx(0.9) and row["ours_std"] == pytest.approx(1.0)
    assert "85.00 ± 1.00" in text and "+0.90" in text


def test_reproduce_cli(tmp_path, capsys, monkeypatch):
    assert cli.main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "hsu2018-split-mnist-task" in listed and "needs" not in listed  # si, mas registered
    assert cli.main(["reproduce", "nope"]) == 2
    assert "known:" in capsys.readouterr().err
    assert cli.main(["reproduce", "hsu2018-split-mnist-task"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert cli.main(["reproduce", "hsu2018-split-mnist-task", "--methods", "finetune"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    d = json.loads((CONFIGS / "demo.json").read_text())
    d["config"].update(tasks=2, hidden=[16], epochs=0.2, eval_every=0, seeds=[0, 1])
    monkeypatch.setenv("EWC_CONFIGS", str(tmp_path))
    (tmp_path / "demo.json").write_text(json.dumps(d))
    out = tmp_path / "out"
    args = ["reproduce", "demo", "--out", str(out), "--no-progress", "--methods", "finetune,ewc"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "published" in text and "84.10" in text and "wall time" in text
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"finetune", "ewc"}
    assert all(r["seeds"] == 2 and r["difference"] is not None for r in rows)


def test_run_cli_seeds_device_and_protocol_file(tmp_path, capsys):
    args = [
        "run",
        "--config",
        str(CONFIGS / "hsu2018-split-mnist-domain.json"),
        "--source",
        "mnist5k",
        "--methods",
        "finetune,l2",
        "--seeds",
        "0,1",
        "--iterations",
        "5",
        "--device",
        "cpu",
        "--hidden",
        "8",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    res = read_results(tmp_path)
    cfg = res["config"]
    assert cfg["seeds"] == [0, 1] and cfg["l2_anchor"] == "latest" and cfg["pad"] == 2
    assert cfg["epochs"] is None and cfg["lam"] == {"l2": [1.0]}
    assert " ± " in capsys.readouterr().out


def test_the_protocols_ship_inside_the_wheel(tmp_path):
    # `ewc reproduce` must work from an installed wheel, not only from a checkout
    import subprocess
    import sys
    import zipfile

    assert protocols.config_dir().resolve() == CONFIGS.resolve()  # the checkout's link
    assert protocols.config_dir().is_relative_to(Path(protocols.__file__).resolve().parent)
    import shutil

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(root / f, src / f)  # a copy: setuptools writes build/ where it builds
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ewc-*.whl")
    shipped = {
        Path(n).name
        for n in zipfile.ZipFile(wheel).namelist()
        if n.startswith("ewc/experiments/configs/")
    }
    assert shipped == {p.name for p in CONFIGS.glob("*.json")} and len(shipped) >= 5
