"""Chapter 08's experiments: embedded fixed points, invariant manifolds and the kind of saddle.

For each unit type: a teacher of the same family (width H + 1, output scaled to unit RMS) on
whitened Gaussian inputs (sample covariance exactly I), or in-context linear regression for
attention; the width-(H-1) student is converged to a fixed point (:func:`~saddle_escape.sim.embedding.fixed_points`) and embedded in width H by every construction of Theorem 1; the
manifolds of Theorem 3 are probed at random points on them and along trajectories; the width-1
optimum embedded in width 2 is classified by its Hessian.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sim import embedding as em
from ..sim import fits, units as un
from ..sim.data import DTYPE, Dataset, gaussian_samples
from ..sim.errors import ParameterError
from ..sim.integrate import Dopri5, PIController, SaveAt, solve
from ..sim.twolayer import UNITS, TwoLayer, incontext_regression

CONTEXT_LENGTH = 8          # tokens per in-context regression sequence (attention)
REFLECTED = "reflected"     # the proportional construction with gamma_u < 0
VARIANTS = em.CONSTRUCTIONS + (REFLECTED,)


@dataclass
class Problem:
    """One unit type's student (width H - 1) and its training set."""

    unit: str
    model: TwoLayer
    data: Dataset
    properties: un.UnitProperties
    teacher_matrix: torch.Tensor | None   # linear FC only: Sigma_yx (= the teacher, inputs whitened)


def whitened_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian samples centred and whitened so that ``E[x x^T] = I`` exactly on the set."""
    if n < 2 * d + 2:
        raise ParameterError("n_samples", n, f"must be at least 2 input_dim + 2 = {2 * d + 2}")
    x = gaussian_samples(n, d, seed)
    x = x - x.mean(0)
    return x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / n)).T


def problem(unit: str, width: int, input_dim: int, n_samples: int, seed: int, output_dim: int = 3) -> Problem:
    """The student of width ``width - 1`` and the data for unit type `unit`."""
    if width < 2:
        raise ParameterError("width", width, "must be at least 2 (the fixed point lives at width - 1)")
    props = un.properties(unit, input_dim=max(input_dim, 3))
    w = torch.full((n_samples,), 1.0 / n_samples, dtype=DTYPE)
    if UNITS[unit].form == "attention":
        model = TwoLayer.build(unit, input_dim, width - 1, 1)
        return Problem(unit, model, incontext_regression(n_samples, input_dim, CONTEXT_LENGTH, seed), props, None)
    kernel = min(3, input_dim) if UNITS[unit].form == "conv" else None
    model = TwoLayer.build(unit, input_dim, width - 1, output_dim, kernel=kernel)
    x = whitened_inputs(n_samples, input_dim, seed)
    teacher = em.wider(model, 2)
    y = teacher.forward(teacher.init(1.0, [10_000 + seed]), x)[0]
    y = y / y.pow(2).sum(-1).mean().sqrt()
    T = (y.T @ x / n_samples) if unit == "linear" else None
    return Problem(unit, model, Dataset(x, y, w), props, T)


def allowed(props: un.UnitProperties, kind: str) -> bool:
    """Whether phi allows construction (or manifold) `kind`."""
    if kind == REFLECTED:
        return props.homogeneous
    return {"split": True, "equal": True, "zero": props.has_zero, "proportional": props.positively_homogeneous,
            "combination": props.linear}[kind]


# ------------------------------------------------------------------ Theorem 1

def embeddings(p: Problem, n_points: int, seed: int) -> tuple[list[dict], torch.Tensor, int]:
    """Every construction applied to `n_points` fixed points of the width-(H-1) student.

    Returns one row per construction (largest relative map change and relative gradient over the
    points), the fixed points and the number of seeds tried to find them.
    """
    theta, tried = em.fixed_points(p.model, p.data, n_points, seed)
    rows = []
    for kind in VARIANTS:
        if kind == REFLECTED:
            wide, th = em.embed(p.model, theta, "proportional", gamma_u=-0.6, gamma_v=0.5)
        else:
            wide, th = em.embed(p.model, theta, kind)
        rows.append(dict(unit=p.unit, kind=kind, allowed=allowed(p.properties, kind),
                         same_map=float(em.map_difference(p.model, theta, wide, th, p.data.x).max()),
                         gradient=float(em.relative_gradient(wide, th, p.data).max()),
                         narrow_gradient=float(em.relative_gradient(p.model, theta, p.data).max())))
    return rows, theta, tried


# ------------------------------------------------------------------ Theorem 3

def tangency(p: Problem, n_points: int, seed: int) -> list[dict]:
    """Normal component of the vector field at random points on each manifold (width H), also
    for the manifolds phi does not allow (where it must be visibly non-zero)."""
    wide = em.wider(p.model)
    theta = wide.init(0.5, [2000 * seed + k for k in range(n_points)])
    rows = []
    for kind in em.MANIFOLDS:
        on = em.on_manifold(wide, theta, kind)
        rows.append(dict(unit=p.unit, kind=kind, allowed=allowed(p.properties, kind),
                         normal=float(em.normal_component(wide, on, p.data, kind).max())))
    return rows


@dataclass
class Trajectories:
    """Runs started on each allowed manifold, and one started at the split fixed point + round-off."""

    kinds: list[str]
    keep_ts: np.ndarray
    distances: np.ndarray          # (len(kinds), T): relative distance from the run's manifold
    ts: np.ndarray
    split_distance: np.ndarray     # (T,): relative distance from the equal-unit manifold
    rate_derived: float            # -lambda_min of the residual curvature of the split unit
    repels: bool
    rate_measured: float
    window: tuple
    seconds: float


KEEP_HORIZON = 3.0   # on-manifold runs last KEEP_HORIZON / lambda_max(Hessian at the start)
DELTA0 = 1e-10       # relative push off the equal-unit manifold at the split fixed point
WINDOW = (1e-8, 1e-5)  # relative distances on which the growth rate is fitted


def trajectories(p: Problem, fixed_point: torch.Tensor, seed: int, delta0: float = DELTA0,
                 window=WINDOW, n_save: int = 60) -> Trajectories:
    """Integrate gradient flow (width H) from a random point on every allowed manifold, and from the
    split embedding (gamma = 1/2) of `fixed_point` (1, P) with the copied unit and its copy pushed
    apart by `delta0` (relative); measure the growth rate of the split run's distance on `window`.
    The copied unit is the one with the largest derived rate (the shortest run).

    The on-manifold runs last ``KEEP_HORIZON / lambda_max``: long enough for the fastest mode to
    relax, short enough that round-off cannot grow past ``e^KEEP_HORIZON`` times itself even
    where the manifold repels (no rate exceeds lambda_max). The split pair's difference obeys
    ``d/dt delta = -K delta`` with ``K`` the residual curvature of one copy
    (:func:`~saddle_escape.sim.embedding.residual_curvature`); the manifold repels when ``K``
    has a negative eigenvalue, at the rate ``-lambda_min(K)``.
    """
    # split the unit whose copy is pushed away fastest (the shortest run to measure)
    rates = []
    for i in range(p.model.width):
        wide, split = em.embed(p.model, fixed_point, "split", unit=i, gamma=0.5)
        rates.append(float(-torch.linalg.eigvalsh(em.residual_curvature(wide, split, p.data, i)[0])[0]))
    unit = int(np.argmax(rates))
    wide, split = em.embed(p.model, fixed_point, "split", unit=unit, gamma=0.5)
    flow = wide.flow(p.data)
    ctrl = PIController(rtol=1e-8, atol=1e-12)
    # runs on each allowed manifold
    kinds = [k for k in em.MANIFOLDS if allowed(p.properties, k)]
    start = wide.init(0.5, [3000 * seed + 1])
    y0 = torch.cat([em.on_manifold(wide, start, k) for k in kinds])
    lam_max = float(torch.linalg.eigvalsh(wide.hessian(y0[:1], p.data)).abs().max())
    t_keep = KEEP_HORIZON / lam_max
    keep = solve(flow, y0, t_keep, solver=Dopri5(), controller=ctrl,
                 saveat=SaveAt(ts=torch.linspace(0.0, t_keep, 20, dtype=DTYPE),
                               fn=lambda y: _all_distances(wide, y, kinds)))
    dist = torch.stack([keep.ys[i, :, i] for i in range(len(kinds))]).numpy()
    # the split fixed point pushed off the equal-unit manifold
    K = em.residual_curvature(wide, split, p.data, unit)[0]
    block = em.unit_block(wide, wide.hessian(split, p.data), unit)[0]
    rate = float(-torch.linalg.eigvalsh(K)[0])
    repels = rate > 1e-3 * float(torch.linalg.eigvalsh(block).abs().max())
    rows = em.unit_params(wide, split).clone()
    xi = torch.randn(rows.shape[-1], generator=torch.Generator().manual_seed(4000 + seed), dtype=DTYPE)
    xi = xi / xi.norm() * delta0 * rows[0, unit].norm()
    rows[0, unit] += xi
    rows[0, -1] -= xi
    t1 = (math.log(window[1] / delta0) + 1.0) / rate if repels else 10.0 / lam_max
    ts = torch.linspace(0.0, t1, n_save, dtype=DTYPE)
    sol = solve(flow, em.from_unit_params(wide, rows), t1, solver=Dopri5(), controller=ctrl,
                saveat=SaveAt(ts=ts, fn=lambda y: _split_distance(wide, y, unit)))
    d = sol.ys[0, :, 0].numpy()
    tt = ts.numpy()
    measured = float("nan")
    if repels:
        inside = (d >= window[0]) & (d <= window[1])
        if inside.sum() >= 3:
            measured = fits.linear_fit(tt[inside], np.log(d[inside]))[0]
    return Trajectories(kinds, keep.ts.numpy() if keep.ts is not None else np.linspace(0, t_keep, 20), dist,
                        tt, d, rate, repels, measured, window, keep.seconds + sol.seconds)


def _split_distance(model: TwoLayer, y: torch.Tensor, unit: int) -> torch.Tensor:
    """Relative distance of the last unit from unit `unit` (the equal-unit relation): (B, 1)."""
    rows = em.unit_params(model, y)
    gap = (rows[:, -1] - rows[:, unit]).norm(dim=-1)
    return (gap / (rows[:, -1].norm(dim=-1) + rows[:, unit].norm(dim=-1))).unsqueeze(-1)


def _all_distances(model: TwoLayer, y: torch.Tensor, relation: list[str]) -> torch.Tensor:
    """Every run's distance from every relation (the saver hands over subsets of runs): (B, len(relation))."""
    return torch.stack([em.distance(model, y, k) for k in relation], dim=-1)


# ------------------------------------------------------------------ the saddle at width 1 -> 2

SADDLE_GAMMA_U = 1e-4   # type II: the proportional copy u_2 = gamma_u u*, v_2 = 0 (a ray, kept small)


@dataclass
class Saddle:
    unit: str
    unit_type: str
    construction: str
    eigenvalues: np.ndarray        # of the width-2 Hessian
    derived_min: float             # lambda_min of the new unit's residual curvature (-sigma_1(M))
    teacher_s2: float | None       # linear FC: the teacher's second singular value
    new_block: float               # largest |entry| of the new unit's Hessian block / largest |eigenvalue|
    narrow_min: float              # lambda_min / lambda_max of the width-1 Hessian (>= 0: a minimum)
    order: int                     # leading order p of phi in u
    ts: np.ndarray                 # step sizes along the escape direction
    drops: np.ndarray              # L(theta + t d) - L(theta) along it
    escape_exponent: float
    escape_coefficient: float      # measured -dL / t^(p+1) at the smallest t (type III)
    derived_coefficient: float     # ||E[r phi_p]|| (type III)


ESCAPE_TS = np.logspace(-3.0, -1.5, 7)


def saddle(p: Problem, seed: int) -> Saddle:
    """Embed the width-1 optimum in width 2 by the construction the paper says learning visits
    (zero unit for types I and III and for tanh; a small proportional copy with ``v = 0`` for
    type II) and measure the Hessian there and the loss along the escape direction."""
    narrow = TwoLayer.build(p.unit, p.model.input_dim, 1, p.model.output_dim, kernel=p.model.kernel,
                            stride=p.model.stride)
    theta, _ = em.fixed_points(narrow, p.data, 1, seed)
    Hn = torch.linalg.eigvalsh(narrow.hessian(theta, p.data))[0]
    typ = p.properties.unit_type
    if typ == "II":
        construction = "proportional"
        wide, th = em.embed(narrow, theta, "proportional", gamma_u=SADDLE_GAMMA_U, gamma_v=0.0)
    else:
        construction = "zero"
        wide, th = em.embed(narrow, theta, "zero")
    H = wide.hessian(th, p.data)[0]
    lam, Q = torch.linalg.eigh(H)
    K = em.residual_curvature(wide, th, p.data, 1)[0]
    derived = float(torch.linalg.eigvalsh(K)[0])
    block = float(em.unit_block(wide, H.unsqueeze(0), 1).abs().max() / lam.abs().max())
    s2 = None
    if p.teacher_matrix is not None:    # one output: a single singular value, s2 = 0
        sv = torch.linalg.svdvals(p.teacher_matrix)
        s2 = float(sv[1]) if len(sv) > 1 else 0.0
    order = p.properties.leading_order
    ts = torch.as_tensor(ESCAPE_TS, dtype=DTYPE)
    L0 = wide.loss(th, p.data)
    if typ == "III":
        direction, coef = _type3_direction(wide, th, p, order, seed)
        power = order + 1
    else:
        direction, coef, power = Q[:, 0], float("nan"), 2
    drops = (wide.loss(th + ts[:, None] * direction, p.data) - L0).numpy()
    fit = fits.power_law(ESCAPE_TS, -drops) if bool((drops < 0).all()) else None
    return Saddle(p.unit, typ, construction, lam.numpy(), derived, s2, block, float(Hn[0] / Hn[-1]), order,
                  ESCAPE_TS, drops, fit.slope if fit else float("nan"),
                  float(-drops[0] / ESCAPE_TS[0] ** power), coef)


def _type3_direction(wide: TwoLayer, theta: torch.Tensor, p: Problem, order: int, seed: int, candidates: int = 64):
    """The new unit's escape direction: of `candidates` random unit vectors ``u``, the one with the
    largest ``||G||``, ``G = E[r phi_p(x; u)]``, and ``v`` along ``G`` (the loss drops as
    ``-(t/sqrt 2)^(p+1) ||G||`` along ``t (v, u) / sqrt 2``); returns it (P,) and ``||G|| / sqrt 2^(p+1)``.

    The largest ``||G||`` keeps the ``O(t^(2p+2))`` remainder small next to the leading term.
    """
    u = torch.randn(candidates, wide.u_dim, generator=torch.Generator().manual_seed(5000 + seed), dtype=DTYPE)
    u = u / u.norm(dim=-1, keepdim=True)
    phi_p = em.leading_part(wide, u, p.data.x, order)                    # (C, n, positions)
    r = p.data.y - wide.forward(theta, p.data.x)[0]                      # (n, m)
    G = torch.einsum("cnj,nm,n->cjm", phi_p, r, p.data.w)                # (C, positions, m)
    best = int(G.flatten(1).norm(dim=-1).argmax())
    G = G[best]
    V = torch.zeros(1, wide.width, *wide.v_shape, dtype=DTYPE)
    U = torch.zeros(1, wide.width, wide.u_dim, dtype=DTYPE)
    V[0, -1] = (G / G.norm()).reshape(wide.v_shape)
    U[0, -1] = u[best]
    d = wide.flatten(V, U)[0]
    return d / d.norm(), float(G.norm() / d.norm() ** (order + 1))
