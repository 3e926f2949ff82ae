r"""Where the optimizer's flat vector sits inside a module: the chart E from p to the weights.

:class:`~covariant.optim.RiemannianGD` moves the flat vector p of its parameters, in
parameter-group order. The module computes with its *weights* w: for a tensor registered with
``torch.nn.utils.parametrize`` the parametrized tensor (a function of its ``original*``
tensors), otherwise the parameter itself. The map E: p ↦ w is a chart, assembled here from
covariant's charts and nothing else:

- the module's parametrizations as :func:`covariant.reparam.split_parametrizations` gives
  them, one block per parametrized tensor that holds one of the optimizer's parameters, in a
  :class:`~covariant.reparam.ParameterwiseReparametrization` of the weights ψ ↦ w;
- composed with the embedding p ↦ ψ (a :class:`~covariant.reparam.FromFunctions` chart) when
  the optimizer moves only some of the coordinates ψ or orders them differently; the other
  coordinates stay at their current values.

A metric G_w of the weights reaches p as ``metrics.Pullback(G_w, E)``, Eᵀ G_w E (docs/math.md §2),
and the weights' Euclidean metric as ``Pullback(Euclidean(), E)``: every product rule lives in
:mod:`covariant.metrics` and :mod:`covariant.reparam`. The embedding is used for products
only (the optimizer solves with conjugate gradients), never for ``Pullback.solve``; the
K-FAC metrics solve through E in closed form when it is the charts alone (:meth:`moves_all`).

Example
-------
>>> import torch
>>> from torch import nn
>>> from torch.nn.utils import parametrize
>>> class Double(nn.Module):
...     def forward(self, x): return 2 * x
...     def right_inverse(self, w): return w / 2
>>> model = nn.Linear(2, 1)
>>> _ = parametrize.register_parametrization(model, "weight", Double())
>>> view = _ModelView(model, list(model.parameters()))
>>> view.names
['bias', 'parametrizations.weight.original']
>>> E = view.chart(view.weight_module())
>>> p = torch.cat([t.detach().reshape(-1) for t in model.parameters()])
>>> bool(torch.allclose(E(p), torch.cat([model.bias, model.weight.reshape(-1)])))
True
>>> E.jvp(p, torch.ones(3))                                # J_E = diag(1, 2, 2)
tensor([1., 2., 2.])
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layout import ParameterLayout
from ..reparam import (
    Compose,
    FromFunctions,
    ParameterwiseReparametrization,
    Reparametrization,
    split_parametrizations,
)

__all__: list[str] = []

#: Batch norm layers (lazy ones become one of these when first called).
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: ``<module>.parametrizations.<tensor>.original<k>``: a tensor of a parametrize chart.
_ORIGINAL = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(original\d*)$")


class _ModelView:
    """The optimizer's parameters inside ``model``: their names, a module computing with the
    weights w directly, and the chart E: p ↦ w.

    Parameters
    ----------
    model : nn.Module
    params : list of Tensor
        The optimizer's parameters, in the order of its flat vector p; each must be a
        parameter of ``model`` that requires grad.
    """

    def __init__(self, model: nn.Module, params: list[Tensor]) -> None:
        self.model = model
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.names: list[str] = []
        for i, p in enumerate(params):
            name = name_of.get(id(p))
            if name is None:
                raise ValueError(
                    f"RiemannianGD: parameter {i} (shape {tuple(p.shape)}) is not a parameter "
                    "of `model`. Pass the parameters of the model the metric is built from, "
                    "e.g. RiemannianGD(model.parameters(), ..., model=model)."
                )
            if not p.requires_grad:
                raise ValueError(f"RiemannianGD: parameter {name!r} does not require grad")
            self.names.append(name)
        self.layout = ParameterLayout(
            tuple(self.names), tuple(torch.Size(p.shape) for p in params)
        )
        # parametrized tensors that hold at least one of the optimizer's parameters:
        # weight name "<module>.<tensor>" -> names of its original tensors
        self._blocks: dict[str, list[str]] = {}
        for name in self.names:
            m = _ORIGINAL.match(name)
            if m is not None:
                mod_name, tensor = m.group(1) or "", m.group(2)
                self._blocks.setdefault(_join(mod_name, tensor), _originals(model, mod_name,
                                                                             tensor))
        self._needs_twin = any(
            parametrize.is_parametrized(m) or isinstance(m, _BATCH_NORMS) for m in model.modules()
        )
        self._twin: nn.Module | None = None
        self._charts: dict[str, Reparametrization] = {}
        self._native: tuple[ParameterLayout, Reparametrization | None, ParameterLayout,
                            Tensor, bool] | None = None

    @property
    def has_chart(self) -> bool:
        """True when some of the optimizer's parameters are originals of a parametrize chart."""
        return bool(self._blocks)

    # ------------------------------------------------------------- a module on the weights
    def weight_module(self) -> nn.Module:
        """A module computing with w directly, for the curvature metrics, synced to the model.

        The model itself, unless it has ``parametrize`` charts or batch norm. Then a twin:
        without the charts (curvature products then never differentiate through a
        parametrization, some of which lack forward-mode AD), and with batch norm that does
        not update its running statistics (a ``torch.func`` transform may not mutate them; in
        training mode the curvature uses the batch statistics, as the loss does). The twin is
        synced to the model's current weights, buffers and train/eval modes.
        """
        if not self._needs_twin:
            return self.model
        if self._twin is None:
            self._twin, self._charts = _weight_twin(self.model)
        twin = self._twin
        live = dict(self.model.named_modules())
        for mod_name, module in twin.named_modules():
            if mod_name in live:
                module.training = live[mod_name].training
        with torch.no_grad():
            for name, t in twin.named_parameters():
                t.copy_(_weight(self.model, name))
                t.requires_grad_(_requires_grad(self.model, name))
            live_buffers = dict(self.model.named_buffers())
            for name, t in twin.named_buffers():
                if name in live_buffers:
                    t.copy_(live_buffers[name])
        return twin

    def moved_weights(self, module: nn.Module) -> Tensor:
        """Positions in the weights of ``module`` of those the optimizer moves: its plain
        parameters in its order, then its parametrized tensors in order of appearance."""
        slices = ParameterLayout.from_module(module).slices
        names = [n for n in self.names if _ORIGINAL.match(n) is None] + list(self._blocks)
        return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])

    def jacobi_preconditioner(
        self, p: Tensor, module: nn.Module, E: Reparametrization
    ) -> Callable[[Tensor], Tensor]:
        """Block-scalar Jacobi preconditioner from the reference metric J_Eᵀ J_E.

        Per parameter tensor b, s_b = ‖J_E z_b‖² / n_b with a fixed Rademacher probe z_b on
        that block: the mean diagonal of J_Eᵀ J_E there (exact when the chart scales the block
        uniformly, e.g. NTK or per-layer rescaling). Conjugate gradients preconditioned by
        M = diag(s) then runs the same iterations in every chart that rescales tensors, so
        even a truncated solve stays invariant, and the chart does not worsen conditioning.
        """
        moved = self.moved_weights(module).to(p.device)
        scales, start = [], 0
        gen = torch.Generator().manual_seed(0)
        for shape in self.layout.shapes:
            n = math.prod(shape)
            z = p.new_zeros(p.shape[0])
            probe = torch.randint(0, 2, (n,), generator=gen).to(p) * 2 - 1
            z[start : start + n] = probe
            with torch.enable_grad():
                jz = E.jvp(p, z).detach()[moved]  # J_E z_b on the weights p moves
            s = float(torch.dot(jz, jz)) / n
            scales.append(p.new_full((n,), s if s > 0 and math.isfinite(s) else 1.0))
            start += n
        inv = torch.cat(scales).reciprocal()
        return lambda r: inv * r

    # ------------------------------------------------------------- the chart p ↦ w
    def chart(self, module: nn.Module) -> Reparametrization | None:
        """E: p ↦ w onto the trainable weights of ``module`` (from :meth:`weight_module`);
        None when E is the identity."""
        w_layout = ParameterLayout.from_module(module)
        if self._native is None or self._native[0] != w_layout:
            self._native = self._build_native(w_layout)
        _, native, psi_layout, index, identity = self._native
        if identity:
            return native
        values = {n: t.detach() for n, t in module.named_parameters() if n in w_layout.names}
        for full, originals in self._blocks.items():
            mod_name, _, tensor = full.rpartition(".")
            plist = self.model.get_submodule(mod_name).parametrizations[tensor]
            for name, o in zip(_psi_names(full, originals), originals, strict=True):
                values[name] = getattr(plist, o).detach()
        psi0 = psi_layout.flatten(values)
        index = index.to(psi0.device)

        def embed(p: Tensor) -> Tensor:
            return psi0.index_copy(0, index, p)

        embedding = FromFunctions(embed, lambda psi: psi[index])
        return embedding if native is None else Compose(native, embedding)

    def moves_all(self, module: nn.Module) -> bool:
        """True when p is all of the coordinates ψ in their order, so that E: p ↦ w is the
        charts alone (invertible, or a submersion) and ``Pullback.solve`` applies; False when
        E embeds p into more coordinates (the optimizer moves only some of them)."""
        self.chart(module)
        assert self._native is not None
        return self._native[4]

    def _build_native(
        self, w_layout: ParameterLayout
    ) -> tuple[ParameterLayout, Reparametrization | None, ParameterLayout, Tensor, bool]:
        """The charts ψ ↦ w of the optimizer's parametrized tensors, the layout of ψ, and the
        positions of the optimizer's parameters in ψ."""
        missing = [full for full in self._blocks if full not in w_layout.names]
        if missing:  # pragma: no cover - defensive: the twin mirrors the model
            raise ValueError(f"RiemannianGD: weights {missing} not found in the module")
        charts = {full: self._charts[full] for full in self._blocks}
        native: Reparametrization | None = None
        psi_layout = w_layout
        if charts:
            with torch.random.fork_rng(devices=[]):  # binding a chart draws a random probe
                blocks = ParameterwiseReparametrization(w_layout, charts)
            native, psi_layout = blocks, blocks.new_layout
        slices = psi_layout.slices
        try:
            pieces = [slices[self._psi_name(n)] for n in self.names]
        except KeyError as err:  # pragma: no cover - defensive: the twin mirrors the model
            raise ValueError(f"RiemannianGD: parameter {err} not found in the module") from None
        index = torch.cat([torch.arange(s.start, s.stop) for s in pieces])
        identity = index.numel() == psi_layout.dim and bool(
            (index == torch.arange(psi_layout.dim)).all()
        )
        return w_layout, native, psi_layout, index, identity

    def _psi_name(self, name: str) -> str:
        """The name of the optimizer's parameter ``name`` among the coordinates ψ."""
        m = _ORIGINAL.match(name)
        if m is None:
            return name
        full = _join(m.group(1) or "", m.group(2))
        originals = self._blocks[full]
        return _psi_names(full, originals)[originals.index(m.group(3))]


def _join(mod_name: str, tensor: str) -> str:
    return f"{mod_name}.{tensor}" if mod_name else tensor


def _originals(model: nn.Module, mod_name: str, tensor: str) -> list[str]:
    """Names of the original tensors of a parametrized tensor, in the order of its chart."""
    plist = model.get_submodule(mod_name).parametrizations[tensor]
    return ["original"] if plist.is_tensor else [f"original{i}" for i in range(plist.ntensors)]


def _psi_names(full: str, originals: list[str]) -> list[str]:
    """The coordinates that replace weight ``full`` in ``split_parametrizations``' charts."""
    if len(originals) == 1:
        return [full]
    return [f"{full}.original{i}" for i in range(len(originals))]


def _weight_twin(model: nn.Module) -> tuple[nn.Module, dict[str, Reparametrization]]:
    """A copy of ``model`` without parametrize charts (and the charts, by weight name), whose
    batch norm layers do not track running statistics."""
    with torch.random.fork_rng(devices=[]):  # charts draw a random probe when they are built
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            twin, charts, _ = split_parametrizations(model)
        else:
            twin, charts = copy.deepcopy(model), {}
    for module in twin.modules():
        if isinstance(module, _BATCH_NORMS):
            module.track_running_stats = False
    return twin, charts


def _weight(model: nn.Module, name: str) -> Tensor:
    """The weight ``name`` of ``model`` as its forward pass sees it (parametrized or not)."""
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name), attr).detach()


def _requires_grad(model: nn.Module, name: str) -> bool:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        return any(t.requires_grad for t in plist.parameters(recurse=False))
    return getattr(module, attr).requires_grad
