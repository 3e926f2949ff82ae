r"""Weight normalization w = g · v / ‖v‖ as a chart (a submersion, docs/math.md §5), and its
linearization: closed-form J, Jᵀ, J⁺, J⁺ᵀ, JᵀJ and J⁺J⁺ᵀ products at one point.

Example
-------
>>> import torch
>>> from covariant.reparam import WeightNorm
>>> h = WeightNorm((2, 3))
>>> psi = h.inverse(torch.arange(1.0, 7.0, dtype=torch.float64))
>>> psi[:2]                      # the gains: the norms of the rows
tensor([3.7417, 8.7750], dtype=torch.float64)
>>> J = h.jacobian(psi)
>>> bool(torch.allclose(J @ h.gauge_directions(psi), torch.zeros(6, 2, dtype=torch.float64)))
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._fast import is_plain as _is_plain
from ..errors import DomainError, ShapeMismatchError
from .base import _SIDES, Linearization, Reparametrization, _NamedProducts

__all__ = ["WeightNorm"]


class WeightNorm(Reparametrization):
    r"""Weight normalization w = g · v / ‖v‖ per slice along ``dim`` (a submersion).

    Follows ``torch.nn.utils.parametrizations.weight_norm``: with ``dim=0`` there is one g per
    output unit and ‖v‖ is taken over all other axes; with ``dim=None`` a single g and the
    norm of the whole tensor. ψ packs ``g`` (one value per slice) followed by ``v`` (the
    shape of w). Per slice, with v̂ = v/‖v‖ and c = g/‖v‖ (docs/math.md §5):

    - J = [v̂ | c (I − v̂v̂ᵀ)], rank n, kernel spanned by (0, v) (the gauge direction);
    - J⁺u = (v̂·u, (u − v̂(v̂·u)) / c) and J⁺ᵀ(δg, δv) = δg v̂ + (δv − v̂(v̂·δv)) / c,
      closed forms of Jᵀ(JJᵀ)⁻¹ since JJᵀ = v̂v̂ᵀ + c²(I − v̂v̂ᵀ).

    Parameters
    ----------
    shape : sequence of int, optional
        Shape of the weight w. Left out, it is filled in when the chart is applied to a
        parameter by name (``space.reparametrize({"0.weight": WeightNorm()})``).
    dim : int or None
        Axis that indexes the slices, as in PyTorch (default 0).

    Example
    -------
    >>> import torch
    >>> h = WeightNorm((2, 3))
    >>> w = torch.randn(6, dtype=torch.float64)
    >>> psi = h.inverse(w)           # g = ‖w_row‖, v = w
    >>> torch.allclose(h(psi), w)
    True
    >>> psi.shape                    # 2 gains + 6 directions
    torch.Size([8])
    """

    is_bijection = False

    def __init__(self, shape: Sequence[int] | None = None, dim: int | None = 0) -> None:
        self.shape = None if shape is None else torch.Size(tuple(shape))
        self.dim = dim
        if self.shape is not None:
            self._setup()

    def _setup(self) -> None:
        shape = self.shape
        assert shape is not None
        if len(shape) == 0:
            raise ShapeMismatchError("WeightNorm: cannot normalize a scalar parameter")
        if self.dim is None:
            self.axis = None
            self.num_slices = 1
        else:
            ndim = len(shape)
            if not -ndim <= self.dim < ndim:
                raise ShapeMismatchError(
                    f"WeightNorm: dim={self.dim} is out of range for a weight of shape "
                    f"{tuple(shape)}"
                )
            self.axis = self.dim % ndim
            self.num_slices = shape[self.axis]
        self.n = math.prod(shape)

    def bind(self, shape: torch.Size | Sequence[int]) -> WeightNorm:
        shape = torch.Size(tuple(shape))
        if self.shape is not None and self.shape != shape:
            raise ShapeMismatchError(
                f"WeightNorm: built for shape {tuple(self.shape)}, applied to a parameter of "
                f"shape {tuple(shape)}"
            )
        return WeightNorm(shape, self.dim)

    def _need_shape(self) -> None:
        if self.shape is None:
            raise ShapeMismatchError(
                "WeightNorm: the weight shape is unknown; pass WeightNorm(shape) or apply it "
                "to a parameter by name"
            )

    def psi_dim(self, theta_dim: int) -> int:
        self._need_shape()
        if theta_dim != self.n:
            raise ShapeMismatchError(
                f"WeightNorm: built for {self.n} weights, the point has {theta_dim}"
            )
        return self.num_slices + self.n

    def psi_layout(self, name: str, shape: torch.Size) -> list[tuple[str, torch.Size]]:
        b = self.bind(shape)
        return [(f"{name}.g", torch.Size([b.num_slices])), (f"{name}.v", torch.Size(shape))]

    # rows: one per slice
    def rows(self, flat: Tensor) -> Tensor:
        """The flat weight as (num_slices, slice size) rows, one per normalized slice."""
        assert self.shape is not None
        x = flat.reshape(self.shape)
        if self.axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0).reshape(self.num_slices, -1)

    def unrows(self, rows: Tensor) -> Tensor:
        """The inverse of :meth:`rows`: rows back to the flat weight."""
        assert self.shape is not None
        if self.axis is None:
            return rows.reshape(-1)
        moved = list(self.shape)
        moved.insert(0, moved.pop(self.axis))
        return rows.reshape(moved).movedim(0, self.axis).reshape(-1)

    def _split(self, psi: Tensor) -> tuple[Tensor, Tensor]:
        return psi[: self.num_slices], self.rows(psi[self.num_slices :])

    def check_psi(self, psi: Tensor) -> None:
        self._need_shape()
        if psi.shape[0] != self.num_slices + self.n:
            raise ShapeMismatchError(
                f"WeightNorm: expected {self.num_slices} gains + {self.n} directions = "
                f"{self.num_slices + self.n} coordinates, got {psi.shape[0]}"
            )
        g, v = self._split(psi)
        if bool((v.norm(dim=1) == 0).any()):
            raise DomainError(
                "WeightNorm: a direction v has zero norm, where w = g·v/‖v‖ is undefined; "
                "initialize v from the weight (WeightNorm.inverse(w))"
            )
        if bool((g == 0).any()):
            raise DomainError(
                "WeightNorm: a gain g is zero; there J loses rank and the chart is not a "
                "submersion. Perturb g away from 0."
            )

    def check_theta(self, theta: Tensor) -> None:
        self._need_shape()
        if theta.shape[0] != self.n:
            raise ShapeMismatchError(
                f"WeightNorm.inverse: expected {self.n} weights, got {theta.shape[0]}"
            )
        if bool((self.rows(theta).norm(dim=1) == 0).any()):
            raise DomainError(
                "WeightNorm.inverse: a slice of w is zero, which gives g = 0 and v = 0, "
                "outside the chart's domain"
            )

    def forward(self, psi: Tensor) -> Tensor:
        g, v = self._split(psi)
        return self.unrows(g[:, None] * v / v.norm(dim=1, keepdim=True))

    def inverse_map(self, theta: Tensor) -> Tensor:
        rows = self.rows(theta)
        return torch.cat([rows.norm(dim=1), theta])

    def _parts(self, psi: Tensor) -> tuple[Tensor, Tensor]:
        g, v = self._split(psi)
        norm = v.norm(dim=1, keepdim=True)
        return v / norm, g[:, None] / norm  # v̂ (rows), c (column)

    # The closed forms live in _WeightNormLinearization; a one-off product builds it at ψ.
    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi).out_of_place("jvp", v)

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi).out_of_place("vjp", w)

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi).out_of_place("inverse_jvp", u)

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi).out_of_place("inverse_vjp", z)

    def _linearize(self, psi: Tensor) -> Linearization:
        return _WeightNormLinearization(self, psi)

    def linearize_into(self, psi: Tensor, theta_out: Tensor) -> Linearization:
        return _WeightNormLinearization(self, psi, theta_out)

    has_closed_form_jjt_logdet = True

    def jjt_logdet(self, psi: Tensor) -> Tensor:
        """log det(J Jᵀ) = Σ_slices 2 (n_slice − 1) log|c| (closed form, docs/math.md §5)."""
        _, c = self._parts(psi)
        per_slice = self.n // self.num_slices
        return 2 * (per_slice - 1) * c.abs().log().sum()

    def vertical_projection(self, psi: Tensor, x: Tensor) -> Tensor:
        """Per slice, (0, v̂ (v̂·δv)): the projection onto the gauge directions (0, v)."""
        vhat, _ = self._parts(psi)
        dv = self.rows(x[self.num_slices :])
        return torch.cat([torch.zeros_like(x[: self.num_slices]),
                          self.unrows(vhat * (vhat * dv).sum(1, keepdim=True))])

    def gauge_directions(self, psi: Tensor) -> Tensor:
        _, v = self._split(psi)
        k = psi.shape[0]
        out = psi.new_zeros(k, self.num_slices)
        for s in range(self.num_slices):
            row = torch.zeros_like(v)
            row[s] = v[s]
            out[self.num_slices :, s] = self.unrows(row)
        return out

    def __repr__(self) -> str:
        shape = None if self.shape is None else tuple(self.shape)
        return f"WeightNorm(shape={shape}, dim={self.dim})"


class _WeightNormLinearization(_NamedProducts):
    r"""Weight norm's products at one ψ, from v itself and per-slice scalars.

    With V the rows of v (a view of ψ when ``dim`` is 0 or None, so no copy is kept),
    s = 1/‖v‖ and c = g s per row, and a = V·x the row-wise dot products, every product is
    α x + V β with per-row α and β (v̂ = s V, so v̂ v̂ᵀ x = V s² a):

    - J (δg, δv) = c δv + V (s δg − c s² a);    Jᵀ w = (s a, c w − V c s² a);
    - J⁺ u = (s a, u / c − V s² a / c);    J⁺ᵀ (δg, δv) = δv / c + V (s δg − s² a / c);
    - JᵀJ (δg, δv) = (δg, c² δv − V c² s² a);    J⁺J⁺ᵀ (δg, δv) = (δg, δv / c² − V s² a / c²),

    the last two being the pulled-back Euclidean metric and its pseudo-inverse, fused. On
    plain contiguous tensors a product is one row-wise dot, one scaling and one ``addcmul_``
    written straight into its output (:meth:`into` writes into a slice of a larger vector);
    otherwise (autograd, ``torch.func``, ``dim`` other than 0) the same formulas run out of
    place.
    """

    def __init__(self, h: WeightNorm, psi: Tensor, theta_out: Tensor | None = None) -> None:
        assert h.shape is not None
        self.chart = h
        m = self._m = h.num_slices
        self._n = h.n
        self._shape = (m, h.n // m)
        self._in_place = _is_plain(psi) and h.axis in (None, 0)  # rows are views
        self._dtype, self._device = psi.dtype, psi.device
        V = self._V = h.rows(psi[m:])
        norm = V.norm(dim=1)
        s = 1.0 / norm
        c = psi[:m] / norm
        s2, c2 = s * s, c * c
        self._s = s
        # per product: α (a column), the coefficient of a in β, and whether the input and
        # the output have a g part (are ψ-side vectors)
        coef = {"jvp": (c, -c * s2), "inverse_jvp": (1.0 / c, -s2 / c),
                "gram": (c2, -c2 * s2), "pinv_gram": (1.0 / c2, -s2 / c2)}
        coef["vjp"], coef["inverse_vjp"] = coef["jvp"], coef["inverse_jvp"]
        self._spec = {p: (alpha[:, None], beta, src == "psi", dst == "psi")
                      for p, (alpha, beta) in coef.items() for src, dst in [_SIDES[p]]}
        self._c = c
        if theta_out is not None:  # else θ is formed on first use (one-off products skip it)
            if self._in_place:
                torch.mul(V, c[:, None], out=theta_out.view(self._shape))
            else:
                theta_out.copy_(h.unrows(c[:, None] * V))
            self.theta = theta_out

    @functools.cached_property
    def theta(self) -> Tensor:  # type: ignore[override]
        return self.chart.unrows(self._c[:, None] * self._V)  # g v̂ = c v

    def _product(self, product: str, x: Tensor) -> Tensor:
        if (self._in_place and _is_plain(x) and x.is_contiguous() and x.dtype == self._dtype
                and x.device == self._device):
            out = x.new_empty(self._n if _SIDES[product][1] == "theta" else self._m + self._n)
            self._into(product, x, out)
            return out
        return self.out_of_place(product, x)

    def out_of_place(self, product: str, x: Tensor) -> Tensor:
        """One product ("jvp", "vjp", "inverse_jvp", "inverse_vjp") into a new tensor."""
        alpha, coef, g_in, g_out = self._spec[product]
        m, h = self._m, self.chart
        xv = h.rows(x[m:] if g_in else x)
        a = (self._V * xv).sum(1)
        beta = torch.addcmul(x[:m] * self._s, coef, a) if g_in and not g_out else coef * a
        v_part = h.unrows(torch.addcmul(xv * alpha, self._V, beta.unsqueeze(1)))
        if not g_out:
            return v_part
        return torch.cat([x[:m] if g_in else self._s * a, v_part])

    def _into(self, product: str, x: Tensor, out: Tensor) -> None:
        alpha, coef, g_in, g_out = self._spec[product]
        m, shape, V = self._m, self._shape, self._V
        xv = (x[m:] if g_in else x).view(shape)
        o = (out[m:] if g_out else out).view(shape)
        a = torch.mul(V, xv, out=o).sum(1)  # the output doubles as scratch: no temporary
        if not g_out:  # J, J⁺ᵀ: (δg, δv) ↦ θ-side
            beta = torch.addcmul(x[:m] * self._s, coef, a)
        else:
            if g_in:  # JᵀJ, J⁺J⁺ᵀ keep δg
                out[:m].copy_(x[:m])
            else:  # Jᵀ, J⁺: g part s a
                torch.mul(self._s, a, out=out[:m])
            beta = coef * a
        torch.mul(xv, alpha, out=o)
        o.addcmul_(V, beta.unsqueeze(1))

    def into(self, product: str, x: Tensor, out: Tensor) -> None:
        """Write a product of the plain ``x`` into the plain ``out`` (same dtype, device)."""
        if self._in_place and x.is_contiguous():
            self._into(product, x, out)
        else:
            out.copy_(self.out_of_place(product, x))
