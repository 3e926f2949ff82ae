"""The optimization experiment (``covariant reproduce optimization``), in its quick mode."""

from __future__ import annotations

import json

import pytest

from covariant.experiments import optimization as exp
from covariant.experiments.optimization import runner, settings


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimization")
    return out, exp.run(out, quick=True, progress=False)


def test_writes_json_and_figures(quick):
    out, res = quick
    on_disk = json.loads((out / exp.JSON_NAME).read_text())
    assert on_disk["summary"] == res["summary"]
    assert set(on_disk["parts"]) == {"a", "b", "c", "d", "e", "f"}
    assert len(res["figures"]) == 5
    for name in res["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_claims_hold_in_the_quick_run(quick):
    _, res = quick
    s, parts = res["summary"], res["parts"]
    slopes = s["slopes"]["phi"]
    assert abs(slopes["plain_gd"]) < 0.3
    assert 0.8 <= slopes["linear"] <= 1.2
    assert slopes["second_order"] >= 1.8
    assert s["geodesic_max_gap"] < 1e-6
    # (a): the flow is invariant, and geodesic steps land on GD in θ (straight lines there)
    for chart in parts["a"]["charts"].values():
        assert chart["flow_invariance_gap"] < 1e-7
        final = chart["final_distance_to_gd_theta"]
        assert final["riemannian_geodesic"] < 1e-6 < final["plain_gd_psi"]
    # (c): Riemannian GD in (g, v) tracks GD in w far better than plain GD in (g, v), and is
    # first order in the step size
    d = s["network_relative_final_distance"]
    assert d["riemannian_gd_gv_vs_gd_w"] < 0.3 * d["gd_gv_vs_gd_w"]
    assert 1.7 < parts["c"]["riemannian_gd_gv_vs_gd_w_half_lr"]["ratio"] < 2.3
    # (d): NTK ↔ standard parametrization to float64 precision; the same lr is different
    assert s["ntk_max_abs_difference"] < 1e-10
    assert parts["d"]["riemannian_gd_omega_vs_gd_w"]["max_abs"] < 1e-10
    assert parts["d"]["gd_omega_vs_gd_w_same_lr"]["max_abs"] > 1e-3
    # (e): Adam / RMSprop are not invariant even at the smallest step; natural gradient is
    gaps = s["rescaling_relative_gap_smallest_lr"]
    assert gaps["adam"] > 0.1 and gaps["rmsprop"] > 0.1
    assert gaps["natural_gradient_ggn"] < 1e-6
    # (f): per step, the best natural-gradient run ends far below the best SGD run, and the
    # SGD sweep brackets its best learning rate (the comparison is not lost at the sweep's end)
    f, claim = parts["f"], s["ngd_vs_sgd"]
    assert claim["ngd_faster_per_step"] is True
    assert claim["ngd_final_loss"] < 0.5 * claim["sgd_final_loss"]
    assert claim["ngd_final_loss"] < 0.3 * f["initial_loss"]
    sgd_lrs = res["settings"]["f"]["sgd_lrs"]
    assert min(sgd_lrs) < f["best_sgd"]["lr"] < max(sgd_lrs)
    finals = [c[-1] for c in f["curves"]["sgd"].values() if c[-1] is not None]
    assert claim["sgd_final_loss"] == min(finals) == f["best_sgd"]["loss"][-1]
    assert f["best_ngd"]["loss"][-1] < f["initial_loss"]


def test_rerun_skips_finished_parts(quick, monkeypatch):
    out, res = quick
    path = out / exp.JSON_NAME
    saved = json.loads(path.read_text())

    def fail(*args, **kwargs):
        raise AssertionError("a finished part was recomputed")

    for name in ("part_a", "part_b", "part_c", "part_d", "part_e", "part_f"):
        monkeypatch.setattr(runner, name, fail)
    again = exp.run(out, quick=True, progress=False)
    assert again["parts"] == res["parts"]

    # a missing part (an interrupted run) is computed, and only that one
    partial = dict(saved)
    partial["parts"] = {k: v for k, v in saved["parts"].items() if k != "d"}
    path.write_text(json.dumps(partial))
    monkeypatch.setattr(runner, "part_d", lambda *a, **k: {**saved["parts"]["d"], "rerun": True})
    resumed = exp.run(out, quick=True, progress=False)
    assert resumed["parts"]["d"]["rerun"] is True
    assert resumed["parts"]["a"] == saved["parts"]["a"]


def test_other_settings_start_over(tmp_path):
    config = settings.settings(True, 0)
    path = tmp_path / exp.JSON_NAME
    settings.write_results(path, {"settings": config, "parts": {"a": {}}})
    assert settings.load_previous(path, config) is not None
    assert settings.load_previous(path, settings.settings(True, 1)) is None
    assert settings.load_previous(path, settings.settings(False, 0)) is None
    path.write_text("{ truncated")
    assert settings.load_previous(path, config) is None
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_ggn_vs_sgd_figure_gives_each_learning_rate_its_own_colour(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covariant.experiments.optimization import ggn_vs_sgd

    captured = {}
    monkeypatch.setattr(ggn_vs_sgd, "save_png", lambda fig, path, plt: captured.setdefault(
        "fig", fig) and str(path))
    lrs = ["0.01", "0.03", "0.1", "0.3", "1.0", "3.0"]
    f = {"curves": {"sgd": {lr: [2.0, 1.5, 1.0] for lr in lrs},
                    "ngd": {lr: [2.0, 1.0, 0.5] for lr in lrs[:3]}},
         "best_sgd": {"lr": 0.3}, "best_ngd": {"lr": 0.1}, "initial_loss": 2.0}
    ggn_vs_sgd.plot_f(f, tmp_path, plt)
    lines = captured["fig"].axes[0].get_lines()
    sgd = [tuple(ln.get_color()) for ln in lines if ln.get_label().startswith("SGD")]
    assert len(sgd) == 6 and len(set(sgd)) == 6  # before: six lines, one colour
    assert sum("(best)" in ln.get_label() for ln in lines) == 2
    plt.close("all")


def test_results_file_is_strict_json_and_reads_back_nonfinite_losses(tmp_path):
    """A diverged run's NaN / inf loss: null plus a flag on disk, the same float on resume."""
    import math

    config = settings.settings(True, 0)
    path = tmp_path / exp.JSON_NAME
    curves = {"10.0": [2.0, math.inf, math.nan], "0.1": [2.0, 1.5, 1.0]}
    settings.write_results(path, {"settings": config, "parts": {"f": {"curves": curves}}})

    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")

    raw = json.loads(path.read_text(), parse_constant=refuse)
    assert raw["parts"]["f"]["curves"]["10.0"] == [2.0, None, None]
    assert raw["nonfinite"] == {"/parts/f/curves/10.0/1": "inf", "/parts/f/curves/10.0/2": "nan"}
    back = settings.load_previous(path, config)["parts"]["f"]["curves"]
    assert back["10.0"][:2] == [2.0, math.inf] and math.isnan(back["10.0"][2])
    assert back["0.1"] == [2.0, 1.5, 1.0] and "nonfinite" not in settings.load_previous(path,
                                                                                         config)
