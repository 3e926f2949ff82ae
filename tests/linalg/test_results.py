"""The result convention of covariant.linalg: fields, aliases and to_dict()."""

from __future__ import annotations

import json
import math

import pytest
import torch

from covariant.linalg import (
    CGResult,
    EigResult,
    PinvSolveResult,
    SLQResult,
    TraceEstimate,
    cg,
    hutchinson,
    hutchpp,
    lanczos,
    pinv_solve,
    slq,
    xtrace,
)

from ._matrices import F64, _mv, _spd


def _results():
    a = _spd(30, cond=1e2)
    b = torch.ones(30, dtype=F64)
    return [
        cg(_mv(a), b),
        lanczos(_mv(a), 30, 2),
        lanczos(_mv(a.float()), 30, 2, dtype=torch.float32),
        pinv_solve(_mv(a), b),
        hutchinson(_mv(a), 30, 5),
        hutchinson(_mv(a), 30, 1),  # a single sample: stderr is NaN
        hutchpp(_mv(a), 30, 12),
        xtrace(_mv(a), 30, 40),  # budget >= dim: exact
        slq(_mv(a), 30, num_probes=3, num_steps=8),
    ]


def _same(value, attribute) -> bool:
    if isinstance(attribute, torch.Tensor):
        return value == attribute.tolist()
    if isinstance(attribute, float) and not math.isfinite(attribute):
        return value is None
    if isinstance(attribute, dict):
        return all(_same(value[str(k)], v) for k, v in attribute.items())
    return value == attribute and type(value) is type(attribute)


@pytest.mark.parametrize("res", _results(), ids=lambda r: type(r).__name__)
def test_to_dict_is_plain_json_with_the_attribute_values(res):
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no tensors, no NaN
    assert json.loads(text) == d
    assert set(d) == set(vars(res))
    for name, value in d.items():
        assert _same(value, getattr(res, name)), name
    # the convention's common fields
    assert {"num_matvecs", "converged", "info"} <= set(d)
    assert isinstance(res.converged, bool) and isinstance(res.num_matvecs, int)
    error = "stderr" if isinstance(res, TraceEstimate | SLQResult) else "residual"
    assert error in d


def test_renamed_fields_keep_read_only_aliases():
    a = _spd(20)
    res = cg(_mv(a), torch.ones(20, dtype=F64))
    assert isinstance(res, CGResult) and res.residual_norm == res.residual
    eig = lanczos(_mv(a), 20, 2)
    assert isinstance(eig, EigResult) and eig.residuals is eig.residual
    with pytest.raises(AttributeError):
        res.residual_norm = 0.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        eig.residuals = eig.residual  # type: ignore[misc]


def test_results_keep_positional_construction():
    x = torch.zeros(2, dtype=F64)
    assert CGResult(x, 3, 0.5, True, 4).residual == 0.5
    assert TraceEstimate(1.0, 0.1, 2, x).converged is True
    assert PinvSolveResult(x, 1, 0.0, True, 1, 1).to_dict()["x"] == [0.0, 0.0]
    assert json.dumps(EigResult(x, x[:, None], x, True, 1).to_dict())
