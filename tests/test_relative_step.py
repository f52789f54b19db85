"""Relative-step gradient descent (sim/relative_step.py): first order in c against gradient flow,
and for ReLU, whose kink makes Dopri5 chatter, escape times that follow eps^-(r-2) in few steps."""
import math

import numpy as np
import pytest
import torch

from saddle_escape.sim import data, networks
from saddle_escape.sim.errors import ParameterError
from saddle_escape.sim.integrate import Event, GradientFlow, PIController, solve
from saddle_escape.sim.relative_step import RelativeStepGD
from saddle_escape.studies import offmanifold as om

EPS = [3e-2, 3e-3, 3e-4]


def escape_times(activation, solver=None, controller=None, r=3):
    ds = data.single_index_samples(data.ScalarTeacher(1.0, 0.3), 128, 16, seed=0)
    net = networks.MLP.build(16, 8, 6, activation)
    loss = networks.population_loss(net, ds)
    term = GradientFlow(loss)
    th = networks.he_normal(net, [1] * len(EPS), eps=torch.tensor(EPS, dtype=torch.float64),
                            bottleneck=om.bottleneck_layers(6, r))
    L0 = term.loss(th)
    # a tenth of the way down: ReLU's first drop is partial (about 40% of the loss here)
    ev = Event(lambda t, y, runs: term.loss(y) - 0.9 * L0[runs], -1)
    solver = solver(net.sizes) if callable(solver) else solver
    sol = solve(term, th, 1e9, solver=solver, controller=controller or solver, events=[ev])
    return sol.event_times[:, 0].numpy(), int(sol.n_steps.max())


def test_first_order_in_c_against_gradient_flow():
    exact, _ = escape_times("tanh", controller=PIController(rtol=1e-9, atol=1e-14), solver=None)
    err = {}
    for c in (0.04, 0.02):
        t, steps = escape_times("tanh", solver=lambda s, c=c: RelativeStepGD(s, c))
        err[c] = t / exact - 1
        assert steps < 2000
    assert np.all(err[0.04] > 0) and np.all(err[0.04] < 0.04 * (3 - 1))    # below (r-1) c
    np.testing.assert_allclose(err[0.04] / err[0.02], 2.0, rtol=0.15)      # first order
    assert np.ptp(err[0.02]) < 0.2 * err[0.02].mean()                      # about the same at every eps


def test_relu_escape_follows_the_power_law_in_few_steps():
    t1, steps = escape_times("relu", solver=lambda s: RelativeStepGD(s, 0.05))
    t2, _ = escape_times("relu", solver=lambda s: RelativeStepGD(s, 0.025))
    assert steps < 1000 and np.all(np.isfinite(t1))
    change = t1 / t2 - 1
    assert np.all((change > 0) & (change < 0.06))
    slopes = np.diff(np.log(t2)) / np.diff(np.log(EPS))
    assert abs(slopes[-1] + 1) < 0.02                          # r = 3: t_esc ~ eps^-1
    assert abs(slopes[-1] - np.diff(np.log(t1))[-1] / np.diff(np.log(EPS))[-1]) < 0.01   # c leaves it


def test_refuses_a_bad_fraction():
    with pytest.raises(ParameterError, match="step_fraction"):
        RelativeStepGD([3], 1.5)
