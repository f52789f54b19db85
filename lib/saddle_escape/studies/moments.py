"""The row-moment hierarchy of a two-layer network and a constructive test of its non-closure.

For ``y_hat = W_2 sigma(W_1 x)`` with N hidden units, unit i is the vector
``theta_i = (w_i, a_i)`` in R^(d+m): row i of W_1 next to column i of W_2 (row i of W_2^T).
The network, its loss and its gradient flow are invariant under permuting units, so the state
that matters is the empirical distribution of units, and its moments

    M_K = (1/N) sum_i theta_i^(tensor K),    K = 1, 2, ...

(with the W_1-row moments and W_2^T-row moments as the marginal blocks) form the row-moment
hierarchy. A closed ODE ``dM/dt = F(M_1..M_K)`` would force two configurations with the same
``M_1..M_K`` to have the same ``dM_1/dt..dM_K/dt``. :func:`closure_test` builds such pairs and
compares their time derivatives, computed exactly with ``torch.func.jvp`` along the gradient
flow velocity from autograd.

The pairs come from the Prouhet--Thue--Morse solution of the Prouhet--Tarry--Escott problem:
splitting {0, ..., 2^(K+1) - 1} by the parity of the binary digit sum gives two sets of 2^K
integers with equal power sums of every degree 0..K (and different ones at degree K+1). Units
placed at ``theta_0 + alpha (n + shift) e`` for n in each set therefore have identical moments up
to order K -- exactly, since every moment is a polynomial of degree <= K in n.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..sim.data import DTYPE, Dataset
from ..sim.imbalance import loss_gradient
from ..sim.networks import MLP
from ..sim.errors import ParameterError


def thue_morse_split(K: int) -> tuple[np.ndarray, np.ndarray]:
    """Two integer sets of size 2^K with equal power sums of degrees 0..K."""
    if K < 0:
        raise ParameterError("K", K, "must be an integer >= 0")
    n = np.arange(2 ** (K + 1))
    parity = np.array([bin(int(v)).count("1") % 2 for v in n])
    return n[parity == 0], n[parity == 1]


def units(net: MLP, theta: torch.Tensor) -> torch.Tensor:
    """Unit vectors (B, N, d+m): ``[W_1[i, :], W_2[:, i]]`` for each hidden unit i."""
    W = net.unflatten(theta)
    if len(W) != 2:
        raise ParameterError("depth", net.depth, "the row-moment test is for two-layer networks")
    return torch.cat([W[0], W[1].transpose(-1, -2)], dim=-1)


def from_units(net: MLP, u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`units`: parameters (B, P) from unit vectors (B, N, d+m)."""
    d = net.widths[0]
    return MLP.flatten([u[..., :d], u[..., d:].transpose(-1, -2)])


def row_moments(u: torch.Tensor, K: int) -> list[torch.Tensor]:
    """``[M_1, ..., M_K]`` of unit vectors ``u`` (N, D): ``M_j`` has shape (D,)*j."""
    out, power = [], None
    N = u.shape[0]
    for _ in range(K):
        power = u if power is None else torch.einsum("n...,nk->n...k", power, u)
        out.append(power.sum(0) / N)
    return out


def moment_velocity(net: MLP, data: Dataset, theta: torch.Tensor, K: int):
    """Moments ``[M_j]`` and their time derivatives ``[dM_j/dt]`` (j = 1..K) under gradient
    flow at ``theta`` (1, P): ``dtheta/dt = -grad L`` by autograd, pushed through the moment map
    by a forward-mode JVP (exact)."""
    grad = loss_gradient(net, data, "mse", theta)

    def moments(t):
        return tuple(row_moments(units(net, t)[0], K))

    M, dM = torch.func.jvp(moments, (theta.detach(),), (-grad,))
    return list(M), list(dM)


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t ** 2).sum()) for t in tensors))


def matched_pair(net: MLP, K: int, seed: int = 0, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two parameter vectors (1, P) of ``net`` whose unit distributions have identical moments
    of orders 1..K and different ones at order K+1.

    Units: the two Thue--Morse sets of order K, each repeated to fill ``2^Kmax`` slots where
    ``2^Kmax`` is the largest power of two not above the width (so every K uses the same width),
    placed on the line ``theta_0 + spread * ((n + 1/2) / 2^(K+1) - 1/2) * e`` (random point
    theta_0 and unit direction e); any remaining units are a random background shared by both."""
    N = net.widths[1]
    D = net.widths[0] + net.widths[-1]
    slots = 2 ** int(math.floor(math.log2(N)))
    if 2 ** K > slots:
        raise ParameterError("max_moment_order", K, f"needs width >= 2^K = {2 ** K} (width is {N})")
    gen = torch.Generator().manual_seed(int(seed))
    theta0 = 0.5 * torch.randn(D, generator=gen, dtype=DTYPE)
    e = torch.randn(D, generator=gen, dtype=DTYPE)
    e = e / e.norm()
    background = torch.randn(N - slots, D, generator=gen, dtype=DTYPE) * 0.7
    configs = []
    for part in thue_morse_split(K):
        s = torch.as_tensor(np.tile(part, slots // len(part)), dtype=DTYPE)
        s = spread * ((s + 0.5) / 2 ** (K + 1) - 0.5)
        line = theta0[None] + s[:, None] * e[None]
        configs.append(from_units(net, torch.cat([line, background])[None]))
    return configs[0], configs[1]


def closure_test(net: MLP, data: Dataset, K: int, seed: int = 0, spread: float = 1.0) -> dict:
    """Compare two configurations with equal moments up to order K.

    Returns ``moment_mismatch`` (max over orders j <= K of ||M_j - M'_j|| / ||M_j||),
    ``derivative_difference`` (max over j <= K of ||dM_j/dt - dM'_j/dt|| / max(||dM_j/dt||, ||dM'_j/dt||)),
    per-order derivative differences, and the order-(K+1) moment mismatch (nonzero)."""
    a, b = matched_pair(net, K, seed, spread)
    Ma, dMa = moment_velocity(net, data, a, K + 1)
    Mb, dMb = moment_velocity(net, data, b, K + 1)
    per_order = [_norm([x - y]) / max(_norm([x]), _norm([y])) for x, y in zip(dMa[:K], dMb[:K])]
    mism = [_norm([x - y]) / _norm([x]) for x, y in zip(Ma[:K], Mb[:K])]
    return {
        "K": K,
        "moment_mismatch": max(mism),
        "next_moment_mismatch": _norm([Ma[K] - Mb[K]]) / _norm([Ma[K]]),
        "derivative_difference": max(per_order),
        "per_order": per_order,
        "line_a": a, "line_b": b,
    }
