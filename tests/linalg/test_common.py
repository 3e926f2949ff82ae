"""Errors, validation and progress bars shared by every covariant.linalg routine."""

from __future__ import annotations

import pytest
import torch

from covariant.errors import NonFiniteError, ShapeMismatchError
from covariant.linalg import cg, hutchinson, lanczos, slq, xtrace

from ._matrices import F64, _mv, _spd


def test_non_finite_operator_raises():
    def bad(v):
        return v * float("nan")

    b = torch.ones(10, dtype=F64)
    with pytest.raises(NonFiniteError):
        cg(bad, b)
    with pytest.raises(NonFiniteError):
        lanczos(bad, 10, 1)
    with pytest.raises(NonFiniteError):
        hutchinson(bad, 10, 3)
    with pytest.raises(NonFiniteError):
        slq(bad, 10, num_probes=2, num_steps=3, fn=torch.square)


def test_validation_errors():
    a = _spd(10)
    with pytest.raises(ShapeMismatchError, match="flat"):
        hutchinson(lambda v: (a @ v)[None], 10, 3)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(_mv(a), 10, 11)
    with pytest.raises(ValueError, match="which"):
        lanczos(_mv(a), 10, 1, which="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution"):
        hutchinson(_mv(a), 10, 3, distribution="uniform")  # type: ignore[arg-type]


def test_progress_bars_do_not_change_results():
    a = _spd(40)
    assert torch.equal(
        lanczos(_mv(a), 40, 2, progress=True).eigenvalues, lanczos(_mv(a), 40, 2).eigenvalues
    )
    assert hutchinson(_mv(a), 40, 5, progress=True).value == hutchinson(_mv(a), 40, 5).value
    assert slq(_mv(a), 40, num_probes=3, progress=True).value == slq(_mv(a), 40, num_probes=3).value
    assert xtrace(_mv(a), 40, 10, progress=True).value == xtrace(_mv(a), 40, 10).value
