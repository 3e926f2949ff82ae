r"""The common base of the model-curvature metrics G = Σ_b w_b J_bᵀ Λ_b J_b.

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
reference=...)`` (docs/math.md §5); with ``solve_mode='pinv'`` it returns the pseudo-inverse
solution G⁺w, matrix-free (Lanczos, i.e. CG, with the numerically null Ritz directions
dropped: :meth:`CurvatureMetric.pinv_solve`), and ``logdet`` is the pseudo-log-determinant.
``rank`` is always the numerical rank (eigenvalues above ``rank_rtol``·λ_max).

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(3, 2).double()        # softmax ignores a constant added to both logits
>>> data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
>>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
>>> space.metric.rank(theta), theta.shape[0]     # a singular GGN: half the directions are null
(4, 8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from .._checks import default_tol, same_point
from .._progress import progress_bar, progress_enabled
from ..errors import NotConvergedError, ShapeMismatchError, SingularMetricError
from ..layout import as_batches, batch_weights
from ..linalg import cg
from ..linalg import pinv_solve as lanczos_pinv_solve
from .base import MAX_DENSE_DIM, Metric, check_dense_size
from .forms import ConnectionForm
from .linear_structure import LinearStructure
from .losses import cast_input, loss_info
from .shard import DataShard, LocalPart, reduce_local, shard_of

__all__ = ["CurvatureMetric", "model_of"]

Forward = Callable[[Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
Model = Callable[[Tensor], Tensor]  # q ↦ f(q, X_b) for one batch

_SOLVE_MODES = ("raise", "pinv")

#: Products per vmapped call when a dense metric is built (:meth:`CurvatureMetric.dense`).
DENSE_CHUNK = 64

#: Directions per vmapped call of a connection form's remainder (``ConnectionForm.batched``).
FORM_CHUNK = 32


def model_of(space: Any, what: str) -> tuple[Forward, LossFn, list[Batch], list[float]]:
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


class CurvatureMetric(LinearStructure, Metric):
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
    shard : DataShard, optional
        Data-parallel: ``batches`` are this rank's, with global weights, and every sum over
        the data (products, ``dense``, the rank bound) is reduced over the ranks once
        (:mod:`covariant.metrics.shard`); ``solve``, ``rank``, ``logdet`` then run the same
        algorithm on every rank. ``from_space`` takes it from the space's binding.
    module : nn.Module, optional
        The module whose functional forward ``forward`` is (``from_space`` passes it for a
        root model space). When all its trainable parameters live in ``nn.Linear`` layers,
        :meth:`dense` builds G from per-layer Kronecker sums instead of d products
        (:mod:`covariant.metrics.dense_linear`).
    """

    name = "CurvatureMetric"
    #: True when Λ_b is the Hessian of the loss in the outputs (its derivative is symmetric).
    loss_hessian: bool = False

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
        shard: DataShard | None = None,
        module: nn.Module | None = None,
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
        self.batches = list(as_batches(batches, self.name))
        self.weights = (
            list(batch_weights(loss_fn, self.batches))
            if weights is None
            else [float(w) for w in weights]
        )
        if len(self.weights) != len(self.batches):
            raise ShapeMismatchError(
                f"{self.name}: {len(self.weights)} weights for {len(self.batches)} batches"
            )
        self.info = loss_info(loss_fn)
        self.solve_mode = solve_mode
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter
        self.rank_rtol = rank_rtol
        self.shard = shard
        self.module = module
        self._linear_layers: list | None = None
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
        >>> G = cv.metrics.GGN.from_space(new)
        >>> psi, v = new.chart.inverse(theta), torch.randn(6, dtype=torch.float64)
        >>> bool(torch.allclose(G.matvec(psi, v), new.metric.matvec(psi, v)))
        True
        """
        forward, loss_fn, batches, weights = model_of(space, cls.name)
        shard = shard_of(space.binding)
        if shard is not None:
            kwargs.setdefault("shard", shard)
        elif space.root_chart() is None and space.binding.model is not None:
            kwargs.setdefault("module", space.binding.model)  # for the structured dense G
        return cls(forward, loss_fn, batches, weights, **kwargs)

    # ---------------------------------------------------------------- products
    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """Λ_b u in output space (``out`` = f(p, X_b), ``u`` = J_b v)."""
        raise NotImplementedError

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        """An upper bound on rank Λ_b (used in messages and for large d)."""
        return out.numel()

    def _batch_models(self, p: Tensor) -> list[tuple[int, Tensor | float, Model, Tensor]]:
        """(b, w_b, q ↦ f(q, X_b), y_b) for each batch, inputs cast to the point's dtype."""
        out = []
        for b, (w, (X, y)) in enumerate(zip(self.weights, self.batches, strict=True)):
            Xb = cast_input(X, p)

            def f(q: Tensor, Xb: Tensor = Xb) -> Tensor:
                return self.forward(q, Xb)

            out.append((b, w, f, y.to(device=p.device)))
        return out

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        """G(p) v = Σ_b w_b J_bᵀ Λ_b(f_b) J_b v: one jvp and one vjp per batch.

        Differentiable in ``p`` (and composable with ``torch.func`` transforms). With a
        ``shard``: the local sum, all-reduced once (reverse mode only).
        """
        return reduce_local(self.shard, lambda q: self.local_matvec(q, v), p)

    def local_matvec(self, p: Tensor, v: Tensor) -> Tensor:
        """Σ_b w_b J_bᵀ Λ_b J_b v over this rank's batches (all of them without a shard)."""
        total: Tensor | None = None
        for b, w, f, yb in self._batch_models(p):
            out, Jv = jvp(f, (p,), (v,))
            u = self._output_matvec(b, out, yb, Jv)
            term = w * vjp(f, p)[1](u)[0]
            total = term if total is None else total + term
        assert total is not None
        return total

    def shard_parts(self) -> tuple[Metric | None, Any] | None:
        """With a shard: this rank's sum Σ_b w_b J_bᵀ Λ_b J_b as a metric of its own (its
        products are not reduced) and the shard (``Metric.shard_parts``); None without."""
        return None if self.shard is None else (LocalPart(self), self.shard)

    def inner(self, p: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """uᵀ G(p) v = Σ_b w_b (J_b u)ᵀ Λ_b (J_b v): two jvps per batch and no vjp, so that
        its directional derivative in p (the connection terms) is forward-over-forward."""
        return reduce_local(self.shard, lambda q: self._local_inner(q, u, v), p)

    def _local_inner(self, p: Tensor, u: Tensor, v: Tensor) -> Tensor:
        total: Tensor | None = None
        for b, w, f, yb in self._batch_models(p):
            out, Ju = jvp(f, (p,), (u,))
            Jv = jvp(f, (p,), (v,))[1]
            term = w * torch.sum(Ju * self._output_matvec(b, out, yb, Jv))
            total = term if total is None else total + term
        assert total is not None
        return total

    def connection_form(self, p: Tensor, r: Tensor) -> ConnectionForm:
        r"""u ↦ rᵀ G Γ(u, u) split as uᵀ∇²ψ(p)u + remainder(u) (see :class:`ConnectionForm`).

        With G = Σ_b w_b J_bᵀ Λ_b(f_b) J_b and ∂²f[u, u] the second derivative of the model,

        rᵀGΓ(u, u) = Σ_b w_b [ (Λ_b J_b r)ᵀ ∂²f_b[u, u] + (J_b r)ᵀ DΛ_b[J_b u] (J_b u)
                              − ½ (J_b u)ᵀ DΛ_b[J_b r] (J_b u) ],

        the first term being the quadratic form of ψ(q) = Σ_b w_b ⟨Λ_b J_b r, f_b(q)⟩ (fixed
        weights), the rest one jvp of the model and output-space derivatives of Λ_b. When
        Λ_b = ∇²_f ℓ_b (:attr:`loss_hessian`) DΛ_b is the symmetric third derivative, the two
        Λ terms are ½ (J_b u)ᵀ DΛ_b[J_b r] (J_b u), and one output jvp serves.
        """
        p, r = p.detach(), r.detach()
        parts = []
        for b, w, f, yb in self._batch_models(p):
            out, Jr = jvp(f, (p,), (r,))
            parts.append((b, w, f, yb, out.detach(), Jr.detach(),
                          self._output_matvec(b, out, yb, Jr).detach()))

        def potential(q: Tensor) -> Tensor:
            return sum(w * torch.sum(a * f(q))  # type: ignore[return-value]
                       for _, w, f, _, _, _, a in parts)

        def remainder(u: Tensor) -> Tensor:
            total = p.new_zeros(())
            for b, w, f, yb, out, Jr, _ in parts:
                Ju = jvp(f, (p,), (u,))[1]

                def lam(o: Tensor, x: Tensor, y: Tensor, b: int = b, yb: Tensor = yb) -> Tensor:
                    return torch.sum(x * self._output_matvec(b, o, yb, y))

                t2 = jvp(lambda o, e=Ju: lam(o, e, e), (out,), (Jr,))[1]
                if self.loss_hessian:  # DΛ = ∇³ℓ is symmetric: t1 = t2
                    total = total + w * (0.5 * t2)
                    continue
                t1 = jvp(lambda o, a=Jr, e=Ju: lam(o, a, e), (out,), (Ju,))[1]
                total = total + w * (t1 - 0.5 * t2)
            return total

        def batched(U: Tensor) -> Tensor:  # remainder(u) of every column, vmapped in chunks
            try:
                return torch.cat([vmap(remainder)(U[:, s:s + FORM_CHUNK].T)
                                  for s in range(0, U.shape[1], FORM_CHUNK)])
            except (RuntimeError, NotImplementedError):  # models that vmap cannot batch
                return torch.stack([remainder(u) for u in U.T])

        def loss_minus_potential(q: Tensor) -> Tensor:  # one forward per batch for both
            total = q.new_zeros(())
            for _, w, f, yb, _, _, a in parts:
                out = f(q)
                total = total + w * (self.loss_fn(out, yb) - torch.sum(a * out))
            return total

        if self.shard is None:
            return ConnectionForm(potential, remainder, batched, loss_minus_potential,
                                  (self.loss_fn, self.batches, self.weights))
        shard = self.shard

        def reduced(u: Tensor) -> Tensor:  # the potential's form folded in, then one reduce
            def local(_: Tensor) -> Tensor:
                pot = jvp(lambda q: jvp(potential, (q,), (u,))[1], (p,), (u,))[1]
                return remainder(u) + pot

            return shard.reduce(local, p)

        return ConnectionForm(None, reduced)

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        """G(p) as a dense symmetric (d, d) matrix, from d products (small d only).

        The products G e_i are vmapped in chunks of :data:`DENSE_CHUNK` (memory-bound work:
        small chunks stay in cache) and advance a progress bar inside
        ``progress_scope(True)`` (:mod:`covariant._progress`).
        """
        check_dense_size(p.shape[0], f"{self.name}.dense", max_dim)
        return reduce_local(self.shard, self._local_dense, p)

    def _local_dense(self, p: Tensor) -> Tensor:
        structured = self._linear_dense(p)
        if structured is not None:
            return structured
        d = p.shape[0]
        eye = torch.eye(d, dtype=p.dtype, device=p.device)
        bar = progress_bar(enabled=progress_enabled(), total=d, desc=f"{self.name} (dense)")
        parts = []
        for start in range(0, d, DENSE_CHUNK):
            E = eye[start:start + DENSE_CHUNK]
            try:
                parts.append(vmap(lambda e: self.local_matvec(p, e))(E))
            except (RuntimeError, NotImplementedError):  # models that vmap cannot batch
                parts.append(torch.stack([self.local_matvec(p, e) for e in E]))
            bar.update(E.shape[0])
        bar.close()
        rows = torch.cat(parts)
        return 0.5 * (rows + rows.T)

    # ---------------------------------------------------------------- spectrum and rank
    def _rank_rtol(self, dtype: torch.dtype) -> float:
        return self.rank_rtol if self.rank_rtol is not None else default_tol(None, dtype, 1e-10)

    def eigvalsh(self, p: Tensor) -> Tensor:
        """Ascending eigenvalues of the dense G(p) (small d; cached for the last point)."""
        cache = self._eig_cache
        if cache is not None and same_point(cache[0], p):
            return cache[1]
        evals = torch.linalg.eigvalsh(self.dense(p.detach()))
        self._eig_cache = (p.detach().clone(), evals)
        return evals

    def rank(self, p: Tensor) -> int:
        """Numerical rank: #eigenvalues > ``rank_rtol``·λ_max (dense, up to MAX_DENSE_DIM).

        Beyond that size it returns the structural bound min(d, Σ_b rank Λ_b), which does
        not see symmetries of the model.
        """

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
                out = self.forward(p.detach(), cast_input(X, p))
                total += self._output_rank_bound(b, out, y.to(p.device))
        if self.shard is None:
            return total
        local = p.new_tensor(float(total), dtype=torch.float64)
        return int(self.shard.reduce(lambda _: local, p.detach()).round())

    def pseudo_logdet(self, p: Tensor) -> Tensor:
        """log of the product of the nonzero eigenvalues (dense; docs/math.md §5)."""
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
            "original chart>) (docs/math.md §5); or ask for the projected answer, "
            f"{self.name}(..., "
            "solve_mode='pinv'), which solves on the range of G (the pseudo-inverse)."
        )

    def _cg(self, p: Tensor, rhs: Tensor, watch: bool) -> Tensor:

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

        rtol = self.cg_rtol if self.cg_rtol is not None else default_tol(None, p.dtype, 1e-12)
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

        Computed by :func:`covariant.linalg.pinv_solve`: Lanczos on the Krylov space K(G, w)
        with full reorthogonalization: with the basis V
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
        maxiter = d if self.cg_maxiter is None else min(int(self.cg_maxiter), d)
        res = lanczos_pinv_solve(
            lambda v: self.matvec(p, v), w,
            rank_rtol=self._rank_rtol(p.dtype),
            rtol=self.cg_rtol if self.cg_rtol is not None else default_tol(None, p.dtype, 1e-12),
            maxiter=self.cg_maxiter, raise_on_failure=False,
        )
        if not res.converged and maxiter < d:
            raise SingularMetricError(
                f"{self.name}.pinv_solve: not converged in {maxiter} iterations; raise "
                "cg_maxiter or loosen cg_rtol, or damp the metric. " + self._fix_hint()
            )
        return res.x

    def __repr__(self) -> str:
        loss = getattr(type(self.loss_fn), "__name__", "loss")
        if loss == "function":
            loss = getattr(self.loss_fn, "__name__", "loss")
        return f"{self.name}({loss}, {len(self.batches)} batches, solve_mode={self.solve_mode!r})"
