"""The chart protocol: identity, composition and the linearization cache."""

from __future__ import annotations

import torch
from torch.func import jacfwd

from covariant import reparam


def test_compose_chains_products_and_adds_log_dets():
    h = reparam.Compose(reparam.Scale(2.0), reparam.Exp(), reparam.Sinh(0.8, 1.1, 0.2))
    psi = torch.tensor([0.3, -0.8], dtype=torch.float64)
    J = jacfwd(h.forward)(psi)
    assert torch.allclose(h.jacobian(psi), J, atol=1e-14)
    parts = (reparam.Sinh(0.8, 1.1, 0.2).log_abs_det_jacobian(psi)
             + reparam.Exp().log_abs_det_jacobian(reparam.Sinh(0.8, 1.1, 0.2)(psi))
             + 2 * torch.log(torch.tensor(2.0, dtype=torch.float64)))
    assert torch.allclose(h.log_abs_det_jacobian(psi), parts, atol=1e-14)
    assert torch.allclose(h.inverse(h(psi)), psi, atol=1e-14)


def test_identity_is_exact():
    h = reparam.Identity()
    psi = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.equal(h.inverse_vjp(psi, psi), psi)
    assert float(h.log_abs_det_jacobian(psi)) == 0.0


def test_linearization_is_reused_at_the_same_point():
    h = reparam.Exp()
    psi = torch.tensor([0.5, 2.0], dtype=torch.float64)
    lin = h.linearize(psi)
    assert h.linearize(psi) is lin
    assert h.linearize(psi.clone()) is not lin
