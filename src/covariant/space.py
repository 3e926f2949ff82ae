r"""The central object: a loss (or log-density) together with a metric, in one chart.

A :class:`ParameterSpace` knows how each object transforms. ``reparametrize`` builds the same
space in a new chart θ = h(ψ): the loss becomes L∘h (a density also gains log|det J|) and the
metric is pulled back, G_Ψ = Jᵀ G_Θ J. ``with_metric(Euclidean())`` gives the common mistake
(the identity in whatever chart you are in), for comparison.

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: (p**2).sum() + p.prod())
>>> theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> new = space.reparametrize(cv.reparam.Exp())
>>> psi = new.chart.inverse(theta)
>>> bool(torch.allclose(new.loss(psi), space.loss(theta)))
True
>>> e_inv = torch.linalg.eigvals(new.shape_operator(psi)).real.sort().values
>>> e_org = torch.linalg.eigvals(space.shape_operator(theta)).real.sort().values
>>> bool(torch.allclose(e_inv, e_org))
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn.utils import parametrize

from . import autodiff
from ._checks import check_finite, check_flat
from ._fast import is_plain as _plain
from .connection import (
    christoffel,
    christoffel_lowered_dense,
    connection_correction,
    data_parallel_riemannian_hvp,
    geodesic,
    riemannian_hvp,
)
from .errors import NotABijectionError, ShapeMismatchError
from .layout import ModelBinding, ParameterLayout
from .metrics import Euclidean, Metric, Pullback, check_dense_size, resolve_metric
from .metrics.base import dense_pinv, dense_solve
from .reparam import (
    Compose,
    ParameterwiseReparametrization,
    Reparametrization,
)
from .reparam.interop import metric_in_weights, split_parametrizations

__all__ = ["ParameterSpace"]

LossFn = Callable[[Tensor], Tensor]


_KEEP = object()  # "carry this field over" in ParameterSpace._derive


class ParameterSpace:
    """A loss and a metric on one chart of a parameter space.

    Parameters
    ----------
    loss : callable
        Flat point ↦ scalar tensor, written in torch operations (it is differentiated with
        ``torch.func``).
    metric : Metric, optional
        The metric of this chart; :class:`~covariant.metrics.Euclidean` by default.
    layout : ParameterLayout, optional
        Names and shapes of the coordinates (module spaces have one; it enables
        ``reparametrize`` by name and ``unflatten``).
    dim : int, optional
        Number of coordinates, checked on every point when known.

    binding : ModelBinding, optional
        The model behind the space (``from_module`` sets it). Every space reparametrized from
        this one carries the same binding, in the root coordinates.
    chart, parent, is_pullback : optional
        Set by :meth:`reparametrize` and the ``with_*`` methods: the chart θ_parent = h(ψ),
        the parent space, and whether loss and metric are the parent's pulled through h.

    Attributes
    ----------
    chart : Reparametrization or None
        For a reparametrized space, h with θ_parent = h(ψ).
    parent : ParameterSpace or None
        The space this one was reparametrized from.
    is_density : bool
        True for a space built by :meth:`from_log_prob` (its loss is −log p and transforms
        as a density).
    """

    def __init__(
        self,
        loss: LossFn,
        metric: Metric | None = None,
        *,
        layout: ParameterLayout | None = None,
        dim: int | None = None,
        is_density: bool = False,
        max_dense_dim: int | None = None,
        binding: ModelBinding | None = None,
        chart: Reparametrization | None = None,
        parent: ParameterSpace | None = None,
        is_pullback: bool = False,
    ) -> None:
        if not callable(loss):
            raise TypeError(f"ParameterSpace: loss must be callable, got {type(loss).__name__}")
        self._loss = loss
        self.metric: Metric = Euclidean() if metric is None else metric
        if not isinstance(self.metric, Metric):
            raise TypeError(
                f"ParameterSpace: metric must be a covariant.metrics.Metric, got "
                f"{type(self.metric).__name__}"
            )
        self.layout = layout
        self.dim = layout.dim if layout is not None else dim
        self.is_density = is_density
        self.max_dense_dim = max_dense_dim
        self.chart: Reparametrization | None = chart
        self.parent: ParameterSpace | None = parent
        self._scalar_pullback = is_pullback  # loss = parent.loss ∘ chart, metric = pullback
        if binding is not None and not isinstance(binding, ModelBinding):
            raise TypeError(
                f"ParameterSpace: binding must be a covariant.layout.ModelBinding, got "
                f"{type(binding).__name__}"
            )
        self._binding = binding

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_log_prob(
        cls, log_prob: LossFn, metric: Metric | None = None, **kwargs: Any
    ) -> ParameterSpace:
        """A density space: loss = −log p. ``reparametrize`` adds log|det J| (docs/math.md §2).

        Example
        -------
        >>> import torch, covariant as cv
        >>> normal = torch.distributions.Normal(0.5, 0.8)
        >>> space = cv.ParameterSpace.from_log_prob(lambda x: normal.log_prob(x).sum())
        >>> y = space.reparametrize(cv.reparam.from_transform(
        ...     torch.distributions.transforms.ExpTransform().inv))   # θ = log y
        >>> round(float(-y.loss(torch.tensor([1.0]))), 4)   # log-normal log-density at y = 1
        -0.8911
        """
        return cls(lambda p: -log_prob(p), metric, is_density=True, **kwargs)

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Any,
        metric: Metric | str = "euclidean",
        *,
        metric_chart: str = "weights",
        **metric_kwargs: Any,
    ) -> tuple[ParameterSpace, Tensor]:
        """The space of a model's trainable parameters, and the model's current point.

        The loss is ``loss_fn(model(X), y)`` over ``data``: an ``(X, y)`` pair or an iterable of
        batches. Batches are averaged exactly like the full-batch loss: weighted by batch size
        for ``reduction='mean'`` losses, summed for ``reduction='sum'``.

        Parameters
        ----------
        metric : Metric or str
            A Metric, or "euclidean", "ggn", "fisher", "empirical_fisher" (matrix-free curvature
            metrics of the model; keyword arguments go to their constructor).
        metric_chart : {"weights", "native"}
            A model using ``torch.nn.utils.parametrize`` (e.g. ``weight_norm``) is analysed in
            its own coordinates: the plain model's (w) space (``space.parent``) reparametrized
            by :func:`covariant.reparam.split_parametrizations`' charts (``<t>.original0``, …).
            ``"weights"`` (default): ``metric`` is given in w and pulled back, so the answers are
            the plain model's (invariant). ``"native"``: in the model's own coordinates (naive).

        Returns
        -------
        space, theta : ParameterSpace, Tensor
        """
        in_w = metric_in_weights(metric_chart)
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            plain, charts, originals = split_parametrizations(model)
            w_metric, w_kwargs = (metric, metric_kwargs) if in_w else ("euclidean", {})
            w_space, _ = cls.from_module(plain, loss_fn, data, w_metric, **w_kwargs)
            native = w_space.reparametrize(charts)  # the metric of w, pulled back
            assert native.layout is not None
            psi = native.layout.flatten(originals)
            return (native if in_w else native.with_metric(metric, **metric_kwargs)), psi

        binding, theta = ModelBinding.from_module(model, loss_fn, data)
        space = cls(binding.loss, None, layout=ParameterLayout.from_module(model),
                    binding=binding)
        space.metric = resolve_metric(metric, space, **metric_kwargs)
        return space, theta

    # ------------------------------------------------------------------ the model behind it
    @property
    def binding(self) -> ModelBinding | None:
        """The :class:`~covariant.layout.ModelBinding` of the model behind this space.

        Its ``forward`` takes points of the root space; ``binding.forward_in_chart(
        space.root_chart())`` takes points of this chart. None for a space built from a plain
        loss.
        """
        return self._binding

    @property
    def model(self) -> nn.Module | None:
        """The module behind the space, if any."""
        return None if self._binding is None else self._binding.model

    @property
    def is_pullback(self) -> bool:
        """True when this space is its parent's pulled through ``chart``: loss L∘h and metric
        Jᵀ G J. Then every tensor rule lets a computation run in the parent chart."""
        return self._scalar_pullback

    # ------------------------------------------------------------------ basics
    @property
    def loss_function(self) -> LossFn:
        """The loss as a plain callable, p ↦ L(p), without the point and finiteness checks.

        Use it inside ``torch.func`` transforms (``vmap``, ``hessian``), where the checks of
        :meth:`loss` cannot run.
        """
        return self._loss

    def check_point(self, p: Tensor, owner: str = "ParameterSpace") -> None:
        """Raise a typed error unless p is a finite flat point of this space and chart.

        ``owner`` names the caller in the message.
        """
        check_flat(p, owner, dim=self.dim)
        if self.chart is not None:
            self.chart.check_psi(p)


    def unflatten(self, p: Tensor) -> dict[str, Tensor]:
        """The parameter dict of a flat point (module spaces only)."""
        if self.layout is None:
            raise ShapeMismatchError("unflatten: this space has no parameter layout")
        return self.layout.unflatten(p)

    def loss(self, p: Tensor) -> Tensor:
        """L(p)."""
        self.check_point(p, "loss")
        return check_finite(self._loss(p), "loss(p)")

    def grad(self, p: Tensor) -> Tensor:
        """∇L(p), a covector."""
        self.check_point(p, "grad")
        return check_finite(autodiff.gradient(self._loss, p), "the gradient")

    def riemannian_grad(self, p: Tensor) -> Tensor:
        """G(p)⁻¹ ∇L(p), a vector (the pseudo-inverse for a submersion chart)."""
        return check_finite(self.metric.solve(p, self.grad(p)), "the Riemannian gradient")

    def hvp_operator(
        self, p: Tensor, riemannian: bool = True, *, method: str = "auto"
    ) -> Callable[[Tensor], Tensor]:
        """v ↦ Hess·v at a fixed point, with the work shared across products.

        The gradient graph of L at p is built once (``create_graph``) and each product runs
        only the second backward pass, as PyHessian does; r = G⁻¹∇L is solved once; a
        pullback space builds its parent's operator once at h(p). Use it for many products
        at one point (estimators, Lanczos); ``hvp`` is the one-off form.
        """
        self.check_point(p, "hvp_operator")
        if not _plain(p):
            return lambda v: riemannian_hvp(self, p, v, method) if riemannian \
                else autodiff.hvp(self._loss, p, v)
        if riemannian and self._scalar_pullback and method in ("auto", "pullback"):
            h, parent = self.chart, self.parent
            assert h is not None and parent is not None
            lin = h.linearize(p)
            parent_op = parent.hvp_operator(lin.theta, True)
            return lambda v: lin.vjp(parent_op(lin.jvp(v)))
        if riemannian and not self.metric.is_constant:  # one all-reduce per product
            shared = data_parallel_riemannian_hvp(self._loss, self.metric, p)
            if shared is not None:
                return shared
        euclidean = autodiff.hvp_operator(self._loss, p)
        if not riemannian or self.metric.is_constant:
            return euclidean
        r = self.metric.solve(p, autodiff.gradient(self._loss, p))

        def riemannian_hvp(v: Tensor) -> Tensor:
            return euclidean(v) - connection_correction(self.metric, p, v, r)

        return riemannian_hvp

    def hvp(self, p: Tensor, v: Tensor, riemannian: bool = True, *, method: str = "auto") -> Tensor:
        """Hessian-vector product.

        ``riemannian=True`` gives Hess·v = ∇²L v − Γ(v, ·)·∇L with the matrix-free connection
        term (docs/math.md §3); ``riemannian=False`` the Euclidean ∇²L v. For a space made by
        ``reparametrize``, ``method="pullback"`` uses Jᵀ Hess_Θ (J v) and ``"general"`` the
        connection formula in this chart; ``"auto"`` picks the pullback when it applies.
        """
        self.check_point(p, "hvp")
        if v.shape != p.shape:
            raise ShapeMismatchError(f"hvp: v has shape {tuple(v.shape)}, p {tuple(p.shape)}")
        out = riemannian_hvp(self, p, v, method) if riemannian else autodiff.hvp(self._loss, p, v)
        return check_finite(out, "the Hessian-vector product")

    def hessian(
        self,
        p: Tensor,
        riemannian: bool = True,
        *,
        method: str = "auto",
        max_dim: int | None = None,
    ) -> Tensor:
        """Dense Hessian (small d): ∇²L, or the Riemannian ∇²L − Γ^m_ij ∂_m L.

        ``method="general"`` computes the connection term from ``jacfwd`` of the dense metric
        (the ground-truth path, O(d³)); submersion charts raise the index with the
        pseudo-inverse. ``"matrix_free"`` stacks d matrix-free connection terms (one solve for
        r = G⁻¹∇L). For a space made by ``reparametrize``, ``"pullback"`` uses the tensor rule
        Hess_Ψ = Jᵀ Hess_Θ J with a dense Jacobian; ``"auto"`` takes the pullback when it
        applies and the matrix-free columns otherwise.
        """
        self.check_point(p, "hessian")
        limit = max_dim or self.max_dense_dim
        check_dense_size(p.shape[0], "hessian", limit)
        if method not in ("auto", "pullback", "general", "matrix_free"):
            raise ValueError(
                "hessian: method must be 'auto', 'pullback', 'general' or 'matrix_free', "
                f"got {method!r}"
            )
        if riemannian and self._scalar_pullback and method in ("auto", "pullback"):
            h, parent = self.chart, self.parent
            assert h is not None and parent is not None
            J = h.jacobian(p)
            H = J.T @ parent.hessian(h.forward(p), True, max_dim=max_dim) @ J
            return check_finite(0.5 * (H + H.T), "the Hessian")
        if method == "pullback" and riemannian:
            raise ValueError("hessian: the pullback path needs a space made by reparametrize")
        H = self._dense_euclidean_hessian(p)
        if riemannian and not self.metric.is_constant and method in ("auto", "matrix_free"):
            # d matrix-free connection terms with r = G⁻¹∇L solved once: O(d) metric products
            r = self._dense_solve_or_matrix_free(p, grad(self._loss)(p))
            eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)

            def corr(v: Tensor) -> Tensor:
                return connection_correction(self.metric, p, v, r)

            try:
                C = vmap(corr, chunk_size=32)(eye)
            except Exception:  # ops without batching rules: one column at a time
                C = torch.stack([corr(e) for e in eye])
            H = H - C.T
        elif riemannian and not self.metric.is_constant:
            g = grad(self._loss)(p)
            G = self.metric.dense(p, max_dim=limit)
            r = dense_solve(self.metric, p, G, g)
            # Γ^m_ij ∂_m L = Γ_lij r_l with r = G⁻¹∇L (lowered symbols from jacfwd of dense G)
            lowered = christoffel_lowered_dense(self.metric, p, max_dim=limit)
            H = H - torch.einsum("lij,l->ij", lowered, r)
        return check_finite(0.5 * (H + H.T), "the Hessian")

    def _dense_euclidean_hessian(self, p: Tensor) -> Tensor:
        """∇²L by batched HVPs with the identity (chunked, so memory stays bounded).

        The last result is cached by point, since several charts of one analysis all pull
        back the same Hessian of their common parent.
        """
        cacheable = _plain(p)
        if not cacheable:
            return autodiff.dense_hessian(self._loss, p)
        cached = getattr(self, "_hessian_cache", None)
        if cached is not None and cached[0].shape == p.shape and torch.equal(cached[0], p):
            return cached[1]
        H = autodiff.dense_hessian(self._loss, p)
        self._hessian_cache = (p.clone(), H)
        return H

    def _dense_solve_or_matrix_free(self, p: Tensor, g: Tensor) -> Tensor:
        if self.metric.is_degenerate(p):
            G = self.metric.dense(p, max_dim=self.max_dense_dim)
            return dense_pinv(self.metric, p, G) @ g
        return self.metric.solve(p, g)

    def horizontal_basis(self, p: Tensor) -> Tensor:
        """Orthonormal basis (d, rank) of the range of G(p): the horizontal space (dense)."""
        G = self.metric.dense(p, max_dim=self.max_dense_dim)
        rank = self.metric.rank(p)
        return torch.linalg.eigh(G)[1][:, -rank:]

    def shape_operator(
        self, p: Tensor, *, method: str = "auto", max_dim: int | None = None
    ) -> Tensor:
        """Dense E = G⁻¹ Hess, a (1,1) tensor: E_Ψ = J⁻¹ E_Θ J. Its spectrum is invariant.

        For a submersion chart G⁻¹ is the pseudo-inverse; the nonzero spectrum then equals
        the spectrum in the original chart, plus a 0 per gauge direction (docs/math.md §5).
        """
        H = self.hessian(p, riemannian=True, method=method, max_dim=max_dim)
        G = self.metric.dense(p, max_dim=max_dim or self.max_dense_dim)
        return dense_solve(self.metric, p, G, H)

    def christoffel(self, p: Tensor, u: Tensor, w: Tensor) -> Tensor:
        """Γ(u, w) = Γ^m_ij u^i w^j, matrix-free."""
        self.check_point(p, "christoffel")
        return christoffel(self.metric, p, u, w)

    def exp(self, p: Tensor, v: Tensor, t: float = 1.0, **kwargs: Any) -> Tensor:
        """Exponential map: the point reached at time t along the geodesic from p with
        velocity v (ẍ + Γ(ẋ, ẋ) = 0, integrated by ``scipy.integrate.solve_ivp``)."""
        self.check_point(p, "exp")
        return geodesic(self.metric, p, v, t, **kwargs)

    # ------------------------------------------------------------------ charts
    def reparametrize(
        self,
        reparam: Reparametrization | Mapping[str, Reparametrization],
        *,
        loss: LossFn | None = None,
    ) -> ParameterSpace:
        """The same space in a new chart θ = h(ψ).

        ``reparam`` is a chart of the whole flat point, or a dict ``{name or glob pattern:
        chart}`` applied to named parameters (module spaces). The loss becomes L∘h (for a
        density space, −log p∘h − log|det J|) and the metric its pullback Jᵀ G J.

        ``loss`` replaces the transformed loss by one written in ψ directly, e.g. a posterior
        whose prior is placed on the new coordinates, or a density lifted through a submersion
        (:func:`covariant.density.lift_log_prob`; pass ``lambda psi: -log_p(psi)``). The metric
        is still pulled back and the space keeps its parent, chart and model binding.
        """
        if isinstance(reparam, Mapping):
            if self.layout is None:
                raise ShapeMismatchError(
                    "reparametrize: a dict of charts by parameter name needs a space with a "
                    "parameter layout (ParameterSpace.from_module or layout=...)"
                )
            h: Reparametrization = ParameterwiseReparametrization(self.layout, reparam)
            new_layout: ParameterLayout | None = h.new_layout
            new_dim: int | None = new_layout.dim
        elif isinstance(reparam, Reparametrization):
            h = reparam
            if self.layout is not None and isinstance(h, ParameterwiseReparametrization):
                new_layout = h.new_layout
            else:
                new_layout = None
            new_dim = None if self.dim is None else _psi_dim_or_none(h, self.dim)
        else:
            raise TypeError(
                "reparametrize: expected a Reparametrization or a dict {name: Reparametrization},"
                f" got {type(reparam).__name__}"
            )

        base_loss = self._loss
        if loss is not None:
            if not callable(loss):
                raise TypeError(f"reparametrize: loss must be callable, got {type(loss).__name__}")
            return self._derive(
                loss, self.metric.pullback(h), layout=new_layout, dim=new_dim, chart=h,
                parent=self, scalar_pullback=False,
            )
        if self.is_density:
            if not h.is_bijection:
                raise NotABijectionError(
                    f"reparametrize: {h!r} is a submersion, and a density cannot be pushed "
                    "through it: there is no log|det J|. Reparametrize the metric only "
                    "(space.with_metric(...).reparametrize on a loss space), or use a "
                    "bijective chart."
                )

            log_p_psi = h.pushforward_log_prob(lambda theta: -base_loss(theta))

            def loss(psi: Tensor) -> Tensor:
                return -log_p_psi(psi)
        else:

            def loss(psi: Tensor) -> Tensor:
                return base_loss(h.forward(psi))

        return self._derive(
            loss, self.metric.pullback(h), layout=new_layout, dim=new_dim, chart=h,
            parent=self, scalar_pullback=not self.is_density,
        )

    def with_metric(self, metric: Metric | str, **metric_kwargs: Any) -> ParameterSpace:
        """Same loss and chart, another metric. ``with_metric(Euclidean())`` is the naive view.

        A name ("euclidean", "ggn", "fisher", "empirical_fisher") builds that metric in this
        chart (module spaces).
        """
        if isinstance(metric, str):
            metric = resolve_metric(metric, self, **metric_kwargs)
        # the pullback fast path holds only while the metric is the pullback of the parent's
        scalar_pullback = (
            self._scalar_pullback
            and isinstance(metric, Pullback)
            and self.parent is not None
            and metric.base is self.parent.metric
            and metric.reparam is self.chart
        )
        return self._derive(self._loss, metric, scalar_pullback=scalar_pullback)

    def with_loss(self, loss: LossFn) -> ParameterSpace:
        """Same metric, chart, parent and model binding, another loss (e.g. plus a penalty).

        The pullback fast path is dropped: the new loss is no longer the parent's through the
        chart.
        """
        if not callable(loss):
            raise TypeError(f"with_loss: loss must be callable, got {type(loss).__name__}")
        return self._derive(loss, self.metric, scalar_pullback=False)

    def with_binding(self, binding: ModelBinding | None) -> ParameterSpace:
        """Same loss, metric and chart, another model binding (e.g. another prior)."""
        return self._derive(self._loss, self.metric, binding=binding,
                            scalar_pullback=self._scalar_pullback)

    def _derive(
        self,
        loss: LossFn,
        metric: Metric,
        *,
        scalar_pullback: bool,
        layout: Any = _KEEP,
        dim: Any = _KEEP,
        chart: Any = _KEEP,
        parent: Any = _KEEP,
        binding: Any = _KEEP,
    ) -> ParameterSpace:
        """The one constructor path of derived spaces: every field is carried over unless
        given."""
        keep = _KEEP
        return ParameterSpace(
            loss, metric,
            layout=self.layout if layout is keep else layout,
            dim=self.dim if dim is keep else dim,
            is_density=self.is_density,
            max_dense_dim=self.max_dense_dim,
            binding=self._binding if binding is keep else binding,
            chart=self.chart if chart is keep else chart,
            parent=self.parent if parent is keep else parent,
            is_pullback=scalar_pullback,
        )

    # ------------------------------------------------------------------ charts to the root
    def lineage(self) -> list[ParameterSpace]:
        """This space, its parent, and so on up to the root space (the one walk to the root)."""
        out = [self]
        while out[-1].parent is not None and out[-1].chart is not None:
            out.append(out[-1].parent)
        return out

    def root_chart(self) -> Reparametrization | None:
        """The composed chart from this space's coordinates to the original space's."""
        charts = [s.chart for s in self.lineage()[:-1]]
        if not charts:
            return None
        return charts[0] if len(charts) == 1 else Compose(*reversed(charts))

    def to_root(self, p: Tensor) -> Tensor:
        """Map a point of this chart to the coordinates of the original space."""
        h = self.root_chart()
        return p if h is None else h(p)

    def __repr__(self) -> str:
        kind = "density" if self.is_density else "loss"
        return (
            f"ParameterSpace({kind}, dim={self.dim}, metric={self.metric!r}, "
            f"chart={self.chart!r})"
        )


def _psi_dim_or_none(h: Reparametrization, dim: int) -> int | None:
    try:
        return h.psi_dim(dim)
    except ShapeMismatchError:
        raise
    except Exception:  # pragma: no cover - charts without shape knowledge
        return None
