"""Part (d): Laplace log evidence in several bijective charts.

Classic (at the MAP of each chart) and invariant (at the Riemannian MAP), for a 2-parameter
Bayesian logistic regression (with the exact evidence by quadrature) and a 25-parameter MLP
regression (exact Hessian and GGN). The invariant evidence is the same in every chart.

Example
-------
>>> space, theta0 = logreg_problem(0)
>>> space.dim, sorted(evidence_charts(2, True, 0))
(2, ['affine (linear)', 'sinh'])
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import density as cvd
from ... import laplace as cvl
from ...reparam import Affine, Compose, Reparametrization, Sinh
from ...space import ParameterSpace
from .common import DT, Cubic, pyplot, save_png, t

__all__ = ["evidence_charts", "logreg_problem", "mlp_problem", "part_evidence", "plot_evidence"]


def logreg_problem(seed: int) -> tuple[ParameterSpace, Tensor]:
    g = torch.Generator().manual_seed(seed + 11)
    X = torch.randn(16, 1, generator=g, dtype=DT)
    logits = 3.0 * X[:, 0] - 0.5
    y = (torch.rand(16, generator=g, dtype=DT) < torch.sigmoid(logits)).long()
    return cvl.posterior_space(_Logistic(), (X, y), prior_precision=1.0)


class _Logistic(nn.Module):
    """Logistic regression as 2-class logits (0, a·x + b): parameters (a, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=DT))
        self.b = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, X: Tensor) -> Tensor:
        z = self.a * X[:, 0] + self.b
        return torch.stack([torch.zeros_like(z), z], -1)


def mlp_problem(seed: int) -> tuple[ParameterSpace, Tensor]:
    g = torch.Generator().manual_seed(seed + 23)
    X = torch.linspace(-2, 2, 200, dtype=DT)[:, None]
    y = torch.sin(1.5 * X) + 0.2 * torch.randn(200, 1, generator=g, dtype=DT)
    torch.manual_seed(seed + 5)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    return cvl.posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.2,
                               prior_precision=1.0)


def evidence_charts(dim: int, quick: bool, seed: int) -> dict[str, Reparametrization]:
    g = torch.Generator().manual_seed(seed + 101)
    A = torch.eye(dim, dtype=DT) + 0.4 * torch.randn(dim, dim, generator=g, dtype=DT) / math.sqrt(
        dim)
    b = 0.2 * torch.randn(dim, generator=g, dtype=DT)
    charts: dict[str, Reparametrization] = {
        "affine (linear)": Affine(A, b),
        "sinh": Sinh(1.5, 1.0, 0.0),
        "cubic": Cubic(1.0),
        "affine∘sinh": Compose(Affine(A, b), Sinh(0.7, 0.8)),
    }
    if quick:
        charts = {k: charts[k] for k in ("affine (linear)", "sinh")}
    return charts


def _quadrature_log_evidence(space: ParameterSpace, center: Tensor, quick: bool) -> float:
    """log ∫ p(D, θ) dθ on a 2-D grid (θ-MAP ± 10 posterior sd per axis, Simpson-free sum)."""
    H = torch.func.hessian(space.loss_function)(center)
    sd = torch.sqrt(torch.diagonal(torch.linalg.inv(H)))
    n = 201 if quick else 601
    a = torch.linspace(-10, 10, n, dtype=DT)
    g0, g1 = center[0] + sd[0] * a, center[1] + sd[1] * a
    T0, T1 = torch.meshgrid(g0, g1, indexing="ij")
    pts = torch.stack([T0.reshape(-1), T1.reshape(-1)], 1)
    vals = -torch.func.vmap(space.loss_function)(pts)
    cell = float((g0[1] - g0[0]) * (g1[1] - g1[0]))
    return float(torch.logsumexp(vals, 0)) + math.log(cell)


def _evidence_rows(space: ParameterSpace, theta0: Tensor, quick: bool, seed: int,
                   with_ggn: bool) -> dict[str, Any]:
    m0 = cvd.map_estimate(space, theta0, riemannian=False)
    theta_map = m0.point
    charts: dict[str, Reparametrization | None] = {
        "θ (original)": None, **evidence_charts(theta0.shape[0], quick, seed)}
    rows = []
    for name, h in charts.items():
        s = space if h is None else space.reparametrize(h)
        psi = theta_map if h is None else h.inverse(theta_map)
        mc = cvd.map_estimate(s, psi, riemannian=False, steps=500)
        mr = cvd.map_estimate(s, psi, riemannian=True, steps=500)
        row = {
            "chart": name,
            "classic": cvl.laplace(s, mc.point, riemannian=False).log_evidence,
            "invariant": cvl.laplace(s, mr.point, riemannian=True).log_evidence,
            "classic_map_shift": float(((h(mc.point) if h else mc.point) - theta_map).norm()),
            "riemannian_map_shift": float(((h(mr.point) if h else mr.point) - theta_map).norm()),
            "converged": mc.converged and mr.converged,
        }
        if with_ggn:
            row["classic_ggn"] = cvl.laplace(s, mc.point, riemannian=False,
                                             hessian="ggn").log_evidence
            row["invariant_ggn"] = cvl.laplace(s, mr.point, riemannian=True,
                                               hessian="ggn").log_evidence
        rows.append(row)
    inv = [r["invariant"] for r in rows]
    cls = [r["classic"] for r in rows]
    return {
        "dim": int(theta0.shape[0]), "rows": rows,
        "invariant_spread": max(inv) - min(inv), "classic_spread": max(cls) - min(cls),
        "theta_map": theta_map.tolist(),
    }


def part_evidence(quick: bool, seed: int) -> dict[str, Any]:
    space, theta0 = logreg_problem(seed)
    out: dict[str, Any] = {"logistic_regression": _evidence_rows(space, theta0, quick, seed,
                                                                  with_ggn=False)}
    tm = t(out["logistic_regression"]["theta_map"])
    out["logistic_regression"]["exact_log_evidence_quadrature"] = _quadrature_log_evidence(
        space, tm, quick)
    out["logistic_regression"]["model"] = (
        "Bayesian logistic regression p(y=1|x) = sigmoid(a x + b), 16 points, prior N(0, I)")
    if not quick:
        mspace, mtheta0 = mlp_problem(seed)
        out["mlp_regression"] = _evidence_rows(mspace, mtheta0, quick, seed, with_ggn=True)
        out["mlp_regression"]["model"] = (
            "1-8-1 tanh MLP regression on y = sin(1.5x) + N(0, 0.2^2), 200 points, prior N(0, I)")
    return out


def plot_evidence(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    models = [k for k in ("logistic_regression", "mlp_regression") if k in r]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.2), squeeze=False)
    for ax, key in zip(axes[0], models, strict=True):
        rows = r[key]["rows"]
        x = range(len(rows))
        ax.plot(x, [row["classic"] for row in rows], "o--", label="classic Laplace (chart MAP)")
        ax.plot(x, [row["invariant"] for row in rows], "s-", label="invariant Laplace (R-MAP)")
        if "exact_log_evidence_quadrature" in r[key]:
            ax.axhline(r[key]["exact_log_evidence_quadrature"], color="k", lw=0.8,
                       label="exact (quadrature)")
        ax.set_xticks(list(x))
        ax.set_xticklabels([row["chart"] for row in rows], rotation=20, fontsize=8)
        ax.set_ylabel("log evidence")
        ax.set_title(f"(d) {key.replace('_', ' ')} (d = {r[key]['dim']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, plt)
