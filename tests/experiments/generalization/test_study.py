"""The generalization study end to end on a tiny population: resume after a kill, checkpoints,
the grid's one-at-a-time groups, and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from covariant.experiments import generalization as gen
from covariant.experiments.generalization import population, stages
from covariant.experiments.generalization.settings import AXES, settings, tiny_settings
from covariant.experiments.generalization.statistics import granulated_tau, kendall_tau


def _comparable(res: dict) -> dict:
    """The results without wall times (the one part that differs between two runs)."""
    res = copy.deepcopy(res)
    res.pop("timing")
    return res


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-uninterrupted")
    return out, gen.run(out, config=tiny_settings(), progress=False)


def test_writes_json_and_figures(full_run):
    out, res = full_run
    on_disk = json.loads((out / gen.JSON_NAME).read_text())
    assert on_disk["summary"] == json.loads(json.dumps(res["summary"]))
    assert res["figures"] == list(gen.FIGURES)
    for name in res["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert len(res["models"]) == 4
    # the chart-invariant trace does not move under the reparametrization attack, the
    # classic one does; both move under the symmetries (a different point)
    att = res["attacks"]["mnist1d"]
    assert att["inv_trace"]["reparametrization"]["max_rel_change"] < 1e-8
    assert att["hess_trace"]["reparametrization"]["max_rel_change"] > 10.0
    assert att["inv_trace"]["per_neuron"]["max_rel_change"] > 1e-2
    assert att["ggn_effdim"]["per_neuron"]["max_rel_change"] < 1e-8


def test_killed_and_resumed_run_gives_the_same_json(full_run, tmp_path, monkeypatch):
    _, uninterrupted = full_run
    trained = []
    real_train = population.train_model

    def dies_after_two(*args, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt("killed while training the third model")
        trained.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(population, "train_model", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        gen.run(tmp_path, config=tiny_settings(), progress=False)
    assert len(list((tmp_path / "models").glob("*.json"))) == 2
    monkeypatch.setattr(population, "train_model", real_train)

    measured = []
    real_attacks = stages.attack_values

    def dies_in_the_attacks(*args, **kwargs):
        if len(measured) == 1:
            raise KeyboardInterrupt("killed while attacking the second model")
        measured.append(1)
        return real_attacks(*args, **kwargs)

    monkeypatch.setattr(gen.runner, "attack_values", dies_in_the_attacks)
    with pytest.raises(KeyboardInterrupt):
        gen.run(tmp_path, config=tiny_settings(), progress=False)
    assert len(list((tmp_path / "models").glob("*.json"))) == 4
    # one file per attack kind of the one model whose attacks finished
    kinds = tiny_settings()["attacks"]["kinds"]
    assert len(list((tmp_path / "attacks").glob("*.json"))) == len(kinds)
    monkeypatch.setattr(gen.runner, "attack_values", real_attacks)

    calls = []
    monkeypatch.setattr(population, "train_model",
                        lambda *a, **k: calls.append(1) or real_train(*a, **k))
    resumed = gen.run(tmp_path, config=tiny_settings(), progress=False)
    assert calls == [], "finished models were trained again"
    assert _comparable(resumed) == _comparable(uninterrupted)
    assert json.loads((tmp_path / gen.JSON_NAME).read_text())["models"] == json.loads(
        json.dumps(uninterrupted["models"]))


def test_checkpoints_reload_weights_only_and_reproduce_the_accuracies(full_run):
    out, res = full_run
    cfg = tiny_settings()
    data = population.load_data("mnist1d", cfg["data"])
    for rec in res["models"]:
        raw = torch.load(out / "models" / f"{rec['id']}.pt", weights_only=True)
        assert raw["metadata"]["hyperparameters"] == rec["hyperparameters"]
        model = population.load_model(out, {"files": {"checkpoint": f"{rec['id']}.pt"}})
        assert population.evaluate(model, data.X_train, data.y_train) == (
            rec["train_acc"], rec["train_loss"])
        assert population.evaluate(model, data.X_test, data.y_test) == (
            rec["test_acc"], rec["test_loss"])
        assert rec["gap"] == rec["train_acc"] - rec["test_acc"]
        init = population.load_model(out, {"files": {"init": f"{rec['id']}.init.pt"}}, "init")
        fresh = population.build_model(rec["hyperparameters"], 40, 10)
        assert fresh[0].weight.dtype == torch.float32
        for a, b in zip(init.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a, b)
        adam = (out / "models" / f"{rec['id']}.adam.pt")
        assert adam.exists() == (rec["hyperparameters"]["optimizer"] == "adam")
        if adam.exists():
            state = torch.load(adam, weights_only=True)["state"]
            assert len(state) == len(list(model.parameters()))
            assert all(bool((s["exp_avg_sq"] > 0).any()) for s in state.values())


@pytest.mark.parametrize("quick", [True, False])
def test_one_at_a_time_lines_are_granulated_tau_groups(quick):
    cfg = settings(quick, 0)
    hps = population.grid(cfg["blocks"])
    ids = [population.model_id(h) for h in hps]
    assert len(set(ids)) == len(ids)
    for block in cfg["blocks"]:
        base = {"task": block["task"], **block["base"]}
        for axis, values in block["one_at_a_time"].items():
            line = [i for i, h in enumerate(hps)
                    if all(h[a] == base[a] for a in ("task", *AXES) if a != axis)
                    and (h[axis] == base[axis] or h[axis] in values)]
            assert sorted({repr(hps[i][axis]) for i in line}) == sorted(
                {repr(v) for v in [base[axis], *values]})
            assert line in population.axis_groups(hps, axis, AXES)
    varied = [a for a in AXES if population.axis_groups(hps, a, AXES)]
    assert len(varied) >= 5 if quick else varied == list(AXES)
    # ψ_axis of statistics.granulated_tau is the mean τ over exactly these groups
    one_task = [h for h in hps if h["task"] == cfg["blocks"][0]["task"]]
    gen_ = torch.Generator().manual_seed(1)
    m = torch.rand(len(one_task), generator=gen_, dtype=torch.float64).tolist()
    g = torch.rand(len(one_task), generator=gen_, dtype=torch.float64).tolist()
    psi = granulated_tau(m, g, one_task, AXES)
    for axis in AXES:
        groups = population.axis_groups(one_task, axis, AXES)
        taus = [kendall_tau([m[i] for i in grp], [g[i] for i in grp]) for grp in groups]
        taus = [t for t in taus if math.isfinite(t)]
        if taus:
            assert psi[axis] == pytest.approx(sum(taus) / len(taus), abs=1e-15)
        else:
            assert math.isnan(psi[axis])


def test_quick_population_size_and_optimizers():
    hps = population.grid(settings(True, 0)["blocks"])
    assert 14 <= len(hps) <= 18
    opts = {h["optimizer"] for h in hps}
    assert opts == {"sgd", "momentum", "adam"}
    assert len(population.grid(settings(False, 0)["blocks"])) >= 80


def test_cli_prints_the_table(full_run, capsys, monkeypatch):
    from covariant.cli.main import main

    out, res = full_run
    monkeypatch.setattr(gen, "run", lambda *a, **k: res)
    assert main(["reproduce", "generalization", "--out", str(out), "--quick", "--json",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"]["table"]["inv_trace"]["tau"] == \
        res["summary"]["table"]["inv_trace"]["tau"]
    assert "inv_trace" in captured.err and "Psi" in captured.err and "PGDL" in captured.err


def test_sigkilled_subprocess_resumes_to_the_same_json(full_run, tmp_path):
    """A real kill (SIGKILL, no clean-up) at an arbitrary point after the first model."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, uninterrupted = full_run
    code = ("import sys; from covariant.experiments.generalization import run; "
            "from covariant.experiments.generalization.settings import tiny_settings; "
            "run(sys.argv[1], config=tiny_settings(), progress=False)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "models").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / gen.JSON_NAME).exists()
    resumed = gen.run(tmp_path, config=tiny_settings(), progress=False)
    assert _comparable(resumed) == _comparable(uninterrupted)
