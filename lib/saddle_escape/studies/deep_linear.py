"""Deep linear networks: teacher modes, mode strengths, the Saxe mode ODE, conserved imbalances.

With whitened inputs (sample covariance exactly I) and targets ``y = T x`` the MSE loss of any
network whose end-to-end map is the matrix ``W = W_L ... W_1`` is exactly ``||W - T||_F^2 / 2``.
Writing ``T = sum_k s_k u_k v_k^T``, the *mode strength* ``u_k^T W v_k`` obeys, for a balanced,
aligned depth-L network, Saxe et al.'s mode ODE (time in units of the learning rate)

    du/dt = L u^(2 - 2/L) (s - u),          L = 2:  du/dt = 2 u (s - u),

whose depth-2 solution is the logistic ``u(t) = s e^{2st} / (e^{2st} - 1 + s/u0)``.

For a *random* small depth-2 initialisation the mode is not balanced: with ``p = W_1 v_k`` and
``q = W_2^T u_k`` the early (linear) phase is ``dp/dt = s q``, ``dq/dt = s p``, so
``u = q.p = ||A||^2 e^{2st} - ||B||^2 e^{-2st}`` with ``A = (p0 + q0)/2``, ``B = (p0 - q0)/2``.
The growing part is a balanced mode of strength :func:`effective_initial_strength` ``= ||A||^2``,
and that is the ``u0`` the logistic needs.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..sim.data import Dataset
from ..sim.integrate import ConstantStep, Euler, Event, GradientFlow, PIController, SaveAt, solve
from ..sim.networks import MLP, population_loss


def teacher_modes(T: torch.Tensor, k: int | None = None):
    """Left vectors U (m, k), singular values s (k,), right vectors V (d, k) of the teacher,
    largest first (signs fixed so that ``u_k^T T v_k = s_k > 0``)."""
    U, s, Vh = torch.linalg.svd(T, full_matrices=False)
    k = int((s > 1e-12 * s.max()).sum()) if k is None else k
    return U[:, :k], s[:k], Vh[:k].T


def end_to_end(net: MLP, theta: torch.Tensor) -> torch.Tensor:
    """The product ``W_L ... W_1`` (B, m, d); the network's map when the activation is linear."""
    Ws = net.unflatten(theta)
    W = Ws[0]
    for Wl in Ws[1:]:
        W = Wl @ W
    return W


def mode_strengths(net: MLP, theta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``u_k^T W_L ... W_1 v_k`` for every teacher mode, shape (B, K)."""
    W = end_to_end(net, theta)
    return torch.einsum("mk,bmd,dk->bk", U, W, V)


def matrix_imbalances(net: MLP, theta: torch.Tensor) -> list[torch.Tensor]:
    """``M_l = W_{l+1}^T W_{l+1} - W_l W_l^T`` (B, N_l, N_l) for l = 1..L-1; ``tr M_l = Delta_l``."""
    Ws = net.unflatten(theta)
    return [Ws[l + 1].transpose(-1, -2) @ Ws[l + 1] - Ws[l] @ Ws[l].transpose(-1, -2)
            for l in range(net.depth - 1)]


def effective_initial_strength(net: MLP, theta0: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                               orthogonalise: bool = True) -> torch.Tensor:
    """Initial strength (B, K) of the growing, balanced part of each mode of a depth-2 network.

    The growing hidden vector of mode k is ``A_k = (W_1 v_k + W_2^T u_k) / 2`` (module docstring);
    without `orthogonalise` the strength is ``||A_k||^2``. Once an earlier (stronger) mode j has
    been learned, the flow drives the off-diagonal ``u_j^T W v_k`` to zero: the part of ``A_k``
    along mode j's hidden direction stops growing (it grows at rate ``s_k - s_j < 0``). With
    `orthogonalise` the strength is that of the part of ``A_k`` orthogonal to ``A_1..A_{k-1}``
    (Gram--Schmidt in the order of the modes, largest singular value first)."""
    if net.depth != 2:
        raise ValueError("the effective initial strength is defined for depth-2 networks")
    W1, W2 = net.unflatten(theta0)
    A = (torch.einsum("bnd,dk->bnk", W1, V) + torch.einsum("bmn,mk->bnk", W2, U)) / 2
    if not orthogonalise:
        return (A ** 2).sum(-2)
    out = []
    for k in range(A.shape[-1]):
        a = A[..., k]
        if k:
            Q, _ = torch.linalg.qr(A[..., :k])
            a = a - (Q @ (Q.transpose(-1, -2) @ a[..., None]))[..., 0]
        out.append((a ** 2).sum(-1))
    return torch.stack(out, -1)


def balanced_initial_strength(net: MLP, theta0: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A depth-L estimate (B, K) of a mode's initial strength as a balanced chain:
    ``a^L`` with ``a^2`` the mean over layers of each layer's squared per-direction scale
    (``||W_1 v_k||^2``, ``||W_L^T u_k||^2`` and ``||W_l||_F^2 / N`` in between).

    Exact for a balanced, aligned chain; for random weights only the order of magnitude is right
    (the early phase of a depth >= 3 chain mixes modes through the middle layers)."""
    Ws = net.unflatten(theta0)
    sq = [torch.einsum("bnd,dk->bkn", Ws[0], V).pow(2).sum(-1),
          torch.einsum("bmn,mk->bkn", Ws[-1], U).pow(2).sum(-1)]
    for W in Ws[1:-1]:
        sq.append((W.flatten(-2).pow(2).sum(-1) / W.shape[-1])[:, None].expand_as(sq[0]))
    a2 = torch.stack(sq).mean(0)
    return a2 ** (net.depth / 2)


def saxe_strength(t, s: float, u0: float) -> torch.Tensor:
    """Depth-2 closed form ``u(t) = s e^{2st} / (e^{2st} - 1 + s/u0)`` of ``du/dt = 2u(s - u)``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    e = torch.exp(2 * s * t)
    return s * e / (e - 1 + s / u0)


def saxe_time(s: float, u0: float, depth: int = 2, fraction: float = 0.5) -> float:
    """Time for a balanced mode ``du/dt = L u^(2-2/L)(s - u)`` to grow from ``u0`` to
    ``fraction * s``. Depth 2 in closed form, ``ln[(s - u0)/u0 * f/(1 - f)] / (2s)``; depth L > 2
    by quadrature in ``log u``."""
    if not 0 < u0 < fraction * s:
        raise ValueError(f"need 0 < u0 < fraction*s, got u0={u0}, s={s}")
    if depth == 2:
        return math.log((s - u0) / u0 * fraction / (1 - fraction)) / (2 * s)
    from scipy.integrate import quad

    L = depth
    # dt = du / (L u^(2-2/L) (s-u)); substitute u = e^x: dt = dx / (L e^{x(1-2/L)} (s - e^x))
    integrand = lambda x: 1.0 / (L * math.exp(x * (1 - 2 / L)) * (s - math.exp(x)))
    val, _ = quad(integrand, math.log(u0), math.log(fraction * s), limit=200, epsabs=0, epsrel=1e-12)
    return val


def leading_order_time(s: float, u0: float, depth: int = 2) -> float:
    """The small-init leading order: ``ln(s/u0) / (2s)`` for L = 2 and
    ``u0^-(1-2/L) / (s (L-2))`` for L > 2 (a power law in the init scale)."""
    if depth == 2:
        return math.log(s / u0) / (2 * s)
    return u0 ** (-(1 - 2 / depth)) / (s * (depth - 2))


def observables(net: MLP, U: torch.Tensor, V: torch.Tensor,
                loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``SaveAt`` function: ``[loss, mode strengths (K), Delta_l (L-1), M_l flattened ...]``.

    Mode strengths are those of the product ``W_L ... W_1`` (the end-to-end map of the linear
    network; for a nonlinear net only a diagnostic)."""

    def fn(theta):
        parts = [loss_fn(theta)[:, None], mode_strengths(net, theta, U, V)]
        Ms = matrix_imbalances(net, theta)
        parts.append(torch.stack([M.diagonal(dim1=-2, dim2=-1).sum(-1) for M in Ms], -1))
        parts += [M.flatten(-2) for M in Ms]
        return torch.cat(parts, -1)

    return fn


def split_observables(ys: torch.Tensor, net: MLP, n_modes: int) -> dict:
    """Undo :func:`observables`: loss (B, T), strengths (B, T, K), Delta (B, T, L-1),
    matrices: list of (B, T, N_l, N_l)."""
    K, L = n_modes, net.depth
    out = {"loss": ys[..., 0], "strengths": ys[..., 1:1 + K], "delta": ys[..., 1 + K:K + L]}
    i = K + L
    mats = []
    for l in range(L - 1):
        n = net.widths[l + 1]
        mats.append(ys[..., i:i + n * n].reshape(*ys.shape[:-1], n, n))
        i += n * n
    out["matrices"] = mats
    return out


def simulate(net: MLP, data: Dataset, theta0: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
             s: torch.Tensor, t_max: float, n_save: int = 300, rtol: float = 1e-10,
             atol: float = 1e-14, step_size: float | None = None) -> dict:
    """Gradient flow of the MSE loss from ``theta0`` (1, P) on a linear grid of ``n_save`` times.

    With ``step_size`` the flow is replaced by gradient descent with that learning rate (Euler
    with a constant step): the way to follow a ReLU network on a finite data set, whose flow can
    slide along a kink (some sample's pre-activation held at 0), where an error-controlled
    explicit integrator chatters with ever smaller steps.

    Returns numpy arrays: ``t``, ``loss``, ``strengths`` (T, K), ``delta`` (T, L-1), ``matrices``
    (list of (T, N, N)), ``theta_sq`` (T,) = ``||theta||^2``; the located times ``plateau_times``
    (K,) at which each mode strength first reaches ``s_k / 2`` (inf if never), and the step count.
    """
    loss_fn = population_loss(net, data)
    term = GradientFlow(loss_fn)
    K = U.shape[1]
    base = observables(net, U, V, loss_fn)
    fn = lambda th: torch.cat([base(th), th.pow(2).sum(-1, keepdim=True)], -1)
    events = [Event((lambda k: lambda t, y, runs: mode_strengths(net, y, U, V)[:, k] - s[k] / 2)(k),
                    direction=1, terminal=False, name=f"mode{k + 1}") for k in range(K)]
    ts = torch.linspace(0.0, float(t_max), int(n_save), dtype=theta0.dtype)
    if step_size is None:
        solver, controller = None, PIController(rtol=rtol, atol=atol)
    else:
        solver, controller = Euler(), ConstantStep(step_size)
    sol = solve(term, theta0, float(t_max), solver=solver, controller=controller,
                events=events, saveat=SaveAt(ts, fn), max_steps=10_000_000)
    keep = sol.saved[0]
    ys = sol.ys[0, keep]
    parts = split_observables(ys[:, :-1], net, K)
    return {"t": ts[keep].numpy(), "loss": parts["loss"].numpy(), "strengths": parts["strengths"].numpy(),
            "delta": parts["delta"].numpy(), "matrices": [M.numpy() for M in parts["matrices"]],
            "theta_sq": ys[:, -1].numpy(), "plateau_times": sol.event_times[0].numpy(),
            "n_steps": int(sol.n_steps[0]), "n_params": net.n_params, "seconds": sol.seconds}


def conservation_bound(n_steps: int, n_params: int, rtol: float, atol: float, theta_sq_min: float) -> float:
    """Error budget of the integrator for a quadratic invariant, relative to ``max ||theta||^2``.

    Every accepted step has an estimated local error ``e`` with ``||e||_rms <= atol + rtol |theta|``
    componentwise, so ``||e||_2 <= sqrt(P) (atol + rtol ||theta||)``; a quadratic form such as
    ``Delta_l`` then moves by at most ``2 ||theta|| ||e||`` per step. Summed over the steps and
    divided by ``||theta||^2``: ``2 n_steps sqrt(P) (rtol + atol / ||theta||_min)``."""
    return 2 * n_steps * math.sqrt(n_params) * (rtol + atol / math.sqrt(theta_sq_min))


def imbalance_drift(result: dict, what: str = "delta") -> float:
    """Largest drift of the imbalances along a :func:`simulate` result, relative to ``max ||theta||^2``.

    ``what``: ``"delta"`` the traces ``Delta_l``; ``"matrix"`` every entry of ``M_l``;
    ``"diagonal"`` / ``"offdiagonal"`` the per-neuron balances on / the entries off the diagonal.
    Relative to the largest squared norm, so a drift that merely follows the weights' growth does
    not count, and the number compares with :func:`conservation_bound`."""
    scale = result["theta_sq"].max()
    if what == "delta":
        return float(abs(result["delta"] - result["delta"][0]).max() / scale)
    diffs = [M - M[0] for M in result["matrices"]]
    if what == "matrix":
        return float(max(abs(d).max() for d in diffs) / scale)
    if what == "diagonal":
        return float(max(abs(d.diagonal(axis1=-2, axis2=-1)).max() for d in diffs) / scale)
    if what == "offdiagonal":
        return float(max(abs(d - d.diagonal(axis1=-2, axis2=-1)[..., None] * np.eye(d.shape[-1])).max()
                         for d in diffs) / scale)
    raise ValueError(f"unknown drift {what!r}: delta, matrix, diagonal or offdiagonal")


def gd_drift_budget(result: dict, step_size: float) -> float:
    """The O(eta) budget of gradient descent for a quadratic invariant, relative to ``max ||theta||^2``.

    One GD step changes ``Delta_l`` by exactly ``eta^2 (||G_{l+1}||^2 - ||G_l||^2)``; summed with
    ``eta sum ||grad L||^2 ~ L(0) - L(T)`` that is at most about ``eta (L(0) - L(T))``; a factor 2
    allows for the O(eta) corrections."""
    return float(2 * step_size * (result["loss"][0] - result["loss"][-1]) / result["theta_sq"].max())
