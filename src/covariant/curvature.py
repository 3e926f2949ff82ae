r"""Curvature metrics of a model space: GGN, Fisher, empirical Fisher, and Adam's geometry.

A model space (``ParameterSpace.from_module``) has a loss L(θ) = Σ_b w_b ℓ(f(θ, X_b), y_b)
over batches b with weights w_b (batch size / total size for ``reduction='mean'``, 1 for
``'sum'``; exactly the weights of the loss). Its curvature metrics all have the form

.. math::

    G(θ) = Σ_b w_b J_bᵀ Λ_b J_b,  J_b = ∂f(θ, X_b)/∂θ,

with an output-space matrix Λ_b:

======================== ====================================================================
metric                   Λ_b
======================== ====================================================================
:class:`GGN`             H_b = ∇²_f ℓ(f, y_b), the Hessian of the loss w.r.t. the outputs
:class:`Fisher`          Σ_n c_n E_{ỹ ~ p(·|f_n)}[∇_f ℓ_n(ỹ) ∇_f ℓ_n(ỹ)ᵀ], exact or Monte Carlo
:class:`EmpiricalFisher` Σ_n c_n ∇_f ℓ_n(y_n) ∇_f ℓ_n(y_n)ᵀ, with the observed labels
======================== ====================================================================

**Scaling convention.** A batch loss is written ℓ = Σ_n c_n ℓ_n with ℓ_n the negative
log-likelihood of sample n summed over its output entries and c_n the reduction factor:

- ``CrossEntropyLoss``: ℓ_n = −Σ_c t_nc log softmax(f_n)_c; c_n = 1/(number of non-ignored
  targets) for ``'mean'``, 1 for ``'sum'``;
- ``MSELoss``: ℓ_n = ‖f_n − y_n‖² (a Gaussian of variance ½); c_n = 1/numel(f) for ``'mean'``;
- ``BCEWithLogitsLoss``: ℓ_n = Σ_k BCE(f_nk, y_nk); c_n = 1/numel(f) for ``'mean'``;
- any other loss: ℓ_n is the loss of a batch of one, c_n = 1/N (``'mean'`` or a plain
  function) or 1 (``'sum'``).

With this convention the empirical Fisher is Σ_b w_b Σ_n c_n g_n g_nᵀ with g_n = ∇_θ ℓ_n,
i.e. (1/N) Σ_n g_n g_nᵀ over the whole data set for a cross-entropy mean loss, and for
exponential-family losses in their natural parameters (CE, MSE, BCE-with-logits) the Fisher
equals the GGN, and E_{y ~ model}[empirical Fisher] = Fisher.

Everything is matrix-free: one ``torch.func.jvp`` and one ``torch.func.vjp`` through the model
per batch and product, and closed forms (or an autodiff HVP) in output space. ``matvec`` is
differentiable in the point, so the connection code (Christoffel symbols, Riemannian Hessian)
can differentiate it.

**Degenerate metrics.** A GGN is often singular: with more parameters than outputs × samples,
or along symmetries (a cross-entropy net with a linear last layer is invariant to adding the
same number to every logit, so the GGN always has zero eigenvalues there). ``solve`` never
returns a silent 1e14: with ``solve_mode='raise'`` (default) it raises
:class:`~covariant.errors.SingularMetricError` with the fix, ``Damped(G, lam,
reference=...)`` (MATH.md §5); with ``solve_mode='pinv'`` it returns the pseudo-inverse
solution G⁺w, matrix-free (Lanczos, i.e. CG, with the numerically null Ritz directions
dropped: :meth:`CurvatureMetric.pinv_solve`), and ``logdet`` is the pseudo-log-determinant.
``rank`` is always the numerical rank (eigenvalues above ``rank_rtol``·λ_max).

:class:`AdamMetric` is different in kind: the diagonal preconditioner of an Adam / RMSprop /
Adagrad state. It is a constant metric in the chart where the optimizer ran and is **not** a
tensor under reparametrization (MATH.md §6).

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
>>> X, y = torch.randn(20, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
>>> space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y), metric="ggn")
>>> G = space.metric.dense(theta)
>>> G.shape, bool(torch.allclose(G, G.T))
(torch.Size([17, 17]), True)
>>> fisher = cv.curvature.Fisher.from_space(space)          # = GGN for MSE
>>> bool(torch.allclose(fisher.dense(theta), G))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from .errors import NonFiniteError, NotConvergedError, ShapeMismatchError, SingularMetricError
from .metrics import Diagonal, Euclidean, Metric, check_dense_size

__all__ = [
    "GGN",
    "AdamMetric",
    "CurvatureMetric",
    "EmpiricalFisher",
    "Fisher",
    "metric_from_name",
]

Forward = Callable[[Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

#: Names understood by :func:`metric_from_name` (and ``ParameterSpace.from_module``).
METRIC_NAMES = ("euclidean", "ggn", "fisher", "empirical_fisher")
_ALIASES = {
    "gauss_newton": "ggn",
    "generalized_gauss_newton": "ggn",
    "ef": "empirical_fisher",
    "empiricalfisher": "empirical_fisher",
}
_SOLVE_MODES = ("raise", "pinv")


# ============================================================================================
# Losses: what we know about them in output space
# ============================================================================================


@dataclass(frozen=True)
class _LossInfo:
    """The kind of a loss and the options that its closed forms need."""

    kind: str  # "ce", "mse", "bce" or "generic"
    reduction: str
    ignore_index: int = -100
    label_smoothing: float = 0.0


def _loss_info(loss_fn: LossFn) -> _LossInfo:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"curvature metrics need a scalar loss: reduction={reduction!r} is not supported. "
            "Use reduction='mean' (averaged like the full-batch loss) or 'sum'."
        )
    if loss_fn is F.cross_entropy:
        return _LossInfo("ce", "mean")
    if loss_fn is F.mse_loss:
        return _LossInfo("mse", "mean")
    if loss_fn is F.binary_cross_entropy_with_logits:
        return _LossInfo("bce", "mean")
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None:
        return _LossInfo(
            "ce", reduction, int(loss_fn.ignore_index), float(loss_fn.label_smoothing)
        )
    if type(loss_fn) is nn.MSELoss:
        return _LossInfo("mse", reduction)
    if (
        type(loss_fn) is nn.BCEWithLogitsLoss
        and loss_fn.weight is None
        and loss_fn.pos_weight is None
    ):
        return _LossInfo("bce", reduction)
    return _LossInfo("generic", reduction)


def _cast_input(X: Tensor, p: Tensor) -> Tensor:
    if X.is_floating_point():
        return X.to(device=p.device, dtype=p.dtype)
    return X.to(device=p.device)


class _CE:
    """Cross-entropy in rows: logits (M, C), target distributions (M, C), reduction factor."""

    def __init__(self, out: Tensor, y: Tensor, info: _LossInfo) -> None:
        self.squeeze = out.ndim == 1
        if self.squeeze:  # a single unbatched sample of C logits
            y = y[None] if y.is_floating_point() and y.shape == out.shape else y.reshape(1)
            out = out[None]
        C = out.shape[1]
        self.moved_shape = out.movedim(1, -1).shape
        z = out.movedim(1, -1).reshape(-1, C)
        if y.is_floating_point() and y.shape == out.shape:  # class probabilities
            T = y.to(z.dtype).movedim(1, -1).reshape(-1, C)
            valid = torch.ones(T.shape[0], dtype=z.dtype, device=z.device)
            count = T.shape[0]
        else:  # class indices
            t = y.reshape(-1).to(device=z.device)
            mask = t != info.ignore_index
            T = F.one_hot(torch.where(mask, t, torch.zeros_like(t)).long(), C).to(z.dtype)
            valid = mask.to(z.dtype)
            T = T * valid[:, None]
            count = valid.sum().clamp_min(1)
        eps = info.label_smoothing
        if eps:
            T = (1 - eps) * T + (eps / C) * valid[:, None]
        self.C = C
        self.probs = torch.softmax(z, dim=-1)
        self.T = T
        self.weight = T.sum(-1)  # 1 per valid row, 0 per ignored one
        self.valid = valid
        self.c = 1.0 / count if info.reduction == "mean" else 1.0

    def rows(self, u: Tensor) -> Tensor:
        if self.squeeze:
            u = u[None]
        return u.movedim(1, -1).reshape(-1, self.C)

    def unrows(self, r: Tensor) -> Tensor:
        out = r.reshape(self.moved_shape).movedim(-1, 1)
        return out[0] if self.squeeze else out

    def hvp(self, u: Tensor) -> Tensor:
        """H u with H = c · s_n (diag p_n − p_n p_nᵀ) per row (s_n = Σ_c t_nc)."""
        p, ur = self.probs, self.rows(u)
        pu = (p * ur).sum(-1, keepdim=True)
        return self.unrows(self.c * self.weight[:, None] * (p * ur - p * pu))

    def grads(self) -> Tensor:
        """Per-row gradients ∇_z ℓ_n = s_n p_n − t_n of the unreduced losses."""
        return self.weight[:, None] * self.probs - self.T

    def mc_grads(self, uniforms: Tensor) -> Tensor:
        """(M, S, C) gradients p_n − e_ỹ with ỹ ~ Cat(p_n) by inverse-CDF sampling."""
        cdf = torch.cumsum(self.probs.detach(), dim=-1)
        labels = torch.searchsorted(cdf, uniforms.T.contiguous()).clamp_max(self.C - 1)
        return self.probs[:, None, :] - F.one_hot(labels, self.C).to(self.probs.dtype)


def _rows(x: Tensor) -> Tensor:
    """Per-sample rows (N, k) of a batched output (a 1-D output is one row per entry)."""
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)


def _outer_rows(g: Tensor, u: Tensor, scale: Tensor | float) -> Tensor:
    """Σ_n scale · g_n (g_nᵀ u_n) for rows g, u of shape (N, k)."""
    return scale * g * (g * u).sum(-1, keepdim=True)


def _mc_outer_rows(g: Tensor, u: Tensor, scale: Tensor | float) -> Tensor:
    """(scale / S) Σ_s g_sn (g_snᵀ u_n) for g of shape (N, S, k) and u of shape (N, k)."""
    a = (g * u[:, None, :]).sum(-1, keepdim=True)
    return scale * (g * a).mean(1)


def _reduction_factor(info: _LossInfo, out: Tensor) -> float:
    """c for elementwise losses (MSE, BCE): 1/numel for 'mean', 1 for 'sum'."""
    return 1.0 / out.numel() if info.reduction == "mean" else 1.0


def _generic_hvp(loss_fn: LossFn, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """∇²_f ℓ · u = ∇_f (∇_f ℓ · u), reverse-over-forward autodiff.

    Forward-over-reverse (``jvp`` of ``grad``) and reverse-over-reverse trip over ZeroTensors
    in ``F.mse_loss`` (alone or under an outer ``jvp``); this order composes with every
    ``torch.func`` transform the metric meets (vmap, jvp, grad).
    """
    return grad(lambda o: jvp(lambda oo: loss_fn(oo, y), (o,), (u,))[1])(out)


# ============================================================================================
# The model-curvature metrics
# ============================================================================================


def _as_batches(batches: Any) -> list[Batch]:
    if (
        isinstance(batches, tuple | list)
        and len(batches) == 2
        and isinstance(batches[0], Tensor)
        and isinstance(batches[1], Tensor)
    ):
        return [(batches[0], batches[1])]
    out = [(X, y) for X, y in batches]
    if not out:
        raise ValueError("curvature metric: the data is empty; pass (X, y) or a list of batches")
    return out


def _default_weights(loss_fn: LossFn, batches: Sequence[Batch]) -> list[float]:
    total = sum(X.shape[0] for X, _ in batches)
    reduction = getattr(loss_fn, "reduction", "mean")
    return [X.shape[0] / total if reduction == "mean" else 1.0 for X, _ in batches]


def _default_rtol(dtype: torch.dtype, base: float) -> float:
    return max(base, 100.0 * torch.finfo(dtype).eps)


class CurvatureMetric(Metric):
    r"""Base class of the matrix-free curvature metrics G = Σ_b w_b J_bᵀ Λ_b J_b.

    Subclasses define the output-space product Λ_b u (:meth:`_output_matvec`). The base class
    supplies the model Jacobian products, the batch average, and the handling of degenerate
    metrics (``solve``, ``rank``, ``logdet``, ``pseudo_logdet``).

    Parameters
    ----------
    forward : callable
        ``forward(p, X)``: the model's outputs at the flat point ``p`` (torch.func-friendly;
        ``ParameterSpace.from_module`` provides one as ``space.binding.forward``).
    loss_fn : callable
        ``loss_fn(outputs, y)``, a scalar (``reduction='mean'`` or ``'sum'``).
    batches : (X, y) or iterable of (X, y)
        The data. Floating inputs are cast to the point's dtype and device.
    weights : sequence of float, optional
        Batch weights w_b with L = Σ_b w_b ℓ_b; by default batch size / total size for a mean
        reduction and 1 for a sum, exactly like ``ParameterSpace.from_module``.
    solve_mode : {"raise", "pinv"}
        What ``solve`` and ``logdet`` do with a singular metric: raise
        :class:`~covariant.errors.SingularMetricError` with the fix (default), or return the
        pseudo-inverse solution G⁺w and the pseudo-log-determinant.
    cg_rtol : float, optional
        Relative tolerance of the conjugate-gradient solves (1e-12 in float64, 100·eps in
        lower precision).
    cg_maxiter : int, optional
        Maximum CG iterations (10·d by default).
    rank_rtol : float, optional
        Eigenvalues below ``rank_rtol · λ_max`` count as zero (``rank``, ``pseudo_logdet``,
        and the singularity test of ``solve``). Default ``max(1e-10, 100·eps)``.
    """

    name = "CurvatureMetric"

    def __init__(
        self,
        forward: Forward,
        loss_fn: LossFn,
        batches: Any,
        weights: Sequence[float] | None = None,
        *,
        solve_mode: str = "raise",
        cg_rtol: float | None = None,
        cg_maxiter: int | None = None,
        rank_rtol: float | None = None,
    ) -> None:
        if not callable(forward):
            raise TypeError(f"{self.name}: forward must be callable forward(p, X)")
        if not callable(loss_fn):
            raise TypeError(f"{self.name}: loss_fn must be callable loss_fn(outputs, y)")
        if solve_mode not in _SOLVE_MODES:
            raise ValueError(
                f"{self.name}: solve_mode must be one of {_SOLVE_MODES}, got {solve_mode!r}"
            )
        self.forward = forward
        self.loss_fn = loss_fn
        self.batches = _as_batches(batches)
        self.weights = (
            _default_weights(loss_fn, self.batches)
            if weights is None
            else [float(w) for w in weights]
        )
        if len(self.weights) != len(self.batches):
            raise ShapeMismatchError(
                f"{self.name}: {len(self.weights)} weights for {len(self.batches)} batches"
            )
        self.info = _loss_info(loss_fn)
        self.solve_mode = solve_mode
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter
        self.rank_rtol = rank_rtol
        self.is_constant = False
        self._eig_cache: tuple[Tensor, Tensor] | None = None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_space(cls, space: Any, **kwargs: Any) -> CurvatureMetric:
        """The metric of a model space, in that space's chart.

        For a space made by ``reparametrize`` (any number of times) this is the metric of
        the model ψ ↦ f(h(ψ)), with h the composed chart to the root module space: the
        metric computed *in the chart*, which must equal the pulled-back one.

        Example
        -------
        >>> import torch, covariant as cv
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2)).double()
        >>> data = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
        >>> space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), data, metric="ggn")
        >>> new = space.reparametrize(cv.reparam.Scale(2.0))
        >>> G = cv.curvature.GGN.from_space(new)
        >>> psi, v = new.chart.inverse(theta), torch.randn(6, dtype=torch.float64)
        >>> bool(torch.allclose(G.matvec(psi, v), new.metric.matvec(psi, v)))
        True
        """
        forward, loss_fn, batches, weights = _model_of(space, cls.name)
        return cls(forward, loss_fn, batches, weights, **kwargs)

    # ---------------------------------------------------------------- products
    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """Λ_b u in output space (``out`` = f(p, X_b), ``u`` = J_b v)."""
        raise NotImplementedError

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        """An upper bound on rank Λ_b (used in messages and for large d)."""
        return out.numel()

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        """G(p) v = Σ_b w_b J_bᵀ Λ_b(f_b) J_b v: one jvp and one vjp per batch.

        Differentiable in ``p`` (and composable with ``torch.func`` transforms).
        """
        total: Tensor | None = None
        for b, (w, (X, y)) in enumerate(zip(self.weights, self.batches, strict=True)):
            Xb = _cast_input(X, p)
            yb = y.to(device=p.device)

            def f(q: Tensor, Xb: Tensor = Xb) -> Tensor:
                return self.forward(q, Xb)

            out, Jv = jvp(f, (p,), (v,))
            u = self._output_matvec(b, out, yb, Jv)
            term = w * vjp(f, p)[1](u)[0]
            total = term if total is None else total + term
        assert total is not None
        return total

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        """G(p) as a dense symmetric (d, d) matrix, from d products (small d only)."""
        d = p.shape[0]
        check_dense_size(d, f"{self.name}.dense", max_dim)
        eye = torch.eye(d, dtype=p.dtype, device=p.device)
        try:
            rows = vmap(lambda e: self.matvec(p, e), chunk_size=min(d, 256))(eye)
        except (RuntimeError, NotImplementedError):  # models that vmap cannot batch
            rows = torch.stack([self.matvec(p, e) for e in eye])
        return 0.5 * (rows + rows.T)

    # ---------------------------------------------------------------- spectrum and rank
    def _rank_rtol(self, dtype: torch.dtype) -> float:
        return self.rank_rtol if self.rank_rtol is not None else _default_rtol(dtype, 1e-10)

    def eigvalsh(self, p: Tensor) -> Tensor:
        """Ascending eigenvalues of the dense G(p) (small d; cached for the last point)."""
        cache = self._eig_cache
        if (
            cache is not None
            and cache[0].shape == p.shape
            and cache[0].dtype == p.dtype
            and cache[0].device == p.device
            and torch.equal(cache[0], p)
        ):
            return cache[1]
        evals = torch.linalg.eigvalsh(self.dense(p.detach()))
        self._eig_cache = (p.detach().clone(), evals)
        return evals

    def rank(self, p: Tensor) -> int:
        """Numerical rank: #eigenvalues > ``rank_rtol``·λ_max (dense, up to MAX_DENSE_DIM).

        Beyond that size it returns the structural bound min(d, Σ_b rank Λ_b), which does
        not see symmetries of the model.
        """
        from .metrics import MAX_DENSE_DIM

        d = p.shape[0]
        if d > MAX_DENSE_DIM:
            return min(d, self.rank_bound(p))
        evals = self.eigvalsh(p)
        top = float(evals[-1])
        if top <= 0:
            return 0
        return int((evals > self._rank_rtol(p.dtype) * top).sum())

    def rank_bound(self, p: Tensor) -> int:
        """Structural upper bound Σ_b rank Λ_b on the rank (one forward pass per batch)."""
        total = 0
        with torch.no_grad():
            for b, (X, y) in enumerate(self.batches):
                out = self.forward(p.detach(), _cast_input(X, p))
                total += self._output_rank_bound(b, out, y.to(p.device))
        return total

    def pseudo_logdet(self, p: Tensor) -> Tensor:
        """log of the product of the nonzero eigenvalues (dense; MATH.md §5)."""
        evals = self.eigvalsh(p)
        r = self.rank(p)
        if r == 0:
            return p.new_zeros(())
        return evals[-r:].log().sum()

    def logdet(self, p: Tensor) -> Tensor:
        """log det G(p) (dense). A singular G raises, or gives the pseudo-log-determinant
        with ``solve_mode='pinv'``."""
        r = self.rank(p)
        if r < p.shape[0] and self.solve_mode == "raise":
            raise SingularMetricError(
                f"{self.name}.logdet: the metric has rank {r} < d = {p.shape[0]}, so its "
                "determinant is 0. " + self._fix_hint()
                + " pseudo_logdet(p) gives the log-product of the nonzero eigenvalues."
            )
        return self.pseudo_logdet(p)

    # ---------------------------------------------------------------- solves
    def _fix_hint(self) -> str:
        return (
            "Fixes: damp it in a way that keeps invariance, covariant.metrics.Damped(G, lam, "
            "reference=<a correctly transformed metric, e.g. the pullback of a metric of the "
            f"original chart>) (MATH.md §5); or ask for the projected answer, {self.name}(..., "
            "solve_mode='pinv'), which solves on the range of G (the pseudo-inverse)."
        )

    def _cg(self, p: Tensor, rhs: Tensor, watch: bool) -> Tensor:
        from .linalg import cg

        tol = self._rank_rtol(p.dtype)
        seen = {"max": 0.0}

        def A(x: Tensor) -> Tensor:
            Ax = self.matvec(p, x)
            if watch:
                xx = float(torch.dot(x, x))
                if xx > 0:
                    rq = float(torch.dot(x, Ax)) / xx
                    seen["max"] = max(seen["max"], rq)
                    if rq <= tol * seen["max"]:
                        raise SingularMetricError(
                            f"{self.name}.solve: the metric is singular at this point (a "
                            f"conjugate-gradient direction has Rayleigh quotient {rq:.3e} <= "
                            f"{tol:.0e} × {seen['max']:.3e}); G⁻¹w does not exist. "
                            + self._bound_note(p) + self._fix_hint()
                        )
            return Ax

        rtol = self.cg_rtol if self.cg_rtol is not None else _default_rtol(p.dtype, 1e-12)
        try:
            return cg(A, rhs, rtol=rtol, maxiter=self.cg_maxiter).x
        except NotConvergedError as err:
            raise SingularMetricError(
                f"{self.name}.solve: conjugate gradients did not converge ({err}); the metric "
                "is singular or badly conditioned. " + self._fix_hint()
            ) from err
        except SingularMetricError as err:
            if str(err).startswith(self.name):
                raise
            raise SingularMetricError(
                f"{self.name}.solve: {err} " + self._fix_hint()
            ) from err

    def _bound_note(self, p: Tensor) -> str:
        try:
            bound = self.rank_bound(p)
        except Exception:  # pragma: no cover - only for the message
            return ""
        d = p.shape[0]
        if bound < d:
            return (
                f"Its rank is at most {bound} (outputs × samples) < d = {d} parameters, so it "
                "is singular everywhere. "
            )
        return "Zero eigenvalues usually come from symmetries of the model. "

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        """G(p)⁻¹ w by conjugate gradients, or G⁺w on the range with ``solve_mode='pinv'``.

        ``'raise'``: CG, stopped with :class:`~covariant.errors.SingularMetricError` as soon
        as a CG direction shows a (numerically) zero eigenvalue, or if CG does not converge.
        A right-hand side in the range of G (a loss gradient always is, for the GGN and the
        empirical Fisher) has a solution even for a singular G, and CG returns the one in
        the range, G⁺w.

        ``'pinv'``: :meth:`pinv_solve`.
        """
        if self.solve_mode == "raise":
            return self._cg(p, w, watch=True)
        return self.pinv_solve(p, w)

    def pinv_solve(self, p: Tensor, w: Tensor) -> Tensor:
        r"""G(p)⁺ w, the pseudo-inverse solution, matrix-free ("CG on the range").

        Lanczos on the Krylov space K(G, w) with full reorthogonalization: with the basis V
        and T = VᵀGV, x = V T⁺ Vᵀw, where T⁺ drops the Ritz values below ``rank_rtol``·θ_max.
        The null-space part of w is an eigenvector of G with eigenvalue 0, so it shows up as
        such a Ritz value and is dropped (the same threshold as :meth:`rank` and
        ``torch.linalg.pinv(G, rtol=rank_rtol)``). On an SPD G this is CG in exact
        arithmetic; unlike CG, a right-hand side outside the range cannot make it blow up. It
        keeps the basis: k vectors of size d after k iterations.

        It stops when the residual outside span(V), β_k |y_k|, is below ``cg_rtol``·‖w‖ on the
        range and every dropped Ritz pair is a converged null vector, or when the Krylov
        space is invariant.
        """
        d = w.shape[0]
        tol = self._rank_rtol(p.dtype)
        rtol = self.cg_rtol if self.cg_rtol is not None else _default_rtol(p.dtype, 1e-12)
        maxiter = d if self.cg_maxiter is None else min(int(self.cg_maxiter), d)
        nw = float(torch.linalg.vector_norm(w))
        if not math.isfinite(nw):
            raise NonFiniteError(f"{self.name}.pinv_solve: the right-hand side is NaN or Inf")
        if nw == 0.0:
            return torch.zeros_like(w)
        Q = [w / nw]
        alphas: list[float] = []
        betas: list[float] = []
        y = torch.zeros(1, dtype=torch.float64)
        converged = False
        for _ in range(maxiter):
            z = self.matvec(p, Q[-1])
            alphas.append(float(torch.dot(Q[-1], z)))
            if not math.isfinite(alphas[-1]):
                raise NonFiniteError(f"{self.name}.pinv_solve: G v is NaN or Inf")
            V = torch.stack(Q)
            for _ in range(2):  # full reorthogonalization; twice is enough
                z = z - V.T @ (V @ z)
            beta = float(torch.linalg.vector_norm(z))
            k = len(alphas)
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if k > 1:
                off = torch.tensor(betas, dtype=torch.float64)
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            theta, U = torch.linalg.eigh(T)
            top = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
            keep = theta > tol * top
            c_kept = nw * U[0, keep]  # U_keptᵀ (‖w‖ e₁)
            y = U[:, keep] @ (c_kept / theta[keep])
            if beta <= tol * top:  # invariant Krylov space: exact on it
                converged = True
                break
            outside = beta * abs(float(y[-1]))
            dropped_ok = bool((beta * U[-1, ~keep].abs() <= tol * top).all())
            if outside <= rtol * float(c_kept.norm()) and dropped_ok:
                converged = True
                break
            Q.append(z / beta)
            betas.append(beta)
        if not converged and maxiter < d:
            raise SingularMetricError(
                f"{self.name}.pinv_solve: not converged in {maxiter} iterations; raise "
                "cg_maxiter or loosen cg_rtol, or damp the metric. " + self._fix_hint()
            )
        V = torch.stack(Q[: y.shape[0]])
        return V.T @ y.to(dtype=w.dtype, device=w.device)

    def __repr__(self) -> str:
        loss = getattr(type(self.loss_fn), "__name__", "loss")
        if loss == "function":
            loss = getattr(self.loss_fn, "__name__", "loss")
        return f"{self.name}({loss}, {len(self.batches)} batches, solve_mode={self.solve_mode!r})"


class GGN(CurvatureMetric):
    r"""Generalized Gauss-Newton metric G = Σ_b w_b J_bᵀ H_b J_b.

    J_b = ∂f(θ, X_b)/∂θ is the model Jacobian and H_b = ∇²_f ℓ(f, y_b) the Hessian of the loss
    w.r.t. the outputs, in closed form for cross-entropy (c · (diag p − ppᵀ) per sample,
    respecting ``reduction``, ``ignore_index`` and ``label_smoothing``), MSE (2c·I) and
    BCE-with-logits (c · σ(1−σ)); an autodiff Hessian-vector product of the loss otherwise.
    For a loss that is not convex in the outputs the GGN can be indefinite.

    See :class:`CurvatureMetric` for the parameters; ``GGN.from_space(space)`` builds it
    from a model space (in that space's chart).

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(3, 2).double()
    >>> X = torch.randn(10, 3, dtype=torch.float64)
    >>> y = torch.randn(10, 2, dtype=torch.float64)
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y))
    >>> G = cv.curvature.GGN.from_space(space)
    >>> # a linear model with MSE: G = (2 / numel) Σ_n J_nᵀ J_n, with J_n the same for each
    >>> # output; for the weights: (2 / 20) XᵀX per output row
    >>> Gd = G.dense(theta)
    >>> bool(torch.allclose(Gd[:3, :3], 2 / 20 * X.T @ X))
    True
    """

    name = "GGN"

    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        kind = self.info.kind
        if kind == "ce":
            return _CE(out, y, self.info).hvp(u)
        if kind == "mse":
            return 2 * _reduction_factor(self.info, out) * u
        if kind == "bce":
            s = torch.sigmoid(out)
            return _reduction_factor(self.info, out) * s * (1 - s) * u
        return _generic_hvp(self.loss_fn, out, y.to(out.dtype) if y.is_floating_point() else y, u)

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        if self.info.kind == "ce":
            ce = _CE(out, y, self.info)
            return int(ce.valid.sum()) * (ce.C - 1)
        return out.numel()


class Fisher(CurvatureMetric):
    r"""Fisher information of the model's predictive distribution, exact or Monte Carlo.

    F = Σ_b w_b Σ_n c_n J_nᵀ E_{ỹ ~ p(·|f_n)}[∇_f ℓ_n(ỹ) ∇_f ℓ_n(ỹ)ᵀ] J_n, with ℓ_n and c_n the
    per-sample negative log-likelihood and reduction factor of the module docstring. The
    predictive distribution is the one the loss is the NLL of: categorical (softmax) for
    cross-entropy, Gaussian of variance ½ for MSE, Bernoulli for BCE-with-logits.

    - ``mc_samples=None``: the exact Fisher, which equals the GGN for these
      exponential-family losses.
    - ``mc_samples=S``: the Monte-Carlo Fisher, (1/S) Σ_s of outer products of the gradients
      at S sampled labels per sample. The randomness (uniforms for categorical / Bernoulli
      labels, normals for Gaussian ones) is drawn once from ``seed``, so the metric is a
      deterministic function of the point (and piecewise smooth in it). Its error shrinks
      like 1/√S.

    Other losses raise: their predictive distribution is unknown here. If such a loss is the
    NLL of an exponential family in its natural parameters, its Fisher is the :class:`GGN`.

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(3, 4).double()
    >>> X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 4, (30,))
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    >>> exact = cv.curvature.Fisher.from_space(space)
    >>> ggn = cv.curvature.GGN.from_space(space)
    >>> bool(torch.allclose(exact.dense(theta), ggn.dense(theta)))
    True
    >>> mc = cv.curvature.Fisher.from_space(space, mc_samples=2000, seed=0)
    >>> err = (mc.dense(theta) - exact.dense(theta)).norm() / exact.dense(theta).norm()
    >>> bool(err < 0.1)
    True
    """

    name = "Fisher"

    def __init__(
        self,
        forward: Forward,
        loss_fn: LossFn,
        batches: Any,
        weights: Sequence[float] | None = None,
        *,
        mc_samples: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(forward, loss_fn, batches, weights, **kwargs)
        if self.info.kind == "generic":
            raise ValueError(
                f"Fisher: the predictive distribution of {type(loss_fn).__name__} is unknown; "
                "the Fisher is implemented for CrossEntropyLoss (without class weights), "
                "MSELoss and BCEWithLogitsLoss (without weight/pos_weight). If your loss is "
                "the negative log-likelihood of an exponential family in its natural "
                "parameters, the Fisher equals the GGN: use metric='ggn' / covariant.curvature.GGN."
            )
        if mc_samples is not None and (int(mc_samples) != mc_samples or mc_samples < 1):
            raise ValueError(
                f"Fisher: mc_samples must be a positive integer or None, got {mc_samples!r}"
            )
        self.mc_samples = None if mc_samples is None else int(mc_samples)
        self.seed = int(seed)
        self._noise: list[Tensor] = []
        self._noise_cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        if self.mc_samples is not None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            S = self.mc_samples
            for _, y in self.batches:
                if self.info.kind == "ce":
                    if y.is_floating_point() and y.ndim >= 2:  # probabilities: drop class dim
                        shape = (y.shape[0], *y.shape[2:])
                    else:
                        shape = tuple(y.shape)
                    noise = torch.rand(S, *shape, generator=gen, dtype=torch.float64)
                    noise = noise.reshape(S, -1)
                elif self.info.kind == "mse":
                    noise = torch.randn(S, *y.shape, generator=gen, dtype=torch.float64)
                else:  # bce
                    noise = torch.rand(S, *y.shape, generator=gen, dtype=torch.float64)
                self._noise.append(noise)

    def _noise_for(self, b: int, like: Tensor) -> Tensor:
        key = (b, like.dtype, like.device)
        if key not in self._noise_cache:
            self._noise_cache[key] = self._noise[b].to(dtype=like.dtype, device=like.device)
        return self._noise_cache[key]

    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        kind = self.info.kind
        if self.mc_samples is None:  # the exact Fisher = the GGN of these losses
            if kind == "ce":
                return _CE(out, y, self.info).hvp(u)
            if kind == "mse":
                return 2 * _reduction_factor(self.info, out) * u
            s = torch.sigmoid(out)
            return _reduction_factor(self.info, out) * s * (1 - s) * u
        if kind == "ce":
            ce = _CE(out, y, self.info)
            g = ce.mc_grads(self._noise_for(b, out))  # (M, S, C)
            return ce.unrows(_mc_outer_rows(g, ce.rows(u), ce.c * ce.weight[:, None]))
        c = _reduction_factor(self.info, out)
        noise = self._noise_for(b, out)  # (S, *out.shape)
        if kind == "mse":
            g = math.sqrt(2.0) * noise  # ∇ℓ = 2(f − ỹ), ỹ = f + z/√2
        else:
            g = torch.sigmoid(out) - (noise < torch.sigmoid(out).detach()).to(out.dtype)
        S = noise.shape[0]
        g_rows = g.reshape(S, *_rows(out).shape).movedim(0, 1)  # (N, S, k)
        return _mc_outer_rows(g_rows, _rows(u), c).reshape(out.shape)

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        if self.info.kind == "ce":
            ce = _CE(out, y, self.info)
            k = ce.C - 1
            rows = int(ce.valid.sum())
        else:
            rows, k = _rows(out).shape
        if self.mc_samples is not None:
            k = min(k, self.mc_samples)
        return rows * k

    def __repr__(self) -> str:
        if self.mc_samples is None:
            mc = "exact"
        else:
            mc = f"mc_samples={self.mc_samples}, seed={self.seed}"
        return super().__repr__()[:-1] + f", {mc})"


class EmpiricalFisher(CurvatureMetric):
    r"""Empirical Fisher: gradient outer products at the observed labels.

    EF = Σ_b w_b Σ_n c_n g_n g_nᵀ with g_n = ∇_θ ℓ_n(f(θ, x_n), y_n) the gradient of the
    per-sample loss (scaling convention of the module docstring). Over a mean-reduced
    cross-entropy data set this is (1/N) Σ_n g_n g_nᵀ. Matrix-free: g_n = J_nᵀ ∇_f ℓ_n, so
    EF v = Σ_b w_b J_bᵀ [c_n ∇_f ℓ_n (∇_f ℓ_nᵀ (J_b v)_n)]_n; per-sample parameter gradients are
    never formed. Its rank is at most the number of samples. It assumes that the samples of a
    batch do not interact (no batch norm in training mode).

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(2, 3).double()
    >>> X, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 3, (5,))
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    >>> EF = cv.curvature.EmpiricalFisher.from_space(space)
    >>> g = [torch.func.grad(lambda p: nn.functional.cross_entropy(
    ...     torch.func.functional_call(model, space.unflatten(p), (X[n:n+1],)), y[n:n+1]))(theta)
    ...     for n in range(5)]
    >>> truth = sum(torch.outer(gn, gn) for gn in g) / 5
    >>> bool(torch.allclose(EF.dense(theta), truth))
    True
    """

    name = "EmpiricalFisher"

    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        kind = self.info.kind
        if kind == "ce":
            ce = _CE(out, y, self.info)
            return ce.unrows(_outer_rows(ce.grads(), ce.rows(u), ce.c))
        if kind in ("mse", "bce"):
            yt = y.to(out.dtype)
            g = 2 * (out - yt) if kind == "mse" else torch.sigmoid(out) - yt
            c = _reduction_factor(self.info, out)
            return _outer_rows(_rows(g), _rows(u), c).reshape(out.shape)
        yt = y.to(out.dtype) if y.is_floating_point() else y
        ghat = grad(lambda o: self.loss_fn(o, yt))(out)  # = c_n ∇ℓ_n per row
        n = out.shape[0] if out.ndim > 1 else out.numel()
        inv_c = float(n) if self.info.reduction == "mean" else 1.0
        return _outer_rows(_rows(ghat), _rows(u), inv_c).reshape(out.shape)

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        if self.info.kind == "ce":
            return int(_CE(out, y, self.info).valid.sum())
        return _rows(out).shape[0]


# ============================================================================================
# Adam / RMSprop / Adagrad
# ============================================================================================

_ADAM_KINDS = ("adam", "rmsprop", "adagrad")
_DEFAULT_EPS = {"adam": 1e-8, "rmsprop": 1e-8, "adagrad": 1e-10}


def _infer_kind(optimizer: torch.optim.Optimizer | None, states: Sequence[Mapping]) -> str:
    if optimizer is not None:
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.NAdam):
            return "adam"
        if isinstance(optimizer, torch.optim.RMSprop):
            return "rmsprop"
        if isinstance(optimizer, torch.optim.Adagrad):
            return "adagrad"
    for st in states:
        if "exp_avg_sq" in st:
            return "adam"
        if "square_avg" in st:
            return "rmsprop"
        if "sum" in st:
            return "adagrad"
    raise ValueError(
        "AdamMetric: cannot tell which optimizer made this state (no 'exp_avg_sq', "
        "'square_avg' or 'sum' entry); pass kind='adam', 'rmsprop' or 'adagrad'"
    )


class AdamMetric(Diagonal):
    r"""The diagonal geometry an Adam / RMSprop / Adagrad state implies: G = diag(√v̂ + ε).

    The optimizer's update is lr · G⁻¹ m (Adam: m̂, RMSprop/Adagrad: the gradient), so G is
    the metric of the chart the optimizer runs in:

    - Adam (and AdamW): v̂ = v / (1 − β₂ᵗ), the bias-corrected second moment
      (``max_exp_avg_sq`` with ``amsgrad``); G = √v̂ + ε, exactly PyTorch's denominator.
    - RMSprop: G = √v + ε (``centered``: √(v − ḡ²) + ε); no bias correction.
    - Adagrad: G = √(Σ g²) + ε.

    The diagonal is frozen when the object is built: a constant metric (no Christoffel
    symbols). It is **not** a tensor under reparametrization (MATH.md §6): Adam run in another
    chart builds its own squared-gradient statistics there, which are not Jᵀ G J. Use it to
    ask how flat a minimum is *for Adam*, in the chart Adam ran in.

    Parameters
    ----------
    state_or_optimizer : torch.optim.Optimizer, state dict, or {param: state}
        An optimizer, its ``state_dict()`` (params in ``param_groups`` order), or its
        ``.state`` mapping (then ``params`` is required).
    params : sequence of Tensor, optional
        The parameters, in the order of the flat point (e.g. ``model.parameters()``).
        Default: the optimizer's parameters in ``param_groups`` order.
    eps : float, optional
        ε; by default each parameter group's ``eps`` (PyTorch's default for ``kind`` with a
        bare ``.state`` mapping, which holds no hyperparameters).
    kind : {"adam", "rmsprop", "adagrad"}, optional
        Inferred from the optimizer type or the state's keys when left out.
    beta2 : float, optional
        β₂ of Adam; by default each parameter group's. Required with a bare ``.state``
        mapping. (With ``amsgrad``, ``max_exp_avg_sq`` is used whenever the state has it.)

    Example
    -------
    >>> import torch, covariant as cv
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> opt = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    >>> for _ in range(3):
    ...     opt.zero_grad(); (w**2).sum().backward(); opt.step()
    >>> G = cv.metrics.AdamMetric(opt)
    >>> v = opt.state[w]["exp_avg_sq"]
    >>> bool(torch.allclose(G.diag, (v / (1 - 0.99**3)).sqrt() + 1e-8))
    True
    """

    def __init__(
        self,
        state_or_optimizer: Any,
        params: Iterable[Tensor] | None = None,
        eps: float | None = None,
        kind: str | None = None,
        *,
        beta2: float | None = None,
    ) -> None:
        entries = _optimizer_entries(state_or_optimizer, params)
        optimizer = (
            state_or_optimizer
            if isinstance(state_or_optimizer, torch.optim.Optimizer)
            else None
        )
        if kind is None:
            kind = _infer_kind(optimizer, [st for st, _ in entries])
        kind = kind.lower()
        if kind not in _ADAM_KINDS:
            raise ValueError(f"AdamMetric: kind must be one of {_ADAM_KINDS}, got {kind!r}")
        parts = []
        for i, (st, group) in enumerate(entries):
            e = float(eps) if eps is not None else float(group.get("eps", _DEFAULT_EPS[kind]))
            parts.append(_denominator(kind, st, group, e, i, beta2).reshape(-1))
        diag = torch.cat(parts).detach().clone()
        if not bool((diag > 0).all()):
            raise SingularMetricError(
                f"AdamMetric: {int((diag <= 0).sum())} diagonal entries are <= 0 (eps = 0 and "
                "no gradient signal yet). Use eps > 0, or damp it: "
                "covariant.metrics.Damped(G, lam, reference=...)."
            )
        super().__init__(diag)
        self.diag = diag
        self.kind = kind

    def __repr__(self) -> str:
        return f"AdamMetric(kind={self.kind!r}, dim={self.diag.numel()})"


def _optimizer_entries(
    x: Any, params: Iterable[Tensor] | None
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(per-parameter state, its param group) pairs, in the order of the flat point."""
    if isinstance(x, torch.optim.Optimizer):
        group_of = {id(p): g for g in x.param_groups for p in g["params"]}
        order = (
            [p for g in x.param_groups for p in g["params"]] if params is None else list(params)
        )
        out = []
        for i, p in enumerate(order):
            if id(p) not in group_of:
                raise ValueError(f"AdamMetric: parameter {i} is not managed by the optimizer")
            out.append((x.state.get(p, {}), group_of[id(p)]))
        return out
    if isinstance(x, Mapping) and "state" in x and "param_groups" in x:
        if params is not None:
            raise ValueError(
                "AdamMetric: a state_dict orders parameters by its param_groups; do not pass "
                "params with it (or pass the optimizer itself)"
            )
        return [
            (x["state"].get(i, {}), g) for g in x["param_groups"] for i in g["params"]
        ]
    if isinstance(x, Mapping):
        if params is None:
            raise ValueError(
                "AdamMetric: with an optimizer's .state mapping, pass params=... (the "
                "parameters in the order of the flat point)"
            )
        return [(x.get(p, {}), {}) for p in params]
    raise TypeError(
        "AdamMetric: expected a torch.optim.Optimizer, its state_dict(), or its .state "
        f"mapping, got {type(x).__name__}"
    )


def _denominator(
    kind: str,
    st: Mapping[str, Any],
    group: Mapping[str, Any],
    eps: float,
    i: int,
    beta2: float | None,
) -> Tensor:
    key = {"adam": "exp_avg_sq", "rmsprop": "square_avg", "adagrad": "sum"}[kind]
    if key not in st:
        raise ValueError(
            f"AdamMetric: parameter {i} has no {key!r} in its {kind} state; run at least one "
            "optimizer step first (or pass the right kind=...)"
        )
    if kind == "adam":
        amsgrad = group.get("amsgrad", True) and "max_exp_avg_sq" in st
        v = st["max_exp_avg_sq"] if amsgrad else st[key]
        if beta2 is None:
            if "betas" not in group:
                raise ValueError(
                    "AdamMetric: the bias correction needs β₂, which a bare .state mapping "
                    "does not hold; pass beta2=... (or the optimizer, or its state_dict())"
                )
            beta2 = float(group["betas"][1])
        step = float(st["step"])
        bc2 = 1 - beta2**step
        return v.sqrt() / math.sqrt(bc2) + eps
    if kind == "rmsprop":
        v = st[key]
        if group.get("centered", False) and "grad_avg" in st:
            v = v - st["grad_avg"] ** 2
        return v.sqrt() + eps
    return st[key].sqrt() + eps


# ============================================================================================
# By name
# ============================================================================================


def _model_of(space: Any, what: str) -> tuple[Forward, LossFn, list[Batch], list[float]]:
    """forward (in the space's chart), loss_fn, batches and weights of a model space."""
    binding = space.binding
    if binding is None:
        raise ValueError(
            f"{what} needs a model space with a model, a loss function and data; this "
            "space has none. Build it with ParameterSpace.from_module(model, loss_fn, "
            "data), or pass an explicit Metric (e.g. covariant.metrics.Euclidean())."
        )
    h = space.root_chart()
    forward = binding.forward_in_chart(None if h is None else h.forward)
    return forward, binding.loss_fn, list(binding.batches), list(binding.weights)


def metric_from_name(name: str, space: Any, **kwargs: Any) -> Metric:
    """A metric of a model space by name, built in that space's chart.

    Parameters
    ----------
    name : {"ggn", "fisher", "empirical_fisher", "euclidean"}
        Also accepted: "gauss_newton", "ef"; case and ``-``/``_`` do not matter.
    space : ParameterSpace
        A model space (``from_module``) or any reparametrization of one; for the latter the
        metric is that of ψ ↦ f(h(ψ)), to compare with the pulled-back metric.
    **kwargs
        Passed to the constructor (``solve_mode``, ``mc_samples``, ``seed``, ...).

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(2, 2).double()
    >>> data = (torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,)))
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data)
    >>> metric_from_name("fisher", space, mc_samples=8)
    Fisher(CrossEntropyLoss, 1 batches, solve_mode='raise', mc_samples=8, seed=0)
    """
    if not isinstance(name, str):
        raise TypeError(f"metric_from_name: name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key == "euclidean":
        if kwargs:
            raise TypeError(f"metric 'euclidean' takes no options, got {sorted(kwargs)}")
        return Euclidean()
    classes: dict[str, type[CurvatureMetric]] = {
        "ggn": GGN,
        "fisher": Fisher,
        "empirical_fisher": EmpiricalFisher,
    }
    if key not in classes:
        raise ValueError(
            f"unknown metric {name!r}; choose one of {', '.join(repr(n) for n in METRIC_NAMES)} "
            "or pass a covariant.metrics.Metric (e.g. AdamMetric(optimizer))"
        )
    return classes[key].from_space(space, **kwargs)
