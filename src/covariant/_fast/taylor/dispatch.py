r"""Which second-order Taylor rule each aten operation takes.

Operations are grouped by the rule they share: linear in the first argument (views,
reductions, indexing), shifted or scaled by a scalar, bilinear (products), elementwise
functions, and the losses and normalizations with a rule of their own. Operations whose output
never depends differentiably on the input (comparisons, constructors) carry no coefficients.

Example
-------
>>> import torch
>>> _name(torch.ops.aten.mul.Tensor)
('mul', 'mul.Tensor')
>>> "tanh" in ELEMENTWISE and "view" in LINEAR_FIRST
True
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from ...errors import TaylorUnsupportedError
from . import nonlinear_rules as non
from . import norm_rules as norm
from . import rules as lin

__all__ = ["CONSTANT", "ELEMENTWISE", "LINEAR_FIRST", "READS_OWN_SHAPE", "READS_OWN_VALUE",
           "rule_for"]


# Operations linear in their first tensor argument (the others carry no derivative).
LINEAR_FIRST = {
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
SCALED = {"mul.Scalar", "div.Scalar"}
SHIFTED = {"add.Scalar", "sub.Scalar"}
# Elementwise functions of one tensor: φ', φ'' are taken by autograd once per point.
ELEMENTWISE = {
    "tanh", "relu", "sigmoid", "exp", "log", "softplus", "silu", "gelu", "leaky_relu",
    "elu", "sqrt", "rsqrt", "reciprocal", "log1p", "expm1", "sin", "cos", "pow.Tensor_Scalar",
    "square", "log_sigmoid_forward", "hardtanh", "erf", "abs",
}
# Rules that read the shape of the operation's own value (a meta tensor stands in for it)
# or the value itself (log-softmax: its probabilities; a norm: its value).
READS_OWN_SHAPE = {"add", "sub", "rsub", "addmm", "baddbmm", "convolution", "div", "where"}
READS_OWN_VALUE = {"_log_softmax", "_softmax", "_safe_softmax", "logsumexp",
                   "linalg_vector_norm",
                   "max_pool1d_with_indices", "max_pool2d_with_indices",
                   "max_pool3d_with_indices"}
# Outputs that never depend differentiably on their inputs.
CONSTANT = {
    "zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones", "full", "arange",
    "scalar_tensor", "eq", "ne", "gt", "lt", "ge", "le", "sign", "argmax", "argmin", "detach",
    "lift_fresh_copy", "new_zeros", "new_ones", "new_full", "new_empty", "empty",
}


def _name(target: Any) -> tuple[str, str]:
    """(packet name, packet.overload name) of an aten operation."""
    packet = target.overloadpacket.__name__
    return packet, f"{packet}.{target._overloadname}"


def rule_for(node: Any, depends: set[Any], primal: dict[Any, Any]) -> Callable[..., Any] | None:
    """The Taylor rule of one recorded operation whose inputs depend on p.

    None for an operation whose output is constant; raises :class:`TaylorUnsupportedError`
    for one without a rule. ``depends`` holds the nodes that depend on p, ``primal`` the
    recorded values (the elementwise rules take φ', φ'' from them once).
    """
    target = node.target
    if target is operator.getitem:
        return lin.getitem_rule
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

    if packet in CONSTANT:
        return None
    if packet in LINEAR_FIRST or full in SCALED:
        first_only()
        return lin.linear_first
    if full in SHIFTED:
        return lin.shifted
    if packet in ("add", "sub", "rsub"):
        return lin.add_sub
    if packet in ("cat", "stack"):
        return lin.concat
    if packet in ("mm", "bmm", "mv", "dot", "matmul") or full == "mul.Tensor":
        return lin.bilinear
    if packet in ("addmm", "baddbmm"):
        return lin.addmm
    if packet == "convolution":
        return lin.convolution
    if full == "div.Tensor":
        return lin.quotient if carries(args[1]) else lin.linear_first
    if packet == "linalg_vector_norm":
        order = args[1] if len(args) > 1 else node.kwargs.get("ord", 2)
        if order != 2:
            raise TaylorUnsupportedError(f"QuadraticForm: vector norm of order {order}")
        return lin.vector_norm
    rule = _loss_or_layer_rule(node, packet, carries) or _norm_or_mask_rule(
        node, packet, carries, primal)
    if rule is not None:
        return rule
    if packet in ELEMENTWISE or full in ELEMENTWISE:
        first_only()
        return non.elementwise_rule(node, primal)
    raise TaylorUnsupportedError(
        f"QuadraticForm: no second-order Taylor rule for aten.{full}; use Hessian-vector "
        "products instead")


def _norm_or_mask_rule(node: Any, packet: str, carries: Callable[[Any], bool],
                       primal: dict[Any, Any]) -> Callable[..., Any] | None:
    """The rules of layer, group and RMS norm and of masking (None for other operations)."""
    if packet == "native_layer_norm":
        return norm.layer_norm_rule(node, primal)
    if packet == "native_group_norm":
        return norm.group_norm_rule(node, primal)
    if packet == "_fused_rms_norm":
        return norm.rms_norm_rule(node, primal)
    if packet in ("masked_fill", "where"):
        fixed = node.args[1:] if packet == "masked_fill" else node.args[:1]
        if any(carries(a) for a in fixed):
            raise TaylorUnsupportedError(f"QuadraticForm: {packet} with a p-dependent mask")
        return lin.masked_fill if packet == "masked_fill" else lin.where
    return None


def _loss_or_layer_rule(node: Any, packet: str,
                        carries: Callable[[Any], bool]) -> Callable[..., Any] | None:
    """The rules of softmax-type operations, losses, batch norm and max pooling (None for
    other operations)."""
    if packet == "_log_softmax":
        return non.log_softmax
    if packet in ("_softmax", "_safe_softmax"):  # safe: rows of −∞ give 0 (attention masks)
        return non.softmax
    if packet == "logsumexp":
        return non.logsumexp
    if packet == "binary_cross_entropy_with_logits":
        if any(a is not None for a in node.args[2:4]) or any(
                node.kwargs.get(k) is not None for k in ("weight", "pos_weight")):
            raise TaylorUnsupportedError(
                "QuadraticForm: binary_cross_entropy_with_logits with weights")
        if carries(node.args[1]):
            raise TaylorUnsupportedError("QuadraticForm: a p-dependent BCE target")
        return non.bce_with_logits
    if packet in ("native_batch_norm", "_native_batch_norm_legit_no_training"):
        if packet == "native_batch_norm" and node.args[5]:
            raise TaylorUnsupportedError(
                "QuadraticForm: batch norm in training mode (batch statistics); use "
                "model.eval() or Hessian-vector products")
        if any(carries(a) for a in node.args[3:5] if a is not None):
            raise TaylorUnsupportedError("QuadraticForm: p-dependent running statistics")
        return lin.batch_norm_eval
    if packet in ("max_pool1d_with_indices", "max_pool2d_with_indices",
                  "max_pool3d_with_indices"):
        return lin.max_pool
    if packet == "mse_loss":
        return non.mse_loss
    return None
