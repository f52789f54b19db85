"""Simplicity counts of a two-layer network: how many units it effectively uses.

Every count is relative (a fraction of the largest value in the same network), so it does not
change when the weights are rescaled and it means the same at eps = 1e-2 and eps = 1e-12:

* :func:`rank` -- the rank of the end-to-end matrix of a linear unit type: ``W = sum_i v_i u_i^T``
  for linear FC, the kernel matrix ``sum_i vec(V_i) u_i^T`` for linear convolution. A singular
  value counts when it exceeds ``rel`` times the largest.
* :func:`active_units` -- units whose contribution ``phi(x; u_i) v_i`` to the output (root mean
  square over a set of inputs) exceeds ``rel`` times the largest unit's. It needs no knowledge of
  the unit's degree, so it serves quadratic, cubic and x tanh x units and attention heads alike.
* :func:`rays` -- for ReLU units: the active units grouped by direction, two units in one ray when
  the cosine of their ``u`` is above ``cos`` (0.99 by default).
* :func:`kinks` -- the kinks of a learned function of an angle: jumps of its derivative along a
  fine grid, larger than ``rel`` times the largest jump.

The defaults (``rel = 0.05``) sit between the two scales a saddle-to-saddle trajectory visits: the
learned units are O(1) and the unlearned ones are a power of eps, so any fraction well inside that
gap counts the same; a chapter states its choice and shows where the count steps relative to the loss.
"""
from __future__ import annotations

import torch

from .errors import ParameterError
from .twolayer import TwoLayer


def _check_rel(rel: float) -> None:
    if not 0.0 < rel < 1.0:
        raise ParameterError("rel", rel, "must be a number in (0, 1)")


def end_to_end(model: TwoLayer, theta: torch.Tensor) -> torch.Tensor:
    """The matrix a linear unit type computes: (B, output_dim, input_dim) for linear FC,
    (B, positions * output_dim, kernel) (the kernel matrix) for linear convolution."""
    if model.unit.name not in ("linear", "linear_conv"):
        raise ParameterError("unit", model.unit.name, "must be linear or linear_conv for an end-to-end matrix")
    V, U = model.unflatten(theta)
    V = V.reshape(*V.shape[:-len(model.v_shape)], model.v_dim)        # (B, H, positions * m)
    return V.transpose(-1, -2) @ U


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values, largest first, of a batch of matrices."""
    return torch.linalg.svdvals(M)


def count_above(values: torch.Tensor, rel: float) -> torch.Tensor:
    """How many of the non-negative `values` (last axis) exceed ``rel`` times their maximum: (B,)."""
    _check_rel(rel)
    top = values.max(-1, keepdim=True).values
    return ((values > rel * top) & (top > 0)).sum(-1)


def rank(model: TwoLayer, theta: torch.Tensor, rel: float = 0.05) -> torch.Tensor:
    """Relative rank of the end-to-end (or kernel) matrix of a linear unit type: (B,)."""
    return count_above(singular_values(end_to_end(model, theta)), rel)


def unit_sizes(model: TwoLayer, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square size of each unit's contribution over the inputs `x`: (B, H)."""
    out = model.unit_outputs(theta, x)                                   # (B, n, H, m)
    return (out * out).sum(-1).mean(-2).sqrt()


def active_units(model: TwoLayer, theta: torch.Tensor, x: torch.Tensor, rel: float = 0.05) -> torch.Tensor:
    """Units contributing more than ``rel`` times the largest unit: (B,)."""
    return count_above(unit_sizes(model, theta, x), rel)


def rays(model: TwoLayer, theta: torch.Tensor, x: torch.Tensor, rel: float = 0.05,
         cos: float = 0.99) -> torch.Tensor:
    """Active units grouped into rays of proportional units (cosine of ``u`` above `cos`): (B,).

    Two active units share a ray when a chain of pairs with cosine above `cos` joins them
    (connected components of the "proportional" graph).
    """
    if not -1.0 < cos < 1.0:
        raise ParameterError("cos", cos, "must be a number in (-1, 1)")
    _, U = model.unflatten(theta)
    active = unit_sizes(model, theta, x)
    _check_rel(rel)
    counts = []
    for b in range(U.shape[0]):
        keep = active[b] > rel * active[b].max()
        dirs = torch.nn.functional.normalize(U[b][keep], dim=-1)
        close = (dirs @ dirs.T) > cos
        counts.append(_components(close))
    return torch.tensor(counts)


def _components(adjacent: torch.Tensor) -> int:
    """Number of connected components of a symmetric boolean adjacency matrix."""
    n = adjacent.shape[0]
    seen = [False] * n
    count = 0
    for start in range(n):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            i = stack.pop()
            for j in torch.nonzero(adjacent[i]).flatten().tolist():
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
    return count


def circle_inputs(n_grid: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles ``phi`` on [0, 2 pi) and the points ``(cos phi, sin phi)`` of the unit circle."""
    phi = torch.arange(n_grid, dtype=dtype) * (2 * torch.pi / n_grid)
    return phi, torch.stack([phi.cos(), phi.sin()], dim=-1)


def kinks(f_on_grid: torch.Tensor, rel: float = 0.05) -> torch.Tensor:
    """Kinks of periodic functions sampled on a uniform angle grid: (B,) for (B, n_grid) samples.

    With grid step h the one-sided slopes ``f_{j+1} - f_j`` change by about ``h^2 f''`` where the
    function is smooth and by ``h`` times the derivative's jump across a kink. A kink is a run of
    adjacent grid points where the slope changes by more than ``rel`` times the largest slope
    ``max |f_{j+1} - f_j|``, i.e. where the derivative jumps by more than ``rel`` times its largest
    value (the grid must be fine enough that ``h |f''| << rel |f'|``).
    """
    _check_rel(rel)
    slope = torch.roll(f_on_grid, -1, dims=-1) - f_on_grid
    jump = (slope - torch.roll(slope, 1, dims=-1)).abs()
    top = slope.abs().max(-1, keepdim=True).values
    big = (jump > rel * top) & (top > 0)
    starts = big & ~torch.roll(big, 1, dims=-1)        # first point of each run (periodic)
    return starts.sum(-1)
