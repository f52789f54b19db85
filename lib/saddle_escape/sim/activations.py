"""Activation registry: torch functions, exact symbolic forms and the universality class.

Every activation carries a sympy expression. From it the registry derives, never types in,
the Euler defect ``phi_sigma(z) = z sigma'(z) - sigma(z)``, its Taylor coefficients at 0,
the leading order ``q``, ``beta1 = sigma'(0)``, ``h_sigma`` (the leading coefficient of
``phi_sigma``) and the class:

* **A** -- ``phi_sigma == 0`` (linear; ReLU, which is linear on each half-line);
* **B** -- first non-zero term of ``phi_sigma`` has odd order (tanh, sin, erf: q = 3);
* **C** -- first non-zero term has even order (GELU, Swish: q = 2);
* **D** -- constant offset ``phi_sigma(0) = -sigma(0) != 0`` (sigmoid, softplus).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import sympy as sp
import torch
import torch.nn.functional as F

from .errors import ParameterError

z = sp.Symbol("z", real=True)
_z_pos = sp.Symbol("z", positive=True)
_z_neg = sp.Symbol("z", negative=True)

SERIES_ORDER = 7  # enough to see q for every registered activation and the next term after it


@dataclass(frozen=True)
class Activation:
    """One activation function with its exact symbolic form.

    ``fn`` and ``dfn`` are the torch function and its derivative; ``expr`` is the sympy
    expression in the symbol ``z`` used for every exact quantity.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    dfn: Callable[[torch.Tensor], torch.Tensor]
    expr: sp.Expr
    label: str = ""
    params: dict = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """``phi_sigma(x) = x sigma'(x) - sigma(x)`` evaluated in torch."""
        return x * self.dfn(x) - self.fn(x)

    @cached_property
    def phi_expr(self) -> sp.Expr:
        """Exact ``phi_sigma(z)`` (piecewise for ReLU)."""
        return sp.simplify(z * sp.diff(self.expr, z) - self.expr)

    @cached_property
    def smooth(self) -> bool:
        """Whether sigma has one Taylor series at 0 (ReLU's two half-lines differ)."""
        right, left = _taylor_sides(self.expr)
        return right == left

    @cached_property
    def sigma_coefficients(self) -> tuple:
        """Exact Taylor coefficients ``a_k`` of sigma at 0 (from the right where sigma has a kink)."""
        return _taylor_sides(self.expr)[0]

    @cached_property
    def phi_coefficients(self) -> tuple:
        """Exact Taylor coefficients ``c_k`` of phi_sigma at 0 (``c_k = (k-1) a_k``)."""
        right, left = _taylor_sides(self.phi_expr)
        if right != left:
            raise ValueError(f"phi_sigma of {self.name} has different series on the two sides of 0")
        return right

    @cached_property
    def q(self) -> int | None:
        """Order of the first non-zero Taylor term of phi_sigma (0 for class D, None for A)."""
        for k, c in enumerate(self.phi_coefficients):
            if c != 0:
                return k
        return None

    @property
    def beta1(self) -> float:
        """sigma'(0), the linear coefficient of sigma."""
        return float(self.sigma_coefficients[1])

    @property
    def h_sigma(self) -> float:
        """Leading (first non-zero) Taylor coefficient of phi_sigma; 0 for class A."""
        return 0.0 if self.q is None else float(self.phi_coefficients[self.q])

    @property
    def sigma0(self) -> float:
        """sigma(0); non-zero exactly for class D."""
        return float(self.sigma_coefficients[0])

    @property
    def cls(self) -> str:
        """Universality class A, B, C or D, computed from the series of phi_sigma."""
        q = self.q
        if q is None:
            return "A"
        if q == 0:
            return "D"
        return "B" if q % 2 else "C"

    def phi_series_latex(self, order: int = 5) -> str:
        """LaTeX of the phi_sigma series up to ``z^order`` with an O-term."""
        terms = sum(c * z**k for k, c in enumerate(self.phi_coefficients[: order + 1]))
        if terms == 0:
            return "0"
        return sp.latex(terms + sp.O(z ** (order + 1)))


def _taylor_sides(expr: sp.Expr) -> tuple[tuple, tuple]:
    """Taylor coefficients at 0 from the right and from the left, so ReLU's kink is exact."""
    sides = []
    for sym in (_z_pos, _z_neg):
        e = sp.simplify(expr.subs(z, sym))
        s = sp.expand(sp.series(e, sym, 0, SERIES_ORDER).removeO())
        sides.append(tuple(sp.nsimplify(sp.simplify(s.coeff(sym, k))) for k in range(SERIES_ORDER)))
    return sides[0], sides[1]


def _erf_d(x):
    return 2.0 / math.sqrt(math.pi) * torch.exp(-x * x)


def _gelu_d(x):
    return 0.5 * (1.0 + torch.special.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _silu_d(x):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _sigmoid_d(x):
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _registry() -> dict[str, Callable[..., Activation]]:
    E = sp.exp
    return {
        "linear": lambda: Activation("linear", lambda x: x, torch.ones_like, z, "linear"),
        "relu": lambda: Activation("relu", torch.relu, lambda x: (x > 0).to(x.dtype),
                                   sp.Max(0, z), "ReLU"),
        "tanh": lambda: Activation("tanh", torch.tanh, lambda x: 1.0 - torch.tanh(x) ** 2,
                                   sp.tanh(z), "tanh"),
        "sin": lambda: Activation("sin", torch.sin, torch.cos, sp.sin(z), "sin"),
        "erf": lambda: Activation("erf", torch.special.erf, _erf_d, sp.erf(z), "erf"),
        "gelu": lambda: Activation("gelu", lambda x: F.gelu(x), _gelu_d,
                                   z / 2 * (1 + sp.erf(z / sp.sqrt(2))), "GELU"),
        "swish": lambda: Activation("swish", F.silu, _silu_d, z / (1 + E(-z)), "Swish/SiLU"),
        "sigmoid": lambda: Activation("sigmoid", torch.sigmoid, _sigmoid_d, 1 / (1 + E(-z)), "sigmoid"),
        "softplus": lambda: Activation("softplus", F.softplus, torch.sigmoid, sp.log(1 + E(z)), "softplus"),
        "quadratic": _quadratic,
    }


def _quadratic(a: float = 0.5) -> Activation:
    a_exact = sp.nsimplify(a)
    return Activation(f"quadratic", lambda x: x + a * x * x, lambda x: 1.0 + 2.0 * a * x,
                      z + a_exact * z**2, f"z + {a:g} z²", {"a": a})


_FACTORIES = _registry()
ALIASES = {"silu": "swish"}
NAMES = tuple(_FACTORIES)


def get(name: str | Activation, **kwargs) -> Activation:
    """Look up an activation by name (``"tanh"``, ``"gelu"``, ``"quadratic"`` with ``a=...``).

    Raises :class:`~saddle_escape.sim.errors.ParameterError` naming the allowed names.
    """
    if isinstance(name, Activation):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _FACTORIES:
        raise ParameterError("activation", name, f"must be one of {', '.join(NAMES)}")
    if kwargs and key != "quadratic":
        raise ParameterError("activation", name, f"takes no parameters (got {sorted(kwargs)})")
    return _cached(key, tuple(sorted(kwargs.items())))


_CACHE: dict = {}


def _cached(key, kw):
    if (key, kw) not in _CACHE:
        _CACHE[(key, kw)] = _FACTORIES[key](**dict(kw))
    return _CACHE[(key, kw)]


def by_class(cls: str) -> list[str]:
    """Names of the registered activations in class ``cls``."""
    return [n for n in NAMES if get(n).cls == cls]
