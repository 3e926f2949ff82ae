r"""Stochastic trace estimators with standard errors: Hutchinson, Hutch++ and XTrace.

Each estimator needs only products ``v ↦ A v`` (or blocks ``V ↦ A V``) and returns a
:class:`~covariant.linalg.results.TraceEstimate` whose ``value`` is the mean of exchangeable
per-probe ``samples`` and whose ``stderr`` is their standard error.

- :func:`hutchinson`: ``tr A ≈ mean_l z_lᵀ A z_l`` with ``num_probes`` probes (Hutchinson
  1989); error ``∝ 1/√N``.
- :func:`hutchpp`: a low-rank sketch plus Hutchinson on the deflated rest, within a budget
  of ``num_matvecs`` products (Meyer, Musco, Musco & Woodruff 2021); error ``∝ 1/m`` for
  PSD ``A``.
- :func:`xtrace`: the exchangeable leave-one-out estimator, within a budget of
  ``num_matvecs`` products (Epperly, Tropp & Webber 2024).

Example
-------
>>> import torch
>>> A = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
>>> [round(f(lambda v: A @ v, 40, 40).value, 6) for f in (hutchpp, xtrace)]  # budget >= dim
[820.0, 820.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._progress import progress_bar
from ._common import Matmat, Matvec, _apply_block, _check_dim, _check_finite, _check_vector
from .probes import Distribution, _generator, _probe, _probes, _stderr
from .results import TraceEstimate

__all__ = ["hutchinson", "hutchpp", "xtrace"]


def hutchinson(
    matvec: Matvec,
    dim: int,
    num_probes: int,
    *,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    quadratic_form: Callable[[Tensor], Tensor] | None = None,
) -> TraceEstimate:
    r"""Hutchinson's trace estimator.

    .. math::

        \operatorname{tr} A ≈ \frac{1}{N} \sum_{l=1}^{N} z_lᵀ A z_l, \qquad
        \mathbb{E}[z zᵀ] = I,

    with Rademacher (±1) or standard Gaussian probes ``z_l``. Unbiased for any square ``A``,
    symmetric or not (e.g. the shape operator ``E = G⁻¹ Hess``). Its variance is
    ``2‖A_s‖_F² − 2Σ_i A_ii²`` (Rademacher) or ``2‖A_s‖_F²`` (Gaussian), with ``A_s`` the
    symmetric part, so the relative error decays only like ``1/√N``.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``.
    dim : int
        Length of the vectors.
    num_probes : int
        Number of probes ``N`` (= operator applications).
    seed : int
        Seed of the probes.
    distribution : {"rademacher", "gaussian"}
        Probe distribution.
    dtype, device :
        Of the probes.
    matmat : callable, optional
        ``V ↦ A V`` on ``(dim, b)`` blocks; used instead of ``matvec`` to batch probes.
    batch_size : int, optional
        Probes per ``matmat`` call (default: all at once).
    progress : bool
        Show a progress bar over probes.
    quadratic_form : callable, optional
        ``z ↦ zᵀ A z`` (a 0-d tensor), used instead of ``matvec`` when given: the estimator
        needs only these, and they can be cheaper than products (for a Hessian, Taylor mode,
        ``covariant._fast.QuadraticForm``). Probes are the same as with ``matvec``.

    Returns
    -------
    TraceEstimate

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> est = hutchinson(lambda v: A @ v, 10, 20, seed=0)
    >>> est.value  # a diagonal matrix: Rademacher probes give the exact trace
    55.0
    """
    dim = _check_dim(dim)
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
    gen = _generator(seed)
    bar = progress_bar(None, enabled=progress, total=num_probes, desc="hutchinson")
    if matmat is None or quadratic_form is not None:  # one probe at a time, no block copies
        values = []
        for _ in range(num_probes):
            z = _probe(gen, dim, distribution, dtype, device)
            if quadratic_form is not None:
                values.append(torch.as_tensor(quadratic_form(z)).detach().reshape(()))
            else:
                values.append(torch.dot(z, _check_vector(matvec(z), dim, "matvec")
                                        .detach()))
            bar.update(1)
        bar.close()
        s = torch.stack(values)
        _check_finite(s, "hutchinson: the probe values zᵀAz")
        return TraceEstimate(float(s.mean()), _stderr(s), num_probes, s)
    bs = batch_size or num_probes
    samples = []
    for start in range(0, num_probes, bs):
        b = min(bs, num_probes - start)
        Z = _probes(gen, dim, b, distribution, dtype, device)
        AZ = _apply_block(matvec, matmat, Z, bar)
        samples.append((Z * AZ).sum(0))
    bar.close()
    s = torch.cat(samples)
    _check_finite(s, "hutchinson: the probe values zᵀAz")
    return TraceEstimate(float(s.mean()), _stderr(s), num_probes, s)


def hutchpp(
    matvec: Matvec,
    dim: int,
    num_matvecs: int,
    *,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    progress: bool = False,
) -> TraceEstimate:
    r"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff, SOSA 2021).

    Spend ``s = ⌊m/3⌋`` products on a sketch ``Q = orth(A S)``, ``s`` on ``A Q`` and the
    remaining ``h = m − 2s`` on Hutchinson probes ``G`` of the deflated remainder:

    .. math::

        \operatorname{tr} A ≈ \operatorname{tr}(Qᵀ A Q)
        + \frac{1}{h} \operatorname{tr}\big(Gᵀ (I − QQᵀ) A (I − QQᵀ) G\big).

    For symmetric PSD ``A`` the error decays like ``1/m`` instead of Hutchinson's ``1/√m``;
    it is especially effective for fast-decaying spectra. The estimate is unbiased for *any*
    square ``A`` (the identity ``tr A = tr(PAP) + tr((I−P)A(I−P))`` holds for every orthogonal
    projector ``P``), so non-symmetric operators such as ``G⁻¹ Hess`` are fine; the variance
    guarantee is only proven for the symmetric PSD case.

    ``samples`` are ``tr(QᵀAQ) + gᵀ(I−QQᵀ)A(I−QQᵀ)g`` per residual probe ``g``, so
    ``stderr`` is the standard error of the Hutchinson part (the sketch part is treated as
    fixed).

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``.
    dim : int
        Length of the vectors.
    num_matvecs : int
        Total budget ``m >= 3`` of operator applications. If ``m >= dim`` the trace is computed
        exactly with ``dim`` products instead (``stderr = 0``).
    seed, distribution, dtype, device, matmat, progress :
        As in :func:`hutchinson`.

    Returns
    -------
    TraceEstimate

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(0.5 ** torch.arange(200, dtype=torch.float64))
    >>> est = hutchpp(lambda v: A @ v, 200, 30)
    >>> abs(est.value - 2.0) < 1e-2
    True
    """
    dim, bar, exact = _trace_setup("hutchpp", 3, "hutch++", matvec, dim, num_matvecs,
                                   dtype, device, matmat, progress)
    if exact is not None:
        return exact
    gen = _generator(seed)
    s = num_matvecs // 3
    h = num_matvecs - 2 * s
    S = _probes(gen, dim, s, distribution, dtype, device)
    Gp = _probes(gen, dim, h, distribution, dtype, device)
    Q, _ = torch.linalg.qr(_apply_block(matvec, matmat, S, bar))
    t_low = (Q * _apply_block(matvec, matmat, Q, bar)).sum()
    Gp = Gp - Q @ (Q.T @ Gp)
    AG = _apply_block(matvec, matmat, Gp, bar)
    bar.close()
    samples = t_low + (Gp * AG).sum(0)
    _check_finite(samples, "hutchpp: the estimates")
    return TraceEstimate(float(samples.mean()), _stderr(samples), num_matvecs, samples)


def xtrace(
    matvec: Matvec,
    dim: int,
    num_matvecs: int,
    *,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    progress: bool = False,
) -> TraceEstimate:
    r"""XTrace, the exchangeable trace estimator (Epperly, Tropp & Webber, SIMAX 2024).

    With ``n = ⌊m/2⌋`` probes ``Ω = [ω_1 … ω_n]``, let ``Q_i`` be an orthonormal basis of
    ``A Ω_{−i}`` (all probes but the ``i``-th) and ``P_i = Q_i Q_iᵀ``. Each probe gives an
    unbiased estimate

    .. math::

        t_i = \operatorname{tr}(Q_iᵀ A Q_i) + ω_iᵀ (I − P_i) A (I − P_i) ω_i,

    and XTrace returns ``mean(t_i)`` with the error estimate ``std(t_i)/√n`` as ``stderr``.
    All ``n`` leave-one-out bases come from a single QR ``A Ω = Q R``: ``Q_i Q_iᵀ =
    Q (I − s_i s_iᵀ) Qᵀ``, with ``s_i`` the normalized ``i``-th column of ``R⁻ᵀ``. Cost: ``2n``
    products (``A Ω`` and ``A Q``). This is the basic estimator of the paper with Rademacher
    or Gaussian probes, not its "improved" normalized-probe variant.

    Each ``t_i`` is unbiased for any square ``A`` (``Q_i`` does not depend on ``ω_i``), so
    non-symmetric operators such as ``G⁻¹ Hess`` are fine; the variance bounds of the paper
    assume a symmetric ``A``.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``.
    dim : int
        Length of the vectors.
    num_matvecs : int
        Total budget ``m >= 4`` (an odd ``m`` wastes one). If ``m >= dim`` the trace is computed
        exactly with ``dim`` products instead (``stderr = 0``).
    seed, distribution, dtype, device, matmat, progress :
        As in :func:`hutchinson`.

    Returns
    -------
    TraceEstimate

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(0.5 ** torch.arange(200, dtype=torch.float64))
    >>> est = xtrace(lambda v: A @ v, 200, 30)
    >>> abs(est.value - 2.0) < 1e-3
    True
    """
    dim, bar, exact = _trace_setup("xtrace", 4, "xtrace", matvec, dim, num_matvecs,
                                   dtype, device, matmat, progress)
    if exact is not None:
        return exact
    gen = _generator(seed)
    n = num_matvecs // 2
    Om = _probes(gen, dim, n, distribution, dtype, device)
    Y = _apply_block(matvec, matmat, Om, bar)
    Q, R = torch.linalg.qr(Y)
    Z = _apply_block(matvec, matmat, Q, bar)
    bar.close()
    H = Q.T @ Z
    eye = torch.eye(n, dtype=dtype, device=R.device)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    if not bool(torch.isfinite(Rinv).all()):  # A Ω rank-deficient (e.g. rank(A) < n)
        Rinv = torch.linalg.pinv(R)
    S = Rinv.T
    S = S / torch.linalg.vector_norm(S, dim=0, keepdim=True)
    C = Q.T @ Om
    # (I − P_i) ω_i = ω_i − Q d_i with d_i = (I − s_i s_iᵀ) Qᵀ ω_i.
    D = C - S * (S * C).sum(0)
    APw = Y - Z @ D  # A (I − P_i) ω_i
    E = Q.T @ APw
    PAPw = APw - Q @ (E - S * (S * E).sum(0))  # (I − P_i) A (I − P_i) ω_i
    samples = torch.trace(H) - (S * (H @ S)).sum(0) + (Om * PAPw).sum(0)
    _check_finite(samples, "xtrace: the estimates")
    return TraceEstimate(float(samples.mean()), _stderr(samples), 2 * n, samples)


def _trace_setup(
    name: str,
    minimum: int,
    desc: str,
    matvec: Matvec,
    dim: int,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    matmat: Matmat | None,
    progress: bool,
) -> tuple[int, Any, TraceEstimate | None]:
    """Shared start of the low-rank trace estimators: checks, progress bar, and the exact
    trace when the budget covers the dimension (then the bar is already closed)."""
    dim = _check_dim(dim)
    if num_matvecs < minimum:
        raise ValueError(f"{name} needs num_matvecs >= {minimum}, got {num_matvecs}.")
    bar = progress_bar(None, enabled=progress, total=min(num_matvecs, dim), desc=desc)
    if num_matvecs >= dim:
        out = _exact_trace(matvec, dim, dtype, device, matmat, bar)
        bar.close()
        return dim, bar, out
    return dim, bar, None


def _exact_trace(
    matvec: Matvec,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    matmat: Matmat | None,
    bar: Any,
) -> TraceEstimate:
    """``tr A = Σ_i e_iᵀ A e_i`` with ``dim`` products: used when the budget allows it."""
    total = torch.zeros((), dtype=dtype, device=device)
    chunk = 256
    for start in range(0, dim, chunk):
        stop = min(dim, start + chunk)
        E = torch.zeros(dim, stop - start, dtype=dtype, device=device)
        idx = torch.arange(start, stop, device=device)
        E[idx, idx - start] = 1
        AE = _apply_block(matvec, matmat, E, bar)
        total = total + AE[idx, idx - start].sum()
    _check_finite(total, "The trace")
    return TraceEstimate(float(total), 0.0, dim, total.reshape(1))
