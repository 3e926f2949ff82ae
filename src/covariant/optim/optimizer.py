r"""RiemannianGD: Riemannian (natural) gradient descent as a drop-in ``torch.optim.Optimizer``.

Each step solves (G + λ G_ref) r = g for the gradient g of all parameters (one flat vector p)
by conjugate gradients and moves p ← p − α r, with the momentum, Nesterov, weight decay and
``maximize`` options of ``torch.optim.SGD``. The metric G is any
:class:`~covariant.metrics.Metric` on p, or built by name from the model:

- ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``: the model metric G_w of the module's weights
  w on one batch (:func:`covariant.metrics.metric_from_name` on
  ``ParameterSpace.from_module``), pulled back to p through the chart E: p ↦ w of the module's
  ``torch.nn.utils.parametrize`` charts, ``metrics.Pullback(G_w, E)``;
- ``"kfac"``, ``"ekfac"``: the Kronecker-factored metric K of the weights
  (:class:`covariant.metrics.KFAC`, ``EKFAC``), refreshed every ``kfac_update_every`` steps,
  averaged, damped exactly (K + λI in w), pulled back through E and solved in closed form;
- ``"weights"``: the weights' Euclidean metric pulled back, ``Pullback(Euclidean(), E)``.

Damping by the ``"weights"`` reference is added in w, ``Pullback(Damped(G_w, λ), E)``, so that it
transforms with the chart (docs/math.md §5).

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(3, 1)
>>> X, y = torch.randn(16, 3), torch.randn(16, 1)
>>> opt = RiemannianGD(model.parameters(), lr=1.0, metric="ggn", model=model,
...                    loss_fn=nn.MSELoss(), data=(X, y))
>>> opt.zero_grad(); nn.MSELoss()(model(X), y).backward(); opt.step()   # one Gauss-Newton step
>>> opt.info["method"], opt.info["converged"]
('cg', True)
>>> opt.zero_grad(); loss = nn.MSELoss()(model(X), y); loss.backward()
>>> bool(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.optim import DataParallelSteps
from ..errors import NonFiniteError, NotConvergedError, SingularMetricError
from ..linalg import cg
from ..metrics import Damped, Euclidean, Metric, Pullback
from ..metrics.kronecker import KroneckerFactored, KroneckerMetric
from ..reparam import Reparametrization
from ..space import ParameterSpace
from ._data import _BatchStream, _check_data
from ._kfac import (
    DEFAULT_DECAY,
    DEFAULT_UPDATE_EVERY,
    KFAC_METRICS,
    _KFACState,
    check_kfac_damping,
)
from ._model_view import _ModelView
from ._options import _check_options, _sgd_move

__all__ = ["METRIC_NAMES", "RiemannianGD"]

#: Metric names accepted by :class:`RiemannianGD`.
METRIC_NAMES = ("euclidean", "weights", "ggn", "fisher", "empirical_fisher", "kfac", "ekfac")

_MODEL_METRICS = ("ggn", "fisher", "empirical_fisher")
#: The metrics taken on the model's batches (the exact ones per step, K-FAC's every T steps).
_CURVATURE_METRICS = _MODEL_METRICS + KFAC_METRICS


class RiemannianGD(torch.optim.Optimizer):
    r"""Riemannian (natural) gradient descent as a drop-in ``torch.optim.Optimizer``.

    With g the gradient of the step's loss (``loss.backward()`` before ``step()``), p the flat
    vector of all parameters in all groups, and G the metric at p:

    .. math::

        g ← g + \lambda_{wd}\, p, \qquad
        r = (G(p) + \lambda\, G_{ref}(p))^{-1} g, \qquad
        b ← \mu b + (1 - \tau) r, \qquad p ← p - \alpha\, b

    (momentum μ, dampening τ, Nesterov and ``maximize`` exactly as ``torch.optim.SGD``, which
    this is for ``metric="euclidean"``). The solve is matrix-free conjugate gradients on
    products with G, unless the metric has its own ``solve`` and no damping is asked for.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups, as for any optimizer. The metric acts on the flat
        vector of all of them, in group order.
    lr : float
        Step size α (per group, like SGD).
    metric : Metric or str
        - a :class:`~covariant.metrics.Metric` acting on that flat vector;
        - ``"euclidean"``: G = I on the parameters (plain SGD);
        - ``"weights"``: the Euclidean metric of the module's weights pulled back to its
          parameters. For a module with ``torch.nn.utils.parametrize`` charts, the parameters
          are the charts' ``original*`` tensors and this is Jᵀ J; without charts it is I.
          Needs ``model``;
        - ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``: natural gradient with the model's
          curvature metric (:mod:`covariant.metrics`) on one batch per step. Need ``model``,
          ``loss_fn`` and ``data``;
        - ``"kfac"``, ``"ekfac"``: K-FAC (EK-FAC) natural gradient: the Kronecker-factored
          metric K of the weights (:class:`covariant.metrics.KFAC`; type-2 GGN factors by
          default, ``metric_kwargs`` choose e.g. ``fisher_type="mc"``), taken on the step's
          batch every ``kfac_update_every`` steps and averaged. The damping is λI added
          exactly in w (K + λI; the ``"weights"`` reference) and pulled back through the
          ``parametrize`` charts; the solve is closed form, (K + λI)⁻¹ per Kronecker block
          through J⁻¹ (J⁺ for a submersion such as weight norm), no CG (``info["method"] ==
          "kfac"``), except when only some of the model's parameters are optimized
          (``"kfac+cg"``). Need ``model``, ``loss_fn`` and ``data``.
    model : nn.Module, optional
        The module the parameters belong to.
    loss_fn : callable, optional
        ``loss_fn(model(X), y)``, e.g. ``nn.CrossEntropyLoss()``.
    data : (X, y) or iterable of (X, y)
        The batch the curvature is taken on, or batches that each step draws the next one from
        (a re-iterable such as a list or ``DataLoader`` starts over when exhausted).
    damping : float
        λ >= 0. Needed when G is singular (an over-parametrized GGN, a weight-norm chart).
    damping_reference : {"weights", "identity"} or Metric
        G_ref. ``"weights"`` (default) is the ``"weights"`` metric above: since it is itself a
        pulled-back metric, G + λ G_ref transforms correctly and **damping keeps invariance
        under every ``torch.nn.utils.parametrize`` chart** (weight norm, per-layer scaling,
        NTK parametrization, ...) (docs/math.md §5). It is still λI in the module's own weight
        coordinates, so it does *not* make the step invariant under a change of those (e.g.
        rewriting the model with rescaled layers without ``parametrize``). Without ``model``
        it is I. ``"identity"`` is λI on the raw parameters: not invariant.
    momentum, dampening, weight_decay, nesterov, maximize
        As ``torch.optim.SGD``. Weight decay is added to the gradient (a covector) before
        the solve; momentum accumulates the solved direction.
    cg_tol : float
        Relative residual tolerance of conjugate gradients.
    cg_maxiter : int
        CG iterations per step. If CG has not converged by then, an undamped metric raises
        :class:`~covariant.errors.SingularMetricError`; a damped one uses the truncated
        solution (still a descent direction) and warns once. ``info`` (alias
        ``last_solve``) reports the iterations and residual of the latest step.
    cg_preconditioner : {"auto", "none"}
        ``"auto"``: for a module with ``parametrize`` charts and the ``"weights"`` damping
        reference, precondition CG with the mean diagonal of J_Eᵀ J_E per parameter tensor,
        so that a chart that rescales tensors (NTK parametrization, per-layer scaling) changes
        neither the conditioning nor the CG iterates. ``"none"``: plain CG.
    metric_kwargs : dict, optional
        Options of the named curvature metric (e.g. ``{"mc_samples": 1}`` for a Monte-Carlo
        Fisher), passed to :func:`covariant.metrics.metric_from_name` (``KFAC.from_space``).
    kfac_update_every : int
        T >= 1 (default 10): K-FAC's factors are refreshed at steps 0, T, 2T, … Each refresh
        costs a forward pass and one backward pass per output-Hessian column (about C
        gradient evaluations for C classes), so T = 10 keeps it at most about as costly as
        the gradients themselves; in between the stored factors are reused.
    kfac_decay : float
        d in [0, 1) (default 0.95): at the j-th refresh the factors become
        min(1 − 1/j, d)·old + (1 − min(1 − 1/j, d))·new, a plain mean over the first
        refreshes and then an exponential average over about 1/(1 − d) = 20 refreshes
        (Martens & Grosse 2015), smoothing mini-batch noise in the curvature; 0 keeps only
        the newest. The factors and counters are in ``state_dict()``.
    kfac_damping : {"exact", "factored"}
        ``"exact"`` (default): K + λI. ``"factored"``: Martens & Grosse's factored Tikhonov
        damping, (B + (√λ/π) I) ⊗ (A + π√λ I) per block (``KroneckerFactored.
        with_factored_damping``; docs/math.md §9): more damping along a layer's large-curvature
        directions, so mini-batch K-FAC can take a small λ. ``metric="kfac"`` only; added in w
        and pulled back through ``parametrize`` charts like exact damping.
    data_parallel, process_group : bool, optional
        Every rank of ``process_group`` holds the same parameters and its part of each
        step's batch: ``step`` combines the ranks' gradients and reduces the metric products
        (:mod:`covariant.distributed.optim`), so that every rank takes the single-process
        step on the union of the batches (K-FAC: its factors). Not with Monte-Carlo metrics.

    Raises
    ------
    ValueError
        A metric name without the ``model`` / ``loss_fn`` / ``data`` it needs.
    SingularMetricError
        In ``step``: the metric is singular (or too badly conditioned for CG) and not damped.
    NonFiniteError
        In ``step``: a gradient contains NaN or Inf.

    Notes
    -----
    *Invariance.* With the exact natural gradient (converged CG) the step transforms as a
    vector: training the same network through any ``parametrize`` chart gives, mapped to the
    weights, the same trajectory to first order in α (exactly, for a linear chart), where
    ``torch.optim.SGD`` and Adam give a different one (docs/math.md §6). A parameter without
    ``.grad`` counts as gradient 0 for a non-Euclidean metric (the metric may still move it).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> opt = RiemannianGD(model.parameters(), lr=0.5, metric="ggn", model=model,
    ...                    loss_fn=loss_fn, data=(X, y), damping=1e-2)
    >>> first = loss_fn(model(X), y).item()
    >>> for _ in range(10):
    ...     opt.zero_grad()
    ...     loss_fn(model(X), y).backward()
    ...     opt.step()
    >>> loss_fn(model(X), y).item() < 0.9 * first
    True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        metric: Metric | str = "euclidean",
        *,
        model: nn.Module | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        data: Any = None,
        damping: float = 0.0,
        damping_reference: str | Metric = "weights",
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        cg_tol: float = 1e-6,
        cg_maxiter: int = 200,
        cg_preconditioner: str = "auto",
        metric_kwargs: dict[str, Any] | None = None,
        kfac_update_every: int = DEFAULT_UPDATE_EVERY,
        kfac_decay: float = DEFAULT_DECAY,
        kfac_damping: str = "exact",
        data_parallel: bool = False,
        process_group: Any = None,
    ) -> None:
        lr = float(lr) if isinstance(lr, Tensor) else lr
        _check_options(lr, momentum, dampening, weight_decay, nesterov, damping, cg_tol,
                       cg_maxiter, cg_preconditioner, damping_reference)
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        )
        super().__init__(params, defaults)

        self.damping = float(damping)
        self.cg_tol = float(cg_tol)
        self.cg_maxiter = int(cg_maxiter)
        self.model, self.loss_fn = model, loss_fn
        self._stream = _BatchStream(data)
        self.metric_kwargs = dict(metric_kwargs or {})
        self.cg_preconditioner = cg_preconditioner
        self.metric_name, self.metric = self._resolve_metric(metric)
        self._kfac = (_KFACState(self.metric_name, kfac_update_every, kfac_decay,
                                 self.metric_kwargs, kfac_damping)
                      if self.metric_name in KFAC_METRICS else None)
        check_kfac_damping(kfac_damping, self.metric_name, damping_reference)
        self._view = _ModelView(model, self._params()) if model is not None else None
        self._damping_reference = damping_reference
        self._warned_truncated = False
        self.info: dict[str, Any] = {}
        self._batch: tuple[Tensor, Tensor] | None = None
        self._dp = (DataParallelSteps(process_group, self.metric_name, self.metric_kwargs)
                    if data_parallel else None)

    # ----------------------------------------------------------------- setup
    @property
    def data(self) -> Any:
        """The batch, or the iterable of batches, the model metrics are taken on."""
        return self._stream.data

    @data.setter
    def data(self, value: Any) -> None:
        self._stream.data = value

    @property
    def last_solve(self) -> dict[str, Any]:
        """Alias of :attr:`info`: how the latest step solved for its direction."""
        return self.info

    @property
    def kfac_factors(self) -> KroneckerFactored | None:
        """The current K-FAC factors of the weights (``KroneckerFactored``, undamped running
        average), or None before the first step and for the other metrics."""
        return None if self._kfac is None else self._kfac.factors

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the metric then covers it too."""
        super().add_param_group(param_group)
        if getattr(self, "_view", None) is not None:
            self._view = _ModelView(self.model, self._params())  # type: ignore[arg-type]

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _resolve_metric(self, metric: Metric | str) -> tuple[str, Metric | None]:
        if isinstance(metric, Metric):
            return type(metric).__name__, metric
        if not isinstance(metric, str):
            raise TypeError(
                f"RiemannianGD: metric must be a covariant.metrics.Metric or one of "
                f"{METRIC_NAMES}, got {type(metric).__name__}"
            )
        name = metric.lower()
        if name not in METRIC_NAMES:
            raise ValueError(f"RiemannianGD: unknown metric {metric!r}; choose from {METRIC_NAMES}")
        need = {"weights": ("model",)}.get(name, ("model", "loss_fn", "data"))
        if name in _CURVATURE_METRICS or name == "weights":
            given = {"model": self.model, "loss_fn": self.loss_fn, "data": self.data}
            missing = [k for k in need if given[k] is None]
            if missing:
                raise ValueError(
                    f"RiemannianGD(metric={name!r}) needs {', '.join(need)}; missing: "
                    f"{', '.join(missing)}. Pass e.g. RiemannianGD(model.parameters(), lr, "
                    f"metric={name!r}, model=model, loss_fn=nn.CrossEntropyLoss(), "
                    "data=(X, y))."
                )
        if name in _CURVATURE_METRICS:
            _check_data(self.data)
        return name, None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["covariant"] = {"batches_drawn": self._stream.drawn, "metric": self.metric_name,
                           "damping": self.damping}
        if self._kfac is not None:
            sd["covariant"]["kfac"] = self._kfac.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("covariant", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            if self.metric_name in _CURVATURE_METRICS:
                self._stream.skip(int(extra.get("batches_drawn", 0)))
            else:
                self._stream.drawn = int(extra.get("batches_drawn", 0))
            if self._kfac is not None and "kfac" in extra:
                self._kfac.load_state_dict(extra["kfac"])

    # ----------------------------------------------------------------- the metric
    def _chart(self) -> tuple[nn.Module | None, Reparametrization | None]:
        """The module on the weights and the chart E: p ↦ w, where this step needs them."""
        view = self._view
        if view is None or not (view.has_chart or self.metric_name in _CURVATURE_METRICS):
            return None, None
        module = view.weight_module()
        return module, view.chart(module)

    def _weights_metric(self, E: Reparametrization | None) -> Metric:
        """The weights' Euclidean metric on p: Eᵀ E, or I without ``parametrize`` charts."""
        view = self._view
        if view is None or not view.has_chart or E is None:
            return Euclidean()
        return Pullback(Euclidean(), E)

    def _reference_metric(self, E: Reparametrization | None) -> Metric:
        ref = self._damping_reference
        if isinstance(ref, Metric):
            return ref
        return Euclidean() if ref == "identity" else self._weights_metric(E)

    def _model_metric(self, module: nn.Module, E: Reparametrization | None) -> Metric:
        """G_w of the model on this step's batch, damped, pulled back to p.

        With the ``"weights"`` reference the damping is added to G_w in the weights,
        Eᵀ (G_w + λ I) E; otherwise the reference metric is added on p.
        """
        batch, self._batch = self._batch or self._stream.next(), None
        space = (ParameterSpace.from_module(module, self.loss_fn, batch)[0]  # type: ignore[arg-type]
                 if self._dp is None else self._dp.space(module, self.loss_fn, batch))  # type: ignore[arg-type]
        G_w = space.with_metric(self.metric_name, **self.metric_kwargs).metric
        lam = self.damping
        if self._damping_reference == "weights":
            inner = Damped(G_w, lam) if lam > 0 else G_w
            return inner if E is None else Pullback(inner, E)
        G = G_w if E is None else Pullback(G_w, E)
        return Damped(G, lam, self._reference_metric(E)) if lam > 0 else G

    def _kfac_metric(
        self, module: nn.Module, E: Reparametrization | None
    ) -> tuple[Metric, bool]:
        """(The K-FAC metric on p, whether its closed-form solve applies), after refreshing
        the factors on this step's batch when due.

        With the ``"weights"`` reference: Eᵀ (K + λI) E, solved in closed form through the
        chart (``Pullback.solve``: J⁻¹ or, for a submersion, J⁺), unless E embeds p into
        more weights (only some parameters are optimized): then by conjugate gradients.
        """
        assert self._kfac is not None
        batch, self._batch = self._batch or self._stream.next(), None
        refreshed = self._kfac.advance(module, self.loss_fn, batch, self._dp and self._dp.space)
        self.info = {"refreshed": refreshed}
        lam = self.damping
        by_weights = self._damping_reference == "weights"
        K: Metric = KroneckerMetric(self._kfac.damped(lam if by_weights else 0.0),
                                    pinv=self._kfac.pinv)
        if E is not None:
            K = Pullback(K, E)
        if not by_weights and lam > 0:
            return Damped(K, lam, self._reference_metric(E)), False
        assert self._view is not None
        return K, self._view.moves_all(module)

    def _metric_at_step(
        self,
    ) -> tuple[Metric, bool, nn.Module | None, Reparametrization | None]:
        """(G + λ G_ref on p, whether G's own ``solve`` may be used, the module on the
        weights and the chart E: p ↦ w, where this step needs them)."""
        module, E = self._chart()
        if self.metric_name in _MODEL_METRICS:
            assert module is not None
            return self._model_metric(module, E), False, module, E
        if self.metric is not None:
            base = self.metric
        elif self.metric_name == "weights":
            base = self._weights_metric(E)
        else:
            base = Euclidean()
        if self.damping == 0.0:
            own_solve = self.metric is not None and base.has_own_solve
            return base, own_solve, module, E
        return Damped(base, self.damping, self._reference_metric(E)), False, module, E

    # ----------------------------------------------------------------- the solve
    def _solve(self, p: Tensor, g: Tensor) -> Tensor:
        """r = (G + λ G_ref)⁻¹ g at p; records how in :attr:`info`."""
        if self._kfac is not None:
            module, E = self._chart()
            assert module is not None
            G, closed = self._kfac_metric(module, E)
            refreshed = self.info["refreshed"]
            if closed:
                r = self._own_solve(G, p, g)
                self.info = {"method": "kfac", "refreshed": refreshed}
                return r
            precond = (self._preconditioner(p, module, E) if self.cg_preconditioner == "auto"
                       else None)
            r = self._cg(G, p, g, precond)
            self.info.update(method="kfac+cg", refreshed=refreshed)
            return r
        G, own_solve, module, E = self._metric_at_step()
        if isinstance(G, Euclidean):
            self.info = {"method": "identity"}
            return g
        if own_solve:
            r = self._own_solve(G, p, g)
            self.info = {"method": "solve"}
            return r
        precond = (self._preconditioner(p, module, E) if self.cg_preconditioner == "auto"
                   else None)
        return self._cg(G, p, g, precond)

    def _own_solve(self, G: Metric, p: Tensor, g: Tensor) -> Tensor:
        catch = (NotConvergedError, SingularMetricError) if self._kfac is not None \
            else NotConvergedError
        try:
            return G.solve(p, g)
        except catch as err:
            raise SingularMetricError(
                f"RiemannianGD: solving with the metric {self.metric_name} failed ({err}); "
                "it is singular or badly conditioned. Pass damping=... > 0."
            ) from err

    def _cg(
        self, G: Metric, p: Tensor, g: Tensor, precond: Callable[[Tensor], Tensor] | None
    ) -> Tensor:
        lam = self.damping
        try:
            res = cg(lambda v: G.matvec(p, v), g, rtol=self.cg_tol, maxiter=self.cg_maxiter,
                     preconditioner=precond, raise_on_failure=False)
        except (SingularMetricError, NonFiniteError) as err:
            # CG breaks down (pᵀGp <= 0, or iterates blowing up along a null direction the
            # right-hand side has a component in) exactly when the metric is singular or
            # indefinite, or not finite at this point.
            raise SingularMetricError(
                f"RiemannianGD: conjugate gradients broke down on the metric {self.metric_name}"
                f"{'' if lam == 0 else f' + {lam:g}·reference'} at the current parameters "
                f"({err}): it is singular, indefinite or not finite here. "
                + ("Pass damping=... > 0 (the default reference 'weights' keeps invariance)."
                   if lam == 0 else "Increase damping.")
            ) from err
        self.info = {"method": "cg", "iterations": res.num_iters,
                     "residual": res.residual_norm, "converged": res.converged}
        if not res.converged:
            self._not_converged(res.residual_norm)
        return res.x

    def _not_converged(self, residual: float) -> None:
        """Raise for an undamped metric; warn once that the damped solve was truncated."""
        if self.damping == 0.0:
            raise SingularMetricError(
                f"RiemannianGD: conjugate gradients on the metric {self.metric_name} did "
                f"not converge in cg_maxiter={self.cg_maxiter} iterations (residual "
                f"{residual:.3e}): the metric is singular or badly conditioned. "
                "Pass damping=... > 0, or raise cg_maxiter / cg_tol."
            )
        if not self._warned_truncated:
            warnings.warn(
                f"RiemannianGD: CG stopped after cg_maxiter={self.cg_maxiter} iterations "
                f"at residual {residual:.3e} (rtol {self.cg_tol:g}); using the "
                "truncated solution. Raise cg_maxiter or damping for the exact natural "
                "gradient (reported once; see opt.info).",
                RuntimeWarning,
                stacklevel=_CALLER_OF_STEP,
            )
            self._warned_truncated = True

    def _preconditioner(
        self, p: Tensor, module: nn.Module | None, E: Reparametrization | None
    ) -> Callable[[Tensor], Tensor] | None:
        """Block-scalar Jacobi preconditioner from the reference metric J_Eᵀ J_E
        (``_ModelView.jacobi_preconditioner``); None when the module has no ``parametrize``
        charts (M = I) or the damping reference is not ``"weights"``."""
        view = self._view
        if (view is None or not view.has_chart or module is None or E is None
                or self._damping_reference != "weights"):
            return None
        return view.jacobi_preconditioner(p, module, E)

    # ----------------------------------------------------------------- step
    def _name(self, i: int, p: Tensor) -> str:
        if self._view is not None:
            return repr(self._view.names[i])
        return f"#{i} (shape {tuple(p.shape)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; ``closure`` (optional) re-evaluates the loss and calls ``backward``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._dp is not None:  # draw the step's batch first: its size weighs the gradient
            self._batch = self._stream.next() if self.metric_name in _CURVATURE_METRICS else None
            self._dp.reduce_gradients(self._params(), self.loss_fn, self._batch)
        euclid = self.metric_name == "euclidean" and self.damping == 0.0
        covectors = self._covectors(skip_missing=euclid)
        if euclid:
            directions: list[Tensor | None] = list(covectors)
        else:
            params = self._params()
            if not params:
                return loss
            directions = list(self._directions(params, covectors))  # type: ignore[arg-type]
        self._move(directions)
        return loss

    def _covectors(self, skip_missing: bool) -> list[Tensor | None]:
        """g + λ_wd p per parameter (sign flipped for ``maximize``); a missing ``.grad`` is
        None when ``skip_missing``, else 0."""
        covectors: list[Tensor | None] = []
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    covectors.append(None if skip_missing else torch.zeros_like(p))
                    i += 1
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RiemannianGD does not support sparse gradients")
                if not bool(torch.isfinite(p.grad).all()):
                    raise NonFiniteError(
                        f"RiemannianGD.step: the gradient of parameter {self._name(i, p)} "
                        "contains NaN or Inf. Check the loss (log of 0, overflow) and lower "
                        "the learning rate."
                    )
                g = -p.grad if group["maximize"] else p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                covectors.append(g)
                i += 1
        return covectors

    def _directions(self, params: list[Tensor], covectors: list[Tensor]) -> list[Tensor]:
        """The solved direction r = (G + λ G_ref)⁻¹ g, split per parameter."""
        gflat = torch.cat([g.reshape(-1) for g in covectors])
        pflat = torch.cat([p.detach().reshape(-1) for p in params])
        with torch.enable_grad():
            r = self._solve(pflat, gflat).detach()
        if not bool(torch.isfinite(r).all()):
            raise NonFiniteError(
                f"RiemannianGD.step: the metric solve ({self.metric_name}) returned NaN or "
                "Inf; the metric is singular or not finite here. Pass damping=... > 0."
            )
        directions, start = [], 0
        for p in params:
            directions.append(r[start : start + p.numel()].view_as(p))
            start += p.numel()
        return directions

    def _move(self, directions: list[Tensor | None]) -> None:
        """Momentum (as ``torch.optim.SGD``) and the update p ← p − α d."""
        _sgd_move(self.param_groups, self.state, directions)


#: ``stacklevel`` of the truncated-CG warning that points at the line calling ``opt.step()``:
#: _not_converged, _cg, _solve, _directions, step, torch's no_grad and step-hook wrappers.
_CALLER_OF_STEP = 8
