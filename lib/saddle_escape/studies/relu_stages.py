"""ReLU networks on the circle: rays, kinks and the early alignment flow (chapter 10, work in progress).

Setup: inputs ``x = (cos phi, sin phi)`` uniform on the unit circle, a bias-free ReLU network
``f(x) = sum_i v_i relu(u_i . x)`` (:class:`~saddle_escape.sim.twolayer.TwoLayer` with unit
``"relu"``), and a teacher ``y(x) = sum_k a_k relu(w_k . x)`` of a few ReLU units.

Population loss in closed form. For two vectors ``u, w`` of the plane at angle ``delta``::

    E_phi[relu(u.x) relu(w.x)] = ((pi - delta) u.w + |u x w|) / (4 pi)

(the degree-1 arc-cosine kernel on the circle), so ``1/2 E (y - f)^2`` is a quadratic form in the
``v``'s and the teacher amplitudes with these kernel entries: exact, sample-free, and smooth enough
for the adaptive integrator (the kernel is C^2 in the angle). :func:`kernel` writes the angle as
``atan2(|u x w|, u.w)``, whose gradient stays finite when two units are parallel -- the invariant
manifold of proportional units, where an ``acos`` form would give 0/0. :meth:`CircleProblem.grid_data`
gives the same expectation as a uniform angle grid, for checking the closed form and for counting kinks.

Initialisation. Drawing ``v_i`` and ``u_i`` independently, N(0, eps^2) per entry, makes every unit with
``v_i < 0`` and ``v_i^2 > |u_i|^2`` run into ``u_i = 0`` in finite time (``d|u_i|/dt = v_i G`` with the
correlation ``G > 0``), where the ReLU network is not differentiable and the flow is not defined;
an explicit integrator stalls there. :func:`balanced_init` keeps ``u_i = eps xi_i`` (N(0, eps^2) per
entry) and sets ``v_i = sign(xi_v,i) |u_i|``: the conserved imbalance ``v_i^2 - |u_i|^2`` is then 0, so
every unit stays balanced, ``v_i = +-|u_i|``, for all time (the early alignment setting of Maennel et
al. 2018 and Boursier et al. 2022).

Early alignment flow. While ``f`` is negligible, a balanced unit at angle ``theta_i`` with sign
``s_i`` obeys ``d theta_i/dt = s_i G'(theta_i)`` and ``d ln|u_i|/dt = s_i G(theta_i)``, with the
initial correlation ``G(theta) = E[y relu(cos(phi - theta))] = sum_k a_k k(theta - alpha_k)``: the
angles move on an eps-independent clock and the norms grow at the rate ``G`` of the direction they
sit in. :func:`early_flow` integrates it; :func:`predicted_escape_time` turns it into the time at
which the loss has fallen by a fraction ``q`` of its initial value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..sim import counts
from ..sim.data import DTYPE, Dataset
from ..sim.errors import ParameterError
from ..sim.integrate import GradientFlow, ODETerm, PIController, SaveAt, solve
from ..sim.twolayer import TwoLayer

PI = math.pi
E_RELU_SQ = 0.25          # E[relu(cos phi)^2] on the circle: the kernel at delta = 0


# ------------------------------------------------------------------ the kernel

def kernel(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``E_phi[relu(u.x) relu(w.x)]`` for plane vectors ``u, w`` (broadcast over leading axes)."""
    dot = (u * w).sum(-1)
    cross = (u[..., 0] * w[..., 1] - u[..., 1] * w[..., 0]).abs()
    return ((PI - torch.atan2(cross, dot)) * dot + cross) / (4 * PI)


def kernel_of_angle(delta: np.ndarray) -> np.ndarray:
    """The kernel of two unit vectors at angle ``delta`` (any real; wrapped to [0, pi])."""
    d = np.abs((np.asarray(delta, dtype=float) + PI) % (2 * PI) - PI)
    return ((PI - d) * np.cos(d) + np.sin(d)) / (4 * PI)


def kernel_of_angle_derivative(delta: np.ndarray) -> np.ndarray:
    """``d k / d delta`` of :func:`kernel_of_angle`: ``-(pi - |delta|) sin(delta) / (4 pi)``."""
    d = (np.asarray(delta, dtype=float) + PI) % (2 * PI) - PI
    return -(PI - np.abs(d)) * np.sin(d) / (4 * PI)


# ------------------------------------------------------------------ the teacher

@dataclass(frozen=True)
class Teacher:
    """``y(x) = sum_k a_k relu(w_k . x)`` with ``w_k = (cos alpha_k, sin alpha_k)``."""

    angles: tuple          # radians
    amplitudes: tuple

    @property
    def size(self) -> int:
        return len(self.angles)

    def directions(self, dtype=DTYPE) -> torch.Tensor:
        a = torch.as_tensor(self.angles, dtype=dtype)
        return torch.stack([a.cos(), a.sin()], dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.as_tensor(self.amplitudes, dtype=x.dtype)
        return (a * torch.relu(x @ self.directions(x.dtype).T)).sum(-1, keepdim=True)

    def energy(self) -> float:
        """``E[y^2]``."""
        W, a = self.directions(), torch.as_tensor(self.amplitudes, dtype=DTYPE)
        return float((a[:, None] * a[None, :] * kernel(W[:, None], W[None, :])).sum())

    def correlation(self, theta) -> np.ndarray:
        """``G(theta) = E[y relu(cos(phi - theta))]``, the initial correlation of a unit at angle theta."""
        theta = np.asarray(theta, dtype=float)[..., None]
        return (np.asarray(self.amplitudes) * kernel_of_angle(theta - np.asarray(self.angles))).sum(-1)

    def correlation_slope(self, theta) -> np.ndarray:
        """``G'(theta)``."""
        theta = np.asarray(theta, dtype=float)[..., None]
        return (np.asarray(self.amplitudes) * kernel_of_angle_derivative(theta - np.asarray(self.angles))).sum(-1)

    def strongest_direction(self, n_grid: int = 36000) -> tuple[float, float]:
        """``(theta*, G(theta*))``: the maximum of the initial correlation over a fine angle grid,
        polished by Newton steps on ``G'``."""
        grid = np.arange(n_grid) * (2 * PI / n_grid)
        theta = float(grid[np.argmax(self.correlation(grid))])
        h = 1e-6
        for _ in range(20):
            g1 = float(self.correlation_slope(theta))
            g2 = float(self.correlation_slope(theta + h) - self.correlation_slope(theta - h)) / (2 * h)
            if g2 >= 0:
                break
            theta -= g1 / g2
        return theta % (2 * PI), float(self.correlation(theta))


def default_teacher(n_units: int) -> Teacher:
    """``n_units`` units at angles ``k * 360 / (n + 1/2)`` degrees (distinct modulo 180 degrees, so
    no two share a kink line) with amplitudes ``0.6^k`` (distinct rates, separated stages)."""
    angles = tuple(math.radians(k * 360.0 / (n_units + 0.5)) for k in range(n_units))
    return Teacher(angles, tuple(0.6 ** k for k in range(n_units)))


def make_teacher(teacher_units, min_separation_deg: float = 20.0) -> Teacher:
    """The teacher from the chapter parameter: a number of units (:func:`default_teacher`) or a
    list of ``[angle_in_degrees, amplitude]`` pairs.

    Amplitudes must be > 0 (a positive combination of ReLUs, so ``G >= 0``) and the directions
    pairwise at least `min_separation_deg` apart modulo 180 degrees (units closer than that are one
    ray for the ``cos > 0.99``-type grouping, and units 180 degrees apart share a kink line).
    """
    allowed = ("must be a number of units in 1..6 or a list of [angle_degrees, amplitude] pairs with "
               f"amplitudes > 0 and directions at least {min_separation_deg:g} degrees apart modulo 180")
    if isinstance(teacher_units, bool):
        raise ParameterError("teacher_units", teacher_units, allowed)
    if isinstance(teacher_units, int):
        if not 1 <= teacher_units <= 6:
            raise ParameterError("teacher_units", teacher_units, allowed)
        return default_teacher(teacher_units)
    try:
        pairs = [(float(a), float(m)) for a, m in teacher_units]
    except (TypeError, ValueError):
        raise ParameterError("teacher_units", teacher_units, allowed) from None
    if not pairs or any(not (math.isfinite(a) and math.isfinite(m) and m > 0) for a, m in pairs):
        raise ParameterError("teacher_units", teacher_units, allowed)
    for i in range(len(pairs)):
        for j in range(i):
            gap = abs(pairs[i][0] - pairs[j][0]) % 180.0
            if min(gap, 180.0 - gap) < min_separation_deg:
                raise ParameterError("teacher_units", teacher_units, allowed)
    return Teacher(tuple(math.radians(a) for a, _ in pairs), tuple(m for _, m in pairs))


# ------------------------------------------------------------------ the problem

@dataclass(frozen=True)
class CircleProblem:
    """A width-``width`` bias-free ReLU network learning `teacher` on the unit circle."""

    teacher: Teacher
    width: int

    @property
    def model(self) -> TwoLayer:
        return TwoLayer.build("relu", 2, self.width)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """Exact population loss ``1/2 E (y - f)^2`` of a batch of parameters (B, P): (B,)."""
        V, U = self.model.unflatten(theta)
        v = V[..., 0]
        W = self.teacher.directions(theta.dtype).to(theta.device)
        a = torch.as_tensor(self.teacher.amplitudes, dtype=theta.dtype, device=theta.device)
        cross = (kernel(U.unsqueeze(-2), W) * a).sum(-1)                       # (B, H)
        gram = kernel(U.unsqueeze(-2), U.unsqueeze(-3))                         # (B, H, H)
        quad = (v.unsqueeze(-1) * gram * v.unsqueeze(-2)).sum((-1, -2))
        return 0.5 * (self.teacher.energy() - 2 * (v * cross).sum(-1) + quad)

    def flow(self) -> GradientFlow:
        return GradientFlow(self.loss)

    def grid_data(self, n_grid: int = 3600) -> Dataset:
        """The uniform angle grid as a dataset (weights 1/n): its loss is the trapezoid rule of
        the population loss, exact up to O(1/n^2) for this piecewise-trigonometric integrand."""
        _, x = counts.circle_inputs(n_grid)
        return Dataset(x, self.teacher(x), torch.full((n_grid,), 1.0 / n_grid, dtype=DTYPE))

    def target_rms(self) -> float:
        return math.sqrt(self.teacher.energy())


def balanced_init(model: TwoLayer, eps, seeds: Sequence[int]) -> torch.Tensor:
    """``u_i = eps xi_i`` (N(0, eps^2) per entry, from :meth:`~saddle_escape.sim.twolayer.TwoLayer.init`), ``v_i = sign(xi_v,i) |u_i|``."""
    theta = model.init(eps, seeds)
    V, U = model.unflatten(theta)
    return model.flatten(torch.sign(V) * U.norm(dim=-1, keepdim=True), U)


# ------------------------------------------------------------------ simplicity counts

@dataclass(frozen=True)
class Ray:
    angle: float        # radians, direction of u
    amplitude: float    # sum of v_i |u_i| over the ray's units: the ray computes amplitude * relu(cos(phi - angle))
    units: int


def rays(model: TwoLayer, theta: torch.Tensor, scale: float, rel: float = 0.05,
         cos: float = 0.99) -> list[list[Ray]]:
    """The rays of each run: units grouped greedily by direction, largest unit first (a unit joins
    the first ray whose leading direction has cosine above `cos` with its own), and only rays whose
    output ``|amplitude| * sqrt(E relu^2)`` exceeds ``rel * scale`` (``scale``: the target's RMS).

    Sizes are per ray, not per unit: a ray shared by many small units still counts, and the
    threshold is relative to the target, so the origin plateau (every unit O(eps)) has no rays.
    """
    V, U = model.unflatten(theta)
    out = []
    for b in range(theta.shape[0]):
        v, u = V[b, :, 0], U[b]
        r = u.norm(dim=-1)
        s = v * r
        groups: list[list[int]] = []
        for i in torch.argsort(-s.abs()).tolist():
            if r[i] == 0:
                continue
            d = u[i] / r[i]
            for g in groups:
                lead = u[g[0]] / r[g[0]]
                if float(d @ lead) > cos:
                    g.append(i)
                    break
            else:
                groups.append([i])
        found = []
        for g in groups:
            amp = float(s[g].sum())
            if abs(amp) * math.sqrt(E_RELU_SQ) > rel * scale:
                lead = u[g[0]]
                found.append(Ray(math.atan2(float(lead[1]), float(lead[0])) % (2 * PI), amp, len(g)))
        out.append(found)
    return out


def ray_count(model: TwoLayer, theta: torch.Tensor, scale: float, rel: float = 0.05) -> list[int]:
    return [len(r) for r in rays(model, theta, scale, rel)]


def kink_lines(model: TwoLayer, theta: torch.Tensor, scale: float, rel: float = 0.05,
               n_grid: int = 7200, cos: float = 0.99) -> list[int]:
    """Kinks of the learned function on the circle, counted in antipodal pairs (kink lines).

    ``f(-x) = f(x) - (sum_i v_i u_i) . x`` differs from ``f(x)`` by a linear, kink-free function, so
    the kinks come in antipodal pairs with equal jumps; a ray of amplitude ``a`` at angle theta puts
    a pair of derivative jumps of size ``|a|`` at theta +- 90 degrees. A kink counts when the
    derivative jumps by more than ``2 rel scale`` -- the jump of a ray that :func:`rays` just counts
    (``|a| sqrt(E relu^2) = rel scale``), so rays and kink lines use one threshold. (Unlike
    :func:`saddle_escape.sim.counts.kinks`, whose threshold is relative to the function's own
    largest slope and so finds kinks in the O(eps^2) function of the origin plateau.)
    Kinks closer than ``acos(cos)`` (the rays' angular tolerance) are one kink, so the units of one
    ray, a few degrees apart, make one kink line as they make one ray.
    """
    _, x = counts.circle_inputs(n_grid)
    h = 2 * PI / n_grid
    f = model.forward(theta, x)[..., 0]                                        # (B, n)
    slope = (torch.roll(f, -1, dims=-1) - f) / h
    jump = (slope - torch.roll(slope, 1, dims=-1)).abs()
    big = jump > 2 * rel * scale
    gap = max(1, int(math.ceil(math.acos(cos) / h)))
    out = []
    for row in big:
        where = torch.nonzero(row).flatten()
        if len(where) == 0:
            out.append(0)
            continue
        # circular clusters of kink points: a new kink where the next one is more than `gap` away
        steps = torch.diff(where, append=where[:1] + n_grid)
        out.append(int((steps > gap).sum()) // 2 if len(where) > 1 else 0)
    return out


# ------------------------------------------------------------------ plateaus

def plateau_indices(grad_norm: np.ndarray, rel: float = 1e-2) -> list[int]:
    """The saddle visits of one trajectory, by a rule fixed before looking at any result.

    Index 0 (the start, next to the saddle at the origin) and every interior local minimum of the
    gradient norm ``||grad L||`` along the saved trajectory that lies below ``rel`` times its
    largest value (a passage close to a fixed point, between two drops), plus the last index (the
    end of the run). Saddle visits are where the flow nearly stops; drops are where it is O(1).
    """
    g = np.asarray(grad_norm, dtype=float)
    top = g.max()
    inner = [i for i in range(1, len(g) - 1) if g[i] <= g[i - 1] and g[i] < g[i + 1] and g[i] < rel * top]
    return [0] + inner + [len(g) - 1]


# ------------------------------------------------------------------ the narrow network

def narrow_fixed_point(teacher: Teacher, visited: Sequence[Ray], steps: int = 200) -> tuple[float, list[Ray]]:
    """Optimise the ``k``-unit network started from the visited rays (one balanced unit per ray)
    with L-BFGS on the exact loss; returns its loss and its rays. ``k = 0``: the loss at the origin."""
    if not visited:
        return 0.5 * teacher.energy(), []
    problem = CircleProblem(teacher, len(visited))
    model = problem.model
    r = torch.tensor([math.sqrt(abs(ray.amplitude)) for ray in visited], dtype=DTYPE)
    ang = torch.tensor([ray.angle for ray in visited], dtype=DTYPE)
    U = r[:, None] * torch.stack([ang.cos(), ang.sin()], -1)
    V = torch.tensor([math.copysign(1.0, ray.amplitude) for ray in visited], dtype=DTYPE)[:, None] * r[:, None]
    theta = model.flatten(V[None], U[None]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        L = problem.loss(theta).sum()
        L.backward()
        return L

    opt.step(closure)
    theta = theta.detach()
    return float(problem.loss(theta)), rays(model, theta, problem.target_rms(), rel=1e-6)[0]


def best_loss(teacher: Teacher, k: int, n_starts: int = 32, seed: int = 0) -> float:
    """The best loss of a ``k``-unit network over `n_starts` random starts (directions uniform,
    amplitude ``+-`` the teacher's scale), each polished by :func:`narrow_fixed_point`."""
    if k == 0:
        return 0.5 * teacher.energy()
    rng = np.random.default_rng(seed)
    best = math.inf
    for _ in range(n_starts):
        start = [Ray(float(a), float(m), 1) for a, m in zip(rng.uniform(0, 2 * PI, k),
                                                            rng.uniform(0.1, 1.0, k) * max(teacher.amplitudes))]
        best = min(best, narrow_fixed_point(teacher, start)[0])
    return best


# ------------------------------------------------------------------ the early alignment flow

def early_flow(teacher: Teacher, angles: np.ndarray, signs: np.ndarray, t_max: float,
               n_save: int = 2001) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrate ``theta' = s G'(theta)``, ``(ln r)' = s G(theta)`` for units at `angles` with `signs`
    (one run). Returns the save times, the angles (T, H) and the log-growth ``ln r(t)/r(0)`` (T, H)."""
    H = len(angles)
    s = torch.as_tensor(signs, dtype=DTYPE)

    def field(t, y):
        th = y[:, :H].numpy()
        dth = torch.as_tensor(teacher.correlation_slope(th), dtype=DTYPE) * s
        dlr = torch.as_tensor(teacher.correlation(th), dtype=DTYPE) * s
        return torch.cat([dth, dlr], dim=-1)

    y0 = torch.cat([torch.as_tensor(angles, dtype=DTYPE), torch.zeros(H, dtype=DTYPE)])[None]
    ts = torch.linspace(0, t_max, n_save, dtype=DTYPE)
    sol = solve(ODETerm(field), y0, t_max, controller=PIController(rtol=1e-10, atol=1e-12), saveat=SaveAt(ts))
    ys = sol.ys[0].numpy()
    return ts.numpy(), ys[:, :H], ys[:, H:]


def predicted_escape_time(teacher: Teacher, theta0_unit: torch.Tensor, model: TwoLayer, eps: float,
                          fraction: float = 0.01, t_max: float | None = None) -> dict:
    """The time at which the loss has fallen by `fraction` of its initial value, from the early flow.

    `theta0_unit` is one run's balanced initialisation at eps = 1 (:func:`balanced_init`); the run at
    `eps` starts at ``eps * theta0_unit``. To first order in ``f`` the loss is
    ``L0 - sum_i s_i r_i^2 G(theta_i)``, so the predicted time solves
    ``eps^2 sum_i s_i r_i(0)^2 exp(2 ln r_i(t)/r_i(0)) G(theta_i(t)) = fraction * L0``.
    Also returns the angle of the unit that carries most of that drop at the predicted time.
    """
    V, U = model.unflatten(theta0_unit[None])
    u = U[0].numpy()
    signs = np.sign(V[0, :, 0].numpy())
    r0 = np.linalg.norm(u, axis=-1)
    angles = np.arctan2(u[:, 1], u[:, 0])
    _, g_star = teacher.strongest_direction()
    L0 = 0.5 * teacher.energy()
    if t_max is None:
        t_max = 2.0 * (math.log(fraction * L0 / (eps ** 2 * g_star)) / (2 * g_star) + 20.0 / g_star)
    ts, th, lr = early_flow(teacher, angles, signs, t_max)
    with np.errstate(over="ignore"):
        terms = eps ** 2 * signs * r0 ** 2 * np.exp(2 * lr) * teacher.correlation(th)      # (T, H)
    drop = terms.sum(-1)
    above = np.flatnonzero(drop >= fraction * L0)
    if len(above) == 0 or above[0] == 0:
        return dict(time=math.nan, angle=math.nan)
    j = above[0]
    # the drop grows exponentially: interpolate its logarithm linearly between saves
    a, b = math.log(drop[j - 1]), math.log(drop[j])
    t = ts[j - 1] + (math.log(fraction * L0) - a) / (b - a) * (ts[j] - ts[j - 1])
    lead = int(np.argmax(terms[j]))
    return dict(time=float(t), angle=float(th[j, lead] % (2 * PI)))
