"""Multi-mode teachers, the chain of saddles, and the block-aligned ansatz (chapter 07).

The teacher has ``n`` independent modes, one per input and output coordinate,

    y_k = c_k tanh(b x_k),   x ~ N(0, I_n),

so it is realised exactly by a two-layer tanh network ``y_hat = W_2 tanh(W_1 x)`` of width ``n``
with diagonal weights ``W_1 = b I``, ``W_2 = diag(c)``. The **block-aligned ansatz** is that
diagonal structure (hidden unit i serves mode i); the **stage-k saddle** has the first ``k``
modes learned exactly and the rest of the network at zero.

Population expectations use a tensor-product Gauss--Hermite grid, on which an expectation of a
product ``f(x_i) h(x_j)`` factorises exactly into one-dimensional rules -- so the one-dimensional
formulas of :func:`gain_terms` and the autograd Hessian of the full network see the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sim.data import DTYPE, Dataset, gauss_hermite
from ..sim.imbalance import loss_gradient
from ..sim.networks import MLP, population_loss
from ..sim.errors import ParameterError


@dataclass(frozen=True)
class ModeTeacher:
    """``y_k = c_k tanh(b x_k)`` for k = 1..n (``strengths`` = c, ``scale`` = b)."""

    strengths: tuple
    scale: float = 1.0

    @property
    def n_modes(self) -> int:
        return len(self.strengths)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(self.strengths, dtype=x.dtype)
        return c * torch.tanh(self.scale * x)

    def linear_coefficients(self, n_nodes: int = 200) -> np.ndarray:
        """``m_k = E[y_k x_k] = c_k b E[sech^2(b g)]``: the rate at which mode k is picked up
        from small initialisation (the singular value of the teacher's linear part)."""
        return np.asarray(self.strengths, dtype=float) * gain_terms(self.scale, n_nodes)["Etg"]

    def mode_energies(self, n_nodes: int = 200) -> np.ndarray:
        """``E[y_k^2]`` for each mode."""
        return np.asarray(self.strengths, dtype=float) ** 2 * gain_terms(self.scale, n_nodes)["Et2"]

    def plateau_losses(self, n_nodes: int = 200) -> np.ndarray:
        """MSE loss ``1/2 sum_{j>k} E[y_j^2]`` of the stage-k saddle, k = 0..n (modes learned in
        the order given)."""
        e = self.mode_energies(n_nodes)
        return np.array([0.5 * e[k:].sum() for k in range(len(e) + 1)])


def product_quadrature(d: int, n_nodes: int, dtype=DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss--Hermite nodes (n_nodes**d, d) and weights (summing to 1)."""
    if n_nodes ** d > 2_000_000:
        raise ParameterError("n_nodes", n_nodes, f"gives {n_nodes}**{d} quadrature points; use fewer nodes or modes")
    g, w = gauss_hermite(n_nodes, dtype)
    x = torch.cartesian_prod(*([g] * d)).reshape(-1, d)
    ww = torch.cartesian_prod(*([w] * d)).reshape(-1, d).prod(-1)
    return x, ww / ww.sum()


def mode_data(teacher: ModeTeacher, n_nodes: int) -> Dataset:
    """Population data for the multi-mode teacher on the product grid."""
    x, w = product_quadrature(teacher.n_modes, n_nodes)
    return Dataset(x, teacher(x), w)


def gain_terms(b: float, n_nodes: int = 200) -> dict:
    """One-dimensional Gaussian integrals of ``t = tanh(b g)``: ``E[t']`` (Et1), ``E[t'^2]``
    (Et1sq), ``E[t^2]`` (Et2), ``E[t g]`` (Etg; equals ``b E[t']`` by Stein's lemma for the exact
    integral, but not on a finite rule), with the same Gauss--Hermite rule as the product grid."""
    g, w = gauss_hermite(n_nodes)
    t = torch.tanh(b * g)
    dt = 1 - t * t
    return {"Et1": float(dt @ w), "Et1sq": float((dt * dt) @ w), "Et2": float((t * t) @ w),
            "Etg": float((t * g) @ w)}


def mixed_block(teacher: ModeTeacher, i: int, j: int, n_nodes: int = 200) -> np.ndarray:
    """The 2x2 Hessian of the loss in the mixed-loop directions ``(u, v) = (W_1[i,j], W_2[j,i])``
    at a saddle where unit i has learned mode i exactly and mode j is unlearned:

        H = [[c_i^2 E[t'^2], -m_j E[t']], [-m_j E[t'], E[t^2]]],   t = tanh(b g),

    with ``m_j = E[y_j x_j] = c_j E[t g]``.
    """
    T = gain_terms(teacher.scale, n_nodes)
    c_i = teacher.strengths[i]
    m_j = teacher.strengths[j] * T["Etg"]
    off = -m_j * T["Et1"]
    return np.array([[c_i**2 * T["Et1sq"], off], [off, T["Et2"]]])


def mixed_loop_gain(teacher: ModeTeacher, i: int, j: int, n_nodes: int = 200) -> float:
    """``G_ij = |H_uv| / sqrt(H_uu H_vv)``: the loop u -> v -> u through unit i and mode j
    relative to the restoring curvatures. The mixed block has a negative Hessian eigenvalue
    (a growing direction of the flow) iff ``G_ij > 1``."""
    H = mixed_block(teacher, i, j, n_nodes)
    return float(abs(H[0, 1]) / math.sqrt(H[0, 0] * H[1, 1]))


def predicted_growth_rate(teacher: ModeTeacher, i: int, j: int, n_nodes: int = 200) -> float:
    """Top eigenvalue of the flow Jacobian ``-H`` on the mixed block (positive iff G > 1)."""
    return float(-np.linalg.eigvalsh(mixed_block(teacher, i, j, n_nodes))[0])


def strength_for_gain(gain: float, c_learned: float, b: float, n_nodes: int = 200) -> float:
    """The unlearned-mode strength ``c_j`` that gives mixed loop gain ``gain`` against a learned
    mode of strength ``c_learned``: ``c_j = G c_i sqrt(E[t'^2] E[t^2]) / (E[t g] E[t'])``."""
    T = gain_terms(b, n_nodes)
    return gain * c_learned * math.sqrt(T["Et1sq"] * T["Et2"]) / (T["Etg"] * T["Et1"])


def block_network(n_modes: int, width: int | None = None) -> MLP:
    """The two-layer tanh network on the multi-mode teacher: d = output = n_modes, hidden
    ``width`` (default n_modes, the smallest block-aligned network)."""
    return MLP.build(n_modes, n_modes if width is None else width, 2, "tanh", output_dim=n_modes)


def stage_saddle(teacher: ModeTeacher, stage: int) -> torch.Tensor:
    """Parameters (1, P) of the stage-k saddle: units 1..k diagonal and exact, the rest zero."""
    n = teacher.n_modes
    if not 0 <= stage < n:
        raise ParameterError("stage", stage, f"must be an integer in 0..{n - 1}")
    W1 = torch.zeros(n, n, dtype=DTYPE)
    W2 = torch.zeros(n, n, dtype=DTYPE)
    for k in range(stage):
        W1[k, k] = teacher.scale
        W2[k, k] = teacher.strengths[k]
    return MLP.flatten([W1[None], W2[None]])


def flat_index(net: MLP, layer: int, row: int, col: int) -> int:
    """Index into the flat parameter vector of ``W_layer[row, col]`` (layer 1-based)."""
    offset = sum(net.sizes[: layer - 1])
    return offset + row * net.shapes[layer - 1][1] + col


def mixed_pairs(net: MLP, stage: int) -> list[tuple[int, int, list[int]]]:
    """``(i, j, [index of W_1[i,j], index of W_2[j,i]])`` for learned units i < stage and
    unlearned modes j >= stage: the mixed-loop (off-block) sector."""
    n = net.widths[0]
    return [(i, j, [flat_index(net, 1, i, j), flat_index(net, 2, j, i)])
            for i in range(stage) for j in range(stage, n)]


def reverse_pairs(net: MLP, stage: int) -> list[tuple[int, int, list[int]]]:
    """Idle unit j reading/writing learned mode i: ``W_1[j,i], W_2[i,j]`` (the other off-block
    sector; exactly flat at the saddle because the learned modes have zero residual)."""
    n = net.widths[0]
    return [(i, j, [flat_index(net, 1, j, i), flat_index(net, 2, i, j)])
            for i in range(stage) for j in range(stage, n)]


def mixed_indices(net: MLP, stage: int) -> list[int]:
    """Flat indices of every mixed-loop coordinate (the pairs of :func:`mixed_pairs`, in order)."""
    return [q for _, _, pair in mixed_pairs(net, stage) for q in pair]


def loss_hessian(net: MLP, data: Dataset, theta: torch.Tensor) -> torch.Tensor:
    """Hessian (P, P) of the population MSE at ``theta`` (1, P), by ``torch.func.hessian``."""
    loss = population_loss(net, data)
    return torch.func.hessian(lambda p: loss(p[None])[0])(theta[0].detach())


@dataclass
class SaddleSpectrum:
    """Flow-Jacobian (``-H``) eigenvalues at a stage-k saddle, sorted by sector."""

    mixed: np.ndarray        # top eigenvalue of each mixed-loop 2x2 block
    reverse: np.ndarray      # top eigenvalue of each idle-unit/learned-mode block
    all_eigs: np.ndarray     # every eigenvalue of -H
    leakage: float           # max |H| between a mixed block and the rest (0 by symmetry)
    gradient_norm: float     # ||grad L|| at the point (0 at a critical point)

    @property
    def top_mixed(self) -> float:
        return float(self.mixed.max())


def saddle_spectrum(teacher: ModeTeacher, stage: int, n_nodes: int,
                    theta: torch.Tensor | None = None) -> SaddleSpectrum:
    """Linearise the gradient flow at the stage-k saddle of the block network (autograd), or at
    ``theta`` (1, P) if given (the tests linearise at a point that is not the saddle)."""
    net = block_network(teacher.n_modes)
    data = mode_data(teacher, n_nodes)
    theta = stage_saddle(teacher, stage) if theta is None else theta
    H = loss_hessian(net, data, theta)
    grad = loss_gradient(net, data, "mse", theta)

    def tops(pairs):
        return np.array([float(-torch.linalg.eigvalsh(H[idx][:, idx])[0]) for _, _, idx in pairs])

    mixed = mixed_pairs(net, stage)
    leak = 0.0
    for _, _, idx in mixed:
        rest = [q for q in range(net.n_params) if q not in idx]
        leak = max(leak, float(H[idx][:, rest].abs().max()))
    return SaddleSpectrum(tops(mixed), tops(reverse_pairs(net, stage)),
                          -torch.linalg.eigvalsh(H).numpy()[::-1].copy(), leak, float(grad.norm()))


def teacher_at_gain(gain: float, n_modes: int, stage: int, scale: float = 1.0,
                    c_learned: float = 1.0, n_nodes: int = 200) -> ModeTeacher:
    """Teacher whose learned modes have strength ``c_learned`` and whose unlearned modes all
    have the strength that gives mixed loop gain ``gain``."""
    c_u = strength_for_gain(gain, c_learned, scale, n_nodes)
    return ModeTeacher(tuple([c_learned] * stage + [c_u] * (n_modes - stage)), scale)


def threshold_gain(n_modes: int, stage: int, n_nodes: int, scale: float = 1.0,
                   lo: float = 0.5, hi: float = 2.0, xtol: float = 1e-13) -> float:
    """The gain at which the top mixed-sector eigenvalue of the autograd Hessian changes sign
    (Brent's method on the measured eigenvalue)."""
    from scipy.optimize import brentq

    net = block_network(n_modes)

    def top(g):
        teacher = teacher_at_gain(g, n_modes, stage, scale, n_nodes=n_nodes)
        H = hessian_rows(net, mode_data(teacher, n_nodes), stage_saddle(teacher, stage),
                         mixed_indices(net, stage))
        return max(float(-torch.linalg.eigvalsh(H[2 * b:2 * b + 2, 2 * b:2 * b + 2])[0])
                   for b in range(H.shape[0] // 2))
    return float(brentq(top, lo, hi, xtol=xtol))


def hessian_rows(net: MLP, data: Dataset, theta: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The Hessian sub-block ``H[idx][:, idx]`` by double backward (one pass per row)."""
    loss = population_loss(net, data)
    p = theta[0].detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(p[None])[0], p, create_graph=True)
    rows = [torch.autograd.grad(g[q], p, retain_graph=True)[0][idx] for q in idx]
    return torch.stack(rows).detach()


def mixed_norm(net: MLP, stage: int, theta: torch.Tensor) -> torch.Tensor:
    """Norm (B,) of the mixed-loop coordinates of ``theta`` (B, P)."""
    idx = mixed_indices(net, stage)
    return theta[:, idx].norm(dim=-1)


def perturbation_growth(teacher: ModeTeacher, stage: int, n_nodes: int, delta: float,
                        t_max: float, n_save: int = 200, seed: int = 0, rtol: float = 1e-10):
    """Gradient flow from the stage-k saddle plus a random mixed-sector perturbation of norm
    ``delta``; returns (times, mixed-sector norm) as numpy arrays."""
    from ..sim.integrate import GradientFlow, PIController, SaveAt, solve

    net = block_network(teacher.n_modes)
    data = mode_data(teacher, n_nodes)
    theta = stage_saddle(teacher, stage)
    idx = mixed_indices(net, stage)
    gen = torch.Generator().manual_seed(int(seed))
    kick = torch.randn(len(idx), generator=gen, dtype=DTYPE)
    theta[0, idx] += delta * kick / kick.norm()
    ts = torch.linspace(0.0, t_max, n_save, dtype=DTYPE)
    sol = solve(GradientFlow(population_loss(net, data)), theta, t_max * (1 + 1e-6),
                controller=PIController(rtol=rtol, atol=1e-14),
                saveat=SaveAt(ts, fn=lambda y: mixed_norm(net, stage, y)[:, None]))
    return ts.numpy(), sol.ys[0, :, 0].numpy()


def growth_rate(ts: np.ndarray, norm: np.ndarray, t_grow: float, start: float = 0.4) -> float:
    """Fitted exponential rate of a perturbation's norm: slope of ``log norm`` against t on
    ``t >= start * t_grow`` (past the transient in which the kick turns into the top mode)."""
    from ..sim import fits
    window = ts >= start * t_grow
    return float(fits.linear_fit(ts[window], np.log(norm[window]))[0])


# ---------------------------------------------------------------- the staircase

def staircase(teacher: ModeTeacher, width: int, eps: float, t_max: float, n_nodes: int,
              seed: int = 0, n_save: int = 400, rtol: float = 1e-6):
    """Gradient flow of a two-layer tanh network (He-normal directions, both layers scaled by
    ``eps``) on the multi-mode teacher. Returns (times, loss, per-mode learned fraction).

    The learned fraction of mode k is ``E[y_hat_k y_k] / E[y_k^2]``."""
    from ..sim.integrate import GradientFlow, PIController, SaveAt, solve
    from ..sim.networks import he_normal

    n = teacher.n_modes
    net = block_network(n, width)
    data = mode_data(teacher, n_nodes)
    loss = population_loss(net, data)
    theta0 = he_normal(net, [seed], eps=eps, bottleneck=(1, 2))
    energy = (data.y ** 2 * data.w[:, None]).sum(0)

    def observe(y):
        yhat, _ = net.forward(y, data.x)
        frac = (yhat * data.y * data.w[:, None]).sum(-2) / energy
        return torch.cat([loss(y)[:, None], frac], dim=-1)

    ts = torch.cat([torch.zeros(1, dtype=DTYPE),
                    torch.logspace(-2, math.log10(t_max), n_save - 1, dtype=DTYPE)])
    sol = solve(GradientFlow(loss), theta0, t_max * (1 + 1e-6), controller=PIController(rtol=rtol, atol=1e-12),
                saveat=SaveAt(ts, fn=observe))
    ys = sol.ys[0].numpy()
    return ts.numpy(), ys[:, 0], ys[:, 1:]


def crossing_times(t: np.ndarray, values: np.ndarray, levels) -> np.ndarray:
    """First time ``values`` falls below each level (linear interpolation; inf if never)."""
    out = []
    for level in levels:
        below = np.nonzero(values <= level)[0]
        if len(below) == 0 or below[0] == 0:
            out.append(math.inf if len(below) == 0 else t[0])
            continue
        k = below[0]
        f = (values[k - 1] - level) / (values[k - 1] - values[k])
        out.append(t[k - 1] + f * (t[k] - t[k - 1]))
    return np.array(out)


def rising_times(t: np.ndarray, values: np.ndarray, level: float) -> float:
    """First time ``values`` rises above ``level`` (linear interpolation; inf if never)."""
    return float(crossing_times(t, -values, [-level])[0])
