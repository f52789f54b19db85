"""Inputs, teachers and the expectations over them.

A :class:`Dataset` is a weighted sample ``(x_i, y_i, w_i)`` whose weights sum to one, so
``sum_i w_i l(x_i)`` is the expectation the theory talks about. Gauss--Hermite datasets are
exact for the population loss whenever the input enters the network through one direction
(the symmetric manifold); fixed Monte-Carlo samples are used everywhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ParameterError

DTYPE = torch.float64


@dataclass
class Dataset:
    """Weighted samples: ``x`` (n, d), targets ``y`` (n, m), weights ``w`` (n,) summing to 1."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor

    def to(self, device=None, dtype=None) -> "Dataset":
        return Dataset(*(t.to(device=device, dtype=dtype) for t in (self.x, self.y, self.w)))

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def input_dim(self) -> int:
        return self.x.shape[1]

    @property
    def output_dim(self) -> int:
        return self.y.shape[1]


@dataclass(frozen=True)
class ScalarTeacher:
    """Single-index target ``f*(g) = linear g + even (g^2 - 1)/sqrt2 + cubic (g^3 - 3g)/sqrt6``.

    The coefficients are those of orthonormal Hermite polynomials, so ``E[f*(g)^2]`` is the sum
    of their squares. The even part is what lets a Class C activation's quadratic term show at
    leading order: with a purely odd teacher and symmetric inputs it cancels.
    """

    linear: float = 1.0
    even: float = 0.0
    cubic: float = 0.0

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        return (self.linear * g + self.even * (g * g - 1) / math.sqrt(2)
                + self.cubic * (g**3 - 3 * g) / math.sqrt(6))

    @property
    def energy(self) -> float:
        """``E[f*(g)^2]`` for standard normal g."""
        return self.linear**2 + self.even**2 + self.cubic**2


def gauss_hermite(n_nodes: int = 80, dtype=DTYPE, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights for ``E[f(g)]``, g ~ N(0, 1) (probabilists' Hermite, weights sum to 1)."""
    if n_nodes < 1:
        raise ParameterError("n_nodes", n_nodes, "must be an integer >= 1")
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    weights = weights / weights.sum()
    return (torch.as_tensor(nodes, dtype=dtype, device=device),
            torch.as_tensor(weights, dtype=dtype, device=device))


def direction(d: int, dtype=DTYPE, device=None) -> torch.Tensor:
    """The teacher direction w* used on the symmetric manifold: the first basis vector of R^d."""
    w = torch.zeros(d, dtype=dtype, device=device)
    w[0] = 1.0
    return w


def single_index_quadrature(teacher: ScalarTeacher, d: int = 1, n_nodes: int = 80,
                            dtype=DTYPE, device=None) -> Dataset:
    """Population data for a single-index teacher through Gauss--Hermite nodes along w*.

    Exact for the population loss and gradient of any network whose first layer has rows
    parallel to w* (the gradient's components orthogonal to w* vanish in expectation).
    """
    g, w = gauss_hermite(n_nodes, dtype, device)
    x = g[:, None] * direction(d, dtype, device)[None, :]
    return Dataset(x, teacher(g)[:, None], w)


def gaussian_samples(n: int, d: int, seed: int, covariance: torch.Tensor | None = None,
                     dtype=DTYPE, device=None) -> torch.Tensor:
    """``n`` fixed samples of N(0, I_d) (or N(0, covariance)), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    if covariance is not None:
        x = x @ torch.linalg.cholesky(covariance.to(dtype)).T
    return x.to(device)


def single_index_samples(teacher: ScalarTeacher, n: int, d: int, seed: int,
                         w_star: torch.Tensor | None = None, covariance=None,
                         dtype=DTYPE, device=None) -> Dataset:
    """Monte-Carlo data ``y = f*(w*.x)`` with ``w*`` normalised so that ``w*.x`` has unit variance."""
    x = gaussian_samples(n, d, seed, covariance, dtype)
    w_star = direction(d, dtype) if w_star is None else w_star.to(dtype)
    cov = torch.eye(d, dtype=dtype) if covariance is None else covariance.to(dtype)
    w_star = w_star / torch.sqrt(w_star @ cov @ w_star)
    y = teacher(x @ w_star)[:, None]
    return Dataset(x, y, torch.full((n,), 1.0 / n, dtype=dtype)).to(device)


def linear_teacher_matrix(singular_values, d: int, m: int, seed: int, dtype=DTYPE) -> torch.Tensor:
    """A teacher map ``T`` (m, d) with the given singular values and random orthonormal modes."""
    s = torch.as_tensor(list(singular_values), dtype=dtype)
    k = len(s)
    if k > min(d, m):
        raise ParameterError("singular_values", list(singular_values), f"needs at most min(input_dim, output_dim) = {min(d, m)} values")
    gen = torch.Generator().manual_seed(int(seed))
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=dtype))
    return U @ torch.diag(s) @ V.T


def linear_teacher_data(T: torch.Tensor, n: int, seed: int, whiten: bool = True) -> Dataset:
    """Samples ``y = T x``, x ~ N(0, I); with ``whiten`` the sample covariance is exactly I,
    so the empirical loss has the population's mode structure."""
    m, d = T.shape
    x = gaussian_samples(n, d, seed, dtype=T.dtype)
    if whiten:
        x = x - x.mean(0)
        cov = x.T @ x / n
        x = x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T
    return Dataset(x, x @ T.T, torch.full((n,), 1.0 / n, dtype=T.dtype))
