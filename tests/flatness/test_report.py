"""covariant.flatness.report and .options: honest result fields, JSON, the options mapping."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import covariant as cv
from covariant.flatness import FlatnessReport, Measure, StochasticOptions, format_value

KEYS = {"name", "value", "stderr", "residual", "num_matvecs", "converged", "method", "info"}


def _loss(p: torch.Tensor) -> torch.Tensor:
    scale = torch.arange(1, p.shape[0] + 1, dtype=p.dtype)
    return 0.5 * (scale * p * p).sum() + 0.1 * (p**4).sum() + torch.sin(p[0] * p[1])


def _problem(metric: str = "curved") -> tuple[cv.ParameterSpace, torch.Tensor]:
    """A 60-dimensional non-quadratic loss; a diagonal point-dependent metric or G = I."""
    space = cv.ParameterSpace(_loss, cv.metrics.Diagonal(lambda q: 1.0 + q**2))
    if metric == "euclidean":
        space = space.with_metric(cv.metrics.Euclidean())
    return space, torch.linspace(-0.6, 0.9, 60, dtype=torch.float64)


# ----------------------------------------------------------------------------- Measure


def test_measure_fields_and_the_extras_alias():
    m = Measure("trace", 2.5, stderr=0.1, num_matvecs=10, method="stochastic",
                info={"estimator": "hutchinson"})
    assert (m.value, m.stderr, m.residual, m.num_matvecs, m.converged) == (2.5, 0.1, None, 10,
                                                                           True)
    assert m.extras is m.info and m.extras["estimator"] == "hutchinson"
    with pytest.raises(AttributeError):
        m.extras = {}  # read-only alias
    assert float(m) == 2.5
    with pytest.raises(TypeError, match="index it"):
        float(Measure("top_eigs", [2.0, 1.0]))


def test_repr_shows_stderr_only_for_monte_carlo_and_residual_for_eigenvalues():
    trace = Measure("trace", 32.1, stderr=0.4, num_matvecs=200, method="stochastic")
    eig = Measure("max_eig", 18.0, residual=3e-12, num_matvecs=40, method="stochastic",
                  converged=False)
    exact = Measure("max_eig", 18.0)
    assert "± 0.4" in repr(trace) and "residual" not in repr(trace)
    assert "(residual 3e-12)" in repr(eig) and "±" not in repr(eig)
    assert "NOT converged" in repr(eig)
    assert repr(exact) == "Measure(max_eig = 18, dense)"
    report = FlatnessReport({"trace": trace, "max_eig": eig}, {"metric": "G"})
    lines = repr(report).splitlines()
    assert lines[0] == "FlatnessReport(G)"
    assert lines[1].split() == ["trace", "32.1", "±", "0.4"]
    assert "±" not in lines[2] and "(residual 3e-12)" in lines[2]


def test_stochastic_measures_fill_the_right_error_field():
    space, p = _problem()
    r = cv.flatness(space, p, measures=("trace", "logdet", "max_eig", "min_eig", "top_eigs",
                                        "spectral_density"),
                    method="stochastic", num_probes=20, k=2)
    for name in ("trace", "logdet"):  # Monte Carlo estimates
        assert r[name].stderr > 0 and r[name].residual is None, name
    for name in ("max_eig", "min_eig", "top_eigs"):  # Lanczos eigenpairs
        assert r[name].stderr is None and 0 <= r[name].residual < 1e-6, name
    residuals = r["max_eig"].info["residuals"]
    assert r["max_eig"].residual == residuals[0] and r["min_eig"].residual == residuals[-1]
    assert r["top_eigs"].residual == max(residuals[:2])
    assert r["spectral_density"].stderr is None and r["spectral_density"].residual is None
    assert "± " not in repr(r["max_eig"]) and "± " in repr(r["trace"])


def test_to_dict_round_trips_through_json():
    space, p = _problem()
    r = cv.flatness(space, p, measures=("trace", "max_eig", "top_eigs"), method="stochastic",
                    num_probes=10, k=2)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert json.loads(r.to_json()) == d
    assert d["info"] == {"method": "stochastic", "metric": repr(space.metric), "dim": 60,
                         "seed": 0, "num_probes": 10}
    for name in ("trace", "max_eig", "top_eigs"):
        assert set(d[name]) == KEYS  # "vectors" are not serialized
        m = r[name]
        for key in KEYS - {"info"}:
            assert d[name][key] == getattr(m, key), (name, key)
    assert d["top_eigs"]["value"] == r["top_eigs"].value and r["top_eigs"].vectors.shape == (60, 2)


def test_to_dict_is_plain_python():
    m = Measure("logdet", -math.inf, info={"grid": torch.tensor([1.0, 2.0]), 3: (1, math.nan)},
                vectors=torch.ones(3, 1))
    d = m.to_dict()
    assert d["value"] == "-inf" and d["info"] == {"grid": [1.0, 2.0], "3": [1, "nan"]}
    assert json.loads(json.dumps(d)) == d
    assert format_value([1.0, 0.5]) == "[1, 0.5]" and format_value(1 / 3, 3) == "0.333"


# ----------------------------------------------------------------------------- options


def test_options_defaults_and_validation():
    opts = StochasticOptions()
    assert (opts.num_probes, opts.seed, opts.progress, opts.trace_method, opts.num_matvecs,
            opts.quadratic_forms, opts.lanczos_steps, opts.lanczos_tol, opts.max_restarts,
            opts.require_convergence, opts.slq_probes, opts.slq_steps, opts.density_grid,
            opts.density_sigma, opts.batch_size, opts.in_chart) == (
        100, 0, False, "hutchinson", None, "auto", None, None, 30, False, None, 40, None,
        None, None, False)
    assert (opts.trace_num_matvecs(), opts.slq_num_probes()) == (100, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="trace_method"):
        StochasticOptions(trace_method="hutch")
    with pytest.raises(ValueError, match="quadratic_forms"):
        StochasticOptions(quadratic_forms="jvp")
    space, p = _problem()
    with pytest.raises(TypeError, match="num_probe"):
        cv.flatness(space, p, measures=("trace",), method="stochastic", num_probe=3)
    with pytest.raises(TypeError, match="StochasticOptions"):
        cv.flatness(space, p, measures=("trace",), method="stochastic", options={"seed": 1})


def test_options_object_and_loose_keywords_give_the_same_report():
    space, p = _problem()
    kw = {"measures": ("trace", "logdet", "max_eig"), "method": "stochastic"}
    loose = cv.flatness(space, p, num_probes=30, seed=2, slq_steps=15, **kw)
    opts = StochasticOptions(num_probes=30, seed=2, slq_steps=15)
    grouped = cv.flatness(space, p, options=opts, **kw)
    assert grouped.to_dict() == loose.to_dict()
    # keywords override the fields of ``options``
    mixed = cv.flatness(space, p, options=dataclasses.replace(opts, seed=7), seed=2, **kw)
    assert mixed.to_dict() == loose.to_dict()


# numbers of the release before StochasticOptions, on _problem(), for num_probes alone:
# (metric, trace_method, num_probes, seed) -> (trace, stderr, num_matvecs)
BEFORE = {
    ("curved", "hutchinson"): (1230.7137935517644, 0.19514795880231953, 37),
    ("curved", "hutchpp"): (1275.4255532644188, 22.3105209921271, 37),
    ("euclidean", "hutchinson"): (1845.8347235375659, 0.2624551147046735, 37),
    ("euclidean", "hutchpp"): (1881.266721439595, 49.45061109041259, 37),
    ("euclidean", "xtrace"): (1856.3189260047611, 39.62668526281493, 36),
}
# metric -> (logdet, stderr, num_matvecs) with num_probes=57, seed=1 (5 SLQ probes)
BEFORE_LOGDET = {"curved": (166.48875778250846, 0.9591909790909772, 200),
                 "euclidean": (189.25461695856865, 0.5005330449033162, 200)}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_num_probes_alone_gives_the_former_trace_and_equals_the_explicit_budget(case):
    metric, method = case
    space, p = _problem(metric)
    kw = {"measures": ("trace",), "method": "stochastic", "seed": 3, "trace_method": method}
    alone = cv.flatness(space, p, num_probes=37, **kw)["trace"]
    value, stderr, matvecs = BEFORE[case]
    assert alone.value == pytest.approx(value, rel=1e-12)
    assert alone.stderr == pytest.approx(stderr, rel=1e-9)
    assert alone.num_matvecs == matvecs
    if method != "hutchinson":  # num_probes only sets the default budget num_matvecs
        explicit = cv.flatness(space, p, num_probes=5, num_matvecs=37, **kw)["trace"]
        assert (explicit.value, explicit.stderr) == (alone.value, alone.stderr)


@pytest.mark.parametrize("metric", sorted(BEFORE_LOGDET))
def test_num_probes_alone_gives_the_former_logdet_and_equals_explicit_slq_probes(metric):
    space, p = _problem(metric)
    kw = {"measures": ("logdet",), "method": "stochastic", "seed": 1}
    alone = cv.flatness(space, p, num_probes=57, **kw)["logdet"]
    value, stderr, matvecs = BEFORE_LOGDET[metric]
    assert alone.value == pytest.approx(value, rel=1e-12)
    assert alone.stderr == pytest.approx(stderr, rel=1e-9)
    assert alone.num_matvecs == matvecs and alone.info["probes"] == 5  # max(4, 57 // 10)
    explicit = cv.flatness(space, p, num_probes=1000, slq_probes=5, **kw)["logdet"]
    assert (explicit.value, explicit.stderr) == (alone.value, alone.stderr)
    assert StochasticOptions(num_probes=20).slq_num_probes() == 4  # never fewer than 4
