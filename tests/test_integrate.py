"""The batched integrator: accuracy against closed forms, events, dense output, gradient descent,
censoring, divergence and parameter errors, determinism."""
import math

import numpy as np
import pytest
import torch

from saddle_escape.sim import fits, networks, reduced
from saddle_escape.sim.data import ScalarTeacher
from saddle_escape.sim.errors import DivergenceError
from saddle_escape.sim.integrate import (ConstantStep, Dopri5, Euler, Event, GradientFlow, ODETerm,
                                     PIController, SaveAt, solve)
from saddle_escape.book.params import ParameterError

F64 = torch.float64
C = 1.0
Y0 = torch.tensor([[0.1], [0.2], [0.5]], dtype=F64)
THRESHOLD = 2.0


def _power_term(r):
    """ydot = c y^(r-1): the saddle's polynomial escape in one variable."""
    return ODETerm(lambda t, y: C * y ** (r - 1))


def _exact(r, y0, t):
    if r == 3:
        return y0 / (1 - C * y0 * t)
    return y0 / torch.sqrt(1 - 2 * C * y0**2 * t)


def _hit_time(r, y0, Y):
    """When y(t) reaches Y: (y0^(2-r) - Y^(2-r)) / (c (r - 2))."""
    return (y0 ** (2 - r) - Y ** (2 - r)) / (C * (r - 2))


@pytest.mark.parametrize("r", [3, 4])
@pytest.mark.parametrize("rtol", [1e-4, 1e-7, 1e-10])
def test_closed_form_final_value_event_and_dense_output(r, rtol):
    term = _power_term(r)
    ctrl = PIController(rtol=rtol, atol=1e-14)
    T = _hit_time(r, Y0[:, 0], THRESHOLD)
    # final value at 0.8 of the hitting time (y grows by a factor of a few)
    t1 = 0.8 * T
    sol = solve(term, Y0, t1, controller=ctrl)
    assert torch.equal(sol.t_final, t1)
    exact = _exact(r, Y0[:, 0], t1)
    assert ((sol.y_final[:, 0] - exact) / exact).abs().max() <= 10 * rtol
    # event: y crosses the threshold, located on the dense output
    sol = solve(term, Y0, 1.5 * T, controller=ctrl,
                events=[Event(lambda t, y, runs: THRESHOLD - y[:, 0], direction=-1)])
    assert sol.stopped_by_event.all() and not sol.censored.any()
    assert ((sol.event_times[:, 0] - T) / T).abs().max() <= 10 * rtol
    assert torch.allclose(sol.event_states[0][:, 0], torch.full((3,), THRESHOLD, dtype=F64), rtol=10 * rtol)
    assert torch.equal(sol.t_final, sol.event_times[:, 0])
    # dense output on a grid shared by all runs
    ts = torch.linspace(0, float(t1.min()), 40, dtype=F64)
    sol = solve(term, Y0, t1, controller=ctrl, saveat=SaveAt(ts))
    assert sol.saved.all() and sol.ys.shape == (3, 40, 1)
    exact = _exact(r, Y0, ts[None, :])
    assert ((sol.ys[..., 0] - exact) / exact).abs().max() <= 20 * rtol


def test_tighter_tolerance_is_more_accurate_and_costs_more_steps():
    errs, steps = [], []
    T = _hit_time(3, Y0[:, 0], THRESHOLD)
    for rtol in (1e-5, 1e-8, 1e-11):
        sol = solve(_power_term(3), Y0, 0.9 * T, controller=PIController(rtol=rtol, atol=1e-15))
        ex = _exact(3, Y0[:, 0], 0.9 * T)
        errs.append(((sol.y_final[:, 0] - ex) / ex).abs().max().item())
        steps.append(int(sol.n_steps.sum()))
    assert errs[0] > errs[1] > errs[2]
    assert steps[0] < steps[1] < steps[2]


@pytest.mark.parametrize("rtol", [1e-4, 1e-6])
def test_predictive_control_follows_the_escape_without_rejections(rtol):
    """Approaching an escape the time scale shrinks geometrically (ydot = y^3 from 1e-2 ... 1e-4,
    t_esc up to 5e7). A controller that only reacts to the last error rejects about every other
    step there; the predictive one follows the trend, at the same accuracy."""
    y0 = torch.tensor([[1e-2], [1e-3], [1e-4]], dtype=F64)
    T = (y0[:, 0] ** -2 - 1) / 2
    hit_one = [Event(lambda t, y, runs: 1.0 - y[:, 0], direction=-1)]
    out = {}
    for predictive in (True, False):
        sol = solve(_power_term(4), y0, 1e12, events=hit_one,
                    controller=PIController(rtol=rtol, atol=1e-14, predictive=predictive))
        assert ((sol.event_times[:, 0] - T) / T).abs().max() <= 10 * rtol
        out[predictive] = sol
    pred, plain = out[True], out[False]
    assert (pred.n_rejected <= 0.05 * pred.n_steps).all()
    assert (plain.n_rejected >= 0.25 * plain.n_steps).all()
    assert (pred.n_steps < plain.n_steps).all()


def test_the_first_step_does_not_depend_on_the_unit_of_time():
    """ydot = -k y to t = 3 / k is one problem in units of 1 / k: the solver must take the same steps
    for k = 1 and k = 1e-12 (a plateau's slow field). Hairer's starting rule falls back to an
    absolute h = 1e-6 for a slow field and pays about a step per decade of time to recover."""
    y0 = torch.ones(1, 3, dtype=F64)
    steps = {}
    for k in (1.0, 1e-12):
        sol = solve(ODETerm(lambda t, y, k=k: -k * y), y0, 3.0 / k, controller=PIController(rtol=1e-6, atol=1e-30))
        assert ((sol.y_final - math.exp(-3.0)) / math.exp(-3.0)).abs().max() <= 1e-5
        steps[k] = int(sol.n_steps[0])
    assert steps[1e-12] == steps[1.0]


def test_saveat_fn_and_runs_stop_at_their_own_events():
    term = _power_term(3)
    T = _hit_time(3, Y0[:, 0], THRESHOLD)
    ts = torch.linspace(0, float(T.max()), 30, dtype=F64)
    sol = solve(term, Y0, 10.0, controller=PIController(rtol=1e-9),
                events=[Event(lambda t, y, runs: THRESHOLD - y[:, 0], direction=-1)],
                saveat=SaveAt(ts, fn=lambda y: torch.cat([y, y**2], -1)))
    assert sol.ys.shape == (3, 30, 2)
    # saved exactly up to each run's event time, NaN (and saved=False) after it
    for b in range(3):
        mask = ts <= sol.event_times[b, 0]
        assert torch.equal(sol.saved[b], mask)
        assert torch.isnan(sol.ys[b, ~mask]).all()
        assert torch.allclose(sol.ys[b, mask, 1], sol.ys[b, mask, 0] ** 2, rtol=1e-14)


def _gd_problem():
    chain = reduced.ScalarChain("tanh", 3, ScalarTeacher(1.0, 0.3), n_nodes=20)
    X0 = reduced.bottleneck_scales(3, 1, [0.5, 0.2], big=1.0)
    return chain, X0


def test_euler_constant_step_is_gradient_descent_exactly():
    chain, X0 = _gd_problem()
    lr, n = 1 / 64, 200          # a power of two: t = k lr is exact in floating point
    sol = solve(chain.term(), X0, n * lr, solver=Euler(), controller=ConstantStep(lr))
    theta = X0.clone()
    for _ in range(n):
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(chain.loss(theta).sum(), theta)
        theta = theta.detach() - lr * g
    assert torch.equal(sol.y_final, theta)
    assert (sol.n_steps == n).all() and (sol.n_rejected == 0).all()
    assert torch.equal(sol.t_final, torch.full((2,), n * lr, dtype=F64))


def test_gradient_descent_converges_to_the_flow_with_order_one():
    chain, X0 = _gd_problem()
    T = 2.0
    ref = solve(chain.term(), X0, T, controller=PIController(rtol=1e-12, atol=1e-14)).y_final
    lrs = [T / 2**k for k in range(4, 9)]
    errs = [(solve(chain.term(), X0, T, solver=Euler(), controller=ConstantStep(lr)).y_final - ref)
            .norm(dim=-1).max().item() for lr in lrs]
    fit = fits.power_law(lrs, errs)
    assert fit.slope == pytest.approx(1.0, abs=0.05), (lrs, errs)
    assert errs[-1] < errs[0] / 10


def test_censoring_when_the_event_never_fires():
    sol = solve(_power_term(3), Y0, 0.5, controller=PIController(rtol=1e-8),
                events=[Event(lambda t, y, runs: THRESHOLD - y[:, 0], direction=-1)])
    assert torch.isinf(sol.event_times).all()
    assert sol.censored.all() and not sol.stopped_by_event.any()
    assert torch.allclose(sol.t_final, torch.full((3,), 0.5, dtype=F64))
    assert torch.isnan(sol.event_states[0]).all()


def test_event_direction_and_per_run_thresholds():
    thresholds = torch.tensor([0.15, 0.3, 0.6], dtype=F64)
    sol = solve(_power_term(3), Y0, 100.0, controller=PIController(rtol=1e-10),
                events=[Event(lambda t, y, runs: thresholds[runs] - y[:, 0], direction=-1, name="up"),
                        Event(lambda t, y, runs: thresholds[runs] - y[:, 0], direction=+1,
                              terminal=False, name="wrong way")])
    T = _hit_time(3, Y0[:, 0], thresholds)
    assert torch.allclose(sol.event_times[:, 0], T, rtol=1e-8)
    assert sol.censored[:, 1].all()


def test_divergence_on_nan():
    nan_term = ODETerm(lambda t, y: torch.full_like(y, math.nan))
    with pytest.raises(DivergenceError, match="non-finite"):
        solve(nan_term, Y0, 1.0)
    # NaN appearing later: adaptive steps shrink until the step collapses; the message names rtol/atol
    late = ODETerm(lambda t, y: torch.where(t[:, None] < 0.5, -y, torch.full_like(y, math.nan)))
    with pytest.raises(DivergenceError, match="rtol"):
        solve(late, Y0, 1.0)
    # with gradient descent the message names the step size
    with pytest.raises(DivergenceError, match="step_size"):
        solve(late, Y0, 1.0, solver=Euler(), controller=ConstantStep(0.1))


def test_divergence_on_blow_up():
    blow = ODETerm(lambda t, y: y * y)              # y = 1/(1 - t): blows up at t = 1
    with pytest.raises(DivergenceError, match=r"rtol|atol"):
        solve(blow, torch.ones(2, 1, dtype=F64), 2.0, controller=PIController(rtol=1e-6))
    with pytest.raises(DivergenceError, match="step_size"):
        solve(blow, torch.ones(2, 1, dtype=F64), 2.0, solver=Euler(), controller=ConstantStep(0.01))
    # gradient descent above the stability limit 2 / curvature on L = y^2 (curvature 2)
    quad = GradientFlow(lambda th: (th**2).sum(-1))
    with pytest.raises(DivergenceError, match="step_size"):
        solve(quad, torch.ones(1, 3, dtype=F64), 1e3, solver=Euler(), controller=ConstantStep(1.5))


@pytest.mark.parametrize("make, name", [
    (lambda: PIController(rtol=-1e-6), "rtol"),
    (lambda: PIController(rtol=0.0), "rtol"),
    (lambda: PIController(atol=math.nan), "atol"),
    (lambda: ConstantStep(0.0), "step_size"),
    (lambda: ConstantStep(-0.1), "step_size"),
    (lambda: ConstantStep(math.inf), "step_size"),
    (lambda: solve(ODETerm(lambda t, y: -y), Y0, 0.0), "t_max"),
    (lambda: solve(ODETerm(lambda t, y: -y), Y0, -1.0), "t_max"),
    (lambda: solve(ODETerm(lambda t, y: -y), Y0[:, 0], 1.0), "y0.shape"),
    (lambda: solve(ODETerm(lambda t, y: -y), Y0, 1.0, saveat=SaveAt(torch.tensor([1.0, 0.5], dtype=F64))),
     "saveat.ts"),
])
def test_parameter_errors_name_the_argument(make, name):
    with pytest.raises(ParameterError) as err:
        make()
    assert err.value.name == name
    assert isinstance(err.value, ValueError)


def test_deterministic():
    chain, X0 = _gd_problem()
    ev = [Event(lambda t, y, runs: 0.3 - chain.loss(y), direction=+1, terminal=False)]
    a = solve(chain.term(), X0, 5.0, controller=PIController(rtol=1e-9), events=ev,
              saveat=SaveAt(torch.linspace(0, 5, 11, dtype=F64)))
    b = solve(chain.term(), X0, 5.0, controller=PIController(rtol=1e-9), events=ev,
              saveat=SaveAt(torch.linspace(0, 5, 11, dtype=F64)))
    assert torch.equal(a.y_final, b.y_final)
    assert torch.equal(a.event_times, b.event_times)
    assert torch.equal(a.ys, b.ys)
    assert torch.equal(a.n_steps, b.n_steps)


def test_solution_bookkeeping():
    term = _power_term(3)
    sol = solve(term, Y0, 1.0, controller=PIController(rtol=1e-8))
    assert sol.calls == term.calls and sol.run_evals <= 3 * sol.calls
    assert 0.0 <= sol.overhead_fraction < 1.0
    assert sol.seconds >= sol.seconds_in_term


def test_gradient_flow_reuses_its_last_evaluation_and_notices_changes():
    calls = []
    term = GradientFlow(lambda th: (calls.append(1), (th**2).sum(-1) / 2)[1])
    y = torch.tensor([[1.0, 2.0]], dtype=F64)
    g = term(0.0, y)
    assert torch.equal(g, -y) and len(calls) == 1
    # the loss of the same, unchanged tensor and the gradient again: no new evaluation
    assert term.loss(y).item() == 2.5 and torch.equal(term(1.0, y), -y)
    assert len(calls) == 1 and term.calls == 1
    g.mul_(0)                                     # the caller's copy is its own
    assert torch.equal(term(0.0, y), -y)
    y.add_(1.0)                                   # changed in place: recomputed
    assert term.loss(y).item() == 6.5 and len(calls) == 2
    assert torch.equal(term(0.0, y), -y) and len(calls) == 3
    assert term.loss(y.clone()).item() == 6.5 and len(calls) == 4   # another tensor: recomputed
