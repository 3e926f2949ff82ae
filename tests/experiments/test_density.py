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
