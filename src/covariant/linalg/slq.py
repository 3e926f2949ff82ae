r"""Stochastic Lanczos quadrature: ``tr f(A)``, log-determinants and spectral densities.

:func:`slq` estimates ``tr f(A) ≈ mean_l z_lᵀ f(A) z_l`` with one Lanczos run per probe and
Gauss quadrature on its tridiagonal matrix (Ubaru, Chen & Saad, SIMAX 2017); ``fn=torch.log``
gives ``log det A``. Its nodes and weights also give a Gaussian-broadened spectral density
(:func:`spectral_density`), whose dense ground truth is :func:`dense_spectral_density`.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64))
>>> res = slq(lambda v: A @ v, 4, num_probes=3, num_steps=4)
>>> import math
>>> abs(res.value - math.log(64.0)) < 1e-10  # log det A = log(1·2·4·8)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._progress import progress_bar
from ..errors import NonFiniteError, ShapeMismatchError, SingularMetricError
from ._common import _DAMPING_HINT, Matmat, Matvec, _apply_block, _check_dim, _check_finite
from .probes import Distribution, _generator, _probes, _stderr
from .results import SLQResult

__all__ = ["dense_spectral_density", "slq", "spectral_density"]


def slq(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int = 10,
    num_steps: int = 30,
    fn: Callable[[Tensor], Tensor] = torch.log,
    seed: int = 0,
    inner_matvec: Matvec | None = None,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    inner_matmat: Matmat | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> SLQResult:
    r"""Stochastic Lanczos quadrature for ``tr f(A)`` (Ubaru, Chen & Saad, SIMAX 2017).

    For a symmetric ``A`` and each probe ``z_l``, ``m`` Lanczos steps from ``z_l/‖z_l‖`` give
    ``T_l = Y diag(θ) Yᵀ``, and Gauss quadrature (exact for polynomials of degree ``≤ 2m−1``)

    .. math::

        z_lᵀ f(A) z_l ≈ ‖z_l‖² \sum_{j=1}^{m} τ_{lj} f(θ_{lj}),\quad τ_{lj} = Y_{1j}^2,
        \qquad \operatorname{tr} f(A) ≈ \frac{1}{N}\sum_l z_lᵀ f(A) z_l .

    With ``fn=torch.log`` this is ``log det A``.

    **Generalized problem** (``inner_matvec = B``, ``matvec = B⁻¹H``): the target is
    ``tr f(B⁻¹H) = tr f(B^{-1/2} H B^{-1/2})``. Gauss quadrature for it would need probes with
    covariance ``B⁻¹`` (``w = B^{-1/2} u``), i.e. a square root of ``B``. Instead we keep
    plain probes (``E[z zᵀ] = I``, so ``E[zᵀ f(A) z] = tr f(A)`` although ``f(A)`` is not
    symmetric) and evaluate each quadratic form with Lanczos in the ``B``-inner product: from
    ``v_1 = z/‖z‖_B`` gives ``f(A) z ≈ ‖z‖_B V f(T) e_1`` (the Lanczos
    approximation of a matrix function, exact for polynomials of degree ``≤ m−1``), hence

    .. math::

        zᵀ f(A) z ≈ \sum_j ω_j f(θ_j),\qquad ω_j = ‖z‖_B\,(zᵀ V y_j)\,(y_j)_1 .

    No ``B^{-1/2}`` is needed, the weights still sum to ``zᵀz`` and the rule reduces to Gauss
    quadrature when ``B = I``. The weights may be negative, and the rule is exact to degree
    ``m−1`` rather than ``2m−1``, so it needs about twice the steps (more for ill-conditioned
    ``B⁻¹H``; compare two values of ``num_steps``). If a whitened operator
    ``B^{-1/2} H B^{-1/2}`` is available, passing it as ``matvec`` without ``inner_matvec``
    gives plain Gauss quadrature instead. For log-determinants alone,
    ``log det(B⁻¹H) = log det H − log det B`` takes two plain SLQ runs and no solves at all.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``; ``A`` symmetric, or ``B``-self-adjoint with ``inner_matvec``.
    dim : int
        Length of the vectors.
    num_probes : int
        Number of probes ``N``.
    num_steps : int
        Lanczos steps ``m`` per probe (capped at ``dim``).
    fn : callable
        Elementwise function on tensors of Ritz values (e.g. ``torch.log``, ``torch.exp``,
        ``lambda x: x ** 2``).
    seed : int
        Seed of the probes (the same stream as :func:`hutchinson`).
    inner_matvec : callable, optional
        ``v ↦ B v`` for an SPD ``B``: estimate ``tr f(B⁻¹H)`` as above.
    distribution : {"rademacher", "gaussian"}
        Probe distribution.
    dtype, device :
        Of the probes and Lanczos vectors.
    matmat : callable, optional
        ``V ↦ A V`` on ``(dim, b)`` blocks: runs ``batch_size`` probes' Lanczos recurrences in
        lockstep, one block product per step.
    inner_matmat : callable, optional
        ``V ↦ B V`` on blocks, used instead of ``inner_matvec`` in the batched runs.
    batch_size : int, optional
        Probes per batch with ``matmat`` (default all; memory ``num_steps · dim · batch_size``).
    progress : bool
        Show a progress bar over probes.

    Returns
    -------
    SLQResult

    Raises
    ------
    SingularMetricError
        If ``fn`` is ``torch.log`` and a Ritz value is ``<= 0`` (the operator is not positive
        definite, so the log-determinant is undefined), or if ``inner_matvec`` is not SPD.
    NonFiniteError
        If ``fn`` returns NaN or Inf at a Ritz value.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(1.0, 10.0, 50, dtype=torch.float64))
    >>> res = slq(lambda v: A @ v, 50, num_probes=5, num_steps=20)
    >>> exact = float(torch.linalg.eigvalsh(A).log().sum())
    >>> abs(res.value - exact) < 1e-8  # diagonal A and Rademacher probes: no sampling error
    True
    """
    dim = _check_dim(dim)
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    m = min(int(num_steps), dim)
    gen = _generator(seed)
    counts = {"A": 0, "B": 0}

    def apply_A(X: Tensor) -> Tensor:
        counts["A"] += X.shape[1]
        return _apply_block(matvec, matmat, X)

    apply_B: Callable[[Tensor], Tensor] | None = None
    if inner_matvec is not None or inner_matmat is not None:
        inner = inner_matvec

        def apply_B(X: Tensor) -> Tensor:
            counts["B"] += X.shape[1]
            return _apply_block(inner, inner_matmat, X)  # type: ignore[arg-type]

    bs = (batch_size or num_probes) if matmat is not None else 1
    bar = progress_bar(None, enabled=progress, total=num_probes, desc="slq")
    all_nodes, all_weights, all_resid = [], [], []
    for start in range(0, num_probes, bs):
        b = min(bs, num_probes - start)
        Z = _probes(gen, dim, b, distribution, dtype, device)
        alpha, beta, V, znorm, length = _block_lanczos_runs(apply_A, apply_B, Z, m)
        for nodes, weights, resid in _quadrature_rules(alpha, beta, V, Z, znorm, length, m,
                                                       generalized=apply_B is not None):
            all_nodes.append(nodes)
            all_weights.append(weights)
            all_resid.append(resid)
        bar.update(b)
    bar.close()
    nodes = torch.stack(all_nodes)
    omega = torch.stack(all_weights)
    samples = (omega * _values_at_nodes(fn, nodes, omega)).sum(1)
    return SLQResult(
        value=float(samples.mean()),
        stderr=_stderr(samples),
        num_matvecs=counts["A"],
        nodes=nodes.to(dtype=dtype, device=device),
        weights=(omega / dim).to(dtype=dtype, device=device),
        samples=samples.to(dtype=dtype, device=device),
        num_inner_matvecs=counts["B"],
        residuals=torch.stack(all_resid).to(dtype=dtype, device=device),
    )


def _quadrature_rules(
    alpha: Tensor,
    beta: Tensor,
    V: Tensor,
    Z: Tensor,
    znorm: Tensor,
    length: Tensor,
    m: int,
    generalized: bool,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Nodes, weights and residual bounds (float64, CPU, length ``m`` each) of each probe's
    Lanczos run.

    The nodes are the Ritz values ``θ`` of the run's tridiagonal ``T = Y diag(θ) Yᵀ``; the
    weights are ``‖z‖² Y_{1j}²`` (Gauss quadrature) or, in a ``B``-inner product,
    ``‖z‖_B (zᵀ V y_j) Y_{1j}``; the residual bounds are ``β_L |Y_{Lj}|`` with ``β_L`` the
    norm of the run's last residual (``beta[L-1]``). A run that stopped early at ``L < m``
    steps is padded with copies of its last node at zero weight.
    """
    a64 = alpha.to(device="cpu", dtype=torch.float64)
    b64 = beta.to(device="cpu", dtype=torch.float64)
    rules = []
    for col in range(Z.shape[1]):
        L = int(length[col])
        T = torch.diag(a64[:L, col])
        if L > 1:
            off = b64[: L - 1, col]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, Yt = torch.linalg.eigh(T)
        if not generalized:
            w = float(znorm[col]) ** 2 * Yt[0] ** 2
        else:
            u = (V[:L, :, col] @ Z[:, col]).to(device="cpu", dtype=torch.float64)
            w = float(znorm[col]) * (u @ Yt) * Yt[0]
        nodes = torch.full((m,), float(theta[-1]), dtype=torch.float64)
        weights = torch.zeros(m, dtype=torch.float64)
        resid = torch.zeros(m, dtype=torch.float64)
        nodes[:L] = theta
        weights[:L] = w
        resid[:L] = b64[L - 1, col].abs() * Yt[L - 1].abs()
        rules.append((nodes, weights, resid))
    return rules


def _values_at_nodes(fn: Callable[[Tensor], Tensor], nodes: Tensor, omega: Tensor) -> Tensor:
    """``fn(nodes)`` in float64, zero where the weight is zero; raises where the log of a
    non-positive node or any non-finite value is met."""
    if fn is torch.log and bool((nodes <= 0).any()):
        bad = float(nodes.min())
        raise SingularMetricError(
            f"slq with fn=log met the Ritz value {bad:.3e} <= 0: the operator is not positive "
            "definite, so its log-determinant is undefined (a negative-curvature direction or a "
            "singular matrix). Use a positive-definite operator (e.g. away from saddle points), "
            f"or damp it. {_DAMPING_HINT}"
        )
    fvals = fn(nodes)
    if not isinstance(fvals, Tensor) or fvals.shape != nodes.shape:
        raise ShapeMismatchError("slq: fn must act elementwise on a tensor of Ritz values.")
    fvals = torch.where(omega != 0, fvals.to(torch.float64), torch.zeros_like(nodes))
    if not bool(torch.isfinite(fvals).all()):
        hint = (
            " Some Ritz values are <= 0: the operator is not positive definite."
            if bool((nodes <= 0).any())
            else ""
        )
        raise NonFiniteError(
            f"slq: fn returned NaN or Inf at a Ritz value in [{float(nodes.min()):.3e}, "
            f"{float(nodes.max()):.3e}]; fn must be finite on the spectrum of the operator." + hint
        )
    return fvals


def _block_lanczos_runs(
    apply_A: Callable[[Tensor], Tensor],
    apply_B: Callable[[Tensor], Tensor] | None,
    Z: Tensor,
    m: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``b`` independent Lanczos runs (one per column of ``Z``), full reorthogonalization.

    Returns ``alpha (m, b)``, ``beta (m, b)`` (``beta[j]`` couples steps ``j`` and ``j+1``;
    ``beta[L-1]`` of a run of ``L`` steps is the norm of its final residual, tiny where the
    Krylov space became invariant), the basis ``V (m, dim, b)``, the ``B``-norms of the start
    vectors ``(b,)`` and the Krylov dimension reached by each run ``(b,)``.
    """
    dim, b = Z.shape
    dtype, device = Z.dtype, Z.device
    BZ = Z if apply_B is None else apply_B(Z)
    znorm2 = (Z * BZ).sum(0)
    if bool((znorm2 <= 0).any()) or not bool(torch.isfinite(znorm2).all()):
        raise SingularMetricError(
            f"slq: a probe has zᵀBz <= 0 or non-finite: inner_matvec is not positive definite. "
            f"{_DAMPING_HINT}"
        )
    znorm = znorm2.sqrt()
    V = torch.zeros(m, dim, b, dtype=dtype, device=device)
    BV = V if apply_B is None else torch.zeros_like(V)
    alpha = torch.zeros(m, b, dtype=dtype, device=device)
    beta = torch.zeros(m, b, dtype=dtype, device=device)
    length = torch.full((b,), m, dtype=torch.long)
    active = torch.ones(b, dtype=torch.bool, device=device)
    eps = torch.finfo(dtype).eps
    V[0] = Z / znorm
    if apply_B is not None:
        BV[0] = BZ / znorm
    for j in range(m):
        w = apply_A(V[j])
        _check_finite(w, "slq: the output of matvec")
        Vj, BVj = V[: j + 1], BV[: j + 1]
        c = torch.zeros(j + 1, b, dtype=dtype, device=device)
        for _ in range(2):  # CGS2: "twice is enough"
            cj = torch.einsum("inb,nb->ib", BVj, w)
            w = w - torch.einsum("inb,ib->nb", Vj, cj)
            c = c + cj
        alpha[j] = c[j] * active
        Bw = w if apply_B is None else apply_B(w)
        bj = (w * Bw).sum(0).clamp_min(0).sqrt()
        if j == m - 1:  # the final residual's norm, for the Ritz residual bounds
            beta[j] = torch.where(active, bj, beta[j])
            break
        scale = alpha[: j + 1].abs().amax(0)
        if j > 0:
            scale = scale + beta[:j].abs().amax(0)
        stop = active & (bj <= 100 * eps * scale.clamp_min(1e-300))
        for col in torch.nonzero(stop).flatten().tolist():
            length[col] = j + 1
        beta[j] = torch.where(stop, bj, beta[j])  # the (tiny) residual of a finished run
        active = active & ~stop
        if not bool(active.any()):
            break
        safe = torch.where(active, bj, torch.ones_like(bj))
        beta[j] = torch.where(active, bj, beta[j])
        V[j + 1] = w / safe * active
        if apply_B is not None:
            BV[j + 1] = Bw / safe * active
    return alpha, beta, V, znorm, length


def spectral_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""Gaussian-broadened spectral density from quadrature nodes and weights.

    .. math::

        ρ(t) = \frac{\sum_{l,j} w_{lj}\, φ_σ(t − θ_{lj})}{\sum_{l,j} w_{lj}},\qquad
        φ_σ(x) = \frac{e^{-x²/(2σ²)}}{σ\sqrt{2π}},

    which integrates to 1 over the real line (to ≈1 over a grid that covers the nodes by a few
    ``σ``). With SLQ nodes/weights this is the estimator of Ubaru, Chen & Saad (2017) and
    Ghorbani, Krishnan & Xiao (2019).

    Parameters
    ----------
    nodes, weights : Tensor
        Same shape, e.g. ``(num_probes, num_steps)`` from :func:`slq`.
    grid : Tensor
        1-D evaluation points; the result has its dtype and device.
    sigma : float
        Broadening width, > 0.

    Returns
    -------
    Tensor
        The density on ``grid``.

    Examples
    --------
    >>> import torch
    >>> grid = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    >>> rho = spectral_density(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), grid, 0.3)
    >>> round(float(torch.trapezoid(rho, grid)), 6)
    1.0
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if nodes.shape != weights.shape:
        raise ShapeMismatchError(
            f"nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} differ in shape."
        )
    if grid.ndim != 1:
        raise ShapeMismatchError(f"grid must be 1-D, got shape {tuple(grid.shape)}.")
    theta = nodes.reshape(-1).to(dtype=grid.dtype, device=grid.device)
    w = weights.reshape(-1).to(dtype=grid.dtype, device=grid.device)
    total = w.sum()
    if float(total) <= 0:
        raise ValueError("spectral_density: the weights must have a positive sum.")
    out = torch.empty_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    chunk = max(1, 4_000_000 // max(1, theta.numel()))
    for start in range(0, grid.numel(), chunk):
        g = grid[start : start + chunk]
        phi = torch.exp(-0.5 * ((g[:, None] - theta[None, :]) / sigma) ** 2) * norm
        out[start : start + chunk] = phi @ w
    return out / total


def dense_spectral_density(eigenvalues: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""Gaussian-broadened density of a known spectrum: ``ρ(t) = (1/n) Σ_i φ_σ(t − λ_i)``.

    The dense ground truth that :func:`spectral_density` of SLQ output approximates.

    Examples
    --------
    >>> import torch
    >>> grid = torch.linspace(-3, 4, 701, dtype=torch.float64)
    >>> rho = dense_spectral_density(torch.tensor([0.0, 1.0]), grid, 0.2)
    >>> round(float(torch.trapezoid(rho, grid)), 6)
    1.0
    """
    eig = eigenvalues.reshape(-1)
    return spectral_density(eig, torch.ones_like(eig), grid, sigma)
