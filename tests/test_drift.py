"""Chapter 02's helpers: the identity check, the series phi, the augmented flow, the drift law."""
import numpy as np
import pytest
import torch

from saddle_escape.sim import data, fits, networks
from saddle_escape.studies import drift
from saddle_escape.book.params import ParameterError


@pytest.fixture(scope="module")
def dataset():
    return data.single_index_samples(data.ScalarTeacher(1.0, 0.5, 0.3), 32, 3, seed=0)


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus"])
def test_identity_check_at_round_off(dataset, act):
    net = networks.MLP.build(3, 5, 3, act)
    out = drift.identity_check(net, dataset, "huber", networks.he_normal(net, [0, 1]))
    assert out["rel_error"].shape == (2, 2)
    assert out["rel_error"].max() < 1e-12


def test_series_phi_is_accurate_at_tiny_z():
    phi = drift.series_phi("tanh")
    z = torch.tensor([1e-9, 1e-5, 0.5], dtype=torch.float64)
    exact_small = -2.0 / 3.0 * z[:2] ** 3 + 8.0 / 15.0 * z[:2] ** 5
    assert torch.allclose(phi(z)[:2], exact_small, rtol=1e-12, atol=0)
    assert phi(z)[2] == drift.activations.get("tanh").phi(z[2:])[0]


def test_drift_exponents_and_refusal():
    assert drift.drift_exponents("tanh", 4) == [6, 8, 10]
    assert drift.drift_exponents("gelu", 4) == [5, 6, 7]
    with pytest.raises(ParameterError, match="class B or C"):
        drift.drift_exponents("sigmoid", 4)


def test_trajectory_integral_matches_imbalance(dataset):
    tr = drift.trajectory_check("tanh", 3, 4, dataset, init_scale=0.5, t_max=1.0, rtol=1e-8, n_save=5)
    assert tr["moved"].shape == (5, 2) and tr["rel_error"] < 1e-6


def test_drift_slope_class_b(dataset):
    eps = [1e-5, 1e-4, 1e-3]
    sc = drift.drift_scaling("tanh", 3, 4, dataset, eps)
    assert abs(fits.power_law(sc["eps"], sc["rate"][:, 0]).slope - 5.0) < 0.01
    assert np.all(sc["rate"] > 0)


def test_identity_test_points_have_unit_preactivations():
    """The identity is checked where every activation works at O(1) arguments (a deep quadratic
    net at plain He-normal weights has pre-activations many orders of magnitude larger)."""
    import torch
    from saddle_escape.sim import data as D
    from saddle_escape.sim.networks import MLP, he_normal
    from saddle_escape.studies import drift as dr
    ds = D.single_index_samples(D.ScalarTeacher(linear=1.0, even=0.5, cubic=0.3), 32, 4, seed=0)
    net = MLP.build(4, 8, 6, "quadratic")
    _, zs = net.forward(dr.unit_preactivations(net, ds, he_normal(net, [0, 1])), ds.x)
    for z in zs:
        assert torch.allclose(z.pow(2).mean(dim=(-2, -1)).sqrt(), torch.ones(2, dtype=torch.float64))
