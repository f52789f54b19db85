"""The critical-depth law on the scalar chain: bottleneck sweeps, the leading-order rate, windows.

Setup (chapter 05): the reduced chain of :mod:`saddle_escape.sim.reduced`, the *first* ``r`` layers at
scale ``eps`` (input side, so every pre-activation is small near the saddle) and the other
``L - r`` at ``big``. Near the saddle each bottleneck scale obeys ``dy/dt = a y^(r-1)`` with

    a = E[y* g] * beta1^(L-1) * big^(L-r)          (smooth sigma with sigma(0) = 0),

computed here for any activation of classes A-C from the chain itself (:func:`leading_rate`).
Escape times at very small ``eps`` (t ~ 1e15 for r = 5) exceed what a float64 clock can resolve
during the O(1)-long escape itself, so :func:`sweeps` integrates in two legs: the saddle phase up
to a hand-off scale, then -- with the clock restarted -- the escape; the two times are added.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..sim import activations, escape, fits
from ..sim.data import ScalarTeacher
from ..sim.integrate import Event, GradientFlow, PIController, solve
from ..sim.errors import ParameterError
from ..sim.reduced import ScalarChain, bottleneck_scales

COVERED_CLASSES = ("A", "B", "C")


def check_activation(name):
    """The activation, or a :class:`~saddle_escape.sim.errors.ParameterError` for class D (sigma(0) != 0 has no saddle at 0)."""
    act = activations.get(name)
    if act.cls not in COVERED_CLASSES:
        raise ParameterError("activation", name, f"it is class {act.cls} (sigma(0) = {act.sigma0:.3g} != 0) and the "
                             "critical-depth law assumes sigma(0) = 0; allowed: activations of classes A-C "
                             "(linear, relu, tanh, sin, erf, gelu, swish, quadratic, ...)")
    return act


#: Bottleneck sizes each activation runs, where it is not every r. The quadratic sigma(z) = z + z^2/2
#: at r >= 4: after the drop its chain never settles -- the loss creeps down like t^-0.75 while
#: X_1 -> 0 and the outer layers grow -- and the flow stiffens (a pilot from eps = 0.3, r = L = 4,
#: needs > 3000 Dopri5 steps between t = 60 and 100; at r = L = 5 it takes 156 s to reach ten times its
#: drop time), so the post-escape reference is not defined (measured December 2026). r <= 3: 8
#: configurations, 9 eps each, in 12 s.
MAX_R = {"quadratic": 3}


def default_r_values(act, quick: bool) -> list[int]:
    """The profile's r values (1..3 quick, 1..5 full), capped by :data:`MAX_R` for ``act``."""
    return [r for r in ([1, 2, 3] if quick else [1, 2, 3, 4, 5]) if r <= MAX_R.get(act.name, r)]


def check_r_values(act, r_values) -> list[int]:
    """``r_values``, or a :class:`~saddle_escape.sim.errors.ParameterError` naming the cap of :data:`MAX_R` and its reason."""
    hi = MAX_R.get(act.name)
    if hi is not None and max(r_values) > hi:
        raise ParameterError("r_values", list(r_values), f"must be <= {hi} with the {act.name} activation: for r >= "
                             f"{hi + 1} its chain never settles after the escape (the loss creeps like t^-0.75 and the "
                             "flow stiffens), so the post-escape reference is undefined (see critical_depth.MAX_R)")
    return r_values


def configurations(r_values, depth_offsets) -> list[tuple[int, int]]:
    """The (r, L = r + offset) pairs, keeping L >= 2 (a depth-1 chain has no activation)."""
    pairs = [(r, r + o) for r in r_values for o in depth_offsets if r + o >= 2]
    if not pairs:
        raise ParameterError("depth_offsets", list(depth_offsets), "must give at least one depth L = r + offset >= 2")
    return pairs


class ChainFlow(GradientFlow):
    """The chain's gradient flow with a hand-written backward pass (MSE only): same vector field
    as ``chain.term()`` to round-off, a few times cheaper than autograd on these tiny tensors."""

    def __init__(self, chain: ScalarChain):
        if chain.loss_name != "mse":
            raise ParameterError("loss", chain.loss_name, "ChainFlow is written for 'mse'")
        self.chain = chain
        super().__init__(chain.loss, neg_grad_and_loss=self._analytic)

    def _analytic(self, X):
        """``(-grad L, L)``; the MSE loss comes free with the residuals, so events reuse it."""
        c = self.chain
        dsigma = c.activation.dfn
        rootN = math.sqrt(c.width)
        zs, us, yhat = c.forward(X)
        resid = yhat - c.y[None, :]
        delta = resid * c.w[None, :]
        grad = torch.empty_like(X)
        grad[:, -1] = rootN * (delta * us[-1]).sum(-1)
        G = delta * (rootN * X[:, -1:])
        for l in range(c.depth - 2, -1, -1):
            gz = G * dsigma(zs[l])
            grad[:, l] = (gz * us[l]).sum(-1)
            G = gz * X[:, l:l + 1]
        return -grad, 0.5 * (resid * delta).sum(-1)


def bottleneck_norm(r: int):
    """``||(X_1, ..., X_r)||``: the norm of the bottleneck block (the input-side layers)."""
    return lambda X: X[:, :r].norm(dim=-1)


def initial_scales(depth, r, eps, big=1.0):
    return bottleneck_scales(depth, r, eps, big=big, layers=range(1, r + 1))


def leading_rate(chain: ScalarChain, r: int, big: float = 1.0, delta: float = 1e-4) -> float:
    """``a`` in ``dy/dt = a y^(r-1)``: ``-dL/dX_1 / delta^(r-1)`` at the balanced point of scale
    ``delta``, Richardson-extrapolated to ``delta -> 0`` (removes the O(delta) and O(delta^2) terms)."""
    def rate(d):
        X = initial_scales(chain.depth, r, [d], big).requires_grad_(True)
        (g,) = torch.autograd.grad(chain.loss(X).sum(), X)
        return -g[0, 0].item() / d ** (r - 1)
    return (8 * rate(delta / 4) - 6 * rate(delta / 2) + rate(delta)) / 3


def closed_form_rate(activation, teacher: ScalarTeacher, depth: int, r: int, big: float = 1.0) -> float | None:
    """``E[y* g] beta1^(L-1) big^(L-r)`` for smooth sigma (None where sigma has a kink at 0)."""
    act = activations.get(activation)
    if not act.smooth:
        return None
    return teacher.linear * act.beta1 ** (depth - 1) * big ** (depth - r)


def integral_T(eps, r: int):
    """``T_r(eps) = int_eps^1 y^(1-r) dy``: the bottleneck-ODE time with a = 1."""
    eps = np.asarray(eps, float)
    if r == 2:
        return np.log(1 / eps)
    return (eps ** (2 - r) - 1) / (r - 2)


def log_correction(activation, teacher: ScalarTeacher, depth: int, r: int, big: float = 1.0) -> float | None:
    """Predicted coefficient B of ``log(1/eps)`` in t_esc for r = 4, odd smooth sigma (classes A, B).

    Next order of the bottleneck ODE: ``dy/dt = a y^(r-1) (1 + lam y^2)`` with
    ``lam = 3 kappa / 2 + (L - r) / (2 big^2)``, ``kappa = (s3 / beta1) E[y* g^3] / E[y* g]``: the
    first layer's cubic term (and the imbalance it drives) plus the Theta(1) layers growing in
    balance. Integrating, ``t = eps^-2 / (2a) - (lam / a) log(1/eps) + C`` at r = 4."""
    act = activations.get(activation)
    if not act.smooth or act.cls == "C" or r != 4 or teacher.linear == 0:
        return None
    b1, s3 = act.beta1, float(act.sigma_coefficients[3])
    m1, m3 = teacher.linear, 3 * teacher.linear + math.sqrt(6) * teacher.cubic
    kappa = s3 / b1 * m3 / m1
    lam = 1.5 * kappa + (depth - r) / (2 * big ** 2)
    return -lam / closed_form_rate(act, teacher, depth, r, big)


@dataclass
class Sweep:
    """Escape times of one (r, L) over all eps: ``times`` (B, 2) for the loss and norm definitions,
    ``inf`` where censored (no escape before ``t_max``). ``batch_grad_evals`` and ``batch_seconds``
    belong to the batched integration of depth L that this sweep shared with the other r of that
    depth (:func:`sweeps`): count them once per depth."""

    r: int
    depth: int
    eps: np.ndarray
    times: np.ndarray
    t_max: np.ndarray
    rate: float
    reference: escape.Reference
    batch_grad_evals: int
    batch_seconds: float

    @property
    def censored(self) -> np.ndarray:
        return ~np.isfinite(self.times).all(1)


def handoff_ratio(r: int) -> float:
    """How far one leg of :func:`sweeps`' saddle phase may grow the bottleneck scale: by at most
    this factor, so that the flow's local time scale at the leg's end, ``1/(a y^(r-2))``, stays
    above 1e-8 of the time the leg took (``~ 1/((r-2) a y0^(r-2))``). A longer leg outruns its
    float64 clock: ``t + h == t`` for the steps the flow needs, and the step size collapses."""
    return math.inf if r <= 2 else ((r - 2) * 1e8) ** (1.0 / (r - 2))


def sweep(activation, r: int, depth: int, eps, teacher: ScalarTeacher, big: float = 1.0,
          reference: escape.Reference | None = None, **options) -> Sweep:
    """One (r, L) of :func:`sweeps`; ``reference`` reuses an earlier pilot's post-escape values."""
    refs = None if reference is None else {(r, depth): reference}
    return sweeps(activation, [(r, depth)], eps, teacher, big, references=refs, **options)[r, depth]


def sweeps(activation, configs, eps, teacher: ScalarTeacher, big: float = 1.0,
           pilot_eps: float | None = None, handoff: float = 0.05, t_max_factor: float = 20.0,
           rtol: float = 1e-9, atol: float = 1e-14, n_nodes: int = 80,
           references: dict | None = None, map=map) -> dict[tuple[int, int], Sweep]:
    """Escape times of every (r, L) in ``configs`` over ``eps``.

    One pilot per (r, L) (post-escape reference at ``pilot_eps``) unless ``references`` has it;
    then, per depth L, **one** batched integration of every run of that depth: all its r and eps
    share the chain, so its parameter count (an integration runs as long as its slowest run and
    pays the dispatch cost per step, not per run).
    The saddle phase runs until the bottleneck RMS scale reaches ``handoff``, in as many legs as
    the float64 clock needs (:func:`handoff_ratio`); the last leg restarts the clock there and
    detects the escape events (thresholds from the original initial loss). Runs get ``t_max =
    t_max_factor * (T_r(eps)/a + reference time)``.

    ``map`` runs the depths' batches (independent tasks): the builtin in this process, or a
    chapter's ``book.task_map()`` on a cluster, with identical numbers."""
    eps = np.asarray(eps, float)
    by_depth: dict[int, list[int]] = {}
    for r, depth in configs:
        by_depth.setdefault(depth, []).append(r)
    task = functools.partial(_depth_batch, getattr(activation, "name", activation), eps=eps, teacher=teacher,
                             big=big, pilot_eps=pilot_eps, handoff=handoff, t_max_factor=t_max_factor,
                             rtol=rtol, atol=atol, n_nodes=n_nodes, references=references or {})
    out = {}
    for batch in map(task, list(by_depth.items())):
        out.update(batch)
    return {c: out[c] for c in configs}


def _depth_batch(activation, depth_rs, *, eps, teacher, big, pilot_eps, handoff, t_max_factor, rtol, atol,
                 n_nodes, references) -> dict[tuple[int, int], Sweep]:
    """All runs of one depth (``depth_rs = (L, [r, ...])``), one batched integration; a task of :func:`sweeps`."""
    depth, rs = depth_rs
    start = time.perf_counter()
    chain = ScalarChain(activation, depth, teacher, n_nodes=n_nodes)
    term = ChainFlow(chain)
    rates, refs, X0, t_max = [], [], [], []
    for r in rs:
        a = leading_rate(chain, r, big)
        if not a > 0:
            raise ParameterError("activation", chain.activation.name,
                                 f"gives no escape direction here (leading rate a = {a:.3g} <= 0)")
        p_eps = pilot_eps if pilot_eps is not None else (0.3 if r >= 2 else 0.1)  # r = 1 has no plateau
        pilot = initial_scales(depth, r, [max(p_eps, float(np.max(eps)))], big)
        t_guess = float(integral_T(p_eps, r) / a) + 10.0
        # the pilot at the sweep's tolerance (a looser sweep gets a cheaper pilot: at 1e-7 its reference
        # moves by 1e-9 relative), never tighter than the 1e-9 that already puts it at round-off
        ref = references.get((r, depth)) or escape.post_escape_reference(
            term, pilot, bottleneck_norm(r), t_max=1e3 * t_guess, rtol=max(rtol, 1e-9), atol=max(atol, 1e-12))
        rates.append(a)
        refs.append(ref)
        X0.append(initial_scales(depth, r, eps, big))
        t_max.append(t_max_factor * (np.maximum(integral_T(eps, r), 0) / a + ref.time))
    n = len(eps)
    X0 = torch.cat(X0)
    t_max_t = torch.as_tensor(np.concatenate(t_max), dtype=X0.dtype)
    r_row = torch.as_tensor(np.repeat(rs, n), dtype=X0.dtype)
    in_block = (torch.arange(depth, dtype=X0.dtype)[None, :] < r_row[:, None]).to(X0.dtype)
    nf = escape.per_run(lambda y, runs: (y * y * in_block[runs]).sum(-1).sqrt())   # ||(X_1..X_r)|| per row
    rms = lambda y, runs: nf(y, runs) / r_row[runs].sqrt()
    ratio = torch.as_tensor([handoff_ratio(r) for r in rs], dtype=X0.dtype).repeat_interleave(n)
    ctrl = PIController(rtol=rtol, atol=atol)

    # the saddle phase, up to the hand-off scale, in legs that each restart the clock
    t1 = torch.zeros(len(X0), dtype=X0.dtype)
    X1 = X0.clone()
    going = torch.as_tensor(np.tile(eps, len(rs)) < handoff)
    while going.any():
        idx = going.nonzero().squeeze(1)
        goal = torch.clamp(rms(X1[idx], idx) * ratio[idx], max=handoff)
        leg = Event(lambda t, y, runs, idx=idx, goal=goal: goal[runs] - rms(y, idx[runs]), -1, terminal=True)
        s1 = solve(term, X1[idx], torch.clamp(t_max_t[idx] - t1[idx], min=1e-12), controller=ctrl, events=[leg])
        reached = torch.isfinite(s1.event_times[:, 0])
        t1[idx] += torch.where(reached, s1.event_times[:, 0], s1.t_final)
        X1[idx] = s1.y_final
        going[idx] = reached & (goal < handoff)
    # the escape, clock restarted; thresholds from the original L(0) and each row's pilot
    per_row = escape.Reference(loss=torch.as_tensor([f.loss for f in refs], dtype=X0.dtype).repeat_interleave(n),
                               norm=torch.as_tensor([f.norm for f in refs], dtype=X0.dtype).repeat_interleave(n),
                               time=math.nan)
    res = escape.escape_times(term, X1, torch.clamp(t_max_t - t1, min=1e-12), per_row, nf, rtol=rtol, atol=atol,
                              origin=X0)
    times = (res.times + t1[:, None]).numpy()
    seconds = time.perf_counter() - start
    return {(r, depth): Sweep(r, depth, eps, times[k * n:(k + 1) * n], t_max[k], rates[k], refs[k],
                              term.run_evals, seconds)
            for k, r in enumerate(rs)}


def stable_window(x, local, tol: float, relative: bool = False, min_points: int = 3) -> np.ndarray:
    """Mask of the asymptotic window: starting from the smallest x, keep points while the local
    slope (``local[i]`` between points i and i+1, x sorted ascending) stays within ``tol``
    (absolute, or relative) of the local slope at the smallest x; at least ``min_points``."""
    x = np.asarray(x, float)
    order = np.argsort(x)
    loc = np.asarray(local, float)
    ref = loc[0]
    n = 1
    for s in loc:
        dev = abs(s - ref) / (abs(ref) if relative else 1.0)
        if not (np.isfinite(s) and dev <= tol):
            break
        n += 1
    n = max(n, min(min_points, len(x)))
    mask = np.zeros(len(x), bool)
    mask[order[:n]] = True
    return mask


def sorted_local_slopes(eps, t, log_law: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """eps ascending and the local slopes between neighbours: d log t / d log eps, or for the
    log law dt / d log(1/eps)."""
    o = np.argsort(eps)
    e, tt = np.asarray(eps, float)[o], np.asarray(t, float)[o]
    if log_law:
        return e, np.diff(tt) / np.diff(np.log(1 / e))
    return e, fits.local_slopes(e, tt)


# ------------------------------------------------------------------ the chapter's measurements

SLOPE_TOL = 0.005     # power-law window: local slopes within this of the smallest-eps one
LOGLAW_DECADES = 3.0  # r = 2: the log law is fitted on the smallest three decades of eps, fixed in
                      # advance (a window grown while the points stay straight would make R² ~ 1 by choice)
DEPTH_EPS_MAX = 1e-2  # depth check: the ratio t(L)/t(L_min) is fitted on every eps up to this


def window(s: Sweep, definition: int = 0) -> np.ndarray:
    """Asymptotic window (mask over ``s.eps``) by the rule of the chapter: r >= 3 the power-law
    local-slope stability rule, r = 2 the smallest three decades, r = 1 the last two decades."""
    ok = np.isfinite(s.times[:, definition])
    eps, t = s.eps[ok], s.times[ok, definition]
    mask = np.zeros(len(s.eps), bool)
    if s.r <= 2:
        sub = eps <= (100 if s.r == 1 else 10 ** LOGLAW_DECADES) * eps.min() * (1 + 1e-9)
        if sub.sum() < 3:
            sub = np.ones_like(sub)
    else:
        e, loc = sorted_local_slopes(eps, t)
        sub = stable_window(eps, loc, SLOPE_TOL)
    mask[np.flatnonzero(ok)[sub]] = True
    return mask


def measure(s: Sweep, mask: np.ndarray | None = None) -> dict:
    """The law's numbers for one sweep, per definition (0 = loss, 1 = norm), on the window."""
    mask = window(s) if mask is None else mask
    out = {"window": (float(s.eps[mask].min()), float(s.eps[mask].max())), "n_window": int(mask.sum())}
    for j, d in enumerate(("loss", "norm")):
        e, t = s.eps[mask], s.times[mask, j]
        p = fits.power_law(e, t)
        out[f"exponent_{d}"] = p.slope
        if s.r == 2:
            f = fits.log_law(e, t)
            out[f"logslope_{d}"], out[f"r2_{d}"] = f.slope, f.r2
        if s.r == 1:
            lo = np.argmin(e)
            hi = np.argmin(np.abs(np.log(e) - np.log(min(100 * e.min(), e.max()))))
            out[f"change_{d}"] = abs(t[lo] - t[hi]) / t[lo]
    return out


def depth_limit(sweeps: list[Sweep], eps_max: float = DEPTH_EPS_MAX) -> list[dict]:
    """Does the depth enter only through the leading rate ``a``? For one r >= 3 and several depths,
    the ratio ``t(L)/t(L_min)`` approaches ``a(L_min)/a(L)`` as ``R_inf + c eps^(r-2)`` (eq.
    ch05-closed-form: the O(1) offsets C_L decay relative to the leading term like eps^(r-2)).
    Fitted by least squares in ``x = eps^(r-2)`` on every eps <= ``eps_max`` (fixed in advance);
    one dict per depth L > L_min: fitted ``R_inf`` with its CI, the predicted ratio, the window."""
    base = min(sweeps, key=lambda s: s.depth)
    r = base.r
    if r < 3:
        raise ParameterError("r", r, "the depth-limit fit needs r >= 3 (a power law with a vanishing offset)")
    out = []
    for s in sweeps:
        if s is base:
            continue
        ok = np.isfinite(s.times[:, 0]) & np.isfinite(base.times[:, 0]) & (s.eps <= eps_max * (1 + 1e-9))
        x = s.eps[ok] ** (r - 2)
        ratio = s.times[ok, 0] / base.times[ok, 0]
        slope, intercept, *_ = fits.linear_fit(x, ratio)
        n = int(ok.sum())
        # the CI of the intercept from the ordinary least-squares formula (Student t, 95%)
        resid = ratio - intercept - slope * x
        se = math.sqrt(resid @ resid / max(n - 2, 1) * (1 / n + x.mean() ** 2 / ((x - x.mean()) @ (x - x.mean()))))
        out.append({"r": r, "L": s.depth, "L_min": base.depth, "R_inf": intercept,
                    "R_inf_half_width": float(stats.t.ppf(0.975, max(n - 2, 1)) * se),
                    "predicted": base.rate / s.rate, "n_points": n,
                    "window": (float(s.eps[ok].min()), float(s.eps[ok].max()))})
    return out


def prefactor_ratio(s: Sweep, m: dict) -> float | None:
    """The leading term over its derived value (1 when the derived rate ``a`` is right): for r = 2
    the log-law slope times ``a`` (``m`` from :func:`measure`), for r >= 3
    ``t_esc a (r - 2) eps^(r-2)`` at the smallest eps; None for r = 1 (no divergent term)."""
    if s.r == 2:
        return float(m["logslope_loss"] * s.rate)
    if s.r >= 3:
        i = np.argmin(s.eps)
        return float(s.times[i, 0] * s.rate * (s.r - 2) * s.eps[i] ** (s.r - 2))
    return None


def log_correction_fit(s: Sweep):
    """The residual ``R = t_esc - eps^-2 / (2a)`` (the r = 4 leading term subtracted) and its fit
    ``R = intercept + B log(1/eps)`` (:func:`~saddle_escape.sim.fits.log_law`): ``(R, fit)``."""
    R = s.times[:, 0] - s.eps ** -2 / (2 * s.rate)
    return R, fits.log_law(s.eps, R)

