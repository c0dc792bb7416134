import json
import math

import pytest
import torch
from conftest import loader, make_case
from safetensors.torch import save_file
from torch import nn

import ewc


def _trained_ewc(mode="separate", cls=ewc.EWC):
    model, x, y = make_case("mlp")
    reg = cls(model, lam=12.5, mode=mode, gamma=0.75 if mode == "online" else 1.0)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        if cls is ewc.L2:
            reg.consolidate()
        else:
            reg.consolidate(loader(x, y, 4), generator=gen)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model, reg


@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize("cls", [ewc.EWC, ewc.L2])
def test_save_load_round_trip_is_bit_exact(tmp_path, mode, cls):
    model, reg = _trained_ewc(mode, cls)
    path = tmp_path / "ewc.safetensors"
    reg.save(str(path))
    loaded = cls.load(str(path), model)
    a, b = reg.state_dict(), loaded.state_dict()
    assert a["metadata"] == b["metadata"]
    assert set(a["tensors"]) == set(b["tensors"])
    for k in a["tensors"]:
        assert a["tensors"][k].dtype == b["tensors"][k].dtype
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert torch.equal(reg.penalty(), loaded.penalty())
    meta = a["metadata"]
    assert meta["format_version"] == 1 and meta["mode"] == mode and meta["lam"] == 12.5
    assert meta["num_tasks"] == 3 and len(meta["tasks"]) == 3
    if cls is ewc.EWC:
        assert meta["tasks"][0]["n_samples"] == 12 and meta["tasks"][0]["kind"] == "sampled"


def test_state_size_does_not_grow_with_tasks(tmp_path):
    model = nn.Linear(30, 30)
    reg = ewc.L2(model, lam=1.0)
    sizes, tensor_bytes = [], []
    for _ in range(30):
        reg.consolidate()
        reg.save(str(tmp_path / "s.safetensors"))
        sizes.append((tmp_path / "s.safetensors").stat().st_size)
        tensor_bytes.append(sum(t.nbytes for t in reg.state_dict()["tensors"].values()))
    # only the JSON task list grows (a few bytes per task), never the tensors
    assert len(set(tensor_bytes)) == 1
    assert sizes[-1] - sizes[0] < 64 * 30 < tensor_bytes[0]


def test_load_state_dict_in_memory():
    model, reg = _trained_ewc()
    other = ewc.EWC(model, lam=1.0)
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.penalty(), reg.penalty()) and other.lam == 12.5


def test_file_is_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    _, reg = _trained_ewc()
    path = tmp_path / "s.safetensors"
    reg.save(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ewc"])
        keys = set(f.keys())
    assert meta["format"] == "ewc" and "offset" in keys and "precision.0.weight" in keys


# --- Bad state files --------------------------------------------------------------------
def test_load_rejects_another_model(tmp_path):
    _, reg = _trained_ewc()
    path = str(tmp_path / "s.safetensors")
    reg.save(path)
    with pytest.raises(ValueError, match=r"shape \(6, 4\).*shape \(7, 4\)"):
        ewc.EWC.load(path, nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Dropout(), nn.Linear(7, 3)))
    with pytest.raises(ValueError, match="parameters the model lacks"):
        ewc.EWC.load(path, nn.Sequential(nn.Linear(4, 6)))
    with pytest.raises(ValueError, match="trainable parameters the state lacks"):
        ewc.EWC.load(
            path,
            nn.Sequential(
                nn.Linear(4, 6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 3), nn.Linear(3, 3)
            ),
        )
    with pytest.raises(ValueError, match="dtype"):
        ewc.EWC.load(path, make_case("mlp")[0].float())
    with pytest.raises(ValueError, match="saved by 'EWC'"):
        ewc.L2.load(path, make_case("mlp")[0])


def test_load_rejects_corrupted_and_foreign_files(tmp_path):
    model, reg = _trained_ewc()
    path = tmp_path / "s.safetensors"
    reg.save(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ewc.EWC.load(str(tmp_path / "trunc.safetensors"), model)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ewc.EWC.load(str(tmp_path / "junk.safetensors"), model)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no ewc metadata"):
        ewc.EWC.load(str(tmp_path / "foreign.safetensors"), model)
    state = reg.state_dict()
    bad_meta = dict(state["metadata"], format_version=99)
    with pytest.raises(ValueError, match="format_version"):
        reg.load_state_dict({"tensors": state["tensors"], "metadata": bad_meta})
    bad = dict(state["tensors"])
    bad["precision.0.weight"] = bad["precision.0.weight"].clone()
    bad["precision.0.weight"][0, 0] = math.nan
    before = reg.state_dict()
    with pytest.raises(ValueError, match="non-finite"):
        reg.load_state_dict({"tensors": bad, "metadata": state["metadata"]})
    after = reg.state_dict()  # unchanged by the failed load
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    with pytest.raises(FileNotFoundError):
        ewc.EWC.load(str(tmp_path / "missing.safetensors"), model)


def _corrupt(state, *, meta=None, tensors=None):
    return {
        "tensors": {**state["tensors"], **(tensors or {})},
        "metadata": {**state["metadata"], **(meta or {})},
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tensors": {"offset": torch.tensor(math.nan, dtype=torch.float64)}}, "offset is nan"),
        ({"tensors": {"offset": torch.tensor(math.inf, dtype=torch.float64)}}, "offset is inf"),
        ({"tensors": {"offset": torch.tensor(-1.0, dtype=torch.float64)}}, "offset is -1.0"),
        ({"tensors": {"offset": torch.zeros(2)}}, "scalar floating-point 'offset'"),
        ({"meta": {"kind": "bogus"}}, "unknown kind 'bogus'"),
        ({"meta": {"mode": "bogus"}}, "unknown mode 'bogus'"),
        ({"meta": {"lam": -1.0}}, "lam must be >= 0"),
        ({"meta": {"gamma": 2.0}}, "gamma must be in"),
        ({"meta": {"tasks": "three"}}, "'tasks' must be a list"),
        ({"meta": {"tasks": [1, 2, 3]}}, "task record 0 of the state is a int"),
        ({"meta": {"tasks": [{"n_samples": -3, "kind": "sampled"}] * 3}}, "n_samples=-3"),
        ({"meta": {"tasks": [{"n_samples": 12, "kind": 7}] * 3}}, "kind=7"),
        ({"meta": {"tasks": [{"n_samples": 12, "oops": 1}] * 3}}, "unknown fields"),
        ({"meta": {"tasks": [], "num_tasks": 0}}, "'tasks' list is empty"),
        ({"meta": {"num_tasks": 5}}, "num_tasks=5"),
    ],
    ids=[
        "nan-offset",
        "inf-offset",
        "negative-offset",
        "offset-shape",
        "kind",
        "mode",
        "lam",
        "gamma",
        "tasks-not-list",
        "task-not-record",
        "task-n",
        "task-kind",
        "task-field",
        "empty-tasks",
        "num-tasks",
    ],
)
def test_load_state_dict_validates_every_field(change, message):
    model, reg = _trained_ewc()
    state = reg.state_dict()
    before = reg.state_dict()
    with pytest.raises(ValueError, match=message):
        reg.load_state_dict(_corrupt(state, **change))
    after = reg.state_dict()  # unchanged by the failed load
    assert after["metadata"] == before["metadata"]
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    reg.load_state_dict(state)  # the unchanged state still loads


def test_online_state_keeps_no_offset():
    model, reg = _trained_ewc("online")
    state = reg.state_dict()
    with pytest.raises(ValueError, match="mode='online' keeps no offset"):
        reg.load_state_dict(
            _corrupt(state, tensors={"offset": torch.tensor(2.0, dtype=torch.float64)})
        )


# --- Bad input ----------------------------------------------------------------------------
def _unchanged(model):
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    def check():
        assert [m.training for m in model.modules()] == modes
        for k, v in model.state_dict().items():
            assert torch.equal(v, snap[k])

    return check


def test_empty_data():
    model, _, _ = make_case("mlp")
    check = _unchanged(model)
    with pytest.raises(ValueError, match="no samples"):
        ewc.fisher_diagonal(model, [])
    check()


def test_non_finite_output():
    model, x, y = make_case("mlp")
    model.train()
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    check = _unchanged(model)
    with pytest.raises(ValueError, match="non-finite"):
        ewc.fisher_diagonal(model, [(x, y)])
    check()


def test_non_finite_fisher():
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="non-finite"):
        ewc.fisher_diagonal(model, [(x * 1e300, y)], kind="exact")


def test_labels_out_of_range():
    model, x, y = make_case("mlp")
    check = _unchanged(model)
    with pytest.raises(ValueError, match=r"labels out of range.*3 classes"):
        ewc.fisher_diagonal(model, [(x, y + 5)], kind="empirical")
    with pytest.raises(ValueError, match="integer class"):
        ewc.fisher_diagonal(model, [(x, y.double())], kind="empirical")
    check()


@pytest.mark.parametrize("lam", [-1.0, math.nan, math.inf, "1"])
def test_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        ewc.EWC(nn.Linear(2, 2), lam=lam)


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, math.nan])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ewc.EWC(nn.Linear(2, 2), lam=1.0, mode="online", gamma=gamma)


def test_bad_options():
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="kind"):
        ewc.fisher_diagonal(model, [(x, y)], kind="diag")
    with pytest.raises(ValueError, match="likelihood"):
        ewc.fisher_diagonal(model, [(x, y)], likelihood="poisson")
    with pytest.raises(ValueError, match="n_samples"):
        ewc.fisher_diagonal(model, [(x, y)], n_samples=0)
    with pytest.raises(ValueError, match="mode"):
        ewc.EWC(model, 1.0, mode="merged")
    with pytest.raises(ValueError, match="only kind='empirical'"):
        ewc.fisher_diagonal(model, [(x, y)], kind="sampled", likelihood=lambda o, t: o.sum(1))
    with pytest.raises(ValueError, match="per-sample losses"):
        ewc.fisher_diagonal(model, [(x, y)], kind="empirical", likelihood=lambda o, t: o.sum())
    with pytest.raises(ValueError, match="needs \\(inputs, targets\\)"):
        ewc.fisher_diagonal(model, [x], kind="empirical")
    ewc.fisher_diagonal(model, [x], kind="exact")  # targets are not needed for exact


def test_no_trainable_parameters():
    model, x, y = make_case("mlp")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ewc.fisher_diagonal(model, [(x, y)])


def test_precomputed_fisher_with_wrong_keys_or_shapes():
    model, _, _ = make_case("mlp")
    reg = ewc.EWC(model, lam=1.0)
    good = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"missing \['3.bias'\]"):
        reg.consolidate(fisher={k: v for k, v in good.items() if k != "3.bias"})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        reg.consolidate(fisher={**good, "extra": torch.ones(1)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 6\)"):
        reg.consolidate(fisher={**good, "0.weight": torch.ones(4, 6)})
    with pytest.raises(ValueError, match="negative"):
        reg.consolidate(fisher={**good, "0.bias": -torch.ones(6)})
    with pytest.raises(ValueError, match="exactly one"):
        reg.consolidate()
    assert reg.num_tasks == 0 and float(reg.penalty()) == 0.0


def test_batchnorm_with_batch_statistics_is_refused():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    )
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="track_running_stats"):
        ewc.fisher_diagonal(model, [(x, y)])
