r"""Curvature operators of other libraries as covariant metrics (curvlinops).

A curvlinops operator (``GGNLinearOperator``, ``HessianLinearOperator``,
``KFACLinearOperator``, ``EKFACLinearOperator``, …) is a matrix evaluated at the parameter
values it was built with, θ₀. :func:`from_curvlinops` wraps it as a :class:`OperatorMetric`:
the metric G(θ₀) (+ λI), **pinned to the point θ₀**. It is not a metric field: asking for
G(p) at another point raises :class:`~covariant.errors.DomainError` (``point_check="raise"``,
the default), because the answer would silently be G(θ₀). Rebuild the operator at the new
parameters instead, or pass ``point_check="ignore"`` to use G(θ₀) on purpose as a constant
metric (a preconditioner). Two things are checked on every product at a plain point:

- the point p equals θ₀ (to a few hundred ulps, so a point that went through a chart and back
  still passes);
- for the operators that re-evaluate the model on every product (GGN, Hessian, Fisher, …)
  the live parameter tensors still hold θ₀; K-FAC and EK-FAC keep the factors they computed
  when wrapped (``from_curvlinops`` computes them then), so for them only p is checked.

Inside ``torch.func`` transforms the values are not observable and the check is skipped.
Because the metric is constant, its Christoffel symbols vanish; pulled back through a
nonlinear chart it is not constant in ψ, and ``Pullback`` differentiates the chart, not G.

Flat vectors: covariant's point is the row-major flatten of the parameters in layout order;
curvlinops' single-tensor format is the same flatten in the order of its ``params``. A
``layout`` whose order differs is mapped by a fixed permutation.

Example
-------
The wrapper works for any operator known by its products (curvlinops is optional):

>>> import torch
>>> M = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
>>> theta0 = torch.tensor([0.5, -1.0], dtype=torch.float64)
>>> G = OperatorMetric(lambda X: M @ X, theta0, damping=1.0, name="M")
>>> G.matvec(theta0, torch.tensor([1.0, 0.0], dtype=torch.float64))     # (M + I) e₁
tensor([3., 1.], dtype=torch.float64)
>>> round(float(G.logdet(theta0)), 12) == round(float(torch.logdet(M + torch.eye(2))), 12)
True
>>> G.matvec(theta0 + 1, torch.ones(2, dtype=torch.float64))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
covariant.errors.DomainError: OperatorMetric(M): ... asked at a point 1 away (max-norm); ...
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._fast import is_transformed
from ..errors import (
    DomainError,
    MissingDependencyError,
    NotConvergedError,
    ShapeMismatchError,
    SingularMetricError,
)
from ..layout import ParameterLayout
from ..linalg import cg
from .base import Metric, check_dense_size

__all__ = ["INSTALL_HINT", "OperatorMetric", "from_curvlinops"]

#: How to get the optional peers (curvlinops, laplace-torch) without pulling another torch.
INSTALL_HINT = (
    "curvlinops is an optional peer of covariant and is not installed. Install it next to "
    "the torch you have, without pulling another torch: bash benchmarks/install_peers.sh"
)

_POINT_CHECKS = ("raise", "warn", "ignore")
_SOLVES = ("auto", "cg")
_DOC = '(docs/api.md, "curvlinops operators as metrics")'

MatMat = Callable[[Tensor], Tensor]


class _Product(torch.autograd.Function):
    """v ↦ G v for a fixed symmetric G known by ``matmat``: the vmap rule is one matmat on
    all the columns, the jvp and vjp are G times the tangent (G is linear and symmetric)."""

    @staticmethod
    def forward(v: Tensor, matmat: MatMat) -> Tensor:  # type: ignore[override]
        with torch.enable_grad():  # curvature products differentiate the model themselves
            out = matmat(v.detach().reshape(v.shape[0], -1))
        return out.detach().reshape(v.shape).to(v.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, MatMat], output: Tensor) -> None:
        ctx.matmat = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _Product.apply(grad, ctx.matmat), None

    @staticmethod
    def jvp(ctx: Any, v_dot: Tensor, _: Any) -> Tensor:  # type: ignore[override]
        return _Product.apply(v_dot, ctx.matmat)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, None], v: Tensor, matmat: MatMat
             ) -> tuple[Tensor, int | None]:
        if in_dims[0] is None:
            return _Product.apply(v, matmat), None
        cols = v.movedim(in_dims[0], -1)  # (d, …, B): every batch member is more columns
        return _Product.apply(cols, matmat), cols.ndim - 1


class OperatorMetric(Metric):
    r"""G(θ₀) + λI for a symmetric PSD operator known by its products, pinned to θ₀.

    Parameters
    ----------
    matmat : callable
        ``X ↦ G X`` for X of shape (d, k) in covariant's flat order (without the damping).
    point : Tensor, shape (d,)
        θ₀, the point where the operator was evaluated (copied).
    damping : float
        λ ≥ 0, added exactly: the metric is G + λI (a matrix of the chart it was built in;
        pulled back with the rest, docs/math.md §5).
    solve_matmat : callable, optional
        ``W ↦ (G + λI)⁻¹ W`` in closed form; without it ``solve`` is the generic one (dense
        Cholesky up to ``DENSE_SOLVE_DIM``, conjugate gradients above) or, with
        ``solve="cg"``, always conjugate gradients.
    logdet_fn : callable, optional
        ``() ↦ log det G`` in closed form; used only when ``damping == 0``.
    live : callable, optional
        ``() ↦`` the current flat values the operator reads, for operators that re-evaluate
        the model on every product; they must still equal θ₀.
    point_check : {"raise", "warn", "ignore"}
        What a product at a point other than θ₀ (or with changed live values) does.
    solve : {"auto", "cg"}
        "auto": ``solve_matmat`` when given, else the generic solve; "cg": conjugate
        gradients (:func:`covariant.linalg.cg`) always.
    name : str
        Shown in ``repr`` and in error messages.
    """

    is_constant = True

    def __init__(self, matmat: MatMat, point: Tensor, *, damping: float = 0.0,
                 solve_matmat: MatMat | None = None, logdet_fn: Callable[[], Tensor] | None = None,
                 live: Callable[[], Tensor] | None = None, point_check: str = "raise",
                 solve: str = "auto", name: str = "operator") -> None:
        if point_check not in _POINT_CHECKS:
            raise ValueError(f"OperatorMetric: point_check must be one of {_POINT_CHECKS}, "
                             f"got {point_check!r}")
        if solve not in _SOLVES:
            raise ValueError(f"OperatorMetric: solve must be one of {_SOLVES}, got {solve!r}")
        if not damping >= 0:
            raise ValueError(f"OperatorMetric: damping must be >= 0, got {damping}")
        if point.ndim != 1:
            raise ShapeMismatchError(f"OperatorMetric: the point must be flat 1-D, got shape "
                                     f"{tuple(point.shape)}")
        self.point = point.detach().clone()
        self.damping = float(damping)
        self.point_check = point_check
        self.solve_mode = solve
        self.name = name
        self._matmat, self._solve_matmat, self._logdet_fn = matmat, solve_matmat, logdet_fn
        self._live = live

    @property
    def dim(self) -> int:
        return self.point.shape[0]

    @property
    def has_closed_form_solve(self) -> bool:
        return self._solve_matmat is not None and self.solve_mode == "auto"

    # ----------------------------------------------------------------- the point check
    def _differs(self, x: Tensor) -> float | None:
        """max|x − θ₀| when it exceeds a few hundred ulps of θ₀'s scale, else None."""
        ref = self.point.to(device=x.device)
        if x.shape != ref.shape:
            raise ShapeMismatchError(f"OperatorMetric({self.name}): the operator acts on "
                                     f"{self.dim} coordinates, got a point of shape "
                                     f"{tuple(x.shape)}")
        gap = float((x.detach().to(ref.dtype) - ref).abs().max()) if x.numel() else 0.0
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        eps = max(torch.finfo(ref.dtype).eps, torch.finfo(x.dtype).eps)  # the coarser one
        return gap if gap > 500 * eps * scale else None

    def check_point(self, p: Tensor) -> None:
        """Apply ``point_check`` to p (skipped inside ``torch.func`` transforms)."""
        if self.point_check == "ignore" or is_transformed(p):
            return
        problems = []
        gap = self._differs(p)
        if gap is not None:
            problems.append(f"it was asked at a point {gap:.3g} away (max-norm)")
        if self._live is not None:
            drift = self._differs(self._live())
            if drift is not None:
                problems.append(f"its parameters have changed by {drift:.3g} since it was "
                                "wrapped")
        if not problems:
            return
        msg = (f"OperatorMetric({self.name}): the operator is G(θ₀) at the parameters it was "
               f"built with, but {' and '.join(problems)}; rebuild the operator at the new "
               "parameters, or pass point_check='ignore' to use G(θ₀) as a constant metric "
               + _DOC)
        if self.point_check == "raise":
            raise DomainError(msg)
        warnings.warn(msg, stacklevel=3)

    # ----------------------------------------------------------------- products
    def _damped(self, X: Tensor) -> Tensor:
        X = X.to(self.point.dtype)  # the operator's precision; results go back to the caller's
        out = self._matmat(X)
        return out + self.damping * X if self.damping else out

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        self.check_point(p)
        return _Product.apply(v, self._damped)

    def matmat(self, p: Tensor, V: Tensor) -> Tensor:
        """(G + λI) V for V of shape (d, k): one product of the operator."""
        self.check_point(p)
        return _Product.apply(V, self._damped)

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        """(G + λI)⁻¹ w: the closed form where the operator has one (K-FAC, EK-FAC), else
        the generic solve, or conjugate gradients with ``solve="cg"``."""
        self.check_point(p)
        if self.has_closed_form_solve:
            assert self._solve_matmat is not None
            return _Product.apply(w.to(self.point.dtype), self._solve_matmat).to(w.dtype)
        if self.solve_mode == "auto":
            return super().solve(p, w)
        try:
            return cg(lambda x: self.matvec(p, x), w, maxiter=10 * w.shape[0]).x
        except NotConvergedError as err:
            raise SingularMetricError(
                f"OperatorMetric({self.name}).solve: conjugate gradients did not converge "
                f"({err}); the operator is singular or badly conditioned: pass damping > 0"
            ) from err

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        """G + λI as a (d, d) matrix: one product with the identity."""
        check_dense_size(self.dim, f"OperatorMetric({self.name}).dense", max_dim)
        self.check_point(p)
        eye = torch.eye(self.dim, dtype=self.point.dtype, device=self.point.device)
        return self._damped(eye).to(p.dtype)

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        """The operator's own log det G (K-FAC, EK-FAC) when undamped, else None."""
        if self._logdet_fn is None or self.damping:
            return None
        self.check_point(p)
        return torch.as_tensor(self._logdet_fn(), dtype=p.dtype, device=p.device)

    def logdet(self, p: Tensor) -> Tensor:
        """log det(G + λI): the operator's closed form when it has one, else dense Cholesky."""
        closed = self.closed_form_logdet(p)
        return super().logdet(p) if closed is None else closed

    def __repr__(self) -> str:
        damping = f", damping={self.damping:g}" if self.damping else ""
        return f"OperatorMetric({self.name}, d={self.dim}{damping})"


def _import_curvlinops() -> Any:
    try:
        return importlib.import_module("curvlinops")
    except ImportError as err:
        raise MissingDependencyError(INSTALL_HINT) from err


def _named(params: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[list[str], list[Tensor]]:
    if isinstance(params, Mapping):
        return list(params), list(params.values())
    tensors = list(params)
    if not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("from_curvlinops: params must be the operator's parameter tensors "
                        "(a list, or a dict name -> tensor in the operator's order)")
    return [str(i) for i in range(len(tensors))], tensors


def _permutation(names: list[str], tensors: list[Tensor], layout: ParameterLayout | None
                 ) -> Tensor | None:
    """Index ``perm`` with op_flat = cov_flat[perm], or None when the orders agree."""
    if layout is None:
        return None
    if list(layout.names) == names or (
            all(n.isdigit() for n in names) and len(names) == len(layout.names)):
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != [tuple(s) for s in layout.shapes]:
            raise ShapeMismatchError(f"from_curvlinops: the layout's shapes "
                                     f"{[tuple(s) for s in layout.shapes]} differ from the "
                                     f"operator's parameters {shapes}")
        return None
    if sorted(layout.names) != sorted(names):
        raise ShapeMismatchError(
            f"from_curvlinops: the layout names {list(layout.names)} are not the operator's "
            f"parameters {names}; pass params as a dict name -> tensor with the layout's names")
    slices = layout.slices
    for name, t in zip(names, tensors, strict=True):
        if tuple(t.shape) != tuple(layout.shapes[layout.names.index(name)]):
            raise ShapeMismatchError(f"from_curvlinops: parameter {name!r} has shape "
                                     f"{tuple(t.shape)} in the operator and another in the layout")
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


def _permuted(fn: MatMat, perm: Tensor | None) -> MatMat:
    """``fn`` in covariant's order: X ↦ P⁻¹ fn(P X)."""
    if perm is None:
        return fn

    def wrapped(X: Tensor) -> Tensor:
        idx = perm.to(X.device)
        out = torch.empty_like(X)
        out[idx] = fn(X[idx])
        return out

    return wrapped


def from_curvlinops(op: Any, params: Mapping[str, Tensor] | Sequence[Tensor] | None = None, *,
                    layout: ParameterLayout | None = None, damping: float = 0.0,
                    solve: str = "auto", point_check: str | None = None) -> OperatorMetric:
    r"""A curvlinops linear operator as a covariant metric, G(θ₀) + λI pinned to θ₀.

    Parameters
    ----------
    op : curvlinops.PyTorchLinearOperator
        A symmetric PSD operator on the parameters: ``GGNLinearOperator``,
        ``FisherMCLinearOperator``, ``EFLinearOperator``, ``KFACLinearOperator``,
        ``EKFACLinearOperator``, or ``HessianLinearOperator`` at a minimum.
    params : list of Tensor, or dict name -> Tensor, optional
        The ``params`` the operator was built with, in its order (curvlinops keeps them
        private). Their current values are θ₀. Without them the flat order is the operator's
        own and θ₀ is unknown, so the metric is the constant G(θ₀) + λI used at any point
        (``point_check="ignore"``): pass them to have every product checked.
    layout : ParameterLayout, optional
        covariant's order of the flat vector (``space.layout``); default the order of
        ``params``. With another order, ``params`` must be a dict with the layout's names.
    damping : float
        λ ≥ 0: the metric is G + λI. For K-FAC / EK-FAC the closed-form solve uses
        curvlinops' ``KFACInverseLinearOperator`` with exact damping, (G + λI)⁻¹.
    solve : {"auto", "cg"}
        "auto": closed form for K-FAC / EK-FAC, the generic solve otherwise (dense Cholesky
        for small d, conjugate gradients above); "cg": conjugate gradients always.
    point_check : {"raise", "warn", "ignore"}, optional
        A product at a point other than θ₀, or after the parameters changed, raises
        :class:`~covariant.errors.DomainError` (default with ``params``), warns, or is
        answered with G(θ₀) (the only choice, and the default, without ``params``).

    Raises
    ------
    MissingDependencyError
        An ``ImportError`` naming ``bash benchmarks/install_peers.sh`` when curvlinops is
        not installed.
    """
    cl = _import_curvlinops()
    if not any(c.__name__ == "PyTorchLinearOperator" and c.__module__.startswith("curvlinops")
               for c in type(op).__mro__):  # curvlinops' base class, not exported by name
        raise TypeError(f"from_curvlinops: expected a curvlinops linear operator, got "
                        f"{type(op).__name__}")
    if params is None:
        if point_check not in (None, "ignore") or layout is not None:
            raise ValueError(
                "from_curvlinops: without params the point the operator was built at is "
                "unknown, so it can neither be checked (point_check) nor reordered (layout); "
                "pass the parameters the operator was built with")
        point_check = "ignore"
        tensors = [torch.zeros(int(op.shape[1]), dtype=op.dtype, device=op.device)]
        names = None
    else:
        names, tensors = _named(params)
    point_check = "raise" if point_check is None else point_check
    d = sum(t.numel() for t in tensors)
    if tuple(op.shape) != (d, d):
        raise ShapeMismatchError(f"from_curvlinops: the operator is {tuple(op.shape)}, the "
                                 f"parameters have {d} entries")
    perm = None if names is None else _permutation(names, tensors, layout)
    flat_op_order = torch.cat([t.detach().reshape(-1) for t in tensors])
    point = flat_op_order if perm is None else torch.empty_like(flat_op_order).index_copy_(
        0, perm.to(flat_op_order.device), flat_op_order)
    is_kfac = isinstance(op, cl.KFACLinearOperator)  # EKFACLinearOperator is a subclass
    solve_matmat = logdet_fn = live = None
    if is_kfac:
        op @ torch.zeros(d, dtype=op.dtype, device=op.device)  # the factors, computed now
        inverse = cl.KFACInverseLinearOperator(op, damping=float(damping), use_exact_damping=True)
        solve_matmat = _permuted(lambda X: inverse @ X.to(op.dtype), perm)
        logdet_fn = lambda: op.logdet  # noqa: E731
    elif params is not None:
        def live() -> Tensor:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            return flat if perm is None else torch.empty_like(flat).index_copy_(
                0, perm.to(flat.device), flat)
    return OperatorMetric(_permuted(lambda X: op @ X.to(op.dtype), perm), point,
                          damping=damping, solve_matmat=solve_matmat, logdet_fn=logdet_fn,
                          live=live, point_check=point_check, solve=solve,
                          name=type(op).__name__)
