"""Classic Laplace log evidence: covariant vs laplace-torch, on the same model, data and prior.

laplace-torch is a reference, not a dependency (it pulls a large torch build), and this script
installs nothing. Where ``import laplace`` works it

1. builds a small tanh MLP classifier (float64) and a Gaussian prior N(0, λ⁻¹ I);
2. finds the MAP with ``covariant.density.map_estimate`` and loads it into the model;
3. computes the classic log evidence with ``covariant.laplace.laplace(..., riemannian=False)``
   for the full exact Hessian and the full GGN;
4. computes laplace-torch's ``log_marginal_likelihood()`` for ``hessian_structure="full"``
   with its GGN backend and, where available, an exact-Hessian backend;
5. prints the relative differences and writes them to
   ``benchmarks/results/compat_laplace_torch.json``.

Both sides evaluate log p(D | θ*) + log p(θ*) + (d/2) log 2π − ½ log det P at the same θ*,
with P = Hessian (or GGN) of the negative log likelihood + λI.

Without laplace-torch it prints a message and exits with status 0.

Usage::

    python benchmarks/compat_laplace_torch.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "compat_laplace_torch.json"


def _atomic_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _laplace_torch_value(model, loader, lam: float, backend) -> float:
    from laplace import Laplace

    kwargs = {} if backend is None else {"backend": backend}
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                 prior_precision=lam, **kwargs)
    la.fit(loader)
    return float(la.log_marginal_likelihood())


def main() -> int:
    if importlib.util.find_spec("laplace") is None:
        print(
            "compat_laplace_torch: laplace-torch is not importable here, so there is nothing "
            "to compare against. Run this script in an environment that has it "
            "(pip install laplace-torch; it is not a covariant dependency). Exiting."
        )
        return 0

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from covariant import density, laplace

    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    n, lam = 60, 1.5
    X = torch.randn(n, 3, generator=g)
    y = ((X[:, 0] - X[:, 1] + 0.5 * torch.randn(n, generator=g)) > 0).long()
    y = y + (X[:, 2] > 1.0).long()  # three classes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    space, theta0 = laplace.posterior_space(model, (X, y), prior_precision=lam)
    m = density.map_estimate(space, theta0, riemannian=False, method="newton")
    torch.nn.utils.vector_to_parameters(m.point, model.parameters())
    ours = {
        "exact": laplace.laplace(space, m.point, riemannian=False, hessian="exact").log_evidence,
        "ggn": laplace.laplace(space, m.point, riemannian=False, hessian="ggn").log_evidence,
    }

    loader = DataLoader(TensorDataset(X, y), batch_size=n)
    theirs: dict[str, float | None] = {"ggn": _laplace_torch_value(model, loader, lam, None)}
    backend_used = {"ggn": "laplace-torch default (GGN)"}
    theirs["exact"] = None
    try:
        from laplace.curvature import CurvlinopsHessian

        theirs["exact"] = _laplace_torch_value(model, loader, lam, CurvlinopsHessian)
        backend_used["exact"] = "CurvlinopsHessian"
    except Exception as err:  # an exact-Hessian backend is optional in laplace-torch
        backend_used["exact"] = f"unavailable ({type(err).__name__}: {err})"

    rows = {}
    for key in ("exact", "ggn"):
        t = theirs[key]
        rel = None if t is None else abs(ours[key] - t) / abs(t)
        rows[key] = {"covariant": ours[key], "laplace_torch": t, "rel_diff": rel,
                     "laplace_torch_backend": backend_used[key]}
        shown = "n/a" if t is None else f"{t:.12g}"
        rel_s = "n/a" if rel is None else f"{rel:.2e}"
        print(f"{key:5s}  covariant {ours[key]:.12g}  laplace-torch {shown}  rel.diff {rel_s}")

    from importlib.metadata import PackageNotFoundError, version

    try:
        lt_version = version("laplace-torch")
    except PackageNotFoundError:  # pragma: no cover - importable but not installed as a dist
        lt_version = "unknown"
    result = {
        "model": "3-5-3 tanh MLP, 60 points, 3 classes, float64",
        "prior_precision": lam, "map_grad_norm": m.grad_norm, "full_structure": rows,
        "versions": {"torch": torch.__version__,
                     "laplace-torch": lt_version},
    }
    _atomic_json(RESULTS, result)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
