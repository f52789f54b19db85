"""Properties of each unit's ``phi(x; u)`` in ``u``, computed rather than typed.

Theorem 1 and Theorem 3 of Part II allow an embedding or an invariant manifold according to
three properties of ``phi`` as a function of the unit's parameters ``u``:

* **has a zero**: some ``u_zero`` (we test ``u = 0``) with ``phi(x; u_zero) = 0`` for every ``x``;
* **degree-1 homogeneous**: ``phi(x; c u) = c phi(x; u)`` for every real ``c`` (*positively*
  homogeneous when it holds for ``c > 0`` only, as for ReLU);
* **linear in u**: ``phi(x; a u + b w) = a phi(x; u) + b phi(x; w)``.

Each is checked numerically here, on random inputs and random parameters, by the size of the
violation relative to the size of the terms (a property "holds" when the violation is at
round-off level, below ``tol``). The *leading order* ``p`` of ``phi`` near ``u = 0``
(``phi(x; t u) ~ t^p``) is measured from the slope of ``log |phi(x; t u)|`` in ``log t`` at small
``t``; it decides the type: I (linear), II (positively homogeneous, not linear), III (has a zero
and leading order >= 2), none (tanh: a zero but leading order 1 and not homogeneous).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .data import DTYPE
from .twolayer import UNITS, TwoLayer, get_unit

_N_INPUTS = 64


@dataclass(frozen=True)
class UnitProperties:
    name: str
    has_zero: bool
    homogeneous: bool            # degree 1 for all real scale factors
    positively_homogeneous: bool  # degree 1 for positive scale factors
    linear: bool
    leading_order: int
    violations: dict             # relative size of each property's violation (for the table)

    @property
    def unit_type(self) -> str:
        """The Part II type, one of "I", "II", "III" or "none"."""
        if self.linear:
            return "I"
        if self.positively_homogeneous:
            return "II"
        if self.has_zero and self.leading_order >= 2:
            return "III"
        return "none"

    @property
    def constructions(self) -> tuple[str, ...]:
        """The Theorem 1 constructions this phi allows (``proportional`` with ``gamma_u >= 0``
        only, when phi is only positively homogeneous)."""
        kinds = ["split"]
        if self.has_zero:
            kinds.append("zero")
        if self.positively_homogeneous:
            kinds.append("proportional")
        if self.linear:
            kinds.append("combination")
        return tuple(kinds)


def probe_model(name: str, input_dim: int = 4) -> TwoLayer:
    """A one-unit model of type `name` to probe phi with (kernel 3 for the convolutions)."""
    kernel = min(3, input_dim) if get_unit(name).form == "conv" else None
    return TwoLayer.build(name, input_dim, 1, kernel=kernel)


def phi(model: TwoLayer, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``phi(x; u)`` of `model`'s unit type for a batch of parameter vectors ``u`` (B, u_dim):
    (B, n, positions) (the model's width does not matter)."""
    model = dataclasses.replace(model, width=1)
    V = torch.zeros(u.shape[0], 1, *model.v_shape, dtype=u.dtype)
    theta = model.flatten(V, u.unsqueeze(1))
    a = model.activations(theta, x)                 # (B, n, 1) or (B, n, 1, positions)
    return a.reshape(u.shape[0], x.shape[0], -1)


def _relative(diff: torch.Tensor, *scales: torch.Tensor) -> float:
    return float(diff.abs().max() / max(float(sum(s.abs().max() for s in scales)), 1e-300))


def properties(name: str, input_dim: int = 4, seed: int = 0, tol: float = 1e-12) -> UnitProperties:
    """Measure the properties of unit `name` on random inputs and parameters from `seed`."""
    model = probe_model(name, input_dim)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(_N_INPUTS, model.input_dim * (2 if model.unit.form == "attention" else 1),
                    generator=g, dtype=DTYPE)
    u, w = torch.randn(2, 3, model.u_dim, generator=g, dtype=DTYPE)
    a, b = 1.7, -0.6
    pu, pw = phi(model, u, x), phi(model, w, x)
    zero = phi(model, torch.zeros(1, model.u_dim, dtype=DTYPE), x)
    viol = {"zero": float(zero.abs().max() / pu.abs().max())}
    for c, key in ((2.5, "positive"), (-1.3, "negative")):
        viol[key] = _relative(phi(model, c * u, x) - c * pu, c * pu)
    viol["linear"] = _relative(phi(model, a * u + b * w, x) - a * pu - b * pw, a * pu, b * pw)
    order = leading_order(model, u, x)
    return UnitProperties(name, viol["zero"] <= tol, viol["positive"] <= tol and viol["negative"] <= tol,
                          viol["positive"] <= tol, viol["linear"] <= tol, order, viol)


def leading_order(model: TwoLayer, u: torch.Tensor, x: torch.Tensor) -> int:
    """The power p in ``phi(x; t u) ~ t^p`` as t -> 0 (rounded slope between t = 1e-4 and 1e-5).

    Measured on the root-mean-square of phi over inputs and parameter draws, so a phi that is
    odd in u (a cubic) does not cancel itself.
    """
    t = torch.tensor([1e-4, 1e-5], dtype=DTYPE)
    size = torch.stack([phi(model, s * u, x).pow(2).mean().sqrt() for s in t])
    return int(round(float(torch.log(size[0] / size[1]) / torch.log(t[0] / t[1]))))


def table(names=None, input_dim: int = 4, seed: int = 0) -> list[dict]:
    """One row per unit: the measured properties, the type and the allowed constructions."""
    rows = []
    for name in names or UNITS:
        p = properties(name, input_dim, seed)
        rows.append({"unit": name, "has zero": p.has_zero, "homogeneous (deg 1)": p.homogeneous,
                     "positively homogeneous": p.positively_homogeneous, "linear in u": p.linear,
                     "leading order": p.leading_order, "type": p.unit_type,
                     "constructions": ", ".join(p.constructions)})
    return rows
