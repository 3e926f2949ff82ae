r"""Experiment: which optimizers are invariant under reparametrization, and to what order
(MATH.md §6; ``covariant reproduce optimization``).

Parts, each saved to ``optimization.json`` as soon as it is done (a rerun with the same
settings skips finished parts), with figures drawn from the JSON:

(a) **Trajectories** on the 2-D loss of MATH.md §8 under two nonlinear charts (h = φ⁻¹ of
    MATH.md §8, and polar coordinates), every run mapped back to θ over the loss contours:
    GD in θ, plain GD in ψ, Riemannian GD in ψ (linear, second-order, geodesic) and the
    gradient flow. → ``optimization_trajectories.png``
(b) **Order of invariance.** Distance at a fixed horizon T between the ψ-run (mapped to θ)
    and the θ-run, against the step size α, with fitted log-log slopes: plain GD in ψ ≈ 0,
    linear ≈ 1, second-order ≈ 2, geodesic exact up to the ODE tolerance.
    → ``optimization_order.png``
(c) **A network.** An MLP on MNIST-1D, full batch: GD in w; GD in the weight-norm chart
    (g, v) (``torch.nn.utils.parametrizations.weight_norm``); Riemannian GD in (g, v) with the
    pulled-back metric; natural gradient (GGN) in both charts. Loss curves, and the distance
    between trajectories mapped to w. → ``optimization_network.png``
(d) **NTK vs standard parametrization.** W = (σ/√n) Ω is linear, so GD on Ω *is* GD on W with
    per-layer learning rate α σ²/n: equal to float64 precision.
(e) **Adam / RMSprop.** Under a per-layer rescaling W_l = c_l Ω_l their trajectories differ
    even as α → 0 (at a fixed horizon), while natural gradient's do not.
    (d) and (e) → ``optimization_ntk_adam.png``
(f) **Natural gradient vs SGD per step**: the best final loss of RiemannianGD("ggn") and of
    SGD over learning-rate sweeps on a small MLP. → ``optimization_ggn_vs_sgd.png``

Example
-------
>>> from covariant.experiments.optimization import run
>>> res = run("/tmp/covariant-optimization", quick=True, progress=False)  # doctest: +SKIP
>>> res["parts"]["b"]["phi"]["linear"]["slope"]                              # doctest: +SKIP
1.08...
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import metrics as _metrics
from .._progress import progress_bar
from ..errors import require
from ..optim import (
    RiemannianGD,
    gradient_flow,
    map_trajectory,
    riemannian_gd,
    step_size_sweep,
)
from ..reparam import Polar, Reparametrization
from ..space import ParameterSpace

__all__ = ["FIGURES", "JSON_NAME", "PolarChart", "ReferenceChart", "reference_loss", "run"]

#: File name of the results, under ``out_dir``.
JSON_NAME = "optimization.json"
#: The figures, under ``out_dir`` (redrawn when a part is recomputed or a figure is missing).
FIGURES = (
    "optimization_trajectories.png",
    "optimization_order.png",
    "optimization_network.png",
    "optimization_ntk_adam.png",
    "optimization_ggn_vs_sgd.png",
)
_VERSION = 1
_DT = torch.float64


# ============================================================================================
# The 2-D problem of MATH.md §8
# ============================================================================================


def reference_loss(p: Tensor) -> Tensor:
    """L(x, y) = (x² + 2y² − 1)² + 0.3 sin 2x + 0.1 xy (MATH.md §8)."""
    x, y = p[0], p[1]
    return (x**2 + 2 * y**2 - 1) ** 2 + 0.3 * torch.sin(2 * x) + 0.1 * x * y


class ReferenceChart(Reparametrization):
    r"""h = φ⁻¹ with φ(x, y) = (x + 0.2x³, y + 0.5 sin x), the chart of MATH.md §8, in closed
    form.

    The cubic x + 0.2x³ = u has one real root (Cardano): with
    a = (2.5u + √(6.25u² + 125/27))^{1/3}, x = a − 5/(3a). Then θ = (x, ψ₂ − 0.5 sin x), and
    J = ∂θ/∂ψ = [[1/k, 0], [−c/k, 1]] with k = 1 + 0.6x², c = 0.5 cos x. The Jacobian
    products are closed forms (the geodesic solver calls them many times).

    Example
    -------
    >>> import torch
    >>> h = ReferenceChart()
    >>> theta = torch.tensor([0.7, -0.4], dtype=torch.float64)
    >>> bool(torch.allclose(h(h.inverse(theta)), theta, atol=1e-14))
    True
    """

    @staticmethod
    def _x(u: Tensor) -> Tensor:
        a = (2.5 * u + torch.sqrt(6.25 * u * u + 125.0 / 27.0)).pow(1.0 / 3.0)
        return a - (5.0 / 3.0) * a.reciprocal()

    def _check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != 2:
            raise ValueError(f"ReferenceChart: needs 2 coordinates, got {psi.shape[0]}")

    def forward(self, psi: Tensor) -> Tensor:
        x = self._x(psi[0])
        return torch.stack([x, psi[1] - 0.5 * torch.sin(x)])

    def _inverse(self, theta: Tensor) -> Tensor:
        x, y = theta[0], theta[1]
        return torch.stack([x + 0.2 * x**3, y + 0.5 * torch.sin(x)])

    def _parts(self, psi: Tensor) -> tuple[Tensor, Tensor]:
        x = self._x(psi[0])
        return 1.0 + 0.6 * x * x, 0.5 * torch.cos(x)

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        k, c = self._parts(psi)
        a = v[0] * k.reciprocal()
        return torch.stack([a, v[1] - c * a])

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        k, c = self._parts(psi)
        return torch.stack([(w[0] - c * w[1]) * k.reciprocal(), w[1]])

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        k, c = self._parts(psi)
        return torch.stack([u[0] * k, u[1] + c * u[0]])

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        k, c = self._parts(psi)
        return torch.stack([z[0] * k + c * z[1], z[1]])

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return -torch.log(self._parts(psi)[0])

    def __repr__(self) -> str:
        return "ReferenceChart()"


class PolarChart(Polar):
    """Polar coordinates (r, φ) ↦ (r cos φ, r sin φ) with closed-form Jacobian products.

    Example
    -------
    >>> import torch
    >>> h = PolarChart()
    >>> psi = torch.tensor([2.0, 0.3], dtype=torch.float64)
    >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> bool(torch.allclose(h.jvp(psi, v), torch.func.jacfwd(h.forward)(psi) @ v))
    True
    """

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        return torch.stack([c * v[0] - r * s * v[1], s * v[0] + r * c * v[1]])

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        return torch.stack([c * w[0] + s * w[1], r * (c * w[1] - s * w[0])])

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        return torch.stack([c * u[0] + s * u[1], (c * u[1] - s * u[0]) * r.reciprocal()])

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        ir = r.reciprocal()
        return torch.stack([c * z[0] - s * z[1] * ir, s * z[0] + c * z[1] * ir])

    def __repr__(self) -> str:
        return "PolarChart()"


def _charts() -> dict[str, Reparametrization]:
    return {"phi": ReferenceChart(), "polar": PolarChart()}


# ============================================================================================
# Settings, JSON and checkpoints
# ============================================================================================


def _settings(quick: bool, seed: int) -> dict[str, Any]:
    if quick:
        return {
            "version": _VERSION, "quick": True, "seed": seed,
            "a": {"theta0": [1.1, 0.55], "lr": 0.1, "steps": 2},
            "b": {"theta0": {"phi": [0.7, -0.4]}, "horizon": 0.2,
                  "lrs": [0.04, 0.02, 0.01], "geodesic_lrs": [0.1]},
            "c": {"num_samples": 240, "hidden": [16], "gd_lr": 0.2, "gd_steps": 20,
                  "ngd_lr": 0.2, "ngd_steps": 3, "damping": 1e-2, "half_lr_ngd": False},
            "d": {"num_samples": 240, "hidden": [16, 16], "sigma": 1.0, "lr": 0.1, "steps": 10},
            "e": {"num_samples": 240, "hidden": [16], "scales": [10.0, 0.1],
                  "adam_horizon": 0.02, "adam_lrs": [4e-3, 1e-3],
                  "sgd_horizon": 0.4, "sgd_lrs": [0.1, 0.025],
                  "ngd_horizon": 0.2, "ngd_lrs": [0.1], "damping": 1e-2},
            "f": {"num_samples": 240, "hidden": [16], "steps": 8,
                  "sgd_lrs": [0.3, 1.0, 3.0, 10.0], "ngd_lrs": [0.3, 1.0], "damping": 1e-2},
        }
    return {
        "version": _VERSION, "quick": False, "seed": seed,
        "a": {"theta0": [1.1, 0.55], "lr": 0.05, "steps": 20},
        "b": {"theta0": {"phi": [0.7, -0.4], "polar": [0.7, -0.4]}, "horizon": 0.4,
              "lrs": [0.04, 0.02, 0.01, 0.005, 0.0025], "geodesic_lrs": [0.04, 0.02]},
        "c": {"num_samples": 1000, "hidden": [32], "gd_lr": 0.2, "gd_steps": 150,
              "ngd_lr": 0.2, "ngd_steps": 15, "damping": 1e-2, "half_lr_ngd": True},
        "d": {"num_samples": 500, "hidden": [32, 32], "sigma": 1.0, "lr": 0.1, "steps": 30},
        "e": {"num_samples": 500, "hidden": [32], "scales": [10.0, 0.1],
              "adam_horizon": 0.02, "adam_lrs": [4e-3, 2e-3, 1e-3, 5e-4],
              "sgd_horizon": 0.4, "sgd_lrs": [0.1, 0.05, 0.025, 0.0125],
              "ngd_horizon": 0.4, "ngd_lrs": [0.1, 0.05, 0.025], "damping": 1e-2},
        "f": {"num_samples": 1000, "hidden": [32], "steps": 25,
              "sgd_lrs": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "ngd_lrs": [0.1, 0.3, 1.0],
              "damping": 1e-2},
    }


def _clean(x: Any) -> Any:
    """JSON-safe copy: tensors and arrays to lists, NaN/Inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, Tensor):
        return _clean(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        return _clean(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON atomically: a temporary file in the same folder, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=1, allow_nan=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_previous(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("settings") != _clean(settings):
        return None
    return old


# ============================================================================================
# (a) trajectories and (b) the order of invariance
# ============================================================================================


def _part_a(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    theta_space = ParameterSpace(reference_loss)
    theta0 = torch.tensor(cfg["theta0"], dtype=_DT)
    lr, steps = cfg["lr"], cfg["steps"]
    horizon = lr * steps
    gd_theta = riemannian_gd(theta_space, theta0, lr, steps)
    t_flow = np.linspace(0.0, horizon, 41)
    flow = gradient_flow(theta_space, theta0, t_flow)
    out: dict[str, Any] = {"theta0": cfg["theta0"], "lr": lr, "steps": steps,
                           "horizon": horizon, "charts": {}}
    for name, h in progress_bar(_charts().items(), enabled=progress, desc="(a) charts"):
        psi_space = theta_space.reparametrize(h)
        psi0 = h.inverse(theta0)
        runs = {
            "gd_theta": gd_theta,
            "plain_gd_psi": map_trajectory(
                riemannian_gd(psi_space.with_metric(_metrics.Euclidean()), psi0, lr, steps), h
            ),
        }
        for update in ("linear", "second_order", "geodesic"):
            runs[f"riemannian_{update}"] = map_trajectory(
                riemannian_gd(psi_space, psi0, lr, steps, update), h
            )
        flow_psi = map_trajectory(gradient_flow(psi_space, psi0, t_flow), h)
        runs["flow_theta"] = flow
        runs["flow_psi"] = flow_psi
        final = {k: float(torch.linalg.vector_norm(v[-1] - gd_theta[-1])) for k, v in runs.items()}
        largest = {  # the discrete runs, step by step against GD in θ
            k: float(torch.linalg.vector_norm(v - gd_theta, dim=1).max())
            for k, v in runs.items() if not k.startswith("flow")
        }
        out["charts"][name] = {
            "trajectories": {k: v.tolist() for k, v in runs.items()},
            "final_distance_to_gd_theta": final,
            "max_distance_to_gd_theta": largest,
            "flow_invariance_gap": float((flow_psi - flow).abs().max()),
        }
    return out


def _part_b(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    theta_space = ParameterSpace(reference_loss)
    charts = _charts()
    out: dict[str, Any] = {"horizon": cfg["horizon"]}
    for name, theta0 in cfg["theta0"].items():
        h = charts[name]
        psi_space = theta_space.reparametrize(h)
        psi0 = h.inverse(torch.tensor(theta0, dtype=_DT))
        res: dict[str, Any] = {"theta0": theta0}
        runs = [
            ("plain_gd", psi_space.with_metric(_metrics.Euclidean()), "linear", cfg["lrs"]),
            ("linear", psi_space, "linear", cfg["lrs"]),
            ("second_order", psi_space, "second_order", cfg["lrs"]),
            ("geodesic", psi_space, "geodesic", cfg["geodesic_lrs"]),
        ]
        for key, space, update, lrs in progress_bar(runs, enabled=progress, desc=f"(b) {name}"):
            t0 = time.perf_counter()
            sweep = step_size_sweep(space, psi0, lrs, cfg["horizon"], update=update)
            res[key] = {**sweep.to_dict(), "seconds": time.perf_counter() - t0}
        geo = res["geodesic"]
        geo["max_discrepancy"] = max(geo["discrepancies"])
        geo["slope"] = geo["intercept"] = None  # a fit through round-off means nothing
        out[name] = res
    return out


# ============================================================================================
# Networks: helpers
# ============================================================================================


def _dataset(num_samples: int, seed: int, cache: Path | None) -> tuple[Tensor, ...]:
    from ..zoo.data import load_mnist1d

    ds = load_mnist1d(num_samples, seed=42 + seed, dtype=_DT, cache_dir=cache)
    return ds.X_train, ds.y_train, ds.X_test, ds.y_test


def _mlp(hidden: list[int], seed: int) -> nn.Sequential:
    from ..zoo.architectures import MLP

    torch.manual_seed(seed)
    return MLP(40, 10, hidden=tuple(hidden), activation="tanh").to(_DT)


def _weights(model: nn.Module, names: list[str]) -> Tensor:
    """The effective tensors (parametrized weights included), flat, in the order ``names``."""
    parts = []
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        parts.append(getattr(model.get_submodule(mod_name), attr).detach().reshape(-1))
    return torch.cat(parts)


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: Tensor,
    y: Tensor,
    steps: int,
    names: list[str],
    *,
    progress: bool = False,
    desc: str = "",
) -> dict[str, Any]:
    """Full-batch training; returns the loss after every step and the w-trajectory."""
    loss_fn = nn.CrossEntropyLoss()
    traj = [_weights(model, names)]
    losses = []
    with torch.no_grad():
        losses.append(float(loss_fn(model(X), y)))
    for _ in progress_bar(range(steps), enabled=progress, desc=desc):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        traj.append(_weights(model, names))
        with torch.no_grad():
            losses.append(float(loss_fn(model(X), y)))
    return {"loss": losses, "traj": torch.stack(traj)}


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(-1) == y).to(_DT).mean())


def _weight_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _with_weight_norm(model: nn.Module) -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    new = copy.deepcopy(model)
    for module in new.modules():
        if isinstance(module, nn.Linear):
            weight_norm(module, dim=0)
    return new


class _Scale(nn.Module):
    """W = s · Ω as a ``torch.nn.utils.parametrize`` parametrization."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = float(s)

    def forward(self, omega: Tensor) -> Tensor:
        return self.s * omega

    def right_inverse(self, w: Tensor) -> Tensor:
        return w / self.s


def _with_scales(model: nn.Module, scales: list[float]) -> nn.Module:
    from torch.nn.utils import parametrize

    new = copy.deepcopy(model)
    linears = [m for m in new.modules() if isinstance(m, nn.Linear)]
    for module, s in zip(linears, scales, strict=True):
        parametrize.register_parametrization(module, "weight", _Scale(s))
    return new


def _dist_curve(a: Tensor, b: Tensor) -> list[float]:
    return torch.linalg.vector_norm(a - b, dim=1).tolist()


# ============================================================================================
# (c) an MLP on MNIST-1D in two charts
# ============================================================================================


def _part_c(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    X, y, Xt, yt = _dataset(cfg["num_samples"], seed, cache)
    base = _mlp(cfg["hidden"], seed)
    names = _weight_names(base)
    loss_fn = nn.CrossEntropyLoss()
    gd_lr, gd_steps = cfg["gd_lr"], cfg["gd_steps"]
    ngd_lr, ngd_steps, lam = cfg["ngd_lr"], cfg["ngd_steps"], cfg["damping"]

    def ngd(model: nn.Module, lr: float = ngd_lr) -> RiemannianGD:
        return RiemannianGD(
            model.parameters(), lr, "ggn", model=model, loss_fn=loss_fn, data=(X, y),
            damping=lam, cg_tol=1e-8, cg_maxiter=1000,
        )

    specs: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any], int]] = [
        ("gd_w", lambda: copy.deepcopy(base),
         lambda m: torch.optim.SGD(m.parameters(), gd_lr), gd_steps),
        ("gd_gv", lambda: _with_weight_norm(base),
         lambda m: torch.optim.SGD(m.parameters(), gd_lr), gd_steps),
        ("riemannian_gd_gv", lambda: _with_weight_norm(base),
         lambda m: RiemannianGD(m.parameters(), gd_lr, "weights", model=m, cg_tol=1e-12,
                                cg_maxiter=500), gd_steps),
        ("ngd_w", lambda: copy.deepcopy(base), ngd, ngd_steps),
        ("ngd_gv", lambda: _with_weight_norm(base), ngd, ngd_steps),
    ]
    runs: dict[str, Any] = {}
    for key, make_model, make_opt, steps in specs:
        model = make_model()
        t0 = time.perf_counter()
        runs[key] = _train(model, make_opt(model), X, y, steps, names,
                           progress=progress, desc=f"(c) {key}")
        runs[key]["seconds"] = time.perf_counter() - t0
        runs[key]["test_accuracy"] = _accuracy(model, Xt, yt)

    def compare(a: str, b: str) -> dict[str, Any]:
        ta, tb = runs[a]["traj"], runs[b]["traj"]
        curve = _dist_curve(ta, tb)
        moved = torch.linalg.vector_norm(tb - tb[0], dim=1)
        relative = [d / float(m) if m > 0 else 0.0 for d, m in zip(curve, moved, strict=True)]
        travel = float(moved[-1])
        return {"distance": curve, "relative": relative, "final": curve[-1], "travel": travel,
                "relative_final": curve[-1] / travel}

    # first order in α: Riemannian GD in (g, v) at half the step, twice the steps
    half: dict[str, Any] = {}
    for key, make_model, make_opt_half in [
        ("gd_w", lambda: copy.deepcopy(base),
         lambda m: torch.optim.SGD(m.parameters(), gd_lr / 2)),
        ("riemannian_gd_gv", lambda: _with_weight_norm(base),
         lambda m: RiemannianGD(m.parameters(), gd_lr / 2, "weights", model=m, cg_tol=1e-12,
                                cg_maxiter=500)),
    ]:
        model = make_model()
        half[key] = _train(model, make_opt_half(model), X, y, 2 * gd_steps, names)
    half_gap = float(torch.linalg.vector_norm(
        half["gd_w"]["traj"][-1] - half["riemannian_gd_gv"]["traj"][-1]
    ))
    ngd_half: dict[str, Any] | None = None
    if cfg["half_lr_ngd"]:
        finals = []
        for make_model in (lambda: copy.deepcopy(base), lambda: _with_weight_norm(base)):
            model = make_model()
            opt = ngd(model, ngd_lr / 2)
            finals.append(_train(model, opt, X, y, 2 * ngd_steps, names)["traj"][-1])
        ngd_half = {"lr": ngd_lr / 2, "steps": 2 * ngd_steps,
                    "final": float(torch.linalg.vector_norm(finals[0] - finals[1]))}
    out: dict[str, Any] = {
        "num_parameters_w": len(runs["gd_w"]["traj"][0]),
        "runs": {
            k: {"loss": v["loss"], "final_loss": v["loss"][-1],
                "test_accuracy": v["test_accuracy"], "seconds": v["seconds"]}
            for k, v in runs.items()
        },
        "distances": {
            "gd_gv_vs_gd_w": compare("gd_gv", "gd_w"),
            "riemannian_gd_gv_vs_gd_w": compare("riemannian_gd_gv", "gd_w"),
            "ngd_gv_vs_ngd_w": compare("ngd_gv", "ngd_w"),
        },
        "riemannian_gd_gv_vs_gd_w_half_lr": {
            "lr": gd_lr / 2, "steps": 2 * gd_steps, "final": half_gap,
        },
    }
    full = out["distances"]["riemannian_gd_gv_vs_gd_w"]["final"]
    out["riemannian_gd_gv_vs_gd_w_half_lr"]["ratio"] = full / half_gap if half_gap else None
    if ngd_half is not None:
        ngd_half["ratio"] = out["distances"]["ngd_gv_vs_ngd_w"]["final"] / ngd_half["final"]
        out["ngd_gv_vs_ngd_w_half_lr"] = ngd_half
    return out


# ============================================================================================
# (d) NTK vs standard parametrization
# ============================================================================================


def _part_d(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    X, y, _, _ = _dataset(cfg["num_samples"], seed, cache)
    sigma, lr, steps = cfg["sigma"], cfg["lr"], cfg["steps"]
    standard = _mlp(cfg["hidden"], seed)
    with torch.no_grad():  # an NTK-style initialization: W = (σ/√n) Ω with Ω ~ N(0, 1)
        for m in standard.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_().mul_(sigma / math.sqrt(m.in_features))
    names = _weight_names(standard)
    linears = [m for m in standard.modules() if isinstance(m, nn.Linear)]
    scales = [sigma / math.sqrt(m.in_features) for m in linears]
    fan_in = [m.in_features for m in linears]

    # GD on Ω with lr α (the NTK model: W = s Ω registered with parametrize)
    ntk = _with_scales(standard, scales)
    run_ntk = _train(ntk, torch.optim.SGD(ntk.parameters(), lr), X, y, steps, names)
    # GD on W with per-layer lr α σ²/n for the weights (biases are not rescaled: lr α)
    std = copy.deepcopy(standard)
    groups = []
    for m, n in zip([m for m in std.modules() if isinstance(m, nn.Linear)], fan_in, strict=True):
        groups.append({"params": [m.weight], "lr": lr * sigma**2 / n})
        groups.append({"params": [m.bias], "lr": lr})
    run_std = _train(std, torch.optim.SGD(groups, lr), X, y, steps, names)
    # Riemannian GD on Ω with the pulled-back metric = plain GD on W with lr α
    ntk2 = _with_scales(standard, scales)
    run_rgd = _train(
        ntk2, RiemannianGD(ntk2.parameters(), lr, "weights", model=ntk2, cg_tol=1e-14),
        X, y, steps, names,
    )
    std2 = copy.deepcopy(standard)
    run_gd = _train(std2, torch.optim.SGD(std2.parameters(), lr), X, y, steps, names)

    def gap(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        diff = (a["traj"] - b["traj"]).abs().amax(dim=1)
        scale = float(b["traj"].abs().max())
        return {"max_abs_per_step": diff.tolist(), "max_abs": float(diff.max()),
                "max_rel": float(diff.max()) / scale}

    return {
        "sigma": sigma, "lr": lr, "steps": steps, "fan_in": fan_in,
        "per_layer_lr": [lr * sigma**2 / n for n in fan_in],
        "gd_omega_vs_gd_w_per_layer_lr": gap(run_ntk, run_std),
        "riemannian_gd_omega_vs_gd_w": gap(run_rgd, run_gd),
        "gd_omega_vs_gd_w_same_lr": gap(run_ntk, run_gd),
        "loss_gd_omega": run_ntk["loss"],
        "loss_gd_w_same_lr": run_gd["loss"],
    }


# ============================================================================================
# (e) Adam and RMSprop under per-layer rescaling
# ============================================================================================


def _part_e(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    X, y, _, _ = _dataset(cfg["num_samples"], seed, cache)
    base = _mlp(cfg["hidden"], seed)
    names = _weight_names(base)
    scales = cfg["scales"]
    loss_fn = nn.CrossEntropyLoss()
    makers: dict[str, tuple[Callable[[nn.Module, float], Any], float, list[float]]] = {
        "adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr),
                 cfg["adam_horizon"], cfg["adam_lrs"]),
        "rmsprop": (lambda m, lr: torch.optim.RMSprop(m.parameters(), lr),
                    cfg["adam_horizon"], cfg["adam_lrs"]),
        "sgd": (lambda m, lr: torch.optim.SGD(m.parameters(), lr),
                cfg["sgd_horizon"], cfg["sgd_lrs"]),
        "natural_gradient_ggn": (
            lambda m, lr: RiemannianGD(
                m.parameters(), lr, "ggn", model=m, loss_fn=loss_fn, data=(X, y),
                damping=cfg["damping"], cg_tol=1e-10, cg_maxiter=500,
            ),
            cfg["ngd_horizon"], cfg["ngd_lrs"],
        ),
    }
    out: dict[str, Any] = {"scales": scales, "optimizers": {}}
    for key, (make, horizon, lrs) in progress_bar(makers.items(), enabled=progress,
                                                  desc="(e) optimizers"):
        rows = []
        for lr in lrs:
            steps = round(horizon / lr)
            m_w = copy.deepcopy(base)
            a = _train(m_w, make(m_w, lr), X, y, steps, names)["traj"]
            m_o = _with_scales(base, scales)
            b = _train(m_o, make(m_o, lr), X, y, steps, names)["traj"]
            gap = float(torch.linalg.vector_norm(a[-1] - b[-1]))
            travel = float(torch.linalg.vector_norm(a[-1] - a[0]))
            rows.append({"lr": lr, "steps": steps, "gap": gap, "travel": travel,
                         "relative_gap": gap / travel})
        out["optimizers"][key] = {"horizon": horizon, "rows": rows,
                                  "relative_gaps": [r["relative_gap"] for r in rows]}
    return out


# ============================================================================================
# (f) natural gradient vs SGD per step
# ============================================================================================


def _part_f(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    X, y, _, _ = _dataset(cfg["num_samples"], seed, cache)
    base = _mlp(cfg["hidden"], seed)
    names = _weight_names(base)
    loss_fn = nn.CrossEntropyLoss()
    steps = cfg["steps"]
    curves: dict[str, dict[str, list[float]]] = {"sgd": {}, "ngd": {}}
    for lr in progress_bar(cfg["sgd_lrs"], enabled=progress, desc="(f) SGD sweep"):
        m = copy.deepcopy(base)
        curves["sgd"][repr(lr)] = _train(m, torch.optim.SGD(m.parameters(), lr), X, y,
                                         steps, names)["loss"]
    for lr in progress_bar(cfg["ngd_lrs"], enabled=progress, desc="(f) NGD sweep"):
        m = copy.deepcopy(base)
        opt = RiemannianGD(m.parameters(), lr, "ggn", model=m, loss_fn=loss_fn, data=(X, y),
                           damping=cfg["damping"], cg_maxiter=300)
        curves["ngd"][repr(lr)] = _train(m, opt, X, y, steps, names)["loss"]

    def best(kind: str) -> tuple[str, list[float]]:
        finite = {k: v for k, v in curves[kind].items() if math.isfinite(v[-1])}
        k = min(finite, key=lambda k: finite[k][-1])
        return k, finite[k]

    sgd_lr, sgd = best("sgd")
    ngd_lr, ngd = best("ngd")
    return {
        "steps": steps, "damping": cfg["damping"], "curves": curves,
        "best_sgd": {"lr": float(sgd_lr), "final_loss": sgd[-1], "loss": sgd},
        "best_ngd": {"lr": float(ngd_lr), "final_loss": ngd[-1], "loss": ngd},
        "ngd_faster_per_step": bool(ngd[-1] < sgd[-1]),
        "initial_loss": sgd[0],
    }


# ============================================================================================
# Figures
# ============================================================================================


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    plt = require("matplotlib.pyplot", "plots")
    plt.switch_backend("Agg")
    parts = results["parts"]
    files = []

    # (a) trajectories
    a = parts["a"]
    fig, axes = plt.subplots(1, len(a["charts"]), figsize=(5.5 * len(a["charts"]), 6.2))
    axes = np.atleast_1d(axes)
    allpts = np.concatenate([
        np.asarray(tr) for res in a["charts"].values() for tr in res["trajectories"].values()
    ])
    lo, hi = allpts.min(0), allpts.max(0)
    center, half = (lo + hi) / 2, 0.6 * max(hi - lo) + 0.05  # a square view
    xs = np.linspace(center[0] - half, center[0] + half, 240)
    ys = np.linspace(center[1] - half, center[1] + half, 240)
    XX, YY = np.meshgrid(xs, ys)
    LL = (XX**2 + 2 * YY**2 - 1) ** 2 + 0.3 * np.sin(2 * XX) + 0.1 * XX * YY
    levels = np.quantile(LL, np.linspace(0.0, 1.0, 30) ** 2)
    styles = {
        "flow_theta": dict(color="0.5", lw=5, alpha=0.5, label="gradient flow"),
        "gd_theta": dict(color="k", marker="o", ms=4, lw=1.5, label="GD in θ"),
        "plain_gd_psi": dict(color="tab:red", marker="s", ms=4, ls="--",
                             label="plain GD in ψ (mapped to θ)"),
        "riemannian_linear": dict(color="tab:blue", marker="^", ms=4,
                                  label="Riemannian GD in ψ, linear"),
        "riemannian_second_order": dict(color="tab:green", marker="v", ms=4,
                                        label="Riemannian GD in ψ, second order"),
        "riemannian_geodesic": dict(color="tab:purple", marker="x", ms=7, ls=":",
                                    label="Riemannian GD in ψ, geodesic"),
    }
    for ax, (name, res) in zip(axes, a["charts"].items(), strict=True):
        ax.contour(XX, YY, LL, levels=np.unique(levels), cmap="viridis", linewidths=0.6)
        for key, st in styles.items():
            tr = np.asarray(res["trajectories"][key])
            ax.plot(tr[:, 0], tr[:, 1], **st)
        title = {"phi": "chart h = φ⁻¹ (MATH.md §8)", "polar": "polar chart (r, φ)"}[name]
        ax.set_title(f"{title}\nα = {a['lr']}, {a['steps']} steps")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_aspect("equal")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    files.append(_save(fig, out / "optimization_trajectories.png", plt))

    # (b) order of invariance
    b = parts["b"]
    charts = [k for k in b if k != "horizon"]
    fig, axes = plt.subplots(1, len(charts), figsize=(6 * len(charts), 4.5), squeeze=False)
    colors = {"plain_gd": "tab:red", "linear": "tab:blue", "second_order": "tab:green",
              "geodesic": "tab:purple"}
    for ax, name in zip(axes[0], charts, strict=True):
        for key, color in colors.items():
            r = b[name][key]
            label = (f"{key}: max {max(r['discrepancies']):.1e}" if key == "geodesic"
                     else f"{key}: slope {r['slope']:.2f}")
            d = np.maximum(np.asarray(r["discrepancies"], dtype=float), 1e-17)
            ax.loglog(r["lrs"], d, "o-", color=color, label=label)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("step size α")
        ax.set_ylabel(f"‖θ-run − ψ-run‖ at T = {b['horizon']}")
        ax.set_title(f"order of invariance, chart {name}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    files.append(_save(fig, out / "optimization_order.png", plt))

    # (c) network
    c = parts["c"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"gd_w": "GD in w", "gd_gv": "GD in (g, v)",
              "riemannian_gd_gv": "Riemannian GD in (g, v)", "ngd_w": "natural gradient in w",
              "ngd_gv": "natural gradient in (g, v)"}
    for key, run in c["runs"].items():
        axes[0].plot(run["loss"], label=labels[key], ls="--" if key.endswith("gv") else "-")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("MLP on MNIST-1D, full batch")
    axes[0].legend(fontsize=8)
    dl = {"gd_gv_vs_gd_w": "GD (g, v) vs GD w",
          "riemannian_gd_gv_vs_gd_w": "Riemannian GD (g, v) vs GD w",
          "ngd_gv_vs_ngd_w": "natural gradient (g, v) vs w"}
    for key, r in c["distances"].items():
        steps = np.arange(1, len(r["relative"]))
        axes[1].semilogy(steps, np.maximum(r["relative"][1:], 1e-17), label=dl[key])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("‖w_a(k) − w_b(k)‖ / ‖w_b(k) − w_b(0)‖")
    axes[1].set_title("distance between charts, mapped to w")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out / "optimization_network.png", plt))

    # (d) + (e)
    d, e = parts["d"], parts["e"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in [("gd_omega_vs_gd_w_per_layer_lr", "GD Ω vs GD W, lr α σ²/n"),
                       ("riemannian_gd_omega_vs_gd_w", "Riemannian GD Ω vs GD W, lr α"),
                       ("gd_omega_vs_gd_w_same_lr", "GD Ω vs GD W, same lr α")]:
        curve = d[key]["max_abs_per_step"][1:]
        axes[0].semilogy(np.arange(1, len(curve) + 1), np.maximum(curve, 1e-18), label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("max |W difference|")
    axes[0].set_title("NTK vs standard parametrization")
    axes[0].legend(fontsize=8)
    for key, r in e["optimizers"].items():
        lrs = [row["lr"] for row in r["rows"]]
        axes[1].loglog(lrs, np.maximum(r["relative_gaps"], 1e-17), "o-",
                       label=f"{key} (T = {r['horizon']})")
    axes[1].set_xlabel("step size α")
    axes[1].set_ylabel("relative gap at T")
    axes[1].set_title(f"per-layer rescaling W_l = c_l Ω_l, c = {e['scales']}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out / "optimization_ntk_adam.png", plt))

    # (f)
    f = parts["f"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for lr, curve in f["curves"]["sgd"].items():
        ax.plot(curve, color="tab:red", alpha=0.3 + 0.7 * (float(lr) == f["best_sgd"]["lr"]),
                label=f"SGD lr {lr}")
    for lr, curve in f["curves"]["ngd"].items():
        ax.plot(curve, color="tab:blue", alpha=0.3 + 0.7 * (float(lr) == f["best_ngd"]["lr"]),
                label=f"RiemannianGD('ggn') lr {lr}")
    ax.set_ylim(top=f["initial_loss"] * 1.2, bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("natural gradient vs SGD (learning-rate sweeps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out / "optimization_ggn_vs_sgd.png", plt))
    return files


def _save(fig: Any, path: Path, plt: Any) -> str:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


# ============================================================================================
# Entry point
# ============================================================================================


def _summary(parts: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "b" in parts:
        b = parts["b"]
        s["slopes"] = {
            name: {k: b[name][k]["slope"] for k in ("plain_gd", "linear", "second_order")}
            for name in b if name != "horizon"
        }
        s["geodesic_max_gap"] = max(
            b[name]["geodesic"]["max_discrepancy"] for name in b if name != "horizon"
        )
    if "c" in parts:
        s["network_relative_final_distance"] = {
            k: v["relative_final"] for k, v in parts["c"]["distances"].items()
        }
    if "d" in parts:
        s["ntk_max_abs_difference"] = parts["d"]["gd_omega_vs_gd_w_per_layer_lr"]["max_abs"]
    if "e" in parts:
        s["rescaling_relative_gap_smallest_lr"] = {
            k: v["relative_gaps"][-1] for k, v in parts["e"]["optimizers"].items()
        }
    if "f" in parts:
        f = parts["f"]
        s["ngd_vs_sgd"] = {"ngd_final_loss": f["best_ngd"]["final_loss"],
                           "sgd_final_loss": f["best_sgd"]["final_loss"],
                           "ngd_faster_per_step": f["ngd_faster_per_step"]}
    return s


def run(
    out_dir: str | os.PathLike[str],
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the optimization experiment; write ``optimization.json`` and PNGs under ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Output folder (created). The JSON is rewritten atomically after every part; a rerun
        with the same ``quick`` and ``seed`` skips the parts already there (checkpoint /
        resume), and different settings start over.
    quick : bool
        A reduced version in well under a minute (used by the tests); the full one takes a
        few minutes on a laptop CPU.
    seed : int
        Seed of the network initializations and of the MNIST-1D draw.
    progress : bool
        Progress bars (needs tqdm).

    Returns
    -------
    dict
        ``{"experiment", "settings", "parts": {"a".."f"}, "summary", "figures"}``, as written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    settings = _settings(bool(quick), int(seed))
    results = _load_previous(path, settings) or {
        "experiment": "optimization", "settings": settings, "parts": {}, "timing": {},
    }
    cache = out / "cache"
    # Every tensor here is tiny: intra-op threads only add synchronization, which on a busy
    # machine costs 10-50x. Run single-threaded and restore the setting afterwards.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        computed = _run_parts(results, settings, seed, cache, progress, path)
    finally:
        torch.set_num_threads(torch_threads)
    results["summary"] = _summary(results["parts"])
    if computed or not all((out / name).exists() for name in FIGURES):
        results["figures"] = _plots(results, out)
        _write_json(path, results)
    return _clean(results)


def _run_parts(
    results: dict[str, Any],
    settings: dict[str, Any],
    seed: int,
    cache: Path,
    progress: bool,
    path: Path,
) -> list[str]:
    """Compute the parts not yet in ``results``, saving after each; return their keys."""
    computed = []
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("a", lambda: _part_a(settings["a"], progress)),
        ("b", lambda: _part_b(settings["b"], progress)),
        ("c", lambda: _part_c(settings["c"], seed, cache, progress)),
        ("d", lambda: _part_d(settings["d"], seed, cache, progress)),
        ("e", lambda: _part_e(settings["e"], seed, cache, progress)),
        ("f", lambda: _part_f(settings["f"], seed, cache, progress)),
    ]
    for key, fn in progress_bar(parts, enabled=progress, desc="optimization"):
        if key in results["parts"]:
            continue
        t0 = time.perf_counter()
        results["parts"][key] = _clean(fn())
        results.setdefault("timing", {})[key] = time.perf_counter() - t0
        results["summary"] = _summary(results["parts"])
        _write_json(path, results)
        computed.append(key)
    return computed
