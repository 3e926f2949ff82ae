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

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CovariantError

__all__ = ["QuadraticForm", "TaylorUnsupportedError"]

aten = torch.ops.aten


class TaylorUnsupportedError(CovariantError):
    """The traced loss uses an operation that has no second-order Taylor rule here."""


# Operations linear in their first tensor argument (the others carry no derivative).
_LINEAR_FIRST = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "select", "slice", "split", "split_with_sizes", "unbind", "clone", "alias",
    "sum", "mean", "neg", "flatten", "_to_copy", "contiguous", "constant_pad_nd",
    "nll_loss_forward", "nll_loss2d_forward", "index_select", "gather", "narrow", "repeat",
    "unfold", "avg_pool1d", "avg_pool2d", "_adaptive_avg_pool2d", "view_copy",
    "permute_copy", "t_copy", "expand_copy", "transpose_copy", "squeeze_copy",
    "unsqueeze_copy", "_reshape_alias", "diagonal", "trace", "flip", "roll", "embedding",
    "index",
}
# Linear with a scalar factor or shift.
_SCALED = {"mul.Scalar", "div.Scalar"}
_SHIFTED = {"add.Scalar", "sub.Scalar"}
# Elementwise functions of one tensor: φ', φ'' are taken by autograd once per point.
_ELEMENTWISE = {
    "tanh", "relu", "sigmoid", "exp", "log", "softplus", "silu", "gelu", "leaky_relu",
    "elu", "sqrt", "rsqrt", "reciprocal", "log1p", "expm1", "sin", "cos", "pow.Tensor_Scalar",
    "square", "log_sigmoid_forward", "hardtanh", "erf", "abs",
}
# Rules that read the shape of the operation's own value (a meta tensor stands in for it)
# or the value itself (log-softmax: its probabilities; a norm: its value).
_READS_OWN_SHAPE = {"add", "sub", "rsub", "addmm", "convolution", "div"}
_READS_OWN_VALUE = {"_log_softmax", "_softmax", "logsumexp", "linalg_vector_norm",
                    "max_pool1d_with_indices", "max_pool2d_with_indices",
                    "max_pool3d_with_indices"}
# Outputs that never depend differentiably on their inputs.
_CONSTANT = {
    "zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones", "full", "arange",
    "scalar_tensor", "eq", "ne", "gt", "lt", "ge", "le", "sign", "argmax", "argmin", "detach",
    "lift_fresh_copy", "new_zeros", "new_ones", "new_full", "new_empty", "empty",
}


def _name(target: Any) -> tuple[str, str]:
    """(packet name, packet.overload name) of an aten operation."""
    packet = target.overloadpacket.__name__
    return packet, f"{packet}.{target._overloadname}"


class _Node:
    """One recorded aten operation: its arguments with recorded tensors replaced by nodes."""

    __slots__ = ("all_input_nodes", "args", "kwargs", "target", "users")

    def __init__(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.target, self.args, self.kwargs = target, args, kwargs
        found: dict[int, _Node] = {}
        _collect((args, kwargs), found)
        self.all_input_nodes = list(found.values())
        self.users = 0
        for n in self.all_input_nodes:
            n.users += 1


def _collect(obj: Any, found: dict[int, _Node]) -> None:
    if isinstance(obj, _Node):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, list | tuple):
        for o in obj:
            _collect(o, found)
    elif isinstance(obj, dict):
        for o in obj.values():
            _collect(o, found)


class _Recorder(TorchDispatchMode):
    """Records the aten operations of one forward evaluation, with their real outputs.

    Lighter than ``make_fx`` (no proxies, no fake tensors): the primal values of the Taylor
    expansion are the outputs computed while recording. Operations whose inputs are all
    unrecorded tensors (data, constants) are not recorded; their outputs are constants.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing here is compiled; without this, torch wraps __torch_dispatch__ in a
        # dynamo-disable that imports torch._dynamo (about 1 s) on first use.
        return False

    def __init__(self, p: Tensor) -> None:
        super().__init__()
        placeholder = _Node("placeholder", (), {})
        self.nodes: list[_Node] = [placeholder]
        self.primal: dict[Any, Any] = {placeholder: p}
        self.producer: dict[int, _Node] = {id(p): placeholder}

    def _wrap(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return self.producer.get(id(obj), obj)
        if isinstance(obj, list | tuple):
            return type(obj)(self._wrap(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._wrap(v) for k, v in obj.items()}
        return obj

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        node = _Node(func, self._wrap(tuple(args)), self._wrap(dict(kwargs)))
        mutated = args[0] if func._schema.is_mutable and args else None
        if isinstance(mutated, Tensor) and node.all_input_nodes:
            _make_out_of_place(node, mutated)
        out = func(*args, **kwargs)
        if not node.all_input_nodes:  # a constant: not recorded
            for n in node.all_input_nodes:
                n.users -= 1
            return out
        self.nodes.append(node)
        self.primal[node] = out
        if isinstance(out, Tensor):
            self.producer[id(out)] = node
        elif isinstance(out, list | tuple):
            for i, o in enumerate(out):
                if isinstance(o, Tensor):
                    item = _Node(operator.getitem, (node, i), {})
                    self.nodes.append(item)
                    self.primal[item] = o
                    self.producer[id(o)] = item
        return out


def _make_out_of_place(node: _Node, mutated: Tensor) -> None:
    """Record an in-place operation (``relu_``, the ``squeeze_`` inside ``matmul``) as its
    out-of-place form. Sound only if nothing else saw the mutated tensor: it is no view and
    its producer has no other user."""
    target = node.target
    packet = target.overloadpacket.__name__
    functional = getattr(aten, packet[:-1], None) if packet.endswith("_") else None
    overload = getattr(functional, target._overloadname, None) if functional else None
    first = node.args[0]
    if overload is None or not isinstance(first, _Node) or mutated._base is not None \
            or first.users != 1:
        raise TaylorUnsupportedError(
            f"QuadraticForm: in-place aten.{packet} on a tensor that other operations see")
    node.target = overload


def _acc(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    """total + term, in place on ``total`` when it is a fresh result of this rule (never a
    coefficient that other nodes hold) and the sum keeps its shape."""
    if total is None:
        return term
    if term is None:
        return total
    if torch.broadcast_shapes(total.shape, term.shape) == total.shape:
        return total.add_(term)
    return total + term


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class QuadraticForm:
    """v ↦ vᵀ ∇²L(p) v at a fixed point, by second-order Taylor mode (see module docstring).

    Parameters
    ----------
    loss : callable
        Flat point ↦ scalar loss. Recorded once at ``p``: control flow is fixed at that point
        (as for any trace), so build a new form for a new point.
    p : Tensor
        The point (1-D).

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
        recorder = _Recorder(self.p)
        with torch.no_grad(), recorder:
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
                rule = self._rule(node, depends)
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
            if name in _READS_OWN_VALUE:
                needed.add(node)
            elif name in _READS_OWN_SHAPE and node not in needed and node is not self._output:
                shape_only.add(node)
        self._primal = {n: v for n, v in primal.items() if n in needed or n is self._output}
        for n in shape_only:  # e.g. pre-activations: their rules need only the shape
            self._primal[n] = torch.empty(primal[n].shape, device="meta")
        self.value = self._primal[self._output].detach().reshape(())
        last_use: dict[Any, int] = {}
        for i, (node, _) in enumerate(self._steps):
            for a in node.all_input_nodes:
                last_use[a] = i
        self._free_after: list[list[Any]] = [[] for _ in self._steps]
        for n, i in last_use.items():
            if n is not self._output:
                self._free_after[i].append(n)

    @staticmethod
    def _map(obj: Any, env: dict[Any, Any]) -> Any:
        if isinstance(obj, _Node):
            return env[obj]
        if isinstance(obj, list | tuple):
            return type(obj)(QuadraticForm._map(o, env) for o in obj)
        if isinstance(obj, dict):
            return {k: QuadraticForm._map(v, env) for k, v in obj.items()}
        return obj

    def _rule(self, node: Any, depends: set[Any]) -> Callable[..., Any] | None:
        target = node.target
        if target is operator.getitem:
            return _getitem
        if not isinstance(target, torch._ops.OpOverload):
            raise TaylorUnsupportedError(f"QuadraticForm: no rule for {target!r}")
        packet, full = _name(target)
        args = node.args

        def carries(a: Any) -> bool:
            return a in depends

        def first_only() -> None:  # linear / elementwise in the first argument only
            if any(carries(a) for a in node.all_input_nodes if a is not args[0]):
                raise TaylorUnsupportedError(
                    f"QuadraticForm: {full} with a p-dependent argument besides the first")

        if packet in _CONSTANT:
            return None
        if packet in _LINEAR_FIRST or full in _SCALED:
            first_only()
            return _linear_first
        if full in _SHIFTED:
            return _shifted
        if packet in ("add", "sub", "rsub"):
            return _add_sub
        if packet in ("cat", "stack"):
            return _concat
        if packet in ("mm", "bmm", "mv", "dot", "matmul") or full == "mul.Tensor":
            return _bilinear
        if packet == "addmm":
            return _addmm
        if packet == "convolution":
            return _convolution
        if full == "div.Tensor":
            return _quotient if carries(args[1]) else _linear_first
        if packet == "linalg_vector_norm":
            order = args[1] if len(args) > 1 else node.kwargs.get("ord", 2)
            if order != 2:
                raise TaylorUnsupportedError(f"QuadraticForm: vector norm of order {order}")
            return _vector_norm
        if packet == "_log_softmax":
            return _log_softmax
        if packet == "_softmax":
            return _softmax
        if packet == "logsumexp":
            return _logsumexp
        if packet == "binary_cross_entropy_with_logits":
            if any(a is not None for a in node.args[2:4]) or any(
                    node.kwargs.get(k) is not None for k in ("weight", "pos_weight")):
                raise TaylorUnsupportedError(
                    "QuadraticForm: binary_cross_entropy_with_logits with weights")
            if carries(args[1]):
                raise TaylorUnsupportedError("QuadraticForm: a p-dependent BCE target")
            return _bce_with_logits
        if packet in ("native_batch_norm", "_native_batch_norm_legit_no_training"):
            if packet == "native_batch_norm" and args[5]:
                raise TaylorUnsupportedError(
                    "QuadraticForm: batch norm in training mode (batch statistics); use "
                    "model.eval() or Hessian-vector products")
            if any(carries(a) for a in args[3:5] if a is not None):
                raise TaylorUnsupportedError("QuadraticForm: p-dependent running statistics")
            return _batch_norm_eval
        if packet in ("max_pool1d_with_indices", "max_pool2d_with_indices",
                      "max_pool3d_with_indices"):
            return _max_pool
        if packet == "mse_loss":
            return _mse_loss
        if packet in _ELEMENTWISE or full in _ELEMENTWISE:
            first_only()
            return _elementwise_rule(node, self._primal)
        raise TaylorUnsupportedError(
            f"QuadraticForm: no second-order Taylor rule for aten.{full}; use Hessian-vector "
            "products instead")

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
        if c2 is None:
            return torch.zeros((), dtype=self.p.dtype, device=self.p.device)
        return 2.0 * c2.reshape(())


def _v(arg: Any, primal: dict[Any, Any]) -> Any:
    """The value at p of an argument: a recorded node's output, or the literal itself."""
    return primal[arg] if isinstance(arg, _Node) else arg


def _c(arg: Any, coef: dict[Any, tuple[Any, Any]], k: int) -> Any:
    """Coefficient k ∈ {1, 2} of an argument (None: zero)."""
    pair = coef.get(arg)
    return None if pair is None else pair[k - 1]


def _resolved(node: Any, primal: dict[Any, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return QuadraticForm._map(node.args, primal), QuadraticForm._map(node.kwargs, primal)


def _getitem(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    src, idx = node.args
    pair = coef.get(src)
    if pair is None:
        return (None, None)
    return tuple(None if c is None else c[idx] for c in pair)


def _linear_first(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    args, kwargs = _resolved(node, primal)
    src = node.args[0]
    out = []
    for k in (1, 2):
        c = _c(src, coef, k)
        out.append(None if c is None else node.target(c, *args[1:], **kwargs))
    return tuple(out)


def _shifted(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    return coef.get(node.args[0], (None, None))


def _add_sub(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    packet = node.target.overloadpacket.__name__
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    shape = primal[node].shape
    out = []
    for k in (1, 2):
        ca, cb = _c(a, coef, k), _c(b, coef, k)
        if packet == "rsub":  # b - alpha·a
            ca, cb = cb, ca
            term_a, term_b = ca, None if cb is None else -alpha * cb
        elif packet == "sub":
            term_a, term_b = ca, None if cb is None else -alpha * cb
        else:
            term_a, term_b = ca, None if cb is None else (cb if alpha == 1 else alpha * cb)
        s = _add(term_a, term_b)
        out.append(None if s is None else s.expand(shape) if s.shape != shape else s)
    return tuple(out)


def _concat(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    tensors = node.args[0]
    rest = QuadraticForm._map(node.args[1:], primal)
    out = []
    for k in (1, 2):
        cs = [_c(t, coef, k) for t in tensors]
        if all(c is None for c in cs):
            out.append(None)
            continue
        parts = [torch.zeros_like(_v(t, primal)) if c is None else c
                 for t, c in zip(tensors, cs, strict=True)]
        out.append(node.target(parts, *rest, **node.kwargs))
    return tuple(out)


def _product(op: Callable[[Any, Any], Tensor], a: Any, b: Any, primal: dict[Any, Any],
             coef: dict[Any, tuple[Any, Any]]) -> tuple[Tensor | None, Tensor | None]:
    """Product rule for a bilinear ``op(a, b)`` of two recorded arguments."""
    return _product_rule(op, _v(a, primal), _c(a, coef, 1), _c(a, coef, 2),
                         _v(b, primal), _c(b, coef, 1), _c(b, coef, 2))


def _product_rule(op: Callable[[Any, Any], Tensor], a0: Any, a1: Tensor | None,
                  a2: Tensor | None, b0: Any, b1: Tensor | None, b2: Tensor | None
                  ) -> tuple[Tensor | None, Tensor | None]:
    """(a·b)₁ = a₁b₀ + a₀b₁, (a·b)₂ = a₂b₀ + a₁b₁ + a₀b₂ for a bilinear ``op``."""
    # every term is a fresh tensor of the output's shape: accumulate in place
    c1 = _acc(None if a1 is None else op(a1, b0), None if b1 is None else op(a0, b1))
    c2 = None
    for x, y in ((a2, b0), (a1, b1), (a0, b2)):
        if x is not None and y is not None:
            c2 = _acc(c2, op(x, y))
    return c1, c2


def _bilinear(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    a, b = node.args[0], node.args[1]
    return _product(node.target, a, b, primal, coef)


def _addmm(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    bias, m1, m2 = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    c1, c2 = _product(torch.mm, m1, m2, primal, coef)
    if alpha != 1:
        c1 = None if c1 is None else c1.mul_(alpha)
        c2 = None if c2 is None else c2.mul_(alpha)
    shape = primal[node].shape
    out = []
    for k, c in ((1, c1), (2, c2)):
        cb = _c(bias, coef, k)
        s = _acc(c, None if cb is None else cb if beta == 1 else beta * cb)
        out.append(None if s is None else s.expand(shape) if s.shape != shape else s)
    return tuple(out)


def _convolution(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    x, w, bias = node.args[:3]
    rest = QuadraticForm._map(node.args[3:], primal)
    target = node.target

    def conv(a: Tensor, b: Tensor) -> Tensor:
        return target(a, b, None, *rest)

    c1, c2 = _product(conv, x, w, primal, coef)
    out = []
    for k, c in ((1, c1), (2, c2)):
        cb = _c(bias, coef, k)
        if cb is not None:
            view = (1, -1) + (1,) * (primal[node].ndim - 2)
            shape = primal[node].shape
            cb = cb.view(view)
            c = cb.expand(shape) if c is None else c.add_(cb)
        out.append(c)
    return tuple(out)


def _quotient(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # a / b = a · r with r = 1/b: r₁ = −b₁/b₀², r₂ = −b₂/b₀² + b₁²/b₀³; then the product rule
    a, b = node.args[0], node.args[1]
    a0, r0 = _v(a, primal), 1.0 / _v(b, primal)
    b1, b2 = _c(b, coef, 1), _c(b, coef, 2)
    r1 = None if b1 is None else -b1 * r0 * r0
    r2 = None if b2 is None else -b2 * r0 * r0
    if b1 is not None:
        r2 = _acc(r2, b1 * b1 * r0 * r0 * r0)
    q1, q2 = _product_rule(torch.mul, a0, _c(a, coef, 1), _c(a, coef, 2), r0, r1, r2)
    shape = primal[node].shape
    return tuple(None if q is None else q.expand(shape) if q.shape != shape else q
                 for q in (q1, q2))


def _vector_norm(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # n = √s with s = Σ x²: s₁ = 2Σ x₀x₁, s₂ = Σ (2 x₀x₂ + x₁²);
    # n₁ = s₁ / (2n₀), n₂ = s₂ / (2n₀) − s₁² / (8 n₀³)
    src = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    keepdim = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    x0, n0 = _v(src, primal), primal[node]
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)

    def total(t: Tensor) -> Tensor:
        return t.sum() if dim is None else t.sum(dim, keepdim=keepdim)

    s1 = None if x1 is None else 2 * total(x0 * x1)
    s2 = None if x2 is None else 2 * total(x0 * x2)
    if x1 is not None:
        s2 = _acc(s2, total(x1 * x1))
    n1 = None if s1 is None else s1 / (2 * n0)
    n2 = None if s2 is None else s2 / (2 * n0)
    if s1 is not None:
        n2 = _acc(n2, -(s1 * s1) / (8 * n0 * n0 * n0))
    return n1, n2


def _lse_coefficients(probs: Tensor, x1: Tensor | None, x2: Tensor | None, dim: Any
                      ) -> tuple[Tensor | None, Tensor | None]:
    """Coefficients 1 and 2 of logsumexp(x) over ``dim`` (kept): ⟨π, x₁⟩ and
    ⟨π, x₂⟩ + ½(⟨π, x₁²⟩ − ⟨π, x₁⟩²), with π = softmax(x₀)."""
    l1 = l2 = None
    if x1 is not None:
        l1 = (probs * x1).sum(dim, keepdim=True)
        l2 = (probs * x1 * x1).sum(dim, keepdim=True).sub_(l1 * l1).mul_(0.5)
    if x2 is not None:
        l2 = _acc(l2, (probs * x2).sum(dim, keepdim=True))
    return l1, l2


def _log_softmax(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # y = x − logsumexp(x): y_k = x_k − lse_k
    src, dim = node.args[0], node.args[1]
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
    l1, l2 = _lse_coefficients(primal[node].exp(), x1, x2, dim)
    y1 = None if x1 is None else x1 - l1
    y2 = None if l2 is None else (-l2).expand(primal[node].shape) if x2 is None else x2 - l2
    return y1, y2


def _softmax(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # s = exp(u), u = log_softmax(x): s₁ = s u₁, s₂ = s (u₂ + ½ u₁²)
    src, dim = node.args[0], node.args[1]
    s0 = primal[node]
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
    l1, l2 = _lse_coefficients(s0, x1, x2, dim)
    u1 = None if x1 is None else x1 - l1
    u2 = None if l2 is None else -l2 if x2 is None else x2 - l2
    s1 = None if u1 is None else s0 * u1
    s2 = None
    if u2 is not None:
        s2 = s0 * (u2 + 0.5 * u1 * u1) if u1 is not None else s0 * u2
    return s1, s2


def _logsumexp(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    src, dim = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = [dim] if isinstance(dim, int) else list(dim)
    x0 = _v(src, primal)
    y0 = primal[node] if keepdim else primal[node].reshape(
        [1 if i in [d % x0.ndim for d in dims] else n for i, n in enumerate(x0.shape)])
    l1, l2 = _lse_coefficients((x0 - y0).exp(), _c(src, coef, 1), _c(src, coef, 2), dims)
    shape = primal[node].shape
    return (None if l1 is None else l1.reshape(shape), None if l2 is None else l2.reshape(shape))


def _bce_with_logits(node: Any, primal: dict[Any, Any],
                     coef: dict[Any, tuple[Any, Any]]) -> Any:
    # ℓ(x) = softplus(x) − t x: ℓ' = σ(x) − t, ½ℓ'' = ½ σ(1 − σ)
    src, target = node.args[0], node.args[1]
    reduction = node.args[4] if len(node.args) > 4 else node.kwargs.get("reduction", 1)
    x0, t = _v(src, primal), _v(target, primal)
    sig = torch.sigmoid(x0)
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)

    def reduce(v: Tensor) -> Tensor:
        return v.mean() if reduction == 1 else v.sum() if reduction == 2 else v

    y1 = None if x1 is None else reduce((sig - t) * x1)
    y2 = None if x2 is None else (sig - t) * x2
    if x1 is not None:
        y2 = _acc(y2, 0.5 * sig * (1 - sig) * x1 * x1)
    return y1, None if y2 is None else reduce(y2)


def _batch_norm_eval(node: Any, primal: dict[Any, Any],
                     coef: dict[Any, tuple[Any, Any]]) -> Any:
    # y = x̂ w + b with x̂ = (x − μ) / √(σ² + ε) per channel (running statistics: affine in x)
    legit = node.target.overloadpacket.__name__ == "_native_batch_norm_legit_no_training"
    x, w, b, mean, var = node.args[:5]
    eps = node.args[6] if legit else node.args[7]
    x0 = _v(x, primal)
    view = (1, -1) + (1,) * (x0.ndim - 2)
    scale = (_v(var, primal) + eps).rsqrt().view(view)
    xhat0 = (x0 - _v(mean, primal).view(view)) * scale
    w0 = None if w is None else _v(w, primal).view(view)

    def chan(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.view(view)

    out = []
    x1 = _c(x, coef, 1)
    for k in (1, 2):
        xk = _c(x, coef, k)
        c = None if xk is None else xk * scale if w0 is None else xk * (scale * w0)
        if w is not None:
            wk = chan(_c(w, coef, k))
            if wk is not None:
                c = _acc(c, xhat0 * wk)
            w1 = chan(_c(w, coef, 1))
            if k == 2 and x1 is not None and w1 is not None:
                c = _acc(c, x1 * scale * w1)
        if b is not None:
            bk = chan(_c(b, coef, k))
            if bk is not None:
                c = bk.expand(x0.shape) if c is None else c + bk
        out.append(c)
    # (output, saved mean, saved inverse std): only the output carries coefficients
    return tuple(None if c is None else (c, None, None) for c in out)


def _max_pool(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # piecewise linear: each output coefficient is the input coefficient at the argmax
    # (indices count within each plane of the d spatial dimensions)
    src = node.args[0]
    d = int(node.target.overloadpacket.__name__[len("max_pool")])
    out0, idx = primal[node]
    flat_idx = idx.flatten(start_dim=idx.ndim - d)
    res = []
    for k in (1, 2):
        xk = _c(src, coef, k)
        if xk is None:
            res.append(None)
            continue
        picked = xk.flatten(start_dim=xk.ndim - d).gather(-1, flat_idx)
        res.append((picked.reshape(out0.shape), None))
    return tuple(res)


def _mse_loss(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # ℓ = reduce((a − b)²): ℓ₁ = reduce(2 d₀ d₁), ℓ₂ = reduce(2 d₀ d₂ + d₁²)
    a, b = node.args[0], node.args[1]
    reduction = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction", 1)
    d0 = _v(a, primal) - _v(b, primal)
    d1 = _add(_c(a, coef, 1), None if _c(b, coef, 1) is None else -_c(b, coef, 1))
    d2 = _add(_c(a, coef, 2), None if _c(b, coef, 2) is None else -_c(b, coef, 2))

    def reduce(t: Tensor) -> Tensor:
        t = t.expand(torch.broadcast_shapes(t.shape, d0.shape))
        return t.mean() if reduction == 1 else t.sum() if reduction == 2 else t

    y1 = None if d1 is None else reduce(2 * d0 * d1)
    y2 = None
    if d2 is not None:
        y2 = reduce(2 * d0 * d2)
    if d1 is not None:
        y2 = _add(y2, reduce(d1 * d1))
    return y1, y2


def _elementwise_rule(node: Any, primal: dict[Any, Any]) -> Callable[..., Any]:
    """φ'(x₀) and ½φ''(x₀) by autograd, once per point (tanh and relu in closed form, kept
    in less memory: tanh keeps only y and forms φ' = 1 − y² and ½φ'' = −y φ' per probe;
    relu keeps its mask as booleans)."""
    args, kwargs = _resolved(node, primal)
    name = node.target.overloadpacket.__name__
    src = node.args[0]
    if name == "relu":
        mask = args[0] > 0

        def relu_rule(node: Any, primal: dict[Any, Any],
                      coef: dict[Any, tuple[Any, Any]]) -> Any:
            x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
            return (None if x1 is None else x1 * mask, None if x2 is None else x2 * mask)

        return relu_rule
    if name == "tanh":
        y = primal[node]

        def tanh_rule(node: Any, primal: dict[Any, Any],
                      coef: dict[Any, tuple[Any, Any]]) -> Any:
            x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
            dy = torch.addcmul(torch.ones_like(y), y, y, value=-1)  # 1 − y², not kept
            y1 = None if x1 is None else dy * x1
            y2 = None if x2 is None else dy * x2
            if x1 is not None:  # ½φ'' x₁² = −y (1 − y²) x₁² = −(y x₁) y₁
                t = (y * x1).mul_(y1)
                y2 = t.neg_() if y2 is None else y2.sub_(t)
            return y1, y2

        return tanh_rule
    x0 = args[0].detach().requires_grad_(True)
    with torch.enable_grad():
        y = node.target(x0, *args[1:], **kwargs)
        (d1,) = torch.autograd.grad(y.sum(), x0, create_graph=True)
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), x0)
            half_d2: Tensor | None = 0.5 * d2.detach()
            if not bool(half_d2.any()):
                half_d2 = None
        else:
            half_d2 = None
    d1 = d1.detach()

    def rule(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
        x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
        y1 = None if x1 is None else d1 * x1
        y2 = None if x2 is None else d1 * x2
        if x1 is not None and half_d2 is not None:
            y2 = _acc(y2, (half_d2 * x1).mul_(x1))
        return y1, y2

    return rule
