"""`covariant flatness`: invariant across charts, helpful errors, dense numbers by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from covariant.cli import main
from covariant.zoo.architectures import build
from covariant.zoo.checkpoints import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build("mlp", 40, 10, hidden=(3,))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    return path


def _run(args, tmp_path, name):
    out = tmp_path / name
    assert main(["flatness", *args, "--out", str(out), "--json", "--no-progress"]) == 0
    return json.loads((out / "flatness.json").read_text())


def test_flatness_cli_invariant_across_charts(checkpoint, tmp_path, capsys):
    common = [str(checkpoint), "--samples", "64", "--measures", "trace,max_eig",
              "--num-probes", "60"]
    w = _run(common, tmp_path, "w")
    wn = _run([*common, "--chart", "weightnorm:10", "--in-chart"], tmp_path, "wn")
    table = capsys.readouterr().out
    assert "invariant (G⁻¹Hess)" in table and "naive" in table
    assert (tmp_path / "wn" / "spectral_density.png").stat().st_size > 1000
    a, b = w["invariant"]["trace"], wn["invariant"]["trace"]
    assert abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"])
    assert wn["invariant"]["max_eig"]["value"] == pytest.approx(
        w["invariant"]["max_eig"]["value"], rel=1e-6)
    # the naive trace in the rescaled chart is off by about the factor 1/10² on the weights
    assert wn["naive"]["trace"]["value"] < 0.3 * a["value"]
    assert wn["chart_dim"] == w["dim"] + 3 + 10
    # without --in-chart the pulled-back space is computed in w: the very same numbers
    fast = _run([*common, "--chart", "weightnorm:10"], tmp_path, "fast")
    assert "computed_in" in fast["invariant"]["trace"]["info"]
    assert "computed_in" not in wn["invariant"]["trace"]["info"]
    assert fast["invariant"]["trace"]["value"] == pytest.approx(a["value"], rel=1e-12)


def test_flatness_cli_architecture_mismatch(checkpoint, capsys):
    status = main(["flatness", str(checkpoint), "--arch", "mlp", "--arch-kwargs", "hidden=16",
                   "--samples", "8", "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "hidden" in err


def test_flatness_cli_dense_ggn(checkpoint, tmp_path):
    """Dense CLI numbers with a damped GGN metric against a hand-built float64 computation."""
    from torch.func import functional_call, hessian, jacrev

    from covariant.zoo.checkpoints import load_checkpoint
    from covariant.zoo.data import load_dataset

    lam = 1e-2
    r = _run([str(checkpoint), "--samples", "16", "--method", "dense", "--metric", "ggn",
              "--damping", str(lam), "--measures", "trace,max_eig"], tmp_path, "ggn")
    model, _ = load_checkpoint(checkpoint)
    model = model.double()
    ds = load_dataset("mnist1d")
    X, y = ds.X_train[:16].double(), ds.y_train[:16]
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def f(p):
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = p[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, parts, (X,))

    loss = lambda p: torch.nn.functional.cross_entropy(f(p), y)
    def ggn(p):  # Jᵀ ∇²ℓ(f) J, with the output Hessian taken at f(p)
        Jp = jacrev(f)(p).reshape(-1, p.numel())
        H_out = hessian(lambda z: torch.nn.functional.cross_entropy(z.reshape(16, 10), y))(
            f(p).reshape(-1))
        return Jp.T @ H_out @ Jp

    G = ggn(theta) + lam * torch.eye(theta.numel())
    dG = torch.func.jacfwd(ggn)
    g = torch.func.grad(loss)(theta)
    rr = torch.linalg.solve(G, g)
    T = dG(theta)  # T[j, l, i] = ∂_i G_jl (the damping is constant)
    corr = 0.5 * (torch.einsum("jli,l->ij", T, rr) + torch.einsum("ilj,l->ij", T, rr)
                  - torch.einsum("ijl,l->ij", T, rr))
    Hess = hessian(loss)(theta) - corr
    evals = torch.linalg.eigvals(torch.linalg.solve(G, Hess)).real
    assert r["invariant"]["trace"]["value"] == pytest.approx(float(evals.sum()), rel=1e-6)
    assert r["invariant"]["max_eig"]["value"] == pytest.approx(float(evals.max()), rel=1e-6)
