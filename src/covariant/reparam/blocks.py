"""Block-diagonal charts by parameter name: :class:`ParameterwiseReparametrization` applies
one chart per named parameter of a layout (names or glob patterns), and its linearization
fills one output vector slice by slice.

Example
-------
>>> import torch
>>> from covariant.layout import ParameterLayout
>>> from covariant.reparam import Exp, ParameterwiseReparametrization, WeightNorm
>>> layout = ParameterLayout.from_shapes({"0.weight": (2, 2), "0.bias": (2,)})
>>> h = ParameterwiseReparametrization(layout, {"*.weight": WeightNorm(), "0.bias": Exp()})
>>> h.new_layout.names
('0.weight.g', '0.weight.v', '0.bias')
>>> psi = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0], dtype=torch.float64)
>>> h(psi)
tensor([1., 0., 0., 2., 1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._fast import is_plain as _is_plain
from ..errors import DomainError, NotABijectionError, ShapeMismatchError
from ..layout import ParameterLayout, match_names
from .base import _SIDES, Linearization, Reparametrization, _NamedProducts

__all__ = ["ParameterwiseReparametrization"]


class ParameterwiseReparametrization(Reparametrization):
    """Block-diagonal chart: a reparametrization per named parameter of a layout.

    Built by ``space.reparametrize({"0.weight": WeightNorm(), "*.bias": Scale(2.0)})``; keys
    are parameter names or glob patterns, and each parameter takes the first pattern that
    matches it. Parameters that match nothing keep their coordinates. The new coordinates
    have their own layout (``new_layout``): weight norm turns ``name`` into ``name.g`` and
    ``name.v``.
    """

    def __init__(
        self, layout: ParameterLayout, mapping: Mapping[str, Reparametrization]
    ) -> None:
        for key, r in mapping.items():
            if not isinstance(r, Reparametrization):
                raise TypeError(
                    f"reparametrize: value for {key!r} must be a Reparametrization, "
                    f"got {type(r).__name__}"
                )
        matched = match_names(layout.names, mapping.keys())
        self.layout = layout
        self.blocks: dict[str, Reparametrization] = {}
        new_names: list[str] = []
        new_shapes: list[torch.Size] = []
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            if name in matched:
                r = mapping[matched[name]].bind(shape)
                self.blocks[name] = r
                for n, s in r.psi_layout(name, shape):
                    new_names.append(n)
                    new_shapes.append(s)
            else:
                new_names.append(name)
                new_shapes.append(shape)
        self.new_layout = ParameterLayout(tuple(new_names), tuple(new_shapes))
        self.is_bijection = all(r.is_bijection for r in self.blocks.values())
        self.is_affine = all(r.is_affine for r in self.blocks.values())
        # slices of each parameter in θ and in ψ
        self.theta_slices = layout.slices
        self.psi_slices: dict[str, slice] = {}
        start = 0
        for name, n in zip(layout.names, layout.numels, strict=True):
            k = self.blocks[name].psi_dim(n) if name in self.blocks else n
            self.psi_slices[name] = slice(start, start + k)
            start += k
        self.new_dim = start

    def psi_dim(self, theta_dim: int) -> int:
        return self.new_dim

    def check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != self.new_dim:
            raise ShapeMismatchError(
                f"reparametrized point must have {self.new_dim} coordinates, got {psi.shape[0]}"
            )
        for name, r in self.blocks.items():
            try:
                r.check_psi(psi[self.psi_slices[name]])
            except DomainError as err:
                raise DomainError(f"parameter {name!r}: {err}") from err

    def check_theta(self, theta: Tensor) -> None:
        if theta.shape[0] != self.layout.dim:
            raise ShapeMismatchError(
                f"point must have {self.layout.dim} coordinates, got {theta.shape[0]}"
            )
        for name, r in self.blocks.items():
            try:
                r.check_theta(theta[self.theta_slices[name]])
            except DomainError as err:
                raise DomainError(f"parameter {name!r}: {err}") from err

    def _map(self, x: Tensor, src: dict[str, slice], fn_name: str, *extra: Tensor) -> Tensor:
        parts = []
        for name in self.layout.names:
            piece = x[src[name]]
            r = self.blocks.get(name)
            if r is None:
                parts.append(piece)
            else:
                args = [e[self.psi_slices[name]] for e in extra]
                parts.append(getattr(r, fn_name)(*args, piece))
        return torch.cat(parts)

    def forward(self, psi: Tensor) -> Tensor:
        return self._map(psi, self.psi_slices, "forward")

    def inverse_map(self, theta: Tensor) -> Tensor:
        parts = []
        for name in self.layout.names:
            piece = theta[self.theta_slices[name]]
            r = self.blocks.get(name)
            try:
                parts.append(piece if r is None else r.inverse_map(piece))
            except NotABijectionError as err:
                raise NotABijectionError(f"parameter {name!r}: {err}") from err
        return torch.cat(parts)

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return self._map(v, self.psi_slices, "jvp", psi)

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        return self._map(w, self.theta_slices, "vjp", psi)

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        return self._map(u, self.theta_slices, "inverse_jvp", psi)

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        return self._map(z, self.psi_slices, "inverse_vjp", psi)

    def _linearize(self, psi: Tensor) -> Linearization:
        return _BlockLinearization(self, psi)

    def jacobian(self, psi: Tensor) -> Tensor:
        """Dense block-diagonal J, block by block (each block may use its own fallback)."""
        J = psi.new_zeros(self.layout.dim, self.new_dim)
        for name in self.layout.names:
            ts, ps = self.theta_slices[name], self.psi_slices[name]
            r = self.blocks.get(name)
            if r is None:
                J[ts, ps] = torch.eye(ts.stop - ts.start, dtype=psi.dtype, device=psi.device)
            else:
                J[ts, ps] = r.jacobian(psi[ps])
        return J

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        self._require_bijection("log_abs_det_jacobian")
        total = psi.new_zeros(())
        for name, r in self.blocks.items():
            total = total + r.log_abs_det_jacobian(psi[self.psi_slices[name]])
        return total

    has_closed_form_jjt_logdet = True

    def jjt_logdet(self, psi: Tensor) -> Tensor:
        """log det(J Jᵀ), block by block (bijective blocks give 2 log|det J|)."""
        total = psi.new_zeros(())
        for name, r in self.blocks.items():
            p = psi[self.psi_slices[name]]
            total = total + (
                2 * r.log_abs_det_jacobian(p) if r.is_bijection else r.jjt_logdet(p)
            )
        return total

    def vertical_projection(self, psi: Tensor, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        parts = []
        for name in self.layout.names:
            sl = self.psi_slices[name]
            r = self.blocks.get(name)
            if r is None or r.is_bijection:
                parts.append(torch.zeros_like(x[sl]))
            else:
                parts.append(r.vertical_projection(psi[sl], x[sl]))
        return torch.cat(parts) if parts else out

    def gauge_directions(self, psi: Tensor) -> Tensor:
        cols = []
        for name, r in self.blocks.items():
            sl = self.psi_slices[name]
            g = r.gauge_directions(psi[sl])
            if g.shape[1]:
                full = psi.new_zeros(psi.shape[0], g.shape[1])
                full[sl] = g
                cols.append(full)
        return torch.cat(cols, 1) if cols else psi.new_zeros(psi.shape[0], 0)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {r!r}" for n, r in self.blocks.items())
        return f"ParameterwiseReparametrization({{{inner}}})"


class _BlockLinearization(_NamedProducts):
    """Products of a :class:`ParameterwiseReparametrization` at one ψ, block by block.

    On plain tensors each product allocates its output once and fills it slice by slice:
    blocks without a chart are copied (runs of adjacent ones in one copy), charted blocks
    write into their slice through :meth:`Linearization.into`, and θ is one vector whose
    slices are the blocks' θ. Inside autograd or ``torch.func`` the blocks' products are
    concatenated instead. ``gram`` and ``pinv_gram`` exist when every charted block has them.
    """

    def __init__(self, h: ParameterwiseReparametrization, psi: Tensor) -> None:
        names = h.layout.names
        self._fast = _is_plain(psi)
        self._dtype, self._device = psi.dtype, psi.device
        self._dims = {"psi": h.new_dim, "theta": h.layout.dim}
        if self._fast:
            theta = psi.new_empty(h.layout.dim)
            lins = {n: r.linearize_into(psi[h.psi_slices[n]], theta[h.theta_slices[n]])
                    for n, r in h.blocks.items()}
            for n in names:
                if n not in lins:
                    theta[h.theta_slices[n]].copy_(psi[h.psi_slices[n]])
        else:
            lins = {n: r.linearize(psi[h.psi_slices[n]]) for n, r in h.blocks.items()}
            theta = torch.cat([lins[n].theta if n in lins else psi[h.psi_slices[n]]
                               for n in names])
        slices = {"psi": h.psi_slices, "theta": h.theta_slices}
        # per product: [(input slice, output slice, block linearization or None)], with
        # adjacent blocks without a chart merged into one copy
        self._plan: dict[str, list[tuple[slice, slice, Linearization | None]]] = {}
        for product, (src, dst) in _SIDES.items():
            plan: list[tuple[slice, slice, Linearization | None]] = []
            for n in names:
                a, b, lin = slices[src][n], slices[dst][n], lins.get(n)
                if lin is None and plan and plan[-1][2] is None:
                    plan[-1] = (slice(plan[-1][0].start, a.stop),
                                slice(plan[-1][1].start, b.stop), None)
                else:
                    plan.append((a, b, lin))
            self._plan[product] = plan
        self.theta = theta
        for fused in ("gram", "pinv_gram"):
            if any(getattr(lin, fused) is None for lin in lins.values()):
                setattr(self, fused, None)

    def _product(self, product: str, x: Tensor) -> Tensor:
        plan = self._plan[product]
        if not (self._fast and _is_plain(x) and x.dtype == self._dtype
                and x.device == self._device):
            return torch.cat([x[a] if lin is None else getattr(lin, product)(x[a])
                              for a, _, lin in plan])
        out = x.new_empty(self._dims[_SIDES[product][1]])
        self.into(product, x, out)
        return out

    def into(self, product: str, x: Tensor, out: Tensor) -> None:
        for a, b, lin in self._plan[product]:
            if lin is None:
                out[b].copy_(x[a])
            else:
                lin.into(product, x[a], out[b])
