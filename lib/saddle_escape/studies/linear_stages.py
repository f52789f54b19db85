"""Chapter 09: data-induced saddle-to-saddle in linear networks (Theorem 4 of Zhang, Saxe & Latham).

The experiment in a few calls:

* :func:`whitened_problem` -- a teacher ``y = T x`` with singular values ``s_n = n^-kappa`` on
  whitened inputs, held as its exact second moments (:class:`~saddle_escape.sim.saxe.Moments`);
* :func:`run_fc` -- many linear fully connected nets (eps x seed x width) in **one** batched
  integration: every width is embedded in the widest net with the extra units at exactly zero
  (the zero-unit manifold is invariant, chapter 08), so each run keeps its own step size and
  still shares the loop;
* :func:`run_generic` -- the same bookkeeping for any map-computing net (linear convolution,
  depth-3 linear net) with an autograd flow;
* :func:`plateaus` -- drops (the loss crossing midway between the best rank-(k-1) and rank-k
  losses), plateau points (the smallest gradient between two drops) and the rank counted there.

Counting rank: a singular value of the prediction map ``W Sigma_xx^{1/2}`` counts when it exceeds
half the smallest singular value the target asks the net to learn (``s_K / 2``; with whitened
inputs these are the singular values of ``W``). Learned modes sit at ``s_k >= s_K``, unlearned
ones are a power of eps, so any threshold in that gap counts the same; half of ``s_K`` puts the
step of mode K at its half-way point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..sim import data as D
from ..sim import saxe
from ..sim.errors import ParameterError
from ..sim.integrate import Event, GradientFlow, PIController, SaveAt, solve
from ..sim.networks import MLP, population_loss
from ..sim.twolayer import TwoLayer


# ------------------------------------------------------------------ problems

def power_law_spectrum(n: int, kappa: float) -> torch.Tensor:
    """``s_k = k^-kappa``, k = 1..n (kappa = 0: all equal to 1)."""
    return torch.arange(1, n + 1, dtype=D.DTYPE) ** (-float(kappa))


@dataclass(frozen=True)
class Problem:
    """A linear regression problem held as moments, with its modes and best rank-k losses."""

    moments: saxe.Moments
    s: torch.Tensor          # (K,) singular values of Sigma_yx Sigma_xx^{-1/2}, largest first
    a: torch.Tensor          # (m, K) left singular vectors of Sigma_yx
    b: torch.Tensor          # (d, K) right singular vectors
    levels: torch.Tensor     # (K+1,) best rank-k losses, k = 0..K
    data: D.Dataset          # a small data set with exactly these moments

    @property
    def K(self) -> int:
        return len(self.s)

    @property
    def midpoints(self) -> torch.Tensor:
        """Loss levels midway between consecutive plateaus; drop k happens when the loss crosses
        ``(L*_{k-1} + L*_k)/2``."""
        return (self.levels[:-1] + self.levels[1:]) / 2

    def threshold(self) -> float:
        """Rank threshold: half the smallest target singular value to be learned."""
        return 0.5 * float(self.s[-1])


def separation_gap(s) -> float:
    """Smallest relative gap ``g = min_k (1 - s_{k+1}/s_k)`` of a spectrum: stage k+1's weights are
    ``eps^(1 - s_{k+1}/s_k)`` of stage k's when stage k is learned, so ``eps^g`` measures how well the
    slowest pair of stages is separated."""
    s = np.asarray(s, dtype=float)
    return float(np.min(1 - s[1:] / s[:-1]))


def eps_bounds(s, separation_max: float = 0.1, separation_min: float = 1e-4) -> tuple[float, float]:
    """The largest eps at which every pair of stages is separated by ``eps^g <= separation_max``
    (the drop-time formula neglects terms of that relative size), and the eps at which
    ``eps^g = separation_min`` (the plateaus are then reached to well below 1e-3)."""
    g = separation_gap(s)
    return 10 ** (math.log10(separation_max) / g), 10 ** (math.log10(separation_min) / g)


def whitened_problem(input_dim: int, output_dim: int, kappa: float, seed: int) -> Problem:
    """Teacher ``T = sum_k s_k a_k b_k^T`` with random orthonormal modes and ``s_k = k^-kappa``,
    whitened inputs (``Sigma_xx = I``), as the d-row data set of :func:`~saddle_escape.sim.saxe.whitened_teacher_data`."""
    K = min(input_dim, output_dim)
    s = power_law_spectrum(K, kappa)
    T = D.linear_teacher_matrix(s.tolist(), input_dim, output_dim, seed)
    return problem_from_data(saxe.whitened_teacher_data(T), K)


def problem_from_data(data: D.Dataset, K: int) -> Problem:
    """A :class:`Problem` from a data set; its first ``K`` modes are the ones to learn."""
    mom = saxe.Moments.of(data)
    A, s, Bh = torch.linalg.svd(mom.syx, full_matrices=False)
    c = saxe.whitened_singular_values(mom)
    return Problem(mom, c[:K], A[:, :K], Bh[:K].T, mom.best_rank_losses()[:K + 1], data)


def sampled_loss_gap(problem: Problem, model: TwoLayer, n_samples: int, seed: int, scales=(1e-3, 0.3, 1.0)) -> float:
    """Largest relative difference between the moment loss and the plain sample loss of a whitened
    training set of ``n_samples`` draws (``data.linear_teacher_data``) at random parameters."""
    T = problem.moments.syx
    sample = D.linear_teacher_data(T, n_samples, seed)
    theta = model.init(torch.tensor(scales, dtype=D.DTYPE), [seed + 1] * len(scales))
    V, U = model.unflatten(theta)
    exact = problem.moments.loss(V.transpose(-1, -2) @ U)
    plain = model.loss(theta, sample)
    return float(((plain - exact).abs() / exact).max())


def digits_problem(digits=(0, 1), stages: int = 4) -> Problem:
    """Completion of scikit-learn's bundled 8x8 digits (no download): from the left half of an
    image of one of the ``digits`` predict its right half. Pixels centred and divided by their
    overall standard deviation; inputs *not* whitened."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    keep = np.isin(y, list(digits))
    if keep.sum() == 0:
        raise ParameterError("digits", list(digits), "must name digit classes 0..9")
    img = X[keep].reshape(-1, 8, 8)
    left = img[:, :, :4].reshape(-1, 32)
    right = img[:, :, 4:].reshape(-1, 32)
    left, right = left - left.mean(0), right - right.mean(0)
    scale = np.concatenate([left, right], 1).std()
    x = torch.tensor(left / scale, dtype=D.DTYPE)
    t = torch.tensor(right / scale, dtype=D.DTYPE)
    n = x.shape[0]
    return problem_from_data(D.Dataset(x, t, torch.full((n,), 1.0 / n, dtype=D.DTYPE)), stages)


def run_digits(problem: Problem, stages: int, width: int, seeds, separation: float = 1e-3, rtol: float = 1e-6,
               n_save: int = 800) -> "Runs":
    """A linear FC net on the digits problem from ``eps`` with ``eps^g = separation`` (``g`` the
    smallest relative gap of the first ``stages + 1`` growth rates, the singular values of
    ``Sigma_yx``), one run per seed, ending when the loss crosses its last drop level.

    Unwhitened inputs keep the directions of small input variance learning on a tread, so the
    gradient is smallest late on it: 1e-3, a decade more than the whitened problem needs (at 1e-2
    one seed of the pair (3, 8) puts its second plateau point inside the next drop)."""
    rates = torch.linalg.svdvals(problem.moments.syx)[:stages + 1]
    eps = separation ** (1 / separation_gap(rates))
    d, m = problem.moments.sxx.shape[0], problem.moments.syx.shape[0]
    model = TwoLayer.build("linear", d, width, m)
    theta0 = model.init(eps, list(seeds))
    W = lambda th: (lambda V, U: V.transpose(-1, -2) @ U)(*model.unflatten(th))  # noqa: E731
    t1 = 3 * math.log(1 / eps) / float(rates[stages - 1])
    return run_generic(saxe.linear_flow(model, problem.moments), W, problem, theta0, np.full(len(seeds), t1),
                       [eps] * len(seeds), seeds, width, rtol=rtol, n_save=n_save, stop_at_last_drop=True)


def conv_problem(kernel: int, positions: int, kappa: float, seed: int) -> tuple[TwoLayer, Problem, torch.Tensor]:
    """A linear convolution teacher on whitened signals of ``positions * kernel`` numbers cut
    into disjoint patches (stride = kernel), scalar output per signal: ``f(x) = sum_j M_j . p_j(x)``
    with a kernel matrix ``M*`` (positions x kernel) of singular values ``k^-kappa``.

    Disjoint patches of a whitened signal are whitened and uncorrelated, so the loss is
    ``1/2 ||M - M*||_F^2 + const``: the linear FC problem with ``Sigma_yz = M*``. Returns the
    model builder's unit shapes (a width-1 template), the problem in kernel-matrix form, and ``M*``.
    """
    d = positions * kernel
    K = min(positions, kernel)
    s = power_law_spectrum(K, kappa)
    Mstar = D.linear_teacher_matrix(s.tolist(), kernel, positions, seed)        # (positions, kernel)
    x = math.sqrt(d) * torch.eye(d, dtype=D.DTYPE)
    p = x.unfold(-1, kernel, kernel)                                             # (n, positions, kernel)
    y = torch.einsum("njk,jk->n", p, Mstar)[:, None]
    data = D.Dataset(x, y, torch.full((d,), 1.0 / d, dtype=D.DTYPE))
    kernel_moments = saxe.Moments(torch.eye(kernel, dtype=D.DTYPE), Mstar, float((y[:, 0] ** 2).mean()))
    A, sv, Bh = torch.linalg.svd(Mstar)
    prob = Problem(kernel_moments, sv[:K], A[:, :K], Bh[:K].T, kernel_moments.best_rank_losses()[:K + 1], data)
    return TwoLayer.build("linear_conv", d, 1, 1, kernel=kernel, stride=kernel), prob, Mstar


# ------------------------------------------------------------------ runs

@dataclass
class Runs:
    """A batch of gradient-flow runs with their observables on a shared time grid."""

    eps: np.ndarray                # (B,)
    seeds: np.ndarray              # (B,)
    widths: np.ndarray             # (B,)
    ts: np.ndarray                 # (T,)
    loss: np.ndarray               # (B, T)
    grad2: np.ndarray              # (B, T) squared gradient norm
    svals: np.ndarray              # (B, T, K) singular values of the prediction map
    saved: np.ndarray              # (B, T) bool
    drop_times: np.ndarray         # (B, K), inf where the loss never crossed
    t_final: np.ndarray            # (B,)
    theta0: torch.Tensor
    extra: dict = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0



def fc_init(problem: Problem, eps, seeds, width: int) -> tuple[TwoLayer, torch.Tensor]:
    """A width-``width`` linear FC net and its initial parameters, N(0, eps^2) per entry, one run
    per ``(eps[i], seeds[i])`` (the same seed with another eps starts on the same ray)."""
    d, m = problem.moments.sxx.shape[0], problem.moments.syx.shape[0]
    model = TwoLayer.build("linear", d, int(width), m)
    return model, model.init(torch.as_tensor(np.asarray(eps, dtype=float)), [int(s) for s in seeds])


def predicted_drop_times(model: TwoLayer, problem: Problem, theta0: torch.Tensor) -> torch.Tensor:
    """Drop times (B, K) from Saxe's logistic with the actual initial overlaps:
    ``t_k = ln[(s_k/u_k - 1)(sqrt 2 - 1)] / (2 s_k)``, ``u_k = R_kk^2`` (loss midpoint)."""
    u0 = saxe.growing_overlaps(model, theta0, problem.a, problem.b)
    return torch.stack([saxe.saxe_time(float(problem.s[k]), u0[:, k], saxe.LOSS_MIDPOINT)
                        for k in range(problem.K)], -1)


def _prediction_root(problem: Problem) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(problem.moments.sxx)
    return (Q * lam.clamp_min(0).sqrt()) @ Q.T


def _drop_events(loss_fn, problem: Problem, terminal_last: bool = False) -> list[Event]:
    mids = problem.midpoints
    return [Event((lambda k: lambda t, y, runs: loss_fn(y) - mids[k])(k), direction=-1,
                  terminal=terminal_last and k == problem.K - 1, name=f"drop{k + 1}") for k in range(problem.K)]


def _integrate(flow: GradientFlow, map_fn, problem: Problem, theta0, t1, ts, rtol: float, extra_events=(),
               keep_theta: bool = False, terminal_last: bool = False):
    """One batched solve with the drop events and a saved record ``[loss, |grad|^2, svals]`` on ``ts``
    (followed by the parameters themselves with ``keep_theta``). ``K + 1`` singular values are kept
    where the map has them, so a rank above K would be seen."""
    root = _prediction_root(problem)
    K = problem.K

    def record(theta):
        neg_grad, loss = flow._neg_grad_and_loss(theta)
        sv = torch.linalg.svdvals(map_fn(theta) @ root)[..., :K + 1]
        parts = [loss[:, None], (neg_grad ** 2).sum(-1, keepdim=True), sv] + ([theta] if keep_theta else [])
        return torch.cat(parts, -1)

    events = _drop_events(flow.loss, problem, terminal_last) + list(extra_events)
    return solve(flow, theta0, torch.as_tensor(t1, dtype=D.DTYPE),
                 controller=PIController(rtol=rtol, atol=1e-300), events=events,
                 saveat=SaveAt(torch.as_tensor(ts, dtype=D.DTYPE), record), max_steps=200_000)


def _runs_from(sol, eps, seeds, width, ts, K, theta0, n_sv, **extra) -> "Runs":
    ys = sol.ys.numpy()
    if ys.shape[-1] > 2 + n_sv:
        extra["thetas"] = ys[..., 2 + n_sv:]
    B = theta0.shape[0]
    return Runs(np.asarray(eps, dtype=float), np.asarray(seeds), np.full(B, int(width)), np.asarray(ts),
                ys[..., 0], ys[..., 1], ys[..., 2:2 + n_sv], sol.saved.numpy(), sol.event_times[:, :K].numpy(),
                sol.t_final.numpy(), theta0, extra=extra, steps=int(sol.n_steps.max()), seconds=sol.seconds)


def fc_horizon(problem: Problem, eps, seeds, width: int, margin: float = 6.0) -> float:
    """Latest end time of these runs: ``margin / s_K`` past the predicted last drop."""
    model, theta0 = fc_init(problem, eps, seeds, width)
    return float(predicted_drop_times(model, problem, theta0)[:, -1].max()) + margin / float(problem.s[-1])


def run_fc(problem: Problem, eps, seeds, width: int, ts=None, rtol: float = 1e-6, n_save: int = 800,
           margin: float = 6.0, keep_theta: bool = False) -> "Runs":
    """Linear FC nets of one width, one run per ``(eps[i], seeds[i])``, in one batched integration
    (exact moment flow, each run its own step size) up to ``margin / s_K`` past each run's
    predicted last drop. Observables are saved on ``ts`` (default: ``n_save`` times up to the
    latest end). Also records, for Theorem 4, the time and state at which the top-mode part
    ``||P theta||^2`` first reaches ``s_1`` (``extra['t_top']``, ``extra['theta_top']``); with
    `keep_theta` the parameters on the grid too (``extra['thetas']``, (B, T, P))."""
    model, theta0 = fc_init(problem, eps, seeds, width)
    flow = saxe.linear_flow(model, problem.moments)
    pred = predicted_drop_times(model, problem, theta0)
    t1 = pred[:, -1] + margin / float(problem.s[-1])
    ts = np.linspace(0.0, float(t1.max()), n_save) if ts is None else ts
    top = Event(lambda t, y, runs: top_norm2(model, problem, y) - float(problem.s[0]), direction=1,
                terminal=False, name="top")
    W = lambda th: (lambda V, U: V.transpose(-1, -2) @ U)(*model.unflatten(th))  # noqa: E731
    sol = _integrate(flow, W, problem, theta0, t1, ts, rtol, [top], keep_theta)
    K = problem.K
    n_sv = min(K + 1, problem.moments.syx.shape[0], problem.moments.syx.shape[1])
    return _runs_from(sol, eps, seeds, width, ts, K, theta0, n_sv, predicted=pred.numpy(),
                      t_top=sol.event_times[:, K].numpy(), theta_top=sol.event_states[K].numpy())


def concat(parts: list["Runs"]) -> "Runs":
    """Runs of several calls on one shared time grid, as one batch (widths may differ: the
    parameter vectors are kept per part in ``extra['thetas']``)."""
    arrays = {f: np.concatenate([getattr(p, f) for p in parts]) for f in
              ("eps", "seeds", "widths", "loss", "grad2", "svals", "saved", "drop_times", "t_final")}
    keys = set.intersection(*(set(p.extra) for p in parts))
    extra = {k: np.concatenate([p.extra[k] for p in parts]) for k in keys if k not in ("theta_top", "thetas")}
    return Runs(ts=parts[0].ts, theta0=None, extra=extra, steps=sum(p.steps for p in parts),
                seconds=sum(p.seconds for p in parts), **arrays)


def run_generic(flow: GradientFlow, map_fn, problem: Problem, theta0: torch.Tensor, t1, eps, seeds,
                width: int, rtol: float = 1e-6, n_save: int = 800, stop_at_last_drop: bool = False) -> "Runs":
    """Any net whose map is ``map_fn(theta)`` (B, m, d) (its kernel matrix for a convolution).
    With `stop_at_last_drop` a run ends when the loss crosses its last drop level (``t1`` is then
    only a bound)."""
    ts = np.linspace(0.0, float(np.max(t1)), n_save)
    sol = _integrate(flow, map_fn, problem, theta0, t1, ts, rtol, terminal_last=stop_at_last_drop)
    n_sv = min(problem.K + 1, *map_fn(theta0[:1]).shape[-2:])
    return _runs_from(sol, eps, seeds, width, ts, problem.K, theta0, n_sv)


def top_norm2(model: TwoLayer, problem: Problem, theta: torch.Tensor, r: int = 1) -> torch.Tensor:
    """``||P theta||^2``: the weights projected on the top-r singular subspace of ``Sigma_yx``
    (``V a a^T`` for the read-out, ``U b b^T`` for the input weights): (B,)."""
    V, U = model.unflatten(theta)
    return ((V @ problem.a[:, :r]) ** 2).sum((-1, -2)) + ((U @ problem.b[:, :r]) ** 2).sum((-1, -2))


def remainder_norm(model: TwoLayer, problem: Problem, theta: torch.Tensor, r: int = 1) -> torch.Tensor:
    """``||(I - P) theta||`` (B,), computed from the projected-out weights themselves (a difference
    of squared norms would cancel: the remainder is ~1e-8 of the weights at eps = 1e-16)."""
    V, U = model.unflatten(theta)
    a, b = problem.a[:, :r], problem.b[:, :r]
    Vr, Ur = V - (V @ a) @ a.T, U - (U @ b) @ b.T
    return ((Vr ** 2).sum((-1, -2)) + (Ur ** 2).sum((-1, -2))).sqrt()


# ------------------------------------------------------------------ analysis

@dataclass
class Plateaus:
    """Per run (B,) and plateau k = 0..K: the time, loss and rank at the plateau point."""

    times: np.ndarray        # (B, K+1)
    index: np.ndarray        # (B, K+1) index into the time grid
    loss: np.ndarray         # (B, K+1)
    rank: np.ndarray         # (B, K+1)


def plateaus(runs: Runs, problem: Problem, level_tol: float = 0.1) -> Plateaus:
    """Plateau k lies between drops k and k+1 (drop 0 = the start, drop K+1 = the end of the run);
    its point is the saved time of smallest gradient there (for k = K the end of the run when all
    modes are learned, since the gradient keeps falling). The rank is the number of singular values above
    :meth:`Problem.threshold` -- or -1 where the loss there is farther than ``level_tol`` of the
    adjacent step height from the best rank-k loss: that is no plateau (e.g. two modes leaving
    together), whatever the count says."""
    B, K = runs.drop_times.shape
    thr = problem.threshold()
    idx = np.full((B, K + 1), -1, dtype=int)
    for b in range(B):
        edges = np.concatenate([[0.0], runs.drop_times[b], [runs.t_final[b]]])
        ok = runs.saved[b]
        for k in range(K + 1):
            inside = ok & (runs.ts >= edges[k]) & (runs.ts <= edges[k + 1])
            if inside.any():
                cand = np.flatnonzero(inside)
                idx[b, k] = cand[np.argmin(runs.grad2[b, cand])]
    rows = np.arange(B)[:, None]
    good = idx >= 0
    safe = np.where(good, idx, 0)
    loss = np.where(good, runs.loss[rows, safe], np.nan)
    levels = problem.levels.numpy()
    steps = -np.diff(levels)
    height = np.concatenate([steps[:1], np.minimum(steps[:-1], steps[1:]), steps[-1:]])   # nearest step(s)
    on_plateau = np.abs(loss - levels) <= level_tol * height
    rank = np.where(good & on_plateau, (runs.svals[rows, safe] > thr).sum(-1), -1)
    times = np.where(good, runs.ts[safe], np.nan)
    return Plateaus(times, idx, loss, rank)


def rank_curve(runs: Runs, problem: Problem) -> np.ndarray:
    """Rank (B, T) on the saved grid (-1 where nothing was saved)."""
    return np.where(runs.saved, (runs.svals > problem.threshold()).sum(-1), -1)


def relative_drop_errors(runs: Runs) -> np.ndarray:
    """``|t_k(measured) / t_k(predicted) - 1|`` (B, K)."""
    return np.abs(runs.drop_times / runs.extra["predicted"] - 1)


def log_slopes(runs: Runs, s: torch.Tensor) -> list:
    """Per mode, the fit ``t_k = c + slope ln(1/eps)`` over every run (bootstrap over seeds)."""
    from ..sim import fits
    return [fits.log_law(runs.eps, runs.drop_times[:, k], groups=runs.seeds, n_boot=200) for k in range(len(s))]


def width_shift_prediction(widths, k: int, s_k: float) -> np.ndarray:
    """Expected drop-time change of mode k relative to the narrowest width (per width), from
    ``E ln R_kk^2 = ln(eps^2/2) + psi((H-k+1)/2) + ln 2``: ``-(psi_H - psi_Hmin) / (2 s_k)``,
    and the standard deviation of one run's ``t_k`` at each width, ``sqrt(psi'((H-k+1)/2)) / (2 s_k)``."""
    base = saxe.expected_log_overlap_shift(min(widths), k)
    shift = np.array([-(saxe.expected_log_overlap_shift(h, k) - base) / (2 * s_k) for h in widths])
    sd = np.array([math.sqrt(saxe.var_log_overlap(h, k)) / (2 * s_k) for h in widths])
    return shift, sd


def width_effect(run_widths, drop_times, s) -> dict:
    """Mean drop time per width and mode (``drop_times`` (B, K), ``run_widths`` (B,)), its change
    from the narrowest width, the derived change, and the z-score of their difference (standard
    error from the derived spread of ``ln chi^2``)."""
    run_widths, drop_times = np.asarray(run_widths), np.asarray(drop_times)
    widths = sorted(set(run_widths.tolist()))
    K = drop_times.shape[1]
    out = {"widths": widths, "mean": np.zeros((len(widths), K)), "shift": np.zeros((len(widths), K)),
           "derived": np.zeros((len(widths), K)), "z": np.zeros((len(widths), K)),
           "n": np.array([(run_widths == h).sum() for h in widths])}
    for k in range(K):
        derived, sd = width_shift_prediction(widths, k + 1, float(s[k]))
        means = np.array([drop_times[run_widths == h, k].mean() for h in widths])
        out["mean"][:, k] = means
        out["shift"][:, k] = means - means[0]
        out["derived"][:, k] = derived
        se = np.sqrt(sd ** 2 / out["n"] + sd[0] ** 2 / out["n"][0])
        out["z"][:, k] = np.abs(out["shift"][:, k] - derived) / se
        out["z"][0, k] = 0.0          # the reference width against itself
    return out


def saddle_hessian_min(model: TwoLayer, problem: Problem, theta: torch.Tensor) -> torch.Tensor:
    """Smallest eigenvalue of the loss Hessian at each of the parameter vectors ``theta`` (B, P)."""
    Hs = model.hessian(theta, problem.data)
    return torch.linalg.eigvalsh(Hs)[:, 0]


# A depth-3 stage k escapes at t_k = c_k / (s_k eps) with c_k set by the random initial weights
# (about +-8% scatter at width 32 on this page's measurements, +-50% at width 8): unlike depth 2,
# a smaller eps does not separate two stages further, only a larger ratio s_k / s_(k+1) does.
DEEP_MAX_RATIO = 0.75     # neighbouring modes the depth-3 net learns: s_(k+1) / s_k <= 0.75
DEEP_MAX_MODES = 4        # and at most four of them (the last plateau lasts ~ 1/(s_K eps))


def deep_modes(s) -> int:
    """How many leading modes of the spectrum ``s`` the depth-3 experiment learns: the longest run
    whose neighbours differ by at least ``1/DEEP_MAX_RATIO`` (a 33% margin over the scatter of
    the prefactors ``c_k``), at most ``DEEP_MAX_MODES``, at least one."""
    s = np.asarray(s, dtype=float)
    n = 1
    while n < min(len(s), DEEP_MAX_MODES) and s[n] / s[n - 1] <= DEEP_MAX_RATIO:
        n += 1
    return n


def truncated(problem: Problem, n: int) -> Problem:
    """The whitened problem whose teacher keeps only the first ``n`` modes of ``problem``'s."""
    T = (problem.a[:, :n] * problem.s[:n]) @ problem.b[:, :n].T
    return problem_from_data(saxe.whitened_teacher_data(T), n)


def deep_eps_bound(s, width: int) -> float:
    """Largest initial scale at which every depth-3 plateau is reached: a chain starting at
    ``u0 ~ (eps sqrt(H))^3`` has grown to ``~ (eps sqrt(H) / g)^3`` when the previous stage is
    learned (``g`` the smallest relative gap), which must stay small against ``s_K``. Returns
    ``g s_K^(1/3) / sqrt(H)`` (with ``s_1 = 1``); the chapter's default is 0.2 of it, so the leftover
    is ``0.2^3 ~ 1%`` of ``s_K``."""
    s = np.asarray(s, dtype=float) / float(s[0])
    gap = separation_gap(s) if len(s) > 1 else 1.0
    return gap * float(s[-1]) ** (1 / 3) / math.sqrt(width)


def deep_setup(problem: Problem, width: int, eps: float, seeds) -> tuple[MLP, torch.Tensor]:
    """A depth-3 linear MLP ``W_3 W_2 W_1`` with every entry N(0, eps^2)."""
    d, m = problem.moments.sxx.shape[0], problem.moments.syx.shape[0]
    net = MLP.build(d, width, 3, "linear", output_dim=m)
    theta = torch.stack([eps * torch.randn(net.n_params, generator=torch.Generator().manual_seed(int(s)),
                                           dtype=D.DTYPE) for s in seeds])
    return net, theta


def deep_map(net: MLP):
    def W(theta):
        Ws = net.unflatten(theta)
        out = Ws[0]
        for Wl in Ws[1:]:
            out = Wl @ out
        return out
    return W


def deep_flow(net: MLP, problem: Problem) -> GradientFlow:
    """Autograd flow of the depth-3 linear net on the moment loss of its end-to-end map."""
    W = deep_map(net)
    return GradientFlow(lambda th: problem.moments.loss(W(th)))
