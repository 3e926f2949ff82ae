"""``covariant reproduce density`` in quick mode: files, claims, and resuming from checkpoints."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")

from covariant.experiments import density as exp
from covariant.experiments.density import runner


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("density")
    return out, exp.run(out, quick=True, seed=0, progress=False)


def test_writes_json_and_pngs(quick_run):
    out, result = quick_run
    on_disk = json.loads((out / "density.json").read_text())
    assert set(on_disk["parts"]) == set(exp.PARTS)
    for part in exp.PARTS:
        png = out / f"density_{part}.png"
        assert png.exists() and png.stat().st_size > 5000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "density_parts" / f"{part}.json").exists()
    assert on_disk["summary"] == result["summary"]
    assert not list(out.glob("**/*.tmp"))  # atomic writes leave no temporaries


def test_claims_hold_in_quick_mode(quick_run):
    _, r = quick_run
    a = r["parts"]["lognormal"]
    assert abs(a["classic_mode"] - 0.869358) < 1e-6
    assert abs(a["riemannian_mode"] - 1.648721) < 1e-6
    assert abs(a["exp_x_mode"] - a["riemannian_mode"]) < 1e-7
    for c in r["parts"]["map2d"]["charts"].values():
        assert c["riemannian_shift"] < 1e-8 < 1e-2 < c["classic_shift"]
    mlp = r["parts"]["mlp"]
    assert "SYNTHETIC" in mlp["data"]  # quick mode says what it used
    local = mlp["local_mode_check"]
    assert local["rel_move_riemannian"] < 1e-2 < 0.1 < local["rel_move_classic"]
    ev = r["parts"]["evidence"]["logistic_regression"]
    assert ev["invariant_spread"] < 1e-8 < 1e-4 < ev["classic_spread"]
    assert math.isfinite(ev["exact_log_evidence_quadrature"])
    pr = r["parts"]["prior"]["logistic_regression"]
    assert pr["invariant_lambda_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_resumes_from_checkpoints(quick_run, monkeypatch):
    out, _ = quick_run
    ckpt = out / "density_parts" / "evidence.json"
    saved = json.loads(ckpt.read_text())
    saved["result"]["marker"] = "from checkpoint"
    ckpt.write_text(json.dumps(saved))

    def boom(*args, **kwargs):
        raise AssertionError("a finished part was recomputed")

    for name in ("part_lognormal", "part_map2d", "part_mlp", "part_evidence", "part_prior"):
        monkeypatch.setattr(runner, name, boom)
    again = exp.run(out, quick=True, seed=0, progress=False)
    assert again["parts"]["evidence"]["marker"] == "from checkpoint"
    # another configuration does not reuse them
    with pytest.raises(AssertionError, match="recomputed"):
        exp.run(out, quick=True, seed=1, progress=False)


# --------------------------------------------------------------------------------------------
# issue 10: strict JSON (null plus a flag), and a resumed run equal to an uninterrupted one
# --------------------------------------------------------------------------------------------


def _refuse(name):
    raise AssertionError(f"not strict JSON: {name}")


def _fake_parts():
    """Part results shaped like the real ones, with the non-finite numbers they can hold: the
    −inf evidence where the precision is not positive definite, a NaN test NLL."""
    inf = math.inf
    curve = {"grid": [0.01, 0.1, 1.0], "prior_precision": 1.0, "log_evidence": -480.0}
    return {
        "lognormal": {"classic_mode": 0.87, "riemannian_mode": 1.65, "analytic_classic": 0.87,
                      "analytic_riemannian": 1.65, "log_density": [-inf, -1.5]},
        "map2d": {"charts": {"polar": {"classic_shift": 0.3, "riemannian_shift": 0.0}}},
        "mlp": {"table": [{"method": "map", "test_accuracy": 0.9, "test_nll": math.nan,
                           "rel_distance_to_map_w": 0.0}]},
        "evidence": {"logistic_regression": {"classic_spread": 2.0, "invariant_spread": 0.0}},
        "prior": {"logistic_regression": {
            "charts": {"θ (original)": {
                "classic": {**curve, "log_evidences": [-inf, -500.0, -480.0]},
                "invariant": {**curve, "log_evidences": [-10.0, -2.0, -3.0]}}},
            "classic_lambda_ratio": 4.0, "invariant_lambda_ratio": 1.0}},
    }


@pytest.fixture
def fake_runner(monkeypatch):
    """The runner with instant fake parts; records what each figure was drawn from."""
    drawn, computed, stop = {}, [], {}

    def part(name):
        def compute(*args):
            if stop.get("part") == name:
                raise KeyboardInterrupt  # a kill while this part runs
            computed.append(name)
            return _fake_parts()[name]
        return compute

    def plot(name):
        def draw(result, png):
            if stop.get("plot") == name:
                raise KeyboardInterrupt  # a kill while this figure is drawn
            drawn[name] = result
        return draw

    for name in exp.PARTS:
        monkeypatch.setattr(runner, f"part_{name}", part(name))
        monkeypatch.setattr(runner, f"plot_{name}", plot(name))
    return drawn, computed, stop


def _comparable(result):
    return {k: v for k, v in result.items() if k not in ("timings_s", "files")}


@pytest.mark.parametrize("kill", [{"part": "evidence"}, {"plot": "prior"}])
def test_parts_are_strict_json_and_a_resumed_run_equals_an_uninterrupted_one(
        fake_runner, tmp_path, kill):
    from covariant._io import dumps_json, read_json
    from covariant.experiments.density.prior import evidence_floor

    drawn, computed, stop = fake_runner
    whole = exp.run(tmp_path / "whole", quick=True, seed=0, progress=False)
    drawn_whole = dict(drawn)
    stop.update(kill)
    with pytest.raises(KeyboardInterrupt):
        exp.run(tmp_path / "killed", quick=True, seed=0, progress=False)
    stop.clear()
    computed.clear()
    resumed = exp.run(tmp_path / "killed", quick=True, seed=0, progress=False)
    saved = ["lognormal", "map2d", "mlp"] if "part" in kill else list(exp.PARTS)
    assert computed == [p for p in exp.PARTS if p not in saved]   # the rest came from disk
    # every file is strict JSON, with the −inf / NaN as null plus a flag
    for path in (tmp_path / "killed").glob("**/*.json"):
        json.loads(path.read_text(), parse_constant=_refuse)
    part = json.loads((tmp_path / "killed" / "density_parts" / "prior.json").read_text())
    key = "/result/logistic_regression/charts/θ (original)/classic/log_evidences/0"
    assert part["nonfinite"] == {key: "-inf"}
    final = json.loads((tmp_path / "killed" / "density.json").read_text())
    assert final["nonfinite"]["/parts/mlp/table/0/test_nll"] == "nan"
    assert final["nonfinite"]["/summary/mlp/0/test_nll"] == "nan"
    # the resumed run: the same results, figures drawn from the same numbers (−inf included)
    assert dumps_json(_comparable(resumed)) == dumps_json(_comparable(whole))
    assert dumps_json(_comparable(read_json(tmp_path / "killed" / "density.json"))) == \
        dumps_json(_comparable(whole))
    prior = drawn["prior"]["logistic_regression"]["charts"]
    assert prior["θ (original)"]["classic"]["log_evidences"][0] == -math.inf
    assert drawn["lognormal"]["log_density"] == [-math.inf, -1.5]
    assert evidence_floor(prior) == -483.0
    assert evidence_floor(drawn_whole["prior"]["logistic_regression"]["charts"]) == -483.0
    assert dumps_json(drawn) == dumps_json(drawn_whole)
