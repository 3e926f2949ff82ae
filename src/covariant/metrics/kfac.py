r"""K-FAC and EK-FAC: Kronecker-factored approximations of the GGN / Fisher as Metrics.

:class:`KFAC` approximates the type-2 GGN (exact output-Hessian square roots) or the
Monte-Carlo Fisher of a model space by one Kronecker block B ⊗ A per ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` layer (:mod:`covariant.metrics.kfac_factors`), and by the
exact diagonal of the same curvature on every other parameter. :class:`EKFAC` keeps the
eigenbasis of each block and refits its eigenvalues to the per-sample gradients (George et
al. 2018). Damping λ is added exactly, K_λ = K + λI, in the chart of the weights; every
operation is closed-form per block (:class:`~covariant.metrics.kronecker.KroneckerFactored`):
``matvec``, ``solve``, ``logdet``, ``inv_sqrt``, ``dense``.

Both are metrics of the *weights* w. On a reparametrized space (a weight-norm chart, a
``torch.nn.utils.parametrize`` model) ``from_space`` returns the pullback Jᵀ K_λ J, so K-FAC
is a tensor like every other metric here (docs/math.md §9).

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
>>> space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y), metric="kfac")
>>> K, G = space.metric.dense(theta), cv.metrics.GGN.from_space(space).dense(theta)
>>> i = slice(16, 16 + 8)              # one data point: the last layer's block is exact
>>> bool(torch.allclose(K[i, i], G[i, i]))
True
>>> w = torch.randn(theta.shape[0], dtype=torch.float64)
>>> damped = cv.metrics.KFAC.from_space(space, damping=0.1)
>>> bool(torch.allclose(damped.matvec(theta, damped.solve(theta, w)), w))
True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .._fast import is_transformed, second_order
from ..errors import ShapeMismatchError
from ..layout import (
    ParameterLayout,
    as_batches,
    batch_stats_active,
    batch_weights,
    functional_forward,
)
from .base import Metric, Pullback
from .forms import ConnectionForm
from .kfac_factors import (
    FISHER_TYPES,
    KFAC_APPROX,
    FactorOptions,
    FactorSet,
    compute_factors,
    kfac_loss_info,
)
from .kronecker import KroneckerFactored
from .shard import DataShard, shard_noise, shard_of

__all__ = ["EKFAC", "KFAC"]

_SOLVE_MODES = ("raise", "pinv")


class KFAC(Metric):
    r"""K-FAC metric K_λ = (⊕_l B_l ⊗ A_l) ⊕ diag(r) + λI of a model (in the weights' chart).

    Parameters
    ----------
    model : nn.Module
        The network; its trainable parameters are the coordinates (``ParameterLayout``).
    loss_fn : callable
        ``nn.CrossEntropyLoss`` (no class weights), ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
        (no weight / pos_weight), reduction ``'mean'`` or ``'sum'``; other losses raise
        :class:`~covariant.errors.UnsupportedStructureError`.
    batches : (X, y) or iterable of (X, y)
    weights : sequence of float, optional
        Batch weights w_b (as ``from_module``: batch size / total size for a mean loss).
    forward : callable, optional
        ``forward(p, X)``, a functional forward of ``model`` (``functional_call``, so module
        hooks fire); by default ``covariant.layout.functional_forward(model, layout)``.
    layout : ParameterLayout, optional
        The coordinates; ``ParameterLayout.from_module(model)`` by default.
    fisher_type : {"type2", "mc"}
        Type-2 GGN (exact output-Hessian square roots) or the Monte-Carlo Fisher with
        ``mc_samples`` draws from ``seed`` (the same draws as ``Fisher(mc_samples, seed)``).
    kfac_approx : {"expand", "reduce"}
        Weight sharing (conv positions, sequence positions): Eschenhagen et al. 2023.
    separate_bias : bool
        A bias gets its own block (A = [[1]]) (default), or is folded into the weight's
        block as a column of ones appended to the inputs.
    damping : float
        λ ≥ 0, added exactly: K + λI.
    solve_mode : {"raise", "pinv"}
        A singular K_λ: ``solve`` / ``logdet`` raise :class:`SingularMetricError`, or give the
        pseudo-inverse solution and the pseudo-log-determinant.
    null_rtol : float, optional
        Eigenvalues at most ``null_rtol``·λ_max count as zero (default 1e-10, floored at
        100·eps of the dtype).
    shard : DataShard, optional
        Data-parallel (:mod:`covariant.metrics.shard`): ``batches`` are this rank's with
        global weights; the factor matrices, the uncovered diagonal and the EK-FAC
        corrections are summed over the ranks (one all-reduce of all of them per pass), the
        input factors are normalized by the global example count, and the Monte-Carlo draws
        are the single process's. ``from_space`` takes it from the space's binding.
    """

    name = "KFAC"
    _ekfac = False

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 batches: Any, weights: Sequence[float] | None = None, *,
                 forward: Callable[[Tensor, Tensor], Tensor] | None = None,
                 layout: ParameterLayout | None = None, fisher_type: str = "type2",
                 mc_samples: int = 1, seed: int = 0, kfac_approx: str = "expand",
                 separate_bias: bool = True, damping: float = 0.0, solve_mode: str = "raise",
                 null_rtol: float | None = None, shard: DataShard | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}: model must be an nn.Module, got "
                            f"{type(model).__name__}")
        self.info = kfac_loss_info(loss_fn, self.name)
        for what, val, allowed in (("fisher_type", fisher_type, FISHER_TYPES),
                                   ("kfac_approx", kfac_approx, KFAC_APPROX),
                                   ("solve_mode", solve_mode, _SOLVE_MODES)):
            if val not in allowed:
                raise ValueError(f"{self.name}: {what} must be one of {allowed}, got {val!r}")
        if int(mc_samples) != mc_samples or mc_samples < 1:
            raise ValueError(f"{self.name}: mc_samples must be a positive integer, got "
                             f"{mc_samples!r}")
        if not float(damping) >= 0.0:
            raise ValueError(f"{self.name}: damping must be >= 0, got {damping!r}")
        if batch_stats_active(model):
            warnings.warn(
                f"{self.name}: a batch-norm layer normalizes by batch statistics (training "
                "mode), which couples the samples of a batch; K-FAC treats them as independent, "
                "an approximation on top of K-FAC's own. Call model.eval() for a net whose "
                "samples do not interact (docs/math.md §9).", stacklevel=2)
        self.model = model
        self.loss_fn = loss_fn
        self.layout = ParameterLayout.from_module(model) if layout is None else layout
        self.forward = functional_forward(model, self.layout) if forward is None else forward
        self.batches = list(as_batches(batches, self.name))
        self.weights = (list(batch_weights(loss_fn, self.batches)) if weights is None
                        else [float(w) for w in weights])
        if len(self.weights) != len(self.batches):
            raise ShapeMismatchError(f"{self.name}: {len(self.weights)} weights for "
                                     f"{len(self.batches)} batches")
        self.fisher_type, self.kfac_approx = fisher_type, kfac_approx
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self.separate_bias = bool(separate_bias)
        self.damping = float(damping)
        self.solve_mode = solve_mode
        self.null_rtol = null_rtol
        self.is_constant = False
        self.shard = shard
        noise = (shard_noise(self.info, self.batches, self.mc_samples, self.seed, shard)
                 if fisher_type == "mc" else None)
        self.options = FactorOptions(fisher_type, kfac_approx, self.separate_bias,
                                     self._ekfac, noise)
        self._cache: tuple[Tensor, KroneckerFactored, FactorSet] | None = None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_space(cls, space: Any, **kwargs: Any) -> Metric:
        """The metric of a model space: K-FAC of its root (weights) space, pulled back
        through ``space.root_chart()`` for a reparametrized space (J ᵀ K_λ J)."""
        binding = space.binding
        if binding is None or binding.model is None:
            raise ValueError(
                f"{cls.name} needs a model space with a module, a loss function and data; "
                "build it with ParameterSpace.from_module(model, loss_fn, data)."
            )
        shard = shard_of(binding)
        if shard is not None:
            kwargs.setdefault("shard", shard)
        base = cls(binding.model, binding.loss_fn, list(binding.batches), list(binding.weights),
                   forward=binding.forward, **kwargs)
        h = space.root_chart()
        return base if h is None else Pullback(base, h)

    # ---------------------------------------------------------------- factors
    def factor_set(self, p: Tensor, *, differentiable: bool = False) -> FactorSet:
        """The raw factors at ``p`` (no damping); differentiable in ``p`` on request."""
        if is_transformed(p):
            raise NotImplementedError(
                f"{self.name}: the factors are computed with hooks and reverse-mode autograd; "
                "they cannot be traced by forward-mode / vmap transforms of the point "
                "(differentiate matvec by reverse mode at a point that requires grad)."
            )
        if p.shape != (self.layout.dim,):
            raise ShapeMismatchError(f"{self.name}: the point has shape {tuple(p.shape)}, the "
                                     f"model has {self.layout.dim} parameters")
        # differentiable factors are differentiated again (reverse over reverse): attention
        # needs its math kernel for that, as in every other second-order computation
        with second_order() if differentiable else nullcontext():
            return compute_factors(self.model, self.layout, self.forward, self.loss_fn,
                                   self.batches, self.weights, p, self.options,
                                   differentiable=differentiable, shard=self.shard)

    def _operator(self, fs: FactorSet) -> KroneckerFactored:
        return KroneckerFactored(fs.blocks, self.layout.dim, fs.rest_index, fs.rest_diagonal,
                                 self.damping)

    def factors(self, p: Tensor) -> KroneckerFactored:
        """K_λ at ``p`` (damping included), cached on the point's values. At a point that
        requires grad (with grad enabled) the factors are built differentiably, uncached."""
        if p.requires_grad and torch.is_grad_enabled():
            return self._operator(self.factor_set(p, differentiable=True))
        c = self._cache
        if c is not None and c[0].shape == p.shape and c[0].dtype == p.dtype \
                and c[0].device == p.device and torch.equal(c[0], p):
            return c[1]
        fs = self.factor_set(p)
        op = self._operator(fs)
        self._cache = (p.detach().clone(), op, fs)
        return op

    def uncovered(self, p: Tensor) -> tuple[str, ...]:
        """Names of the parameters that get the exact diagonal instead of a Kronecker block."""
        self.factors(p.detach())
        assert self._cache is not None
        return self._cache[2].uncovered

    # ---------------------------------------------------------------- products
    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        """K_λ(p) v, closed form per block; differentiable in a ``p`` that requires grad."""
        return self.factors(p).matvec(v)

    def inner(self, p: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return torch.dot(u, self.matvec(p, v))

    def _pinv(self) -> bool:
        return self.solve_mode == "pinv"

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        """K_λ⁻¹ w per block (eigenbasis of the factors); ``solve_mode='pinv'``: K_λ⁺ w."""
        return self.factors(p.detach()).solve(w, pinv=self._pinv(), null_rtol=self.null_rtol)

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        return self.factors(p).dense(max_dim)

    def rank(self, p: Tensor) -> int:
        return self.factors(p.detach()).rank(self.null_rtol)

    def logdet(self, p: Tensor) -> Tensor:
        """Σ log eigenvalues of K_λ; a singular K_λ raises, or with ``solve_mode='pinv'``
        gives the pseudo-log-determinant."""
        return self.factors(p).logdet(pseudo=self._pinv(), null_rtol=self.null_rtol)

    def pseudo_logdet(self, p: Tensor) -> Tensor:
        """The log-product of the eigenvalues above the null threshold."""
        return self.factors(p).logdet(pseudo=True, null_rtol=self.null_rtol)

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        op = self.factors(p)
        if op.rank(self.null_rtol) < op.dim and not pseudo:
            return None
        return op.logdet(pseudo=pseudo, null_rtol=self.null_rtol)

    def inv_sqrt(self, p: Tensor, Z: Tensor) -> Tensor:
        """K_λ^{-1/2} Z (symmetric square root; K_λ must be nonsingular)."""
        return self.factors(p.detach()).inv_sqrt(Z, null_rtol=self.null_rtol)

    def connection_form(self, p: Tensor, r: Tensor) -> ConnectionForm:
        r"""u ↦ rᵀKΓ(u, u) = D_u(rᵀKu) − ½ D_r(uᵀKu), the directional derivatives taken by
        reverse mode through the differentiable factor computation (K depends on p through
        the layer inputs, the backprop columns and the output Hessian)."""
        p, r = p.detach(), r.detach()

        def remainder(u: Tensor) -> Tensor:
            u = u.detach()
            with torch.enable_grad():
                q = p.clone().requires_grad_(True)
                K = self.factors(q)
                Ku = K.matvec(u)
                g1, g2 = (torch.autograd.grad(s, q, retain_graph=True, allow_unused=True)[0]
                          for s in (torch.dot(r, Ku), torch.dot(u, Ku)))
            zero = torch.zeros_like(p)
            g1 = zero if g1 is None else g1
            g2 = zero if g2 is None else g2
            return torch.dot(g1, u) - 0.5 * torch.dot(g2, r)

        return ConnectionForm(None, remainder)

    def __repr__(self) -> str:
        loss = type(self.loss_fn).__name__
        if loss == "function":
            loss = getattr(self.loss_fn, "__name__", "loss")
        mc = f", mc_samples={self.mc_samples}, seed={self.seed}" \
            if self.fisher_type == "mc" else ""
        return (f"{self.name}({loss}, {len(self.batches)} batches, fisher_type="
                f"{self.fisher_type!r}{mc}, kfac_approx={self.kfac_approx!r}, "
                f"damping={self.damping:g}, solve_mode={self.solve_mode!r})")


class EKFAC(KFAC):
    r"""EK-FAC: K-FAC's eigenbasis Q_B ⊗ Q_A with eigenvalues refitted to the per-sample
    gradients, Λ_ij = Σ_n Σ_k (Q_Bᵀ Ĝ_nk Q_A)²_ij (George et al. 2018), Ĝ_nk = Σ_t g_ntk x_ntᵀ
    the gradient matrix of sample n and backprop column k. Same parameters as :class:`KFAC`.

    In its eigenbasis it matches the exact block's diagonal, so on one data point (where
    K-FAC is exact) it is exact too:

    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> lin = nn.Linear(3, 2).double()
    >>> data = (torch.randn(1, 3, dtype=torch.float64), torch.tensor([1]))
    >>> space, theta = cv.ParameterSpace.from_module(lin, nn.CrossEntropyLoss(), data, "ekfac")
    >>> G = cv.metrics.GGN.from_space(space).dense(theta)
    >>> bool(torch.allclose(space.metric.dense(theta)[:6, :6], G[:6, :6]))
    True
    """

    name = "EKFAC"
    _ekfac = True
