"""ReLU networks on the sphere: rays, kinks and the early alignment flow (chapter 10).

Setup: a bias-free ReLU network ``f(x) = sum_i v_i relu(u_i . x)`` (:class:`~saddle_escape.sim.twolayer.TwoLayer`
with unit ``"relu"``) and a teacher ``y(x) = sum_k a_k relu(w_k . x)`` of a few ReLU units, with
inputs uniform on the sphere S^{d-1} (d = 2: the circle). The convolutional variant reads ``P``
independent patches, each uniform on S^{d-1}, with one kernel ``u_i`` shared by the patches and
the patch outputs averaged: ``g_u(x) = (1/P) sum_p relu(u . x_p)`` (P = 1 is the fully connected net).

Population loss in closed form. For ``u, w`` at angle ``delta``::

    E[relu(u.x) relu(w.x)] = (|u||w| sin delta + (pi - delta) u.w) / (2 pi d)

(the degree-1 arc-cosine kernel, divided by ``d`` because ``E|x|^2 = 1`` on the sphere instead of
``d`` for a Gaussian), and ``E relu(u.x) = c_d |u|`` with ``c_d = Gamma(d/2) / (2 sqrt(pi) Gamma((d+1)/2))``.
Independent patches add ``(1 - 1/P) c_d^2 |u||w|``. The loss ``1/2 E (y - f)^2`` is a quadratic
form in the ``v``'s with these entries: exact and sample-free. Its gradient is written out
(:meth:`SphereProblem.neg_grad_and_loss`): ``grad_u E[relu(u.x) relu(w.x)] = ((pi - delta) w + |w| sin(delta) u/|u|) / (2 pi d)``
is finite when two units are parallel -- the invariant manifold of proportional units, where
autograd through ``acos`` or a square root gives 0/0.

Initialisation. Drawing ``v_i`` and ``u_i`` independently, N(0, eps^2) per entry, makes every unit with
``v_i < 0`` and ``v_i^2 > |u_i|^2`` run into ``u_i = 0`` in finite time (``d|u_i|/dt = v_i G`` with the
correlation ``G > 0``), where the ReLU network is not differentiable and the flow is not defined.
:func:`balanced_init` keeps ``u_i = eps xi_i`` (N(0, eps^2) per entry) and sets
``v_i = sign(xi_v,i) |u_i|``: the conserved imbalance ``v_i^2 - |u_i|^2`` is then 0, so every unit
stays balanced, ``v_i = +-|u_i|``, for all time (the early alignment setting of Maennel et al. 2018
and Boursier et al. 2022).

Early alignment flow. While ``f`` is negligible, a balanced unit ``u = r z`` (``|z| = 1``) with sign
``s`` obeys ``dz/dt = s (I - z z^T) grad G(z)`` and ``d ln r/dt = s G(z)``, with the initial
correlation ``G(z) = E[y g_z] = sum_k a_k K(z, w_k)``: directions move on an eps-independent clock
to the local maxima of ``s G`` and the norms grow at the rate ``s G`` of the direction they sit in.
Each local maximum collects a cluster of units that grows as one ray: a stage of its own only if
every teacher unit has such a basin (:func:`basins`), which :func:`check_teacher` asks of a
teacher before anything runs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..sim import counts
from ..sim.data import DTYPE
from ..sim.errors import ParameterError
from ..sim.integrate import Event, GradientFlow, ODETerm, PIController, SaveAt, solve
from ..sim.twolayer import TwoLayer

PI = math.pi


def relu_mean(d: int) -> float:
    """``c_d = E relu(x_1)`` for ``x`` uniform on S^{d-1} (1/pi on the circle, 1/4 on S^2)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / (2 * math.sqrt(PI))


# ------------------------------------------------------------------ the inputs and their kernel

@dataclass(frozen=True)
class Inputs:
    """``patches`` independent patches, each uniform on the sphere S^{dim-1}."""

    dim: int
    patches: int = 1

    def _parts(self, U, W):
        """Norms, unit vectors, and the angle's cosine and sine, from unit vectors (no products
        of norms that could underflow for units that have shrunk by hundreds of decades)."""
        nu = U.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        nw = W.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        zu, zw = U / nu, W / nw
        cos = (zu * zw).sum(-1)
        sin = (zu - cos[..., None] * zw).norm(dim=-1)       # accurate also near delta = 0
        return nu[..., 0], nw[..., 0], zu, cos, sin, torch.atan2(sin, cos)

    def kernel(self, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``E[g_u(x) g_w(x)]`` for ``U, W (..., d)`` (broadcast)."""
        nu, nw, _, cos, sin, delta = self._parts(U, W)
        P = self.patches
        return nu * nw * ((sin + (PI - delta) * cos) / (2 * PI * self.dim * P) + (1 - 1 / P) * relu_mean(self.dim) ** 2)

    def kernel_grad(self, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``grad_u E[g_u(x) g_w(x)]`` (..., d): ``((pi - delta) w + |w| sin(delta) u/|u|) / (2 pi d P)``
        plus the patches' ``(1 - 1/P) c_d^2 |w| u/|u|``."""
        U, W = torch.broadcast_tensors(U, W)
        nu, nw, zu, cos, sin, delta = self._parts(U, W)
        P = self.patches
        radial = nw * (sin / (2 * PI * self.dim * P) + (1 - 1 / P) * relu_mean(self.dim) ** 2)
        return ((PI - delta) / (2 * PI * self.dim * P))[..., None] * W + radial[..., None] * zu

    def unit_energy(self) -> float:
        """``E g_z^2`` of a unit-norm kernel ``z``: what one ray of amplitude 1 puts out."""
        return 1 / (2 * self.dim * self.patches) + (1 - 1 / self.patches) * relu_mean(self.dim) ** 2


# ------------------------------------------------------------------ the teacher

@dataclass(frozen=True)
class Teacher:
    """``y = sum_k a_k g_{w_k}`` with unit vectors ``w_k`` (``directions``) and ``a_k`` (``amplitudes``)."""

    directions: tuple          # K tuples of d numbers, unit norm
    amplitudes: tuple
    inputs: Inputs

    @property
    def size(self) -> int:
        return len(self.amplitudes)

    def W(self, dtype=DTYPE) -> torch.Tensor:
        return torch.tensor(self.directions, dtype=dtype)

    def a(self, dtype=DTYPE) -> torch.Tensor:
        return torch.tensor(self.amplitudes, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher on single-patch inputs ``x (n, d)``: (n, 1)."""
        return (self.a(x.dtype) * torch.relu(x @ self.W(x.dtype).T)).sum(-1, keepdim=True)

    def energy(self) -> float:
        """``E[y^2]``."""
        W, a = self.W(), self.a()
        return float(a @ self.inputs.kernel(W[:, None], W[None, :]) @ a)

    def correlation(self, Z: torch.Tensor) -> torch.Tensor:
        """``G(z) = E[y g_z]`` for directions ``Z (..., d)``."""
        return (self.inputs.kernel(Z[..., None, :], self.W(Z.dtype)) * self.a(Z.dtype)).sum(-1)

    def correlation_grad(self, Z: torch.Tensor) -> torch.Tensor:
        """``grad G(z)`` (..., d)."""
        g = self.inputs.kernel_grad(Z[..., None, :], self.W(Z.dtype))
        return (g * self.a(Z.dtype)[:, None]).sum(-2)


def default_teacher(n_units: int, dim: int | None = None, patches: int = 1) -> Teacher:
    """``n_units`` (1..4) units of alternating signs. Directions: ``w_1 = e_1``; ``w_2`` at 75 degrees
    azimuth in the ``(e_1, e_2)`` plane and 30 degrees above it; ``w_3`` at 150 degrees azimuth in that
    plane; ``w_4 = -cos 30 w_2 + sin 30 e_4`` (150 degrees from ``w_2``). Units of one sign 150 degrees
    apart, and each negative unit between the positive ones, give every unit its own basin of the
    early alignment flow (:func:`basins`; :func:`check_teacher` tests it).

    Amplitudes ``1, -0.7, 0.5`` (three units) and ``1, -0.7, 0.6, -0.25`` (four). One basin per unit
    is necessary, not sufficient: the four-unit amplitudes come from a search over a grid
    (``a_2`` in 0.6..0.8, ``a_3`` in 0.5..0.7, ``|a_4|`` in 0.2..0.3, one simulated run each) for
    the first set whose runs learn one ray per stage; with ``0.5, -0.35`` the last three stages
    arrive in one drop. Two units: ``e_1`` and the circle's direction at 75 degrees, with amplitudes
    ``1, -0.5`` (with -0.7 their rates are within a factor 1.8 and the plateau between the stages,
    ``ln(1/eps) (1/r_2 - 1/r_1)``, is too short for the first ray to settle below eps = 1e-13)."""
    c, s = math.cos, math.sin
    r = math.radians
    w2 = np.array([c(r(75)) * c(r(30)), s(r(75)) * c(r(30)), s(r(30)), 0.0])
    dirs = np.array([[1.0, 0, 0, 0], w2, [c(r(150)), s(r(150)), 0, 0], -c(r(30)) * w2 + s(r(30)) * np.eye(4)[3]])
    if n_units <= 2:
        dirs = np.array([[1.0, 0], [c(r(75)), s(r(75))]])
    need = max(2, n_units)
    dim = dim or need
    W = np.zeros((n_units, dim))
    W[:, :need] = dirs[:n_units, :need]
    amps = {1: (1.0,), 2: (1.0, -0.5), 3: (1.0, -0.7, 0.5), 4: (1.0, -0.7, 0.6, -0.25)}[n_units]
    return Teacher(tuple(tuple(map(float, w)) for w in W), amps, Inputs(dim, patches))


TEACHER_RULE = ("must be a number of units in 1..4 or a list of [direction, amplitude] pairs "
                "(direction: input_dim numbers, not zero; amplitude: a number, not zero) with "
                "linearly independent directions, at most input_dim of them")


def make_teacher(teacher_units, input_dim: int | None = None, patches: int = 1) -> Teacher:
    """The teacher from the chapter's parameters (allowed values: ``TEACHER_RULE``).

    Why at most ``input_dim`` independent directions: ``relu(z) - relu(-z) = z``, so with K > d
    units the zero-loss networks form a (K - d)-dimensional family with different rays (on the
    circle, three units already have one): the ray count would not be a property of the function.
    """
    if isinstance(teacher_units, bool):
        raise ParameterError("teacher_units", teacher_units, TEACHER_RULE)
    if isinstance(teacher_units, int):
        if not 1 <= teacher_units <= 4:
            raise ParameterError("teacher_units", teacher_units, TEACHER_RULE)
        dim = input_dim or max(2, teacher_units)
        if dim < max(2, teacher_units):
            raise ParameterError("input_dim", input_dim,
                                 f"must be at least {max(2, teacher_units)} for a teacher of {teacher_units} units")
        return default_teacher(teacher_units, dim, patches)
    try:
        pairs = [([float(x) for x in d], float(a)) for d, a in teacher_units]
    except (TypeError, ValueError):
        raise ParameterError("teacher_units", teacher_units, TEACHER_RULE) from None
    dims = {len(d) for d, _ in pairs}
    if not pairs or len(dims) != 1 or min(dims) < 2:
        raise ParameterError("teacher_units", teacher_units, TEACHER_RULE)
    dim = dims.pop()
    if input_dim is not None and input_dim != dim:
        raise ParameterError("input_dim", input_dim, f"must equal the teacher directions' length {dim}")
    W = np.array([d for d, _ in pairs])
    a = np.array([m for _, m in pairs])
    if not (np.isfinite(W).all() and np.isfinite(a).all()) or (a == 0).any() or len(pairs) > dim:
        raise ParameterError("teacher_units", teacher_units, TEACHER_RULE)
    norms = np.linalg.norm(W, axis=1)
    if (norms == 0).any():
        raise ParameterError("teacher_units", teacher_units, TEACHER_RULE)
    W = W / norms[:, None]
    if np.linalg.svd(W, compute_uv=False).min() < 1e-3:
        raise ParameterError("teacher_units", teacher_units, TEACHER_RULE)
    return Teacher(tuple(tuple(map(float, w)) for w in W), tuple(map(float, a)), Inputs(dim, patches))


# ------------------------------------------------------------------ the problem

@dataclass(frozen=True)
class SphereProblem:
    """A width-``width`` bias-free ReLU network (convolutional when the inputs have several patches)
    learning `teacher` on the sphere, with the exact population loss."""

    teacher: Teacher
    width: int

    @property
    def inputs(self) -> Inputs:
        return self.teacher.inputs

    @property
    def model(self) -> TwoLayer:
        return TwoLayer.build("relu", self.inputs.dim, self.width)

    def _terms(self, theta):
        V, U = self.model.unflatten(theta)
        v = V[..., 0]
        W, a = self.teacher.W(theta.dtype), self.teacher.a(theta.dtype)
        cross = (self.inputs.kernel(U[..., None, :], W) * a).sum(-1)                 # (B, H)
        gram = self.inputs.kernel(U[..., None, :], U[..., None, :, :])               # (B, H, H)
        gv = (gram * v[..., None, :]).sum(-1)                                        # (B, H)
        return v, U, W, a, cross, gv

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """``1/2 E (y - f)^2`` of a batch of parameters (B, P): (B,)."""
        v, _, _, _, cross, gv = self._terms(theta)
        return 0.5 * (self.teacher.energy() - 2 * (v * cross).sum(-1) + (v * gv).sum(-1))

    def neg_grad_and_loss(self, theta: torch.Tensor):
        """``(-grad L, L)`` written out (the kernel's own gradient, no autograd)."""
        v, U, W, a, cross, gv = self._terms(theta)
        L = 0.5 * (self.teacher.energy() - 2 * (v * cross).sum(-1) + (v * gv).sum(-1))
        dv = cross - gv
        pull = (self.inputs.kernel_grad(U[..., None, :], W) * a[:, None]).sum(-2)       # (B, H, d)
        push = (self.inputs.kernel_grad(U[..., None, :], U[..., None, :, :]) * v[..., None, :, None]).sum(-2)
        du = v[..., None] * (pull - push)
        return self.model.flatten(dv[..., None], du), L

    def flow(self) -> GradientFlow:
        return GradientFlow(self.loss, self.neg_grad_and_loss)

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
    direction: tuple    # unit vector of the ray's leading unit
    amplitude: float    # sum of v_i |u_i| over the ray's units: the ray computes amplitude * g_direction
    units: int


def rays(problem: SphereProblem, theta: torch.Tensor, rel: float = 0.05, cos: float = 0.99) -> list[list[Ray]]:
    """The rays of each run: units grouped greedily by direction, largest unit first (a unit joins
    the first ray whose leading direction has cosine above `cos` with its own), and only rays whose
    output ``|amplitude| sqrt(E g_z^2)`` exceeds ``rel`` times the target's RMS.

    Sizes are per ray, not per unit: a ray shared by many small units still counts, and the
    threshold is relative to the target, so the origin plateau (every unit O(eps)) has no rays.
    """
    V, U = problem.model.unflatten(theta)
    bar = rel * problem.target_rms() / math.sqrt(problem.inputs.unit_energy())
    out = []
    for b in range(theta.shape[0]):
        r = U[b].norm(dim=-1)
        s = V[b, :, 0] * r
        Z = U[b] / r.clamp_min(1e-300)[:, None]
        groups: list[list[int]] = []
        for i in torch.argsort(-s.abs()).tolist():
            for g in groups:
                if float(Z[i] @ Z[g[0]]) > cos:
                    g.append(i)
                    break
            else:
                groups.append([i])
        found = [Ray(tuple(Z[g[0]].tolist()), float(s[g].sum()), len(g)) for g in groups]
        out.append([ray for ray in found if abs(ray.amplitude) > bar])
    return out


def ray_count(problem: SphereProblem, theta: torch.Tensor, rel: float = 0.05) -> list[int]:
    return [len(r) for r in rays(problem, theta, rel)]


def great_circles(dim: int, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """``n`` great circles of S^{dim-1} as orthonormal pairs ``(p, q)`` (2, dim): the circle itself
    for dim = 2, fixed random planes otherwise (seeded: the same for every run)."""
    if dim == 2:
        return [torch.eye(2, dtype=DTYPE)]
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=DTYPE))[0].T for _ in range(n)]


def kink_lines(problem: SphereProblem, theta: torch.Tensor, rel: float = 0.05, n_grid: int = 7200,
               cos: float = 0.99) -> list[int]:
    """Kink lines of the learned (single-patch) function, counted on a fine angle grid along great circles.

    A ray of amplitude ``a`` along ``z`` is not differentiable on the hyperplane ``z.x = 0``, which
    crosses a great circle in an antipodal pair of points, where the slope along the circle jumps
    by ``|a| |z_pq|`` (``z_pq``: the part of ``z`` in the circle's plane). A kink counts when the
    jump exceeds half the amplitude that :func:`rays` just counts, so a counted ray at least 30
    degrees from the circle's normal is seen; kinks closer than ``acos(cos)`` (the rays' angular
    tolerance) are one. The count of a run is the largest over :func:`great_circles` (a
    coincidence on one circle can only merge kinks, never make them). Unlike the ray count it is
    a property of the function alone, whatever units compute it.
    """
    d = problem.inputs.dim
    bar = 0.5 * rel * problem.target_rms() / math.sqrt(problem.inputs.unit_energy())
    _, circle = counts.circle_inputs(n_grid)
    h = 2 * PI / n_grid
    gap = max(1, int(math.ceil(math.acos(cos) / h)))
    best = [0] * theta.shape[0]
    for pq in great_circles(d):
        x = circle @ pq
        f = problem.model.forward(theta, x)[..., 0]                               # (B, n)
        slope = (torch.roll(f, -1, dims=-1) - f) / h
        big = (slope - torch.roll(slope, 1, dims=-1)).abs() > bar
        for b, row in enumerate(big):
            where = torch.nonzero(row).flatten()
            if len(where) > 1:
                steps = torch.diff(where, append=where[:1] + n_grid)
                best[b] = max(best[b], int((steps > gap).sum()) // 2)
    return best


# ------------------------------------------------------------------ plateaus

def plateau_indices(grad_norm: np.ndarray, loss: np.ndarray, rel: float = 1e-2, fall: float = 0.01) -> list[int]:
    """The saddle visits of one trajectory, by a rule fixed before looking at any result.

    Index 0 (the start, next to the saddle at the origin), one index per passage close to a fixed
    point between two drops, and the last index (the end of the run). Candidates are the interior
    local minima of the gradient norm below ``rel`` times its largest value; candidates with no
    drop between them -- the loss within `fall` of the group's first -- are one visit, represented
    by the one with the smallest gradient; a visit must come after the loss has fallen by `fall`
    from its start (the alignment phase on the origin plateau is not a visit). Saddle visits are
    where the flow nearly stops; drops are where it is O(1).
    """
    g = np.asarray(grad_norm, dtype=float)
    L = np.asarray(loss, dtype=float)
    top = g.max()
    candidates = [i for i in range(1, len(g) - 1) if g[i] <= g[i - 1] and g[i] < g[i + 1] and g[i] < rel * top]
    groups: list[list[int]] = []
    for i in candidates:
        if groups and L[i] >= (1 - fall) * L[groups[-1][0]]:
            groups[-1].append(i)
        elif L[i] < (1 - fall) * L[0]:
            groups.append([i])
    return [0] + [min(grp, key=lambda i: g[i]) for grp in groups] + [len(g) - 1]


# ------------------------------------------------------------------ runs

@dataclass
class Trajectories:
    """Saved runs of one problem: ``ts`` (T,), ``thetas`` (B, T, P) (NaN after a run stopped),
    ``saved`` (B, T), ``loss`` and ``grad_norm`` (B, T), the runs' ``eps`` and ``seeds``, and for
    each run the time and state at which the loss had fallen by `escape_fraction` (the first escape)."""

    problem: SphereProblem
    ts: np.ndarray
    thetas: torch.Tensor
    saved: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    eps: np.ndarray
    seeds: list
    escape_time: np.ndarray
    escape_state: torch.Tensor
    learned: np.ndarray        # (B,) the loss fell below the stop fraction before t_max

    def run(self, b: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
        """One run's saved times, states, losses and gradient norms (only the saved part)."""
        keep = self.saved[b]
        return self.ts[keep], self.thetas[b][torch.as_tensor(keep)], self.loss[b][keep], self.grad_norm[b][keep]


def simulate(problem: SphereProblem, eps_values: Sequence[float], seeds: Sequence[int], t_max: float,
             n_save: int = 1500, stop_fraction: float = 1e-4, escape_fraction: float = 0.01,
             rtol: float = 1e-7) -> Trajectories:
    """Every (eps, seed) pair as one batch from :func:`balanced_init`, until the loss is below
    `stop_fraction` of its start (the teacher is learned) or `t_max`; saves on a grid of `n_save`
    times shared by the runs, and locates the first escape (the loss down by `escape_fraction`)."""
    runs = [(float(e), int(s)) for e in eps_values for s in seeds]
    theta0 = balanced_init(problem.model, [e for e, _ in runs], [s for _, s in runs])
    flow = problem.flow()
    L0 = flow.loss(theta0)
    events = [Event(lambda t, y, idx: flow.loss(y) - (1 - escape_fraction) * L0[idx], direction=-1,
                    terminal=False, name="escape"),
              Event(lambda t, y, idx: flow.loss(y) - stop_fraction * L0[idx], direction=-1, name="learned")]
    ts = torch.linspace(0, t_max, n_save, dtype=DTYPE)
    sol = solve(flow, theta0, t_max, controller=PIController(rtol=rtol, atol=1e-14), events=events,
                saveat=SaveAt(ts))
    saved = sol.saved.numpy()
    loss = np.full(saved.shape, np.nan)
    grad = np.full(saved.shape, np.nan)
    for b in range(len(runs)):
        neg, L = problem.neg_grad_and_loss(sol.ys[b][torch.as_tensor(saved[b])])
        loss[b, saved[b]] = L.numpy()
        grad[b, saved[b]] = neg.norm(dim=-1).numpy()
    return Trajectories(problem, ts.numpy(), sol.ys, saved, loss, grad, np.array([e for e, _ in runs]),
                        [s for _, s in runs], sol.event_times[:, 0].numpy(), sol.event_states[0],
                        np.isfinite(sol.event_times[:, 1].numpy()))


@dataclass
class Stage:
    """One saddle visit of one run: where the flow nearly stopped, and what the network was there."""

    time: float
    loss: float
    rays: list
    kinks: int


@dataclass
class RunSummary:
    eps: float
    seed: int
    missing: list          # teacher units whose basin no student unit of their sign reached (decided at t = 0)
    stages: list           # Stage per saddle visit: the start, each plateau, the end
    learned: bool          # the loss fell below the stop fraction

    @property
    def ray_counts(self) -> list[int]:
        return [len(s.rays) for s in self.stages]

    @property
    def kink_counts(self) -> list[int]:
        return [s.kinks for s in self.stages]


def summarise(tr: Trajectories) -> list[RunSummary]:
    """Every run's saddle visits (:func:`plateau_indices`) with the rays and kink lines there, and
    which teacher basins its initialisation leaves empty (:func:`unpopulated_basins`)."""
    problem = tr.problem
    unit0 = tr.thetas[:, 0] / torch.as_tensor(tr.eps)[:, None]
    missing = unpopulated_basins(problem.teacher, unit0, problem.model)
    out = []
    for b in range(len(tr.eps)):
        ts, th, L, g = tr.run(b)
        idx = plateau_indices(g, L)
        found = rays(problem, th[idx])
        kinks = kink_lines(problem, th[idx])
        stages = [Stage(float(ts[i]), float(L[i]), r, k) for i, r, k in zip(idx, found, kinks)]
        out.append(RunSummary(float(tr.eps[b]), tr.seeds[b], missing[b], stages, bool(tr.learned[b])))
    return out


# ------------------------------------------------------------------ the narrow network

def narrow_fixed_point(teacher: Teacher, visited: Sequence[Ray], steps: int = 300) -> tuple[float, list[Ray]]:
    """Optimise the ``k``-unit network started from the visited rays (one balanced unit per ray)
    with L-BFGS on the exact loss; returns its loss and its rays. ``k = 0``: the loss at the origin."""
    if not visited:
        return 0.5 * teacher.energy(), []
    problem = SphereProblem(teacher, len(visited))
    model = problem.model
    r = torch.tensor([math.sqrt(abs(ray.amplitude)) for ray in visited], dtype=DTYPE)
    U = r[:, None] * torch.tensor([ray.direction for ray in visited], dtype=DTYPE)
    V = torch.tensor([math.copysign(1.0, ray.amplitude) for ray in visited], dtype=DTYPE)[:, None] * r[:, None]
    theta = model.flatten(V[None], U[None]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        neg, L = problem.neg_grad_and_loss(theta.detach())
        theta.grad = -neg
        return L.sum()

    opt.step(closure)
    theta = theta.detach()
    return float(problem.loss(theta)), rays(problem, theta, rel=1e-6)[0]


def best_loss(teacher: Teacher, k: int, n_starts: int = 32, seed: int = 0) -> float:
    """The best loss of a ``k``-unit network over `n_starts` random starts (directions uniform on
    the sphere, amplitudes of either sign up to the teacher's largest), each polished by
    :func:`narrow_fixed_point`."""
    if k == 0:
        return 0.5 * teacher.energy()
    rng = np.random.default_rng(seed)
    top = max(abs(a) for a in teacher.amplitudes)
    best = math.inf
    for _ in range(n_starts):
        Z = rng.standard_normal((k, teacher.inputs.dim))
        Z /= np.linalg.norm(Z, axis=1, keepdims=True)
        amps = rng.uniform(0.1, 1.0, k) * top * rng.choice([-1.0, 1.0], k)
        best = min(best, narrow_fixed_point(teacher, [Ray(tuple(z), float(m), 1) for z, m in zip(Z, amps)])[0])
    return best


# ------------------------------------------------------------------ the early alignment flow

def _early_field(teacher: Teacher, H: int, d: int, signs: torch.Tensor):
    def field(t, y):
        Z = y[:, :H * d].reshape(-1, H, d)
        Z = Z / Z.norm(dim=-1, keepdim=True)     # projecting with the normalised z keeps |z| = 1 neutral,
        g = teacher.correlation_grad(Z)          # not unstable where s G < 0
        dz = signs[:, None] * (g - (g * Z).sum(-1, keepdim=True) * Z)
        return torch.cat([dz.reshape(y.shape[0], -1), signs * teacher.correlation(Z)], dim=-1)
    return field


def early_flow(teacher: Teacher, Z0: np.ndarray, signs: np.ndarray, t_max: float,
               n_save: int = 2001, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrate ``z' = s (I - z z^T) grad G(z)``, ``(ln r)' = s G(z)`` for units at directions `Z0`
    (H, d) with `signs` (one run). Returns the save times, the directions (T, H, d) and the
    log-growth ``ln r(t)/r(0)`` (T, H)."""
    H, d = Z0.shape
    field = _early_field(teacher, H, d, torch.as_tensor(signs, dtype=DTYPE))
    y0 = torch.cat([torch.as_tensor(Z0, dtype=DTYPE).reshape(-1), torch.zeros(H, dtype=DTYPE)])[None]
    ts = torch.linspace(0, t_max, n_save, dtype=DTYPE)
    sol = solve(ODETerm(field), y0, t_max, controller=PIController(rtol=rtol, atol=rtol * 1e-2), saveat=SaveAt(ts))
    ys = sol.ys[0].numpy()
    return ts.numpy(), ys[:, :H * d].reshape(-1, H, d), ys[:, H * d:]


def time_horizon(teacher: Teacher, eps_min: float) -> float:
    """A generous ``t_max`` for runs down to `eps_min`: four times the time the slowest basin's
    cluster needs to grow by ``1/eps_min`` at its initial rate (runs stop once they have learned)."""
    rates = [abs(float(teacher.correlation(torch.tensor(z)))) for z in basins(teacher)]
    return 4 * math.log(1 / eps_min) / min(rates)


def _alignment_time(teacher: Teacher) -> float:
    """A time by which the early flow has settled: 40 over the teacher's smallest curvature scale."""
    return 40.0 / (min(abs(a) for a in teacher.amplitudes) * teacher.inputs.unit_energy())


@functools.lru_cache(maxsize=16)
def basins(teacher: Teacher) -> np.ndarray:
    """Where the early alignment flow started at each teacher direction ``w_k`` with the sign of
    ``a_k`` settles (K, d): the attractor that collects that unit's cluster."""
    W = np.asarray(teacher.directions)
    signs = np.sign(teacher.amplitudes)
    _, Z, _ = early_flow(teacher, W, signs, _alignment_time(teacher), n_save=2)
    return Z[-1] / np.linalg.norm(Z[-1], axis=-1, keepdims=True)


def check_teacher(teacher: Teacher, min_angle_deg: float = 20.0) -> np.ndarray:
    """Refuse (:class:`~saddle_escape.sim.errors.ParameterError`) a teacher whose units do not have
    their own basins: two teacher units of one sign whose early flows settle within `min_angle_deg`
    share one cluster of student units, so their two rays cannot form in two stages (the second
    would have to split off the first cluster instead of growing from eps). Returns the basins."""
    Z = basins(teacher)
    signs = np.sign(teacher.amplitudes)
    for i in range(len(Z)):
        for j in range(i):
            angle = math.degrees(math.acos(float(np.clip(Z[i] @ Z[j], -1, 1))))
            if signs[i] == signs[j] and angle < min_angle_deg:
                raise ParameterError(
                    "teacher_units", [[list(w), a] for w, a in zip(teacher.directions, teacher.amplitudes)],
                    f"must give every teacher unit its own basin of the early alignment flow: units {j} and {i} "
                    f"(same sign) both attract student units to one direction ({angle:.0f} degrees apart, "
                    f"need {min_angle_deg:g}); put units of one sign further apart or give them opposite signs")
    return Z


def unpopulated_basins(teacher: Teacher, theta0: torch.Tensor, model: TwoLayer, cos: float = 0.99) -> list[list[int]]:
    """For each run of `theta0` (B, P), the teacher units whose basin (:func:`basins`) no student
    unit of the right sign reaches under the early alignment flow: those rays have no cluster.
    Decided from the initial directions alone (the flow is eps-free), before any simulation."""
    Zb = basins(teacher)
    signs_t = np.sign(teacher.amplitudes)
    V, U = model.unflatten(theta0)
    B, H, d = U.shape
    u = U.reshape(B * H, d).numpy()
    signs = np.sign(V[..., 0].reshape(-1).numpy())
    # every unit of every run in one call: the units do not interact in this flow
    _, Z, _ = early_flow(teacher, u / np.linalg.norm(u, axis=1, keepdims=True), signs,
                         _alignment_time(teacher), n_save=2, rtol=1e-6)
    end = Z[-1].reshape(B, H, d)
    end = end / np.linalg.norm(end, axis=-1, keepdims=True)
    signs = signs.reshape(B, H)
    return [[k for k in range(teacher.size)
             if not any(signs[b, i] == signs_t[k] and end[b, i] @ Zb[k] > cos for i in range(H))]
            for b in range(B)]


def predicted_escape_time(teacher: Teacher, theta0_unit: torch.Tensor, model: TwoLayer, eps: float,
                          fraction: float = 0.01, rtol: float = 1e-9) -> dict:
    """The time at which the loss has fallen by `fraction` of its initial value, from the early flow.

    `theta0_unit` is one run's balanced initialisation at eps = 1 (:func:`balanced_init`); the run at
    `eps` starts at ``eps * theta0_unit``. To first order in ``f`` the loss is
    ``L0 - sum_i s_i r_i^2 G(z_i)``, so the predicted time solves
    ``eps^2 sum_i s_i r_i(0)^2 exp(2 ln r_i(t)/r_i(0)) G(z_i(t)) = fraction * L0``, located as an
    event of the early flow. Also returns the direction of the unit that carries most of that drop.
    """
    V, U = model.unflatten(theta0_unit[None])
    u = U[0]
    H, d = u.shape
    signs = torch.sign(V[0, :, 0])
    r0 = u.norm(dim=-1)
    target = fraction * 0.5 * teacher.energy()

    def terms(y):
        Z = y[:, :H * d].reshape(-1, H, d)
        Z = Z / Z.norm(dim=-1, keepdim=True)
        return eps ** 2 * signs * r0 ** 2 * torch.exp(2 * y[:, H * d:]) * teacher.correlation(Z), Z

    field = _early_field(teacher, H, d, signs)
    y0 = torch.cat([(u / r0[:, None]).reshape(-1), torch.zeros(H, dtype=DTYPE)])[None]
    g_star = max(float(np.sign(a) * teacher.correlation(torch.tensor(z)))
                 for z, a in zip(basins(teacher), teacher.amplitudes))
    t_max = 4.0 * (math.log(target / (eps ** 2 * float((r0 ** 2).sum()) * g_star)) / (2 * g_star) + 20.0 / g_star)
    drop = Event(lambda t, y, idx: terms(y)[0].sum(-1) - target, direction=1, name="drop")
    sol = solve(ODETerm(field), y0, t_max, controller=PIController(rtol=rtol, atol=rtol * 1e-2), events=[drop])
    t = float(sol.event_times[0, 0])
    if not math.isfinite(t):
        return dict(time=math.nan, direction=None)
    T, Z = terms(sol.event_states[0])
    lead = int(torch.argmax(T[0]))
    return dict(time=t, direction=tuple(Z[0, lead].tolist()))


# ------------------------------------------------------------------ what the chapter reports

def staircase_ok(summary: RunSummary, K: int) -> bool:
    """One saddle visit per stage, counts ``0, 1, ..., K`` in rays and in kink lines, and learned."""
    want = list(range(K + 1))
    return summary.learned and summary.ray_counts == want and summary.kink_counts == want


def plateau_gaps(teacher: Teacher, summary: RunSummary) -> list[dict]:
    """For each interior saddle visit (k = 1 .. K-1 rays): the loss there, the loss of the k-unit
    network's fixed point reached from the visited rays (:func:`narrow_fixed_point`), and their
    relative difference."""
    out = []
    for stage in summary.stages[1:-1]:
        fixed, fixed_rays = narrow_fixed_point(teacher, stage.rays)
        out.append(dict(k=len(stage.rays), loss=stage.loss, fixed=fixed, rays=fixed_rays,
                        rel=abs(stage.loss - fixed) / fixed))
    return out


def first_escape_check(tr: Trajectories, b: int) -> dict:
    """Run `b`'s measured first escape (time, and the direction of the ray carrying it) against
    :func:`predicted_escape_time` from its own initial directions; the angle in degrees."""
    problem = tr.problem
    pred = predicted_escape_time(problem.teacher, tr.thetas[b, 0] / float(tr.eps[b]), problem.model, float(tr.eps[b]))
    V, U = problem.model.unflatten(tr.escape_state[b][None])
    s = (V[0, :, 0] * U[0].norm(dim=-1)).abs()
    lead = U[0, int(torch.argmax(s))]
    z = (lead / lead.norm()).numpy()
    angle = math.degrees(math.acos(float(np.clip(z @ np.asarray(pred["direction"]), -1, 1))))
    return dict(measured=float(tr.escape_time[b]), predicted=pred["time"], angle_deg=angle)


def sky(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directions ``Z (..., d)`` as (azimuth, polar angle in degrees) in the axes ``e_1, e_2, e_3``:
    azimuth in the ``(e_1, e_2)`` plane, polar angle from ``e_3`` (90 on the plane; for d = 2 every
    direction is on it; for d > 3 the other axes are left out, the direction renormalised)."""
    Z = np.asarray(Z, dtype=float)
    if Z.shape[-1] == 2:
        Z = np.concatenate([Z, np.zeros(Z.shape[:-1] + (1,))], -1)
    Z = Z[..., :3] / np.linalg.norm(Z[..., :3], axis=-1, keepdims=True).clip(1e-300)
    return np.arctan2(Z[..., 1], Z[..., 0]), np.degrees(np.arccos(np.clip(Z[..., 2], -1, 1)))


def on_great_circle(problem: SphereProblem, theta: torch.Tensor, n_grid: int = 720) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The angle grid, the network's function (B, n) and the teacher's (n,) along the first of
    :func:`great_circles`: what :func:`kink_lines` counts on."""
    phi, circle = counts.circle_inputs(n_grid)
    x = circle @ great_circles(problem.inputs.dim)[0]
    return phi.numpy(), problem.model.forward(theta, x)[..., 0].numpy(), problem.teacher(x)[:, 0].numpy()


def sampled_loss_gap(problem: SphereProblem, theta: torch.Tensor, n_samples: int, seed: int) -> tuple[float, float]:
    """The closed-form loss against its average over `n_samples` inputs drawn uniformly on the
    sphere (patches independent): the relative difference and the sample's relative standard error."""
    g = torch.Generator().manual_seed(seed)
    d, P = problem.inputs.dim, problem.inputs.patches
    x = torch.randn(n_samples, P, d, generator=g, dtype=DTYPE)
    x = x / x.norm(dim=-1, keepdim=True)
    V, U = problem.model.unflatten(theta)
    f = (torch.relu(torch.einsum("npd,bhd->bnph", x, U)).mean(-2) * V[..., 0][:, None]).sum(-1)   # (B, n)
    W, a = problem.teacher.W(), problem.teacher.a()
    y = (torch.relu(torch.einsum("npd,kd->npk", x, W)).mean(-2) * a).sum(-1)                    # (n,)
    sq = 0.5 * (y - f) ** 2
    exact = problem.loss(theta)
    mean = sq.mean(-1)
    return float(((mean - exact).abs() / exact).max()), float((sq.std(-1) / math.sqrt(n_samples) / exact).max())
