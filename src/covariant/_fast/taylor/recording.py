r"""Recording one evaluation of a loss: its aten operations and their values at p.

:class:`Recorder` is a ``TorchDispatchMode`` that sees every aten operation of one forward
evaluation. Each operation whose inputs depend on a recorded tensor becomes a :class:`Node`
whose arguments name the nodes that produced them; operations on data and constants alone are
not recorded (their outputs are constants of the expansion). The recorded outputs are the
zeroth Taylor coefficients x₀ of every intermediate.

Example
-------
>>> import torch
>>> p = torch.tensor([0.5, -1.0], dtype=torch.float64)
>>> recorder = Recorder(p)
>>> with torch.no_grad(), recorder:
...     out = (p.sin() * p).sum()
>>> [n.target.overloadpacket.__name__ for n in recorder.nodes[1:]]
['sin', 'mul', 'sum']
>>> bool(recorder.primal[recorder.producer[id(out)]] == out)
True
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ...errors import TaylorUnsupportedError

__all__ = ["Node", "Recorder", "substitute"]

aten = torch.ops.aten


class Node:
    """One recorded aten operation: its arguments with recorded tensors replaced by nodes."""

    __slots__ = ("all_input_nodes", "args", "kwargs", "target", "users")

    def __init__(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.target, self.args, self.kwargs = target, args, kwargs
        found: dict[int, Node] = {}
        _collect((args, kwargs), found)
        self.all_input_nodes = list(found.values())
        self.users = 0
        for n in self.all_input_nodes:
            n.users += 1


def _collect(obj: Any, found: dict[int, Node]) -> None:
    if isinstance(obj, Node):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, list | tuple):
        for o in obj:
            _collect(o, found)
    elif isinstance(obj, dict):
        for o in obj.values():
            _collect(o, found)


class Recorder(TorchDispatchMode):
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
        placeholder = Node("placeholder", (), {})
        self.nodes: list[Node] = [placeholder]
        self.primal: dict[Any, Any] = {placeholder: p}
        self.producer: dict[int, Node] = {id(p): placeholder}

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
        node = Node(func, self._wrap(tuple(args)), self._wrap(dict(kwargs)))
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
                    item = Node(operator.getitem, (node, i), {})
                    self.nodes.append(item)
                    self.primal[item] = o
                    self.producer[id(o)] = item
        return out


def _make_out_of_place(node: Node, mutated: Tensor) -> None:
    """Record an in-place operation (``relu_``, the ``squeeze_`` inside ``matmul``) as its
    out-of-place form. Sound only if nothing else saw the mutated tensor: it is no view and
    its producer has no other user."""
    target = node.target
    packet = target.overloadpacket.__name__
    functional = getattr(aten, packet[:-1], None) if packet.endswith("_") else None
    overload = getattr(functional, target._overloadname, None) if functional else None
    first = node.args[0]
    if overload is None or not isinstance(first, Node) or mutated._base is not None \
            or first.users != 1:
        raise TaylorUnsupportedError(
            f"QuadraticForm: in-place aten.{packet} on a tensor that other operations see")
    node.target = overload


def substitute(obj: Any, env: dict[Any, Any]) -> Any:
    """``obj`` with every node replaced by ``env[node]``, through lists, tuples and dicts."""
    if isinstance(obj, Node):
        return env[obj]
    if isinstance(obj, list | tuple):
        return type(obj)(substitute(o, env) for o in obj)
    if isinstance(obj, dict):
        return {k: substitute(v, env) for k, v in obj.items()}
    return obj
