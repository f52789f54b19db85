"""Simplicity counts on constructed weights whose answer is known."""
import math

import pytest
import torch

from saddle_escape.sim import counts, twolayer as tl
from saddle_escape.sim.errors import ParameterError

D = torch.float64


def _theta(model, V, U):
    return model.flatten(torch.as_tensor(V, dtype=D).unsqueeze(0), torch.as_tensor(U, dtype=D).unsqueeze(0))


def test_rank_of_constructed_linear_weights():
    model = tl.TwoLayer.build("linear", 4, 3, 3)
    e = torch.eye(4, dtype=D)
    # two strong rank-one terms and a third at 1% of the largest: rank 2 at rel 0.05, 3 at rel 0.005
    V = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0, 0.5, 0]), torch.tensor([0, 0, 0.01])]).to(D)
    theta = _theta(model, V, e[:3])
    assert counts.rank(model, theta, rel=0.05).item() == 2
    assert counts.rank(model, theta, rel=0.005).item() == 3
    # scale-free: multiplying every weight by 1e-6 changes nothing
    assert counts.rank(model, 1e-6 * theta, rel=0.05).item() == 2
    # two units on one rank-one direction count once
    same = _theta(model, torch.stack([V[0], 2 * V[0], V[2] * 0]), torch.stack([e[0], e[0], e[1]]))
    assert counts.rank(model, same).item() == 1


def test_rank_of_a_convolution_kernel_matrix():
    model = tl.TwoLayer.build("linear_conv", 5, 2, 1, kernel=3)   # 3 positions
    U = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=D)
    V = torch.ones(2, 3, 1, dtype=D)
    V[1, :, 0] = torch.tensor([1.0, -1.0, 0.5], dtype=D)   # not proportional to V[0]
    assert counts.rank(model, _theta(model, V, U)).item() == 2
    assert counts.rank(model, _theta(model, V, torch.stack([U[0], U[0]]))).item() == 1


def test_active_units_count_what_contributes():
    model = tl.TwoLayer.build("quadratic", 3, 4, 1)
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    U = torch.eye(3, dtype=D)[[0, 1, 2, 0]]
    V = torch.tensor([[1.0], [0.8], [1e-4], [0.0]], dtype=D)
    theta = _theta(model, V, U)
    assert counts.active_units(model, theta, x).item() == 2
    assert counts.unit_sizes(model, theta, x)[0, 3].item() == 0.0


def test_rays_group_proportional_relu_units():
    model = tl.TwoLayer.build("relu", 2, 4, 1)
    _, x = counts.circle_inputs(360)
    a = torch.tensor([1.0, 0.0], dtype=D)
    b = torch.tensor([math.cos(2.0), math.sin(2.0)], dtype=D)
    U = torch.stack([a, 2 * a, b, a + 1e-3 * b])      # three units on ray a, one on ray b
    V = torch.ones(4, 1, dtype=D)
    theta = _theta(model, V, U)
    assert counts.rays(model, theta, x).item() == 2
    assert counts.active_units(model, theta, x).item() == 4


def test_rays_of_opposite_units_are_two():
    model = tl.TwoLayer.build("relu", 2, 2, 1)
    _, x = counts.circle_inputs(360)
    a = torch.tensor([1.0, 0.0], dtype=D)
    theta = _theta(model, torch.ones(2, 1, dtype=D), torch.stack([a, -a]))
    assert counts.rays(model, theta, x).item() == 2


def test_kinks_of_a_sum_of_relus_on_the_circle():
    phi, x = counts.circle_inputs(2000)
    # one relu(cos(phi - c)) has two kinks (where its argument crosses zero); two have four
    f1 = torch.relu(torch.cos(phi - 0.3))
    f2 = f1 + 0.7 * torch.relu(torch.cos(phi - 2.0))
    assert counts.kinks(f1.unsqueeze(0)).item() == 2
    assert counts.kinks(f2.unsqueeze(0)).item() == 4
    assert counts.kinks(torch.cos(phi).unsqueeze(0)).item() == 0     # smooth: no kink


def test_counts_refuse_bad_thresholds_and_units():
    model = tl.TwoLayer.build("relu", 2, 2, 1)
    theta = model.init(0.1, [0])
    with pytest.raises(ParameterError):
        counts.rank(model, theta)
    with pytest.raises(ParameterError):
        counts.count_above(torch.ones(1, 3), rel=1.5)
