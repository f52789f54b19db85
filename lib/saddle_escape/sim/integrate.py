"""A small batched ODE integrator for gradient flow (in the spirit of diffrax / torchdiffeq).

``solve(term, y0, t1, solver=Dopri5(), controller=PIController(...), events=..., saveat=...)``
integrates ``dy/dt = term(t, y)`` for ``B`` independent runs stacked in ``y0`` (B, P). Every run
has its own time and step size, so a sweep over eps whose escape times span eight decades is one
call. The pieces are swappable:

* solvers: :class:`Dopri5` (Dormand--Prince 5(4), FSAL, 4th-order dense output) and
  :class:`Euler` (fixed-step explicit Euler, i.e. plain gradient descent on a gradient term);
* step control: :class:`PIController` (PI gain plus Gustafsson's predictive step, which follows the
  geometric shrinking of time scales on the way into an escape) or :class:`ConstantStep`;
* :class:`Event` -- located to round-off on the dense output, optionally terminal;
* :class:`SaveAt` -- observables on a requested time grid, from the dense output.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from .errors import DivergenceError
from .errors import ParameterError
from .progress import bar


# ------------------------------------------------------------------ terms

class ODETerm:
    """Vector field ``f(t, y) -> dy/dt`` with bookkeeping of calls and the time spent in it."""

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.f = f
        self.calls = 0        # batched calls
        self.run_evals = 0    # calls x runs in the batch
        self.seconds = 0.0    # wall time inside f

    def __call__(self, t, y):
        start = time.perf_counter()
        out = self.f(t, y)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.run_evals += y.shape[0]
        return out


class GradientFlow(ODETerm):
    """``dtheta/dt = -grad L(theta)`` for a batched loss ``theta (B, P) -> (B,)``.

    The runs are independent, so the gradient of the summed loss is every run's own gradient.
    The last evaluation is remembered: asking again for the gradient or the loss of the very
    same tensor (unchanged since) returns the stored values without recomputing them -- the
    integrator's last stage is the step's end point, so event functions that need ``L`` or
    ``grad L`` there cost nothing.

    ``neg_grad_and_loss`` (theta -> (-grad L, L)) replaces autograd, e.g. by a hand-written
    backward pass for a model whose tensors are too small for autograd's overhead to pay.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], neg_grad_and_loss=None):
        self.loss_fn = loss_fn
        self._neg_grad_and_loss = neg_grad_and_loss or self._autograd
        self._last = None     # (theta, its version, -grad L, L)
        super().__init__(self._neg_grad)

    def __call__(self, t, y):
        hit = self._lookup(y)
        if hit is not None:
            return hit[0].clone()
        out = super().__call__(t, y)
        self._last = (y, _version(y), out.detach().clone(), self._pending_loss)
        return out

    def _lookup(self, y):
        last = self._last
        return (last[2], last[3]) if last is not None and _unchanged(y, last[0], last[1]) else None

    def _neg_grad(self, t, theta):
        neg_grad, self._pending_loss = self._neg_grad_and_loss(theta)
        return neg_grad

    def _autograd(self, theta):
        with torch.enable_grad():
            theta = theta.detach().requires_grad_(True)
            L = self.loss_fn(theta)
            (g,) = torch.autograd.grad(L.sum(), theta)
        return -g, L.detach()

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        hit = self._lookup(theta)
        if hit is not None:
            return hit[1].clone()
        with torch.no_grad():
            return self.loss_fn(theta)


def _version(y):
    try:
        return y._version
    except Exception:   # e.g. inference tensors have no version counter: never cached
        return None


def _unchanged(y, held, held_version) -> bool:
    """``y`` is the very tensor ``held`` and has not been written to since its version was taken."""
    return held is y and held_version is not None and _version(y) == held_version


def last_value_cache(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` remembering its last result: asked again for the very same tensor, unchanged since
    (several events evaluating one observable at one state), it returns the stored value."""
    memo = {"y": None, "version": None, "value": None}

    def cached(y):
        # hold the tensor itself, so its identity cannot be recycled while it is the key
        if not _unchanged(y, memo["y"], memo["version"]):
            memo.update(y=y, version=_version(y), value=fn(y))
        return memo["value"]
    return cached


# ------------------------------------------------------------------ solvers

class _Dense:
    """Interpolant of one step, evaluated at fractions ``s`` in [0, 1] of each run's step."""

    def __init__(self, coeffs):
        self._coeffs = coeffs  # tensors (b, P), highest power first -- or a function making them

    @property
    def coeffs(self):
        if callable(self._coeffs):   # built on first use: most steps never need the interpolant
            self._coeffs = self._coeffs()
        return self._coeffs

    def rows(self, rows) -> "_Dense":
        """The interpolant of the runs ``rows`` only."""
        return _Dense([c[rows] for c in self.coeffs])

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        s = s[:, None]
        out = self.coeffs[0]
        for c in self.coeffs[1:]:
            out = out * s + c
        return out


class Dopri5:
    """Dormand--Prince 5(4) with FSAL and the 4th-order continuous extension."""

    order = 5
    _A = [
        [],
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ]
    _C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
    _E = [71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]
    _MID = [6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2,
            -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
            -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2]

    def step(self, term, t, y, f0, h):
        hc = h[:, None]
        k = [f0]
        for i in range(1, 7):
            yi = torch.addcmul(y, hc, _lincomb(self._A[i], k))
            k.append(term(torch.add(t, h, alpha=self._C[i]), yi))
        y1, f1 = yi, k[6]
        err = hc * _lincomb(self._E, k)

        def interpolant():
            y_mid = y + hc * _lincomb(self._MID, k)
            return _quartic(y, y1, y_mid, f0, f1, hc)

        return y1, f1, err, _Dense(interpolant)


def _lincomb(coefs, ks):
    """``sum_j coefs[j] * ks[j]`` over the non-zero coefficients, left to right."""
    out = None
    for a, kj in zip(coefs, ks):
        if a != 0.0:
            out = a * kj if out is None else torch.add(out, kj, alpha=a)   # one fused op per term
    return out


def _quartic(y0, y1, ym, f0, f1, h):
    # Quartic through y0, y_mid, y1 matching f0, f1 (torchdiffeq's dopri5 interpolation).
    a = 2 * h * (f1 - f0) - 8 * (y1 + y0) + 16 * ym
    b = h * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * ym
    c = h * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * ym
    return [a, b, c, h * f0, y0]


class Euler:
    """Explicit Euler. With a :class:`GradientFlow` term and :class:`ConstantStep` this *is*
    gradient descent with learning rate equal to the step; events and saves interpolate linearly."""

    order = 1

    def step(self, term, t, y, f0, h):
        y1 = y + h[:, None] * f0
        return y1, term(t + h, y1), None, _Dense([y1 - y, y])


# ------------------------------------------------------------------ step control

class StepHistory(NamedTuple):
    """What a step-size controller remembers of each run: the error norm and size of its last
    accepted step, and whether its last attempt was rejected."""

    err: torch.Tensor
    h: torch.Tensor
    rejected: torch.Tensor

    @classmethod
    def start(cls, h):
        # no accepted step yet: err = 1 is neutral for the PI term, h = nan switches prediction off
        return cls(torch.ones_like(h), torch.full_like(h, math.nan), torch.zeros_like(h, dtype=torch.bool))

    def after(self, accept, h, errn):
        return StepHistory(torch.where(accept, errn.clamp_min(1e-4), self.err),
                           torch.where(accept, h, self.h), ~accept)


@dataclass
class PIController:
    """Adaptive steps from the embedded error: ``||err / (atol + rtol |y|)||_rms <= 1``.

    After an accepted step the new step is the smaller of two proposals: the PI controller's
    ``safety * err^-beta1 * err_prev^beta2`` and, with ``predictive``, Gustafsson's predictive
    controller ``safety * err^(-1/k) * (h / h_prev) * (err_prev / err)^(1/k)``, which follows a
    trend in the step size. That trend is what an escape looks like to the integrator: approaching
    the escape the time scale shrinks geometrically, and without prediction about every other
    step is rejected (Gustafsson 1994; Hairer & Wanner, Solving ODEs II, IV.8). As in Hairer's
    DOPRI5, the step may shrink after an accepted step but may not grow right after a rejected one.
    """

    rtol: float = 1e-8
    atol: float = 1e-12
    dt0: float | None = None
    dt_max: float = math.inf
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    beta1: float = 0.7 / 5
    beta2: float = 0.4 / 5
    predictive: bool = True

    def __post_init__(self):
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ParameterError(name, v, "must be a finite number > 0")

    adaptive = True

    def initial(self, term, t, y, f0, order):
        if self.dt0 is not None:
            return torch.full_like(t, float(self.dt0))
        # Hairer, Norsett & Wanner, Solving ODEs I, II.4: a trial step h0 whose Euler change is 1%
        # of y, then a step from how much the field changes over it. Unlike there, the second
        # estimate is relative to the field itself, rho = ||f(y + h0 f0) - f0|| / ||f0|| (about
        # h0 / T for a field changing on the time scale T), so it does not depend on the units of
        # time: Hairer's absolute h1 = (0.01 / max(d1, d2))^(1/p) starts a plateau at eps, whose
        # field is O(eps^(r-1)), at a few time units, and factor_max then costs a step per decade
        # before the steps reach the plateau's time scale. The start is still capped at 100 h0;
        # y = 0 or a vanishing field keeps Hairer's fixed 1e-6.
        scale = self.atol + self.rtol * y.abs()
        d0 = _rms(y / scale)
        d1 = _rms(f0 / scale)
        h0 = 0.01 * d0 / d1
        h0 = torch.where((d0 < 1e-5) | ~torch.isfinite(h0), torch.full_like(d0, 1e-6), h0)
        f1 = term(t + h0, y + h0[:, None] * f0)
        rho = _rms((f1 - f0) / scale) / d1
        h1 = h0 * (0.01 / rho.clamp_min(1e-300)) ** (1.0 / order)
        h1 = torch.where(torch.isfinite(h1) & (d1 > 0), h1, torch.full_like(h0, 1e-6))
        return torch.minimum(100 * h0, h1).clamp(max=self.dt_max)

    def error_norm(self, err, y0, y1):
        scale = self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs())
        return _rms(err / scale)

    def propose(self, h, errn, history: StepHistory, order):
        e = errn.clamp_min(1e-10)
        factor = self.safety * e ** (-self.beta1) * history.err ** self.beta2
        if self.predictive:
            trend = self.safety * (h / history.h) * (history.err / (e * e)) ** (1.0 / order)
            factor = torch.fmin(factor, trend)     # fmin: no history yet (nan) leaves the PI factor
        grow = torch.where(history.rejected, 1.0, self.factor_max)
        factor = torch.where(errn <= 1, torch.minimum(factor.clamp(min=self.factor_min), grow),
                             (self.safety * e ** (-1.0 / order)).clamp(self.factor_min, 0.9))
        factor = torch.nan_to_num(factor, nan=self.factor_min)
        return (h * factor).clamp(max=self.dt_max)


@dataclass
class ConstantStep:
    """Fixed step ``dt`` (every step accepted): the gradient-descent reference."""

    dt: float
    adaptive = False

    def __post_init__(self):
        if not (isinstance(self.dt, (int, float)) and self.dt > 0 and math.isfinite(self.dt)):
            raise ParameterError("step_size", self.dt, "must be a finite number > 0")

    def initial(self, term, t, y, f0, order):
        return torch.full_like(t, float(self.dt))

    def error_norm(self, err, y0, y1):
        return torch.zeros(y0.shape[0], dtype=y0.dtype, device=y0.device)

    def propose(self, h, errn, history, order):
        return torch.full_like(h, float(self.dt))


def _rms(x):
    return torch.sqrt((x * x).mean(dim=-1))


# ------------------------------------------------------------------ events and saving

@dataclass
class Event:
    """A zero of ``fn(t, y, runs) -> (b,)`` where ``runs`` are the indices of the rows of ``y``
    in the batch (so thresholds can differ per run). ``direction=-1`` only counts crossings
    from positive to non-positive, ``+1`` the reverse, ``0`` both. ``fn`` must depend on its
    arguments only: crossings are bracketed during the integration and located afterwards, all
    runs in one batch, at states from the steps where they happened."""

    fn: Callable
    direction: int = 0
    terminal: bool = True
    name: str = "event"


@dataclass
class SaveAt:
    """Save ``fn(y)`` (default: ``y`` itself) at the times ``ts`` (increasing, shared by all runs)."""

    ts: torch.Tensor
    fn: Callable | None = None


@dataclass
class Solution:
    """Result of :func:`solve` for ``B`` runs.

    ``ts``/``ys``: the save grid and the saved values (B, T, K); entries after a run stopped are
    NaN and ``saved`` (B, T) says which are real. ``event_times`` (B, n_events) holds the first
    time each event fired, ``inf`` where it did not (a censored run: never a silent NaN).
    ``t_final``/``y_final``: where each run stopped; ``stopped_by_event`` (B,) bool.
    """

    t_final: torch.Tensor
    y_final: torch.Tensor
    event_times: torch.Tensor
    event_states: list
    stopped_by_event: torch.Tensor
    ts: torch.Tensor | None
    ys: torch.Tensor | None
    saved: torch.Tensor | None
    n_steps: torch.Tensor
    n_rejected: torch.Tensor
    calls: int
    run_evals: int
    seconds: float
    seconds_in_term: float

    @property
    def overhead_fraction(self) -> float:
        """Share of the wall time spent outside the vector field (integrator bookkeeping)."""
        return 1.0 - self.seconds_in_term / self.seconds if self.seconds > 0 else 0.0

    @property
    def censored(self) -> torch.Tensor:
        """Boolean tensor of shape ``(B, n_events)``: True where the event never fired before the run ended."""
        return torch.isinf(self.event_times)


# ------------------------------------------------------------------ the driver

def solve(term: ODETerm, y0: torch.Tensor, t1, *, solver=None, controller=None,
          events: Sequence[Event] = (), saveat: SaveAt | None = None, max_steps: int = 1_000_000,
          max_norm: float = 1e8, progress: bool = False, desc: str = "integrating",
          min_relative_step: float = 1e-13) -> Solution:
    """Integrate ``B`` runs ``y0`` (B, P) from t = 0 to ``t1`` (scalar or (B,)).

    Raises :class:`~saddle_escape.sim.errors.DivergenceError` when a run produces non-finite values, leaves the ball of
    radius ``max_norm``, or needs ever smaller steps; the message names the knob to change.
    A rejected step shorter than ``min_relative_step * t`` counts as collapsed: an escape that comes
    after t ~ 1e12 still needs O(1) steps, so such runs pass a smaller value (float64 resolves
    steps down to about 1e-15 t).
    """
    solver = solver or Dopri5()
    controller = controller or PIController()
    if y0.ndim != 2:
        raise ParameterError("y0.shape", tuple(y0.shape), "must be (runs, parameters)")
    B = y0.shape[0]
    dtype, device = y0.dtype, y0.device
    t1 = torch.as_tensor(t1, dtype=dtype, device=device).expand(B).clone()
    if not torch.all(t1 > 0):
        raise ParameterError("t_max", t1.min().item(), "must be > 0")
    wall = time.perf_counter()
    s0, c0, r0 = term.seconds, term.calls, term.run_evals

    t = torch.zeros(B, dtype=dtype, device=device)
    y = y0.clone()
    f = term(t, y)
    _check_finite(f, torch.arange(B), t, controller)
    h = torch.minimum(controller.initial(term, t, y, f, solver.order), t1)
    history = StepHistory.start(h)
    active = torch.ones(B, dtype=torch.bool, device=device)
    ev_t = torch.full((B, len(events)), math.inf, dtype=dtype, device=device)
    ev_y = [torch.full_like(y, math.nan) for _ in events]
    ev_g = [ev.fn(t, y, torch.arange(B, device=device)) for ev in events]
    brackets = [[] for _ in events]     # per event: the steps in which runs crossed it
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    n_steps = torch.zeros(B, dtype=torch.long, device=device)
    n_rej = torch.zeros(B, dtype=torch.long, device=device)

    saver = _Saver(saveat, y, B) if saveat is not None else None
    if saver is not None:
        saver.initial(y)

    pbar = bar(total=100, desc=desc, enabled=progress)
    last_pct = 0
    t1_stop = t1 * (1 - 1e-14)
    n_active, idx = -1, None
    for _ in range(max_steps):
        # the active set only ever shrinks: rebuild the row index (and what depends on it) when it does
        count = int(active.sum())
        if count == 0:
            break
        if count != n_active:
            n_active = count
            idx = active.nonzero().squeeze(1)
            full = count == B
            t1a = t1 if full else t1[idx]
        ta, ya, fa = (t, y, f) if full else (t[idx], y[idx], f[idx])
        ha = torch.minimum(h if full else h[idx], t1a - ta)
        y1, f1, err, dense = solver.step(term, ta, ya, fa, ha)
        errn = controller.error_norm(err, ya, y1)
        # one isfinite for the three: a NaN or inf in y1 or f1 makes its row sum non-finite (a row
        # sum overflowing on finite values is far beyond max_norm, and then rejected just the same)
        finite = torch.isfinite(errn + y1.sum(-1) + f1.sum(-1))
        if not controller.adaptive:
            _check_finite(torch.where(finite[:, None], y1, torch.nan), idx, ta, controller)
        accept = finite & (errn <= 1.0)
        n_steps += active
        rejected = ~accept
        any_rejected = bool(rejected.any())
        if not any_rejected:
            pass
        elif full:
            n_rej += rejected
        else:
            n_rej.index_add_(0, idx, rejected.long())
        t_new = ta + ha
        if controller.adaptive and any_rejected:
            tiny = rejected & (ha <= min_relative_step * torch.clamp(ta.abs(), min=1e-3))
            if tiny.any():
                b = idx[tiny][0].item()
                raise DivergenceError(
                    f"run {b}: the step size collapsed to {ha[tiny][0].item():.3g} at t = "
                    f"{ta[tiny][0].item():.6g}; the flow is blowing up or too stiff for an explicit "
                    f"method. Lower the initial scale or learning-problem size, or raise rtol/atol "
                    f"(now rtol={controller.rtol:g}, atol={controller.atol:g}).")
        if bool(y1.abs().amax() > max_norm) and (big := accept & (y1.abs().amax(-1) > max_norm)).any():
            b = idx[big][0].item()
            raise DivergenceError(
                f"run {b}: parameters exceeded max_norm = {max_norm:g} at t = {t_new[big][0].item():.6g}: "
                + ("reduce step_size (gradient descent is unstable above 2 / curvature)." if not controller.adaptive
                   else "the loss is exploding; lower rtol/atol or check the teacher and initial scales."))

        # events on accepted steps: a crossing is only bracketed here (a terminal one stops its run
        # at the step's end); all crossings are located together after the loop, in one batch
        stop_here = None
        for k, ev in enumerate(events):
            g0 = ev_g[k] if full else ev_g[k][idx]
            g1 = ev.fn(t_new, y1, idx)
            crossed = accept & _crossed(g0, g1, ev.direction) & torch.isinf(ev_t[:, k] if full else ev_t[idx, k])
            if crossed.any():
                rows = crossed.nonzero().squeeze(1)
                ev_t[idx[rows], k] = t_new[rows]          # fired; the time is refined after the loop
                brackets[k].append((idx[rows], ta[rows], ha[rows], g0[rows], g1[rows], dense.rows(rows)))
                if ev.terminal:
                    stop_here = crossed if stop_here is None else stop_here | crossed
            if full:
                ev_g[k] = torch.where(accept, g1, g0)
            else:
                ev_g[k][idx] = torch.where(accept, g1, g0)

        if saver is not None:
            saver.save(dense, idx, ta, ha, t_new, accept)

        # commit accepted steps (in place: the whole batch, or the active rows)
        acc = accept[:, None]
        hist_a = history if full else StepHistory(*(x[idx] for x in history))
        h_prop = controller.propose(ha, errn, hist_a, solver.order)
        updates = ((t, torch.where(accept, t_new, ta)), (y, torch.where(acc, y1, ya)),
                   (f, torch.where(acc, f1, fa)), (h, h_prop), *zip(history, hist_a.after(accept, ha, errn)))
        for dst, val in updates:
            if full:
                dst.copy_(val)
            else:
                dst.index_copy_(0, idx, val)
        if stop_here is not None:
            stopped[idx[stop_here]] = True
        active = (~stopped) & (t < t1_stop)

        if progress:
            pct = int(100 * torch.log1p(t).sum() / torch.log1p(t1).sum())
            if pct > last_pct:
                pbar.update(pct - last_pct)
                last_pct = pct
    else:
        raise DivergenceError(f"max_steps = {max_steps} reached before t_max; raise max_steps or rtol")
    pbar.close()
    for k, ev in enumerate(events):
        _locate_brackets(ev, k, brackets[k], ev_t, ev_y, t, y)
    if saver is not None:
        saver.forget_after(t, stopped)

    return Solution(
        t_final=t, y_final=y, event_times=ev_t, event_states=ev_y, stopped_by_event=stopped,
        ts=None if saver is None else saver.ts,
        ys=None if saver is None else saver.values,
        saved=None if saver is None else saver.mask,
        n_steps=n_steps, n_rejected=n_rej,
        calls=term.calls - c0, run_evals=term.run_evals - r0,
        seconds=time.perf_counter() - wall, seconds_in_term=term.seconds - s0)


def _crossed(g0, g1, direction):
    if direction < 0:
        return (g0 > 0) & (g1 <= 0)
    if direction > 0:
        return (g0 < 0) & (g1 >= 0)
    return _crossed(g0, g1, -1) | _crossed(g0, g1, 1)


def _locate_brackets(ev, k, brackets, ev_t, ev_y, t, y):
    """Locate every crossing of event ``k`` on its step's interpolant, all runs in one batch; a
    terminal event moves its run's end back from the step's end to the earliest such event."""
    if not brackets:
        return
    *columns, dense_parts = zip(*brackets)      # (runs, t0, h, g0, g1, interpolant) per step
    runs, t0, h, g0, g1 = (torch.cat(c) for c in columns)
    dense = _Dense([torch.cat(cs) for cs in zip(*(d.coeffs for d in dense_parts))])
    s = _locate(ev.fn, dense, runs, t0, h, g0, g1)
    te, ye = t0 + s * h, dense(s)
    ev_t[runs, k] = te
    ev_y[k][runs] = ye
    if ev.terminal:
        earlier = te <= t[runs]
        t[runs] = torch.where(earlier, te, t[runs])
        y[runs] = torch.where(earlier[:, None], ye, y[runs])


def _locate(fn, dense, runs, t0, h, g0, g1, iters: int = 100):
    """Illinois (regula falsi) on the step fraction s in [0, 1] for each crossing run, down to a
    few ulps of t; ``dense`` is the interpolant of these runs only."""
    lo, hi = torch.zeros_like(t0), torch.ones_like(t0)
    glo, ghi = g0.clone(), g1.clone()
    kept_lo = torch.zeros_like(t0, dtype=torch.bool)   # the last update kept lo (moved hi)
    kept_hi = torch.zeros_like(kept_lo)
    tol = 4 * torch.finfo(h.dtype).eps * (t0 + h) / h
    for _ in range(iters):
        s = (lo * ghi - hi * glo) / (ghi - glo)
        s = torch.where((s > lo) & (s < hi), s, 0.5 * (lo + hi))   # nan compares False: bisect
        gs = fn(t0 + s * h, dense(s), runs)
        left = torch.sign(gs) == torch.sign(glo)
        # Illinois: when the same end survives twice, halve its value so the bracket shrinks from both sides
        glo = torch.where(left, gs, torch.where(kept_lo, glo / 2, glo))
        ghi = torch.where(left, torch.where(kept_hi, ghi / 2, ghi), gs)
        # an exact zero is the crossing itself: close the bracket there
        lo, hi = torch.where(left | (gs == 0), s, lo), torch.where(left, hi, s)
        kept_lo, kept_hi = ~left, left
        if bool(((hi - lo) <= tol).all()):
            break
    return hi  # the first point at which the event condition holds


def _check_finite(values, runs, t, controller):
    bad = ~torch.isfinite(values).all(-1)
    if bad.any():
        b = runs[bad][0].item()
        knob = (f"reduce step_size (now {controller.dt:g})" if isinstance(controller, ConstantStep)
                else "check the initial scales and the loss")
        raise DivergenceError(f"run {b}: non-finite values (NaN/inf) at t = {t[bad][0].item():.6g}; {knob}.")


class _Saver:
    def __init__(self, saveat: SaveAt, y, B):
        self.ts = torch.as_tensor(saveat.ts, dtype=y.dtype, device=y.device)
        if self.ts.ndim != 1 or (self.ts.numel() > 1 and torch.any(self.ts[1:] < self.ts[:-1])):
            raise ParameterError("saveat.ts", "...", "must be a 1-d increasing grid of times")
        self.fn = saveat.fn or (lambda v: v)
        k = self.fn(y[:1]).shape[-1]
        self.values = torch.full((B, self.ts.numel(), k), math.nan, dtype=y.dtype, device=y.device)
        self.mask = torch.zeros(B, self.ts.numel(), dtype=torch.bool, device=y.device)

    def initial(self, y):
        at0 = (self.ts <= 0).nonzero().squeeze(1)
        if at0.numel():
            v = self.fn(y)
            self.values[:, at0] = v[:, None, :]
            self.mask[:, at0] = True

    def forget_after(self, t_final, stopped):
        """Runs stopped by a terminal event saved up to their last step's end: drop what lies
        after the event."""
        late = stopped[:, None] & (self.ts[None, :] > t_final[:, None])
        self.values[late] = math.nan
        self.mask &= ~late

    def save(self, dense, idx, t0, h, t_end, accept):
        lo = torch.searchsorted(self.ts, t0, right=True)
        hi = torch.searchsorted(self.ts, t_end, right=True)
        count = torch.where(accept, hi - lo, torch.zeros_like(hi))
        n = int(count.max()) if count.numel() else 0
        for j in range(n):
            rows = (count > j).nonzero().squeeze(1)
            col = lo[rows] + j
            s = ((self.ts[col] - t0[rows]) / h[rows]).clamp(0, 1)
            self.values[idx[rows], col] = self.fn(dense.rows(rows)(s))
            self.mask[idx[rows], col] = True
