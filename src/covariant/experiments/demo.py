"""``covariant demo``: naive flatness moves with the chart, invariant flatness does not.

Two parts, each printed as a table of measure × (original chart; new chart with the metric
carried along; new chart naive):

1. The 2-D reference problem of docs/math.md §8 at a non-critical point, in the chart φ⁻¹ and in an
   elementwise sinh chart.
2. A small MLP trained on generated MNIST-1D data (the ``mnist1d`` generator; nothing is
   downloaded), reparametrized by weight norm with ‖v‖ rescaled by 0.1, 1 and 10 (which does
   not change the network at all) and by a per-layer ``Scale``.

3. The spectral density of the trained MLP (stochastic Lanczos quadrature, matrix-free) in
   three charts: w, weight norm with ‖v‖×10, and the per-layer Scale.

With ``out_dir`` it writes ``demo_spectra.png`` (naive vs invariant spectra),
``demo_spectral_density.png`` and, with ``write_json``, ``demo.json`` holding every number.

Example
-------
>>> toy = toy_part()                 # the docs/math.md §8 part (fast)
>>> toy["max_invariant_deviation"] < 1e-12, round(toy["original"]["trace"], 5)
(True, 5.57746)
>>> from covariant.experiments.demo import run
>>> result = run(quick=True, echo=None)            # doctest: +SKIP
>>> result["mlp"]["max_invariant_deviation"] < 1e-6  # doctest: +SKIP
True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import flatness, metrics, reparam
from .._io import atomic_write_json, save_figure
from .._progress import progress_bar
from ..errors import require
from ..flatness import format_value
from ..linalg import spectral_density
from ..reparam import Sinh
from ..space import ParameterSpace
from ..zoo.architectures import build
from ..zoo.data import load_mnist1d
from ..zoo.problems import REFERENCE_POINT, ReferenceChart, reference_loss
from ..zoo.training import evaluate, train_classifier

MEASURES = ("trace", "logdet", "max_eig", "top_eigs")


def _values(report: Any) -> dict[str, Any]:
    return {k: m.value for k, m in report.items()}


def _rel_dev(a: Any, b: Any) -> float:
    ta = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    tb = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    return float((ta - tb).abs().max() / ta.abs().max().clamp_min(1e-300))


def _table(title: str, measures: list[str], rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    """Rows of (chart, view, values); one column per measure."""
    cw = max(len(r[0]) for r in rows) + 2
    lines = [title, "=" * len(title)]
    lines.append(f"{'chart':{cw}s}{'metric':12s}" + "".join(f"{m:>14s}" for m in measures))
    last = None
    for chart, view, values in rows:
        shown = chart if chart != last else ""
        last = chart
        lines.append(f"{shown:{cw}s}{view:12s}"
                     + "".join(f"{format_value(values[m], 4):>14s}" for m in measures))
    return "\n".join(lines)


def _compare(
    space: ParameterSpace,
    p: torch.Tensor,
    charts: dict[str, tuple[Any, Callable[[torch.Tensor], torch.Tensor] | None]],
    measures: tuple[str, ...],
    k: int,
    progress: bool,
    extra: tuple[str, ...] = ("spectrum",),
) -> dict[str, Any]:
    """Measures in the original chart and, per new chart, invariant and naive."""
    base = flatness(space, p, measures=measures + extra, k=k)
    out: dict[str, Any] = {"original": _values(base), "charts": {}}
    worst_inv, naive_spread = 0.0, {}
    for name, (chart, modify) in progress_bar(charts.items(), enabled=progress,
                                               total=len(charts), desc="charts"):
        new = space.reparametrize(chart)
        psi = new.chart.inverse(p)
        if modify is not None:
            psi = modify(psi)
        assert torch.allclose(new.chart(psi), p, rtol=1e-10, atol=1e-12)
        inv = flatness(new, psi, measures=measures + extra, k=k)
        naive = flatness(new.with_metric(metrics.Euclidean()), psi, measures=measures + extra, k=k)
        out["charts"][name] = {"invariant": _values(inv), "naive": _values(naive)}
        for m in measures:
            worst_inv = max(worst_inv, _rel_dev(base[m].value, inv[m].value))
        naive_spread[name] = _rel_dev(base["max_eig"].value, naive["max_eig"].value)
    out["max_invariant_deviation"] = worst_inv
    out["naive_max_eig_deviation"] = naive_spread
    return out


def _print_part(title: str, result: dict[str, Any], measures: tuple[str, ...],
                echo: Callable[[str], None]) -> None:
    rows = [("original chart", "G (given)", result["original"])]
    for name, r in result["charts"].items():
        rows.append((name, "pullback", r["invariant"]))
        rows.append((name, "naive I", r["naive"]))
    echo(_table(title, list(measures), rows))
    echo(f"largest relative deviation of the invariant measures: "
         f"{result['max_invariant_deviation']:.2e}")
    echo("")


def _scale_directions(
    chart: reparam.ParameterwiseReparametrization, s: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """ψ ↦ ψ with every weight-norm direction v scaled by ``s`` (the network is unchanged)."""
    def modify(psi: torch.Tensor) -> torch.Tensor:
        out = psi.clone()
        v_slices = chart.new_layout.slices
        for name in chart.blocks:
            out[v_slices[f"{name}.v"]] *= s
        return out

    return modify


def toy_part(progress: bool = False) -> dict[str, Any]:
    """Part 1: the docs/math.md §8 problem."""
    space = ParameterSpace(reference_loss)
    charts = {
        "φ⁻¹ (MATH §8)": (ReferenceChart(), None),
        "sinh": (Sinh(torch.tensor([1.5, 0.8]), torch.tensor([0.3, 2.5])), None),
    }
    return _compare(space, REFERENCE_POINT.clone(), charts, ("trace", "det", "max_eig"),
                    2, progress)


def mlp_part(
    *, quick: bool = False, seed: int = 0, progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Part 2: a small MLP trained on generated MNIST-1D, in weight-norm and scaled charts."""
    num_samples, epochs, analysis = (600, 15, 96) if quick else (2000, 40, 256)
    hidden = (12, 12) if quick else (16, 16)
    weight_decay = 1e-3
    t0 = time.perf_counter()
    ds = load_mnist1d(num_samples=num_samples, seed=seed)
    torch.manual_seed(seed)
    model = build("mlp", ds.num_features, ds.num_classes, hidden=hidden, activation="tanh")
    losses = train_classifier(model, ds.X_train, ds.y_train, epochs=epochs, lr=1e-2,
                              batch_size=128, weight_decay=weight_decay, seed=seed,
                              progress=progress)
    test = evaluate(model, ds.X_test, ds.y_test)
    if echo:
        echo(f"trained MLP {ds.num_features}-{'-'.join(map(str, hidden))}-{ds.num_classes} on "
             f"MNIST-1D ({len(ds.y_train)} samples, {epochs} epochs): train loss "
             f"{losses[-1]:.3f}, test accuracy {test['accuracy']:.3f} "
             f"[{time.perf_counter() - t0:.1f}s]")
    model = model.double()
    X, y = ds.X_train[:analysis].double(), ds.y_train[:analysis]
    data_space, theta = ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    # the objective that was minimized: cross-entropy + (weight decay / 2)·‖θ‖²
    space = ParameterSpace(
        lambda p: data_space.loss_function(p) + 0.5 * weight_decay * (p**2).sum(),
        layout=data_space.layout,
    )
    wn = reparam.ParameterwiseReparametrization(
        space.layout, {"*.weight": reparam.WeightNorm()}
    )
    layer_scales = {"0.*": reparam.Scale(0.1), "2.*": reparam.Scale(10.0)}
    charts = {
        f"weight norm ‖v‖×{s:g}": (wn, _scale_directions(wn, s)) for s in (0.1, 1.0, 10.0)
    }
    charts["layer Scale(0.1, 10)"] = (
        reparam.ParameterwiseReparametrization(space.layout, layer_scales), None)
    t1 = time.perf_counter()
    result = _compare(space, theta, charts, MEASURES, 3, progress)
    result["spectral_density"] = _densities(space, theta, charts, quick, seed, progress)
    result.update(
        dim=int(theta.shape[0]), analysis_samples=analysis, train_losses=losses,
        test=test, hidden=list(hidden), weight_decay=weight_decay,
        seconds_training=t1 - t0, seconds_analysis=time.perf_counter() - t1,
    )
    return result


def _densities(space: ParameterSpace, theta: torch.Tensor, charts: dict[str, Any], quick: bool,
               seed: int, progress: bool) -> dict[str, Any]:
    """SLQ spectral densities (matrix-free) in three charts, invariant and naive."""
    picks = {"original (w)": (None, None)}
    for name in charts:
        if "×10" in name or "layer" in name:
            picks[name] = charts[name]
    # in_chart=True: the invariant densities are computed with each chart's own Hessian and
    # metric products, so their agreement demonstrates the rules (by default flatness would
    # compute a pulled-back space's measures in the original chart, identical by design)
    opts = {"measures": ("spectral_density",), "method": "stochastic", "seed": seed,
            "slq_probes": 4 if quick else 10, "slq_steps": 30 if quick else 60,
            "progress": progress, "in_chart": True}
    raw: dict[str, dict[str, Any]] = {}
    for name, (chart, modify) in picks.items():
        if chart is None:
            new, p = space, theta
        else:
            new = space.reparametrize(chart)
            p = new.chart.inverse(theta)
            p = modify(p) if modify is not None else p
        raw[name] = {}
        for kind, s in (("invariant", new), ("naive", new.with_metric(metrics.Euclidean()))):
            if chart is None and kind == "naive":
                continue
            m = flatness(s, p, **opts)["spectral_density"]
            raw[name][kind] = (torch.tensor(m.info["nodes"]), torch.tensor(m.info["weights"]))
    lo = min(float(n.min()) for r in raw.values() for n, _ in r.values())
    hi = max(float(n.max()) for r in raw.values() for n, _ in r.values())
    pad = 0.05 * (hi - lo)
    grid = torch.linspace(lo - pad, hi + pad, 500, dtype=torch.float64)
    sigma = 0.01 * float(grid[-1] - grid[0])
    out: dict[str, Any] = {"grid": grid.tolist(), "sigma": sigma, "charts": {}}
    for name, r in raw.items():
        out["charts"][name] = {
            kind: spectral_density(n.double(), w.double(), grid, sigma).tolist()
            for kind, (n, w) in r.items()
        }
    return out


def _plot_densities(result: dict[str, Any], path: Path) -> Path:
    plt = require("matplotlib.pyplot", "plots")
    dens = result["spectral_density"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("invariant", "naive"), strict=True):
        for name, r in dens["charts"].items():
            key = kind if kind in r else "invariant"
            ax.plot(dens["grid"], [max(v, 1e-8) for v in r[key]], label=name,
                    lw=2.5 if key != kind else 1.2, alpha=0.5 if key != kind else 1.0)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-5)
        ax.set_xlabel("eigenvalue")
        ax.set_title("G⁻¹Hess (metric carried along)" if kind == "invariant"
                     else "∇²L in the chart (naive)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("spectral density (SLQ)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Spectral density of the trained MLP in three charts")
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def _plot(result: dict[str, Any], path: Path) -> Path:
    plt = require("matplotlib.pyplot", "plots")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    base = sorted((abs(v) for v in result["original"]["spectrum"]), reverse=True)
    for ax, kind in zip(axes, ("invariant", "naive"), strict=True):
        ax.plot(base, "k-", lw=3, alpha=0.35, label="original chart (w)")
        for name, r in result["charts"].items():
            spec = sorted((abs(v) for v in r[kind]["spectrum"]), reverse=True)
            ax.plot(spec, lw=1.2, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue index")
        ax.set_title(
            "with the metric carried along: G⁻¹Hess" if kind == "invariant"
            else "naive: ∇²L in the new chart (metric dropped)"
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("|eigenvalue|")
    axes[1].legend(fontsize=8)
    fig.suptitle("Hessian spectrum of a trained MLP in five charts of the same network")
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def run(
    out_dir: str | Path | None = None,
    *,
    write_json: bool = False,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the demo; print tables through ``echo``; write PNG/JSON under ``out_dir``."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    toy = toy_part(progress)
    if echo:
        _print_part("docs/math.md §8 problem at θ = (0.7, −0.4)", toy, ("trace", "det", "max_eig"),
                    echo)
    mlp = mlp_part(quick=quick, seed=seed, progress=progress, echo=echo)
    if echo:
        _print_part(f"MLP on MNIST-1D ({mlp['dim']} parameters), spectrum of G⁻¹Hess", mlp,
                    ("trace", "logdet", "max_eig"), echo)
        spread = mlp["naive_max_eig_deviation"]
        echo("naive λ_max relative change per chart: "
             + ", ".join(f"{k}: {v:.2g}" for k, v in spread.items()))
    result = {"toy": toy, "mlp": mlp, "seed": seed, "quick": quick}
    if out_dir is not None:
        out = Path(out_dir)
        png = _plot(mlp, out / "demo_spectra.png")
        result["files"] = [str(png), str(_plot_densities(mlp, out / "demo_spectral_density.png"))]
        if write_json:
            result["files"].append(str(out / "demo.json"))
            atomic_write_json(out / "demo.json", result)
        if echo:
            echo("wrote " + ", ".join(result["files"]))
    return result


