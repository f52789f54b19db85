"""Fast checks of the off-manifold helpers (chapter 06)."""
import math

import numpy as np
import pytest
import torch

from saddle_escape.sim import data, networks
from saddle_escape.studies import offmanifold as om
from saddle_escape.sim.integrate import GradientFlow
from saddle_escape.book.params import ParameterError


@pytest.fixture(scope="module")
def setup():
    ds = data.single_index_samples(data.ScalarTeacher(1.0, 0.3), 64, 4, seed=0)
    net = networks.MLP.build(4, 6, 4, "tanh")
    return net, ds


def test_bottleneck_layers():
    assert om.bottleneck_layers(6, 3) == (4, 5, 6)
    with pytest.raises(ParameterError):
        om.bottleneck_layers(4, 5)


def test_signal_energy_scales_as_eps_to_2r(setup):
    net, ds = setup
    layers = om.bottleneck_layers(net.depth, 3)
    th = networks.he_normal(net, [1, 1], eps=torch.tensor([1e-3, 1e-4]), bottleneck=layers)
    g = om.signal_energy(net, ds, th)
    assert abs(math.log(g[0] / g[1]) / math.log(10) - 6) < 1e-3


def test_gamma_rate_matches_finite_difference(setup):
    net, ds = setup
    loss_fn = networks.population_loss(net, ds)
    term = GradientFlow(loss_fn)
    th = networks.he_normal(net, [2], eps=0.3, bottleneck=(3, 4))
    obs = om.observables(net, ds, (3, 4), loss_fn)(th)
    h = 1e-6
    g_plus = om.signal_energy(net, ds, th + h * term(0, th))
    g_minus = om.signal_energy(net, ds, th - h * term(0, th))
    fd = (g_plus - g_minus) / (2 * h)
    assert torch.allclose(obs[:, 2], fd, rtol=1e-5)


def test_bottleneck_distance_zero_on_manifold(setup):
    net, _ = setup
    th = networks.symmetric_weights(net, torch.tensor([[1.0, 0.5, 0.2, 0.3]]), data.direction(4))
    dist, norm = om.bottleneck_distance(net, th, (2, 3, 4))
    assert dist.item() < 1e-12 and norm.item() > 0


def test_escape_sweep_deterministic_and_ordered(setup):
    net, ds = setup
    ex1 = om.run_experiment(net, ds, 3, [3e-2, 1e-2], [1], rtol=1e-6)
    ex2 = om.run_experiment(net, ds, 3, [3e-2, 1e-2], [1], rtol=1e-6)
    assert np.array_equal(ex1.times, ex2.times)
    assert np.all(np.isfinite(ex1.times)) and ex1.times[1] > ex1.times[0]
    k = om.inequality_exponents(ex1, lo_factor=10.0, hi=1e-2)
    assert np.all(np.isfinite(k[1:]))


def test_digits_covariance():
    s = om.digits_covariance(8)
    assert s.shape == (8, 8) and torch.allclose(s.diag().mean(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(s.diag()[:-1] >= s.diag()[1:])
    with pytest.raises(ParameterError):
        om.digits_covariance(100)


def test_experiments_as_pickled_tasks_give_identical_numbers(setup):
    import pickle

    net, ds = setup
    items = [(ds, 3), (ds, 2)]
    local = om.run_experiments(net, items, [3e-2, 1e-2], [1, 2], rtol=1e-6)
    # the r are tasks a cluster can run: what crosses to a worker and back pickles
    ship = lambda x: pickle.loads(pickle.dumps(x))
    shipped = lambda f, xs: [ship(ship(f)(ship(x))) for x in xs]
    remote = om.run_experiments(net, items, [3e-2, 1e-2], [1, 2], map=shipped, rtol=1e-6)
    assert [e.r for e in remote] == [3, 2]
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a.times, b.times)
        np.testing.assert_array_equal(a.sweep.level_obs, b.sweep.level_obs)
        assert a.loss_ref == b.loss_ref


def test_step_exponent_change_fails_for_an_eps_dependent_step_error():
    # realistic times of r = 3: A / eps + C, three seeds with their own prefactor
    eps = np.tile([3e-2, 1e-2, 3e-3, 1e-3, 3e-4], 3)
    seeds = np.repeat([1, 2, 3], 5)
    t = np.repeat([1.0, 3.5, 3.0], 5) * 8.0 / eps + 5.0
    # relative steps: the step error is a constant factor on the times -> the exponent stays
    assert om.step_exponent_change(eps, t * 1.03, t, seeds) < 1e-3
    # a step error growing as eps shrinks (e.g. a step not scaled with the plateau) -> the claim fails
    assert om.step_exponent_change(eps, t * (eps / 3e-2) ** -0.03, t, seeds) > 0.01


def test_relu_runs_as_relative_step_gradient_descent():
    ds = data.single_index_samples(data.ScalarTeacher(1.0, 0.3), 64, 4, seed=0)
    net = networks.MLP.build(4, 6, 4, "relu")
    ex = om.run_experiment(net, ds, 3, [3e-2, 3e-3], [1], step_fraction=0.05, pilot_drop=0.9)
    assert np.all(np.isfinite(ex.times)) and ex.sweep.solution.n_steps.max() < 1000
    assert 5 < ex.times[1] / ex.times[0] < 15          # t_esc ~ 1/eps for r = 3


def test_relu_r4_escapes_in_its_first_drop():
    """Chapter 06 with ReLU at r = 4 (its book size: width 16, 256 samples): seed 2 ends its
    first, partial drop above the halfway level of the smooth activations' rule and then waits on a
    second plateau (relative steps oscillate there, the sweep never ends); the escape at 0.9 L(0)
    is in the first drop of every run, a few hundred steps, and t_esc ~ eps^-2."""
    from saddle_escape.sim.errors import DivergenceError

    ds = data.single_index_samples(data.ScalarTeacher(1.0, 0.3), 256, 16, seed=0)
    net = networks.MLP.build(16, 16, 6, "relu")
    eps, seeds = [3e-2, 3e-3, 3e-4], [1, 2]   # the pilot of the halfway rule is seed 1, as in the chapter
    ex = om.run_experiment(net, ds, 4, eps, seeds, t_max=1e15, step_fraction=0.05, escape_drop=0.9, max_steps=500)
    assert np.all(np.isfinite(ex.times)) and ex.sweep.solution.n_steps.max() < 400
    L0 = ex.sweep.obs[:, 0, 0]
    np.testing.assert_allclose(ex.sweep.escape_obs[:, 0] / L0, 0.9, rtol=1e-6)   # the escape is at 0.9 L(0)
    fit, _ = om.offset_power_law(ex.eps, ex.times, ex.seeds)
    assert abs(fit.slope + 2) < 0.05
    # the halfway rule on the same runs: stuck on the second plateau, 500 steps (more than twice
    # what the first drop took) run out
    with pytest.raises(DivergenceError, match="max_steps"):
        om.run_experiment(net, ds, 4, eps, seeds, t_max=1e15, step_fraction=0.05, pilot_drop=0.9, max_steps=500)


def test_quadratic_front_layers_set_the_curvature_of_the_bottleneck():
    """Chapter 06's reason for one front layer with the quadratic (its data, width 16, seeds 1-5,
    eps 3e-2, r = 3): behind one front layer the curvature term a|z| of the first bottleneck layer
    stays below 1 on every sample; each further front layer squares the tails, and behind two it
    exceeds 1 for every seed. A front that did not square the tails (e.g. tanh) stays small too."""
    ds = data.single_index_samples(data.ScalarTeacher(1.0, 0.3), 256, 16, seed=0)
    worst = {}
    for front in (1, 2):
        net = networks.MLP.build(16, 16, 3 + front, "quadratic")
        assert om.first_bottleneck_preactivations(net, ds, 3, [1, 2, 3, 4, 5], 3e-2).shape == (5, 256, 16)
        worst[front] = om.front_curvature(net, ds, 3, [1, 2, 3, 4, 5], 3e-2)[0]
    assert worst[1].max() < 1 and worst[2].min() > 1
    z = om.first_bottleneck_preactivations(networks.MLP.build(16, 16, 5, "tanh"), ds, 3, [1, 2, 3, 4, 5], 3e-2)
    assert 0.5 * z.abs().max() < 1


def test_front_layers_give_each_r_its_own_depth():
    ds = data.single_index_samples(data.ScalarTeacher(1.0, 0.3), 256, 16, seed=0)
    net = networks.MLP.build(16, 16, 6, "quadratic")
    assert om.with_depth(net, 4).widths == (16, 16, 16, 16, 1)
    ex, = om.run_experiments(net, [(ds, 3)], [3e-2, 3e-3, 3e-4], [1, 2], front_layers=1, escape_drop=0.9,
                             t_max=1e15)
    assert ex.layers == (2, 3, 4)               # depth 4: one front layer
    L0 = ex.sweep.obs[:, 0, 0]
    np.testing.assert_allclose(ex.sweep.escape_obs[:, 0] / L0, 0.9, rtol=1e-6)
    assert ex.sweep.solution.n_steps.max() < 200
    fit, _ = om.offset_power_law(ex.eps, ex.times, ex.seeds)
    assert abs(fit.slope + 1) < 0.05
