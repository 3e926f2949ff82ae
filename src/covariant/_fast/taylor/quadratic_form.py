r"""Second-order Taylor mode: the quadratic form vᵀ ∇²L(p) v without a Hessian-vector product.

Hutchinson's trace estimator needs only the quadratic forms zᵀ ∇²L z, not the products ∇²L z.
A quadratic form is the second derivative of t ↦ L(p + t v) at t = 0, and that can be pushed
*forward* through the computation: every intermediate x(t) = x₀ + x₁ t + x₂ t² + O(t³) is
carried as its first three Taylor coefficients, and

    vᵀ ∇²L(p) v = d²/dt² L(p + t v) |₀ = 2 L₂.

The rules are the product rule for bilinear operations (matrix products, convolutions,
elementwise products),

    (a·b)₁ = a₁b₀ + a₀b₁,        (a·b)₂ = a₂b₀ + a₁b₁ + a₀b₂,

and for an elementwise φ, (φ∘x)₁ = φ'(x₀) x₁, (φ∘x)₂ = φ'(x₀) x₂ + ½ φ''(x₀) x₁²; linear
operations act on each coefficient. The zeroth coefficients (the forward pass at p) and the
factors φ', φ'' are computed once per point and kept (only what the rules read: tanh and
relu form theirs from the kept output or a boolean mask), so each quadratic form costs only
the x₁, x₂ passes: for a linear layer y = x Wᵀ that is four matrix products (x₁Wᵀ + x₀Vᵀ and
x₂Wᵀ + x₁Vᵀ), against six for the second backward pass of a reverse-over-reverse
Hessian-vector product through a kept gradient graph (what PyHessian does). The first layer,
whose input is data, needs one.

Why hand-written: torch has forward mode (``torch.func.jvp``) but no Taylor mode; nesting two
``jvp`` computes x₁ twice and recomputes the forward pass, 8 products per layer. The loss is
evaluated once at p under a ``TorchDispatchMode`` that records its aten operations and their
values (so it works for any model and loss built from the supported operations; control flow
is fixed at p, as in any trace), and the record is interpreted per probe. ``make_fx`` would
record the same graph but costs 5× more here (proxies and fake tensors: 24 vs 4 ms on a
78k-parameter MLP). An operation without a rule raises :class:`TaylorUnsupportedError`;
callers (``flatness``) then fall back to Hessian-vector products.
``benchmarks/bench_flatness.py`` (rows a and d) measures it against PyHessian.

Example
-------
>>> import torch
>>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
>>> loss = lambda p: 0.5 * p @ A @ p + torch.tanh(p).sum()
>>> p = torch.tensor([0.3, -0.2], dtype=torch.float64)
>>> q = QuadraticForm(loss, p)
>>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
>>> H = torch.func.hessian(loss)(p)
>>> bool(torch.isclose(q(v), v @ H @ v))
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...errors import TaylorUnsupportedError
from ..kernels import second_order
from .dispatch import READS_OWN_SHAPE, READS_OWN_VALUE, rule_for
from .recording import Recorder

__all__ = ["QuadraticForm"]


class QuadraticForm:
    """v ↦ vᵀ ∇²L(p) v at a fixed point, by second-order Taylor mode (see module docstring).

    Parameters
    ----------
    loss : callable
        Flat point ↦ scalar loss. Recorded once at ``p``: control flow is fixed at that point
        (as for any trace), so build a new form for a new point.
    p : Tensor
        The point (1-D).

    A loss with a ``taylor_parts()`` method (a data-parallel sum over ranks,
    ``covariant.distributed``) returns ``(local, reduce)``: the rank's partial loss is traced
    and each form (and ``value``) is ``reduce``-d, one all-reduce of a scalar per probe.

    Raises
    ------
    TaylorUnsupportedError
        The traced loss uses an operation without a rule, or is not a scalar.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> net = net.double()
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> names = [n for n, _ in net.named_parameters()]
    >>> shapes = [q.shape for q in net.parameters()]
    >>> def loss(p):
    ...     parts = torch.split(p, [s.numel() for s in shapes])
    ...     params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
    ...     out = torch.func.functional_call(net, params, (X,))
    ...     return torch.nn.functional.cross_entropy(out, y)
    >>> p = torch.cat([q.detach().flatten() for q in net.parameters()])
    >>> v = torch.randn_like(p)
    >>> H = torch.func.hessian(loss)(p)
    >>> bool(torch.isclose(QuadraticForm(loss, p)(v), v @ H @ v))
    True
    """

    def __init__(self, loss: Callable[[Tensor], Tensor], p: Tensor) -> None:
        if not isinstance(p, Tensor) or p.ndim != 1:
            raise TypeError("QuadraticForm: p must be a 1-D tensor")
        self.p = p.detach()
        parts = getattr(loss, "taylor_parts", None)
        self._reduce: Callable[[Tensor], Tensor] | None = None
        if parts is not None:
            loss, self._reduce = parts()
        recorder = Recorder(self.p)
        with torch.no_grad(), second_order(), recorder:  # attention: the math kernel
            out = loss(self.p)
        self._nodes = recorder.nodes
        self._primal: dict[Any, Any] = recorder.primal
        self._output = recorder.producer.get(id(out)) if isinstance(out, Tensor) else None
        if self._output is None or out.numel() != 1:
            raise TaylorUnsupportedError(
                "QuadraticForm: the loss must return a scalar tensor that depends on p")
        self._steps: list[tuple[Any, Callable[..., Any]]] = []
        self._setup()

    # ---- setup: the rule of each recorded operation, what stays alive ----------------------
    def _setup(self) -> None:
        primal = self._primal
        depends: set[Any] = {self._nodes[0]}  # nodes whose value depends on p
        for node in self._nodes[1:]:
            if any(a in depends for a in node.all_input_nodes):
                rule = rule_for(node, depends, primal)
                if rule is not None:
                    depends.add(node)
                    self._steps.append((node, rule))
        if self._output not in depends:
            raise TaylorUnsupportedError("QuadraticForm: the loss does not depend on p")
        # Keep only the primal values that some rule reads.
        needed = {a for node, _ in self._steps for a in node.all_input_nodes}
        shape_only = set()
        for node, _ in self._steps:
            packet = getattr(node.target, "overloadpacket", None)
            name = packet.__name__ if packet is not None else ""
            if name in READS_OWN_VALUE:
                needed.add(node)
            elif name in READS_OWN_SHAPE and node not in needed and node is not self._output:
                shape_only.add(node)
        self._primal = {n: v for n, v in primal.items() if n in needed or n is self._output}
        for n in shape_only:  # e.g. pre-activations: their rules need only the shape
            self._primal[n] = torch.empty(primal[n].shape, device="meta")
        self.value = self._primal[self._output].detach().reshape(())
        if self._reduce is not None:
            self.value = self._reduce(self.value)
        last_use: dict[Any, int] = {}
        for i, (node, _) in enumerate(self._steps):
            for a in node.all_input_nodes:
                last_use[a] = i
        self._free_after: list[list[Any]] = [[] for _ in self._steps]
        for n, i in last_use.items():
            if n is not self._output:
                self._free_after[i].append(n)

    # ---- per probe -------------------------------------------------------------------------
    def __call__(self, v: Tensor) -> Tensor:
        """vᵀ ∇²L(p) v (a 0-d tensor)."""
        if v.shape != self.p.shape:
            raise ValueError(
                f"QuadraticForm: v has shape {tuple(v.shape)}, p {tuple(self.p.shape)}")
        placeholder = self._nodes[0]
        coef: dict[Any, tuple[Any, Any]] = {placeholder: (v.to(self.p.dtype), None)}
        primal = self._primal
        with torch.no_grad():
            for i, (node, rule) in enumerate(self._steps):
                coef[node] = rule(node, primal, coef)
                for n in self._free_after[i]:
                    coef.pop(n, None)
            c2 = coef.get(self._output, (None, None))[1]
        out = (torch.zeros((), dtype=self.p.dtype, device=self.p.device) if c2 is None
               else 2.0 * c2.reshape(()))
        return out if self._reduce is None else self._reduce(out)
