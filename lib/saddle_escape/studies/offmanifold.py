"""Off-manifold escape: full-width He-normal networks with ``r`` layers rescaled by eps.

The chapter's experiment in three calls:

* :func:`~saddle_escape.sim.reduced.bottleneck_layers` -- which layers are the bottleneck (the last
  ``r``, as in :func:`~saddle_escape.sim.reduced.bottleneck_scales`);
* :func:`pilot_loss_reference` -- the loss the escape reaches, from one pilot run stopped a fixed
  multiple of its drop time after the drop (full-width nets on Monte-Carlo data keep learning
  slowly after the escape, so waiting for the loss to *settle* costs far more than it tells);
* :func:`escape_sweep` -- escape times of a batch ``theta0`` (B, P) in one integration: a run stops
  when its loss crosses halfway between its own plateau ``L(0)`` and the reference, and saves
  observables (loss, signal energy, manifold distance) on a shared log-time grid on the way.

:func:`run_experiments` runs several (data, r) experiments as independent tasks through a ``map``
(a chapter's ``book.task_map()``: on a cluster when one is configured), with identical numbers.

Signal energy: ``gamma(W) = ||E[y_hat x]||^2``, the squared end-to-end input-output correlation
(the write-up's ``f = E[y_hat x^T]``, squared). With ``r`` layers of scale eps it is ``O(eps^(2r))``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sim import activations, fits
from ..sim.data import Dataset
from ..sim.integrate import Event, GradientFlow, PIController, SaveAt, last_value_cache, solve
from ..sim.networks import MLP, manifold_distance
from ..sim.errors import ParameterError
from ..sim.reduced import bottleneck_layers

OBSERVABLES = ("loss", "gamma", "gamma_rate", "distance", "norm")


def signal_energy(net: MLP, data: Dataset, theta: torch.Tensor) -> torch.Tensor:
    """``gamma = ||E[y_hat x]||^2`` (B,), summed over outputs."""
    yhat, _ = net.forward(theta, data.x)                       # (B, n, m)
    f = torch.einsum("bnm,nd,n->bmd", yhat, data.x, data.w)    # E[y_hat x^T]
    return (f * f).flatten(1).sum(-1)


def bottleneck_distance(net: MLP, theta: torch.Tensor, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of the bottleneck layers from the permutation-symmetric manifold (B,), and the
    bottleneck's Frobenius norm (B,), so ``distance / norm`` is the relative distance."""
    sub = MLP(tuple(net.widths[l - 1] for l in layers) + (net.widths[layers[-1]],), net.activation)
    Ws = net.unflatten(theta)
    part = MLP.flatten([Ws[l - 1] for l in layers])
    return manifold_distance(sub, part), part.norm(dim=-1)


def observables(net: MLP, data: Dataset, layers, loss_fn):
    """``theta (B, P) -> (B, 5)``: loss, signal energy gamma, its rate under gradient flow
    ``dgamma/dt = -<grad gamma, grad L>`` (exact, by autograd), bottleneck manifold distance, norm."""
    def fn(theta):
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            loss = loss_fn(th)
            gamma = signal_energy(net, data, th)
            gl, = torch.autograd.grad(loss.sum(), th)
            gg, = torch.autograd.grad(gamma.sum(), th)
        dist, norm = bottleneck_distance(net, theta, layers)
        rate = -(gl * gg).sum(-1)
        return torch.stack([loss.detach(), gamma.detach(), rate, dist, norm], -1)
    return fn


def pilot_loss_reference(term: GradientFlow, theta0: torch.Tensor, t_max: float, drop: float = 0.5,
                         extra: float = 1.0, rtol: float = 1e-7, atol: float = 1e-12, stepper=None) -> float:
    """Loss of one pilot run (1, P) at ``(1 + extra) t_drop``, where ``t_drop`` is when its loss
    first falls below ``drop * L(0)``. ``stepper``: None (Dopri5 with error control) or a
    :class:`~saddle_escape.sim.relative_step.RelativeStepGD` (solver and controller in one)."""
    L0 = term.loss(theta0)
    kw = dict(controller=PIController(rtol=rtol, atol=atol)) if stepper is None else dict(solver=stepper, controller=stepper)
    sol = solve(term, theta0, t_max, events=[Event(lambda t, y, runs: term.loss(y) - drop * L0[runs], -1, name="drop")],
                **kw)
    t_drop = sol.event_times[0, 0].item()
    if not math.isfinite(t_drop):
        raise RuntimeError(f"the pilot run did not escape before t_max = {t_max:g}; use a larger pilot eps")
    sol = solve(term, sol.y_final, extra * t_drop, **kw)
    return term.loss(sol.y_final).item()


@dataclass
class Sweep:
    """Escape times (B,) (``inf`` = censored) and the ``OBSERVABLES`` (B, T, 5) on the grid ``ts``."""

    times: np.ndarray
    ts: np.ndarray
    obs: np.ndarray
    solution: object
    level_obs: np.ndarray | None = None   # (B, K, 5): observables where gamma crossed each level
    escape_obs: np.ndarray | None = None  # (B, 5): observables at the escape (NaN if censored)

    @property
    def censored(self) -> np.ndarray:
        return ~np.isfinite(self.times)


def escape_sweep(term: GradientFlow, theta0: torch.Tensor, loss_ref: float, t_max: float, obs_fn,
                 gamma_fn, gamma_factors=(), n_save: int = 120, t_min_save: float = 1e-2,
                 rtol: float = 1e-7, atol: float = 1e-12, stepper=None, escape_drop: float | None = None,
                 max_steps: int = 1_000_000) -> Sweep:
    """All runs of ``theta0`` (B, P) in one integration; each stops at its escape: the loss crossing
    ``(L(0) + loss_ref) / 2``, or ``escape_drop * L(0)`` when ``escape_drop`` is given (then
    ``loss_ref`` is not used). ``max_steps``: the integrator's step budget per run (a DivergenceError
    when it is spent before every run escaped or reached ``t_max``). ``obs_fn`` (theta -> (B, len(OBSERVABLES)), e.g.
    :func:`observables`) is saved at t = 0 and on a log grid from ``t_min_save`` to ``t_max``.
    The state is also caught, by events, where ``gamma_fn`` (theta -> (B,)) first reaches
    ``gamma(0) * factor`` for each of ``gamma_factors`` -- the escape of a deep bottleneck is too
    abrupt in time for any fixed time grid to resolve -- and ``obs_fn`` there is ``level_obs``."""
    L0 = term.loss(theta0)
    half = 0.5 * (L0 + loss_ref) if escape_drop is None else escape_drop * L0
    gamma_fn = last_value_cache(gamma_fn)   # every level's event asks for gamma of the same state
    g0 = gamma_fn(theta0)
    events = [Event(lambda t, y, runs, c=c: math.log(c) + torch.log(g0[runs]) - torch.log(gamma_fn(y)),
                    -1, terminal=False, name=f"gamma x{c:g}") for c in gamma_factors]
    events.append(Event(lambda t, y, runs: term.loss(y) - half[runs], -1, terminal=True, name="loss"))
    ts = torch.cat([torch.zeros(1, dtype=theta0.dtype),
                    torch.logspace(math.log10(t_min_save), math.log10(t_max), n_save, dtype=theta0.dtype)])
    # the slowest escapes (class C, r = 5, smallest eps) come after t ~ 3e12 and still need steps
    # of O(0.1): the default collapse test (rejected steps below 1e-13 t) would stop them there
    kw = dict(controller=PIController(rtol=rtol, atol=atol)) if stepper is None else dict(solver=stepper, controller=stepper)
    sol = solve(term, theta0, t_max, events=events, saveat=SaveAt(ts, fn=obs_fn), min_relative_step=1e-15,
                max_steps=max_steps, **kw)

    def at_events(k):  # obs_fn at the states where event k fired (NaN where it did not)
        out = np.full((theta0.shape[0], len(OBSERVABLES)), np.nan)
        hit = torch.isfinite(sol.event_times[:, k])
        if hit.any():
            out[hit.cpu().numpy()] = obs_fn(sol.event_states[k][hit]).cpu().numpy()
        return out

    level_obs = np.stack([at_events(k) for k in range(len(gamma_factors))], 1) if len(gamma_factors) else None
    return Sweep(sol.event_times[:, -1].cpu().numpy(), sol.ts.cpu().numpy(), sol.ys.cpu().numpy(), sol,
                 level_obs, at_events(-1))


def log_derivative_exponent(gamma, rate, lo, hi):
    """Slope of ``log(dgamma/dt)`` against ``log gamma`` over the saved points of one run with
    gamma in ``[lo, hi]`` and a positive rate; ``nan`` with fewer than 3 such points."""
    gamma, rate = np.asarray(gamma, float), np.asarray(rate, float)
    keep = np.isfinite(gamma) & np.isfinite(rate) & (gamma >= lo) & (gamma <= hi) & (rate > 0)
    if keep.sum() < 3:
        return math.nan
    return fits.linear_fit(np.log(gamma[keep]), np.log(rate[keep]))[0]


def digits_covariance(input_dim: int) -> torch.Tensor:
    """Input covariance from scikit-learn's bundled digits (no download): the 8x8 pixel features,
    standardised (constant pixels dropped), projected on their top ``input_dim`` principal
    components -- a diagonal matrix of the top eigenvalues, scaled to mean 1 (trace = input_dim)."""
    from sklearn.datasets import load_digits

    X = load_digits().data
    X = X[:, X.std(0) > 0]
    if not 1 <= input_dim <= X.shape[1]:
        raise ParameterError("input_dim", input_dim, f"must be in 1..{X.shape[1]} for the digits covariance")
    X = (X - X.mean(0)) / X.std(0)
    lam = np.linalg.eigvalsh(np.cov(X, rowvar=False))[::-1][:input_dim]
    return torch.diag(torch.as_tensor(lam / lam.mean(), dtype=torch.float64))


@dataclass
class Experiment:
    """One bottleneck depth ``r``: every (seed, eps) run of it, integrated as one batch."""

    r: int
    layers: tuple
    seeds: np.ndarray       # (B,)
    eps: np.ndarray         # (B,)
    loss_ref: float
    sweep: Sweep

    @property
    def times(self) -> np.ndarray:
        return self.sweep.times

    @property
    def gamma0(self) -> np.ndarray:
        return self.sweep.obs[:, 0, 1]

    def rows(self, **extra) -> list[dict]:
        out = []
        for b in range(len(self.eps)):
            t = self.times[b]
            out.append(dict(extra, r=self.r, seed=int(self.seeds[b]), eps=float(self.eps[b]),
                            t_esc=float(t) if np.isfinite(t) else None, censored=bool(not np.isfinite(t)),
                            gamma0=float(self.gamma0[b])))
        return out


def run_experiment(net: MLP, data: Dataset, r: int, eps_values, seeds, pilot_eps: float = 0.3,
                   t_max: float = 1e12, rtol: float = 1e-6, gamma_factors=tuple(10.0 ** np.arange(1, 19)),
                   n_save: int = 120, step_fraction: float | None = None, pilot_drop: float = 0.5,
                   escape_drop: float | None = None, max_steps: int = 1_000_000) -> Experiment:
    """He-normal nets (one per seed), the last ``r`` layers scaled by each eps; a pilot at
    ``pilot_eps`` (first seed) sets the reference loss (at twice the time its loss first fell below
    ``pilot_drop * L(0)``); all (seed, eps) runs go in one batch.

    ``step_fraction`` None: Dopri5 with error control ``rtol``; a number c: gradient descent with
    relative steps (:class:`~saddle_escape.sim.relative_step.RelativeStepGD`, every layer moves by at
    most the fraction c per step; the pilot's steps also at most 0.5) -- for a non-smooth activation.

    ``escape_drop`` None: the escape is the loss crossing halfway between ``L(0)`` and the pilot's
    reference; a number q: the crossing of ``q * L(0)``, no pilot (``loss_ref`` is NaN) -- for an
    activation whose first drop ends at a loss that varies from run to run (ReLU), sometimes above
    the halfway level, where the run would wait on a second plateau that has nothing to do with eps."""
    from ..sim.relative_step import RelativeStepGD
    from ..sim.networks import he_normal, population_loss

    layers = bottleneck_layers(net.depth, r)
    loss_fn = population_loss(net, data)
    term = GradientFlow(loss_fn)
    gd = None if step_fraction is None else RelativeStepGD(net.sizes, step_fraction)
    if escape_drop is None:
        loss_ref = pilot_loss_reference(term, he_normal(net, [seeds[0]], eps=pilot_eps, bottleneck=layers),
                                        t_max, drop=pilot_drop, rtol=rtol,
                                        stepper=None if gd is None else RelativeStepGD(net.sizes, step_fraction, h_max=0.5))
    else:
        loss_ref = math.nan
    S = np.array([s for s in seeds for _ in eps_values])
    E = np.array([e for _ in seeds for e in eps_values], dtype=float)
    theta0 = he_normal(net, S.tolist(), eps=torch.as_tensor(E), bottleneck=layers)
    sweep = escape_sweep(term, theta0, loss_ref, t_max, observables(net, data, layers, loss_fn),
                         lambda y: signal_energy(net, data, y), gamma_factors, n_save=n_save, rtol=rtol,
                         stepper=gd, escape_drop=escape_drop, max_steps=max_steps)
    return Experiment(r, layers, S, E, loss_ref, sweep)


def with_depth(net: MLP, depth: int) -> MLP:
    """``net`` with ``depth`` layers: the same input, hidden width, output and activation."""
    return MLP.build(net.widths[0], net.widths[1], depth, net.activation, output_dim=net.widths[-1])


def run_experiments(net: MLP, items, eps_values, seeds, map=map, front_layers: int | None = None,
                    **options) -> list[Experiment]:
    """:func:`run_experiment` for every ``(data, r)`` of ``items``, in input order.

    Each item is one batched integration (all its seeds and eps), an independent task: ``map`` is
    the builtin (in this process) or a chapter's ``book.task_map()`` (on a cluster), with identical
    numbers. What crosses to a worker pickles: the network travels as its widths and activation
    name (an activation holds lambdas), ``options`` are :func:`run_experiment`'s keywords.

    ``front_layers`` None: every item runs on ``net``; a number k: the item of bottleneck depth r
    runs on :func:`with_depth` ``(net, r + k)``, k He-normal front layers in front of the bottleneck
    (the quadratic takes k = 1: every front layer squares the tails of its inputs)."""
    act = net.activation
    task = functools.partial(_experiment_task, tuple(net.widths), act.name, tuple(sorted(act.params.items())),
                             eps_values=list(eps_values), seeds=list(seeds), front_layers=front_layers, **options)
    return list(map(task, list(items)))


def _experiment_task(widths, activation, act_params, item, front_layers=None, **options) -> Experiment:
    """One ``(data, r)`` of :func:`run_experiments`, with the network rebuilt from its description."""
    data, r = item
    net = MLP(tuple(widths), activations.get(activation, **dict(act_params)))
    if front_layers is not None:
        net = with_depth(net, r + front_layers)
    return run_experiment(net, data, r, **options)


def first_bottleneck_preactivations(net: MLP, data: Dataset, r: int, seeds, eps: float) -> torch.Tensor:
    """Pre-activations (B, n, N) of the first bottleneck layer ``L - r + 1`` at the He-normal
    initialisation of :func:`run_experiment` (seeds ``seeds``, bottleneck scale ``eps``), on every
    sample: the front's features times the eps-scaled first bottleneck matrix. For the quadratic
    ``sigma(z) = z + a z^2``, ``a |z|`` is the size of the curvature term against the linear one,
    which the escape law's derivation takes small."""
    from ..sim.networks import he_normal

    layers = bottleneck_layers(net.depth, r)
    _, zs = net.forward(he_normal(net, list(seeds), eps=eps, bottleneck=layers), data.x)
    return zs[layers[0] - 1]


def front_curvature(net: MLP, data: Dataset, r: int, seeds, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per seed, at the He-normal start of :func:`run_experiment`: the quadratic's curvature term
    ``a |z|`` on the worst sample of the first bottleneck layer (:func:`first_bottleneck_preactivations`;
    the derivation needs it small) and the initial loss. Forward passes only."""
    from ..sim.networks import he_normal, population_loss

    z = first_bottleneck_preactivations(net, data, r, seeds, eps)
    L0 = population_loss(net, data)(he_normal(net, list(seeds), eps=eps, bottleneck=bottleneck_layers(net.depth, r)))
    return net.activation.params["a"] * z.abs().amax((1, 2)).numpy(), L0.numpy()


def offset_power_law(eps, t, groups, n_boot: int = 400, seed: int = 0, level: float = 0.95):
    """Fit ``t = A eps^p + C`` -- the power law plus the O(1) time the escape itself takes -- by
    least squares on ``log t``; returns (:class:`~saddle_escape.sim.fits.Fit` of the exponent ``p``
    with a bootstrap interval over ``groups`` (seeds), the offset ``C``).

    A plain log-log fit reads the offset as curvature and biases ``p`` towards 0 at the large-eps
    end; fitting ``C`` removes that without choosing a window by looking at the theory."""
    from scipy.optimize import least_squares

    eps, t, groups = np.asarray(eps, float), np.asarray(t, float), np.asarray(groups)
    keep = np.isfinite(t) & (t > 0)
    eps, t, groups = eps[keep], t[keep], groups[keep]
    start = fits.power_law(eps, t)
    lower_c = -0.5 * t.min()       # the model must stay positive at every point

    def solve(e, tt):
        def resid(x):
            return np.log(np.exp(x[0]) * e ** x[1] + x[2]) - np.log(tt)
        x0 = [start.intercept, start.slope, 0.0]
        return least_squares(resid, x0, bounds=([-np.inf, -np.inf, lower_c], [np.inf, np.inf, np.inf]),
                             x_scale=[1.0, 0.1, max(float(t.min()), 1.0)], xtol=1e-12, ftol=1e-12).x

    best = solve(eps, t)
    labels = np.unique(groups)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = np.concatenate([np.flatnonzero(groups == g) for g in rng.choice(labels, len(labels))])
        if np.ptp(eps[idx]) > 0:
            boot.append(solve(eps[idx], t[idx])[1])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    model = np.log(np.exp(best[0]) * eps ** best[1] + best[2])
    ly = np.log(t)
    r2 = 1 - np.sum((ly - model) ** 2) / np.sum((ly - ly.mean()) ** 2)
    fit = fits.Fit(float(best[1]), float(best[0]), float(lo), float(hi), float(r2),
                   (float(eps.min()), float(eps.max())), int(keep.sum()))
    return fit, float(best[2])


def step_exponent_change(eps, times, times_half, seeds) -> float:
    """``|p(c) - p(c/2)|``: how much the exponent of :func:`offset_power_law` moves when the step
    fraction of relative-step gradient descent is halved (``times``, ``times_half`` per run). A
    step error that is a constant factor on the times leaves it ~0; one that depends on eps
    (e.g. a step not scaled with the plateau's time scale) moves it."""
    return abs(offset_power_law(eps, times, seeds)[0].slope - offset_power_law(eps, times_half, seeds)[0].slope)


def inequality_ratios(exp: Experiment, k: float, lo_factor: float = 1e3, hi: float = 1e-3) -> np.ndarray:
    """``dgamma/dt / gamma^k`` (B, K) at the states where gamma reached ``10^j gamma(0)``, NaN
    outside the saddle-phase window ``[lo_factor gamma(0), hi]``. If ``dgamma/dt >= c gamma^k``
    holds there with one constant ``c`` for every eps and seed, these ratios stay within a bounded
    band; with a wrong ``k`` they drift as a power of gamma, by decades across the window."""
    g, rate = exp.sweep.level_obs[:, :, 1], exp.sweep.level_obs[:, :, 2]
    inside = np.isfinite(g) & (g >= lo_factor * exp.gamma0[:, None]) & (g <= hi) & (rate > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inside, rate / np.abs(g) ** k, np.nan)


def inequality_exponents(exp: Experiment, lo_factor: float = 1e3, hi: float = 1e-3) -> np.ndarray:
    """Per run, the slope of log(dgamma/dt) vs log gamma over gamma in [lo_factor gamma(0), hi]."""
    lo = exp.sweep.level_obs
    return np.array([log_derivative_exponent(lo[b, :, 1], lo[b, :, 2], lo_factor * exp.gamma0[b], hi)
                     for b in range(lo.shape[0])])
