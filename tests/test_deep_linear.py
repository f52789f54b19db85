"""Deep linear helpers: Saxe closed form, mode strengths, imbalance matrices, conservation."""
import math

import numpy as np
import torch

from saddle_escape.sim import data, networks
from saddle_escape.studies import deep_linear as DL


def _setup(act="linear", depth=2, init=1e-2, n=12):
    T = data.linear_teacher_matrix([2.0, 1.0], 4, 4, seed=0)
    train = data.linear_teacher_data(T, n, seed=0)
    U, s, V = DL.teacher_modes(T)
    net = networks.MLP.build(4, 6, depth, act, output_dim=4)
    return T, train, U, s, V, net, init * networks.he_normal(net, [0])


def test_teacher_modes_and_strengths():
    T, _, U, s, V, net, _ = _setup()
    assert torch.allclose(s, torch.tensor([2.0, 1.0], dtype=torch.float64))
    W1 = torch.eye(6, 4, dtype=torch.float64)[None]
    W2 = T @ torch.eye(6, 4, dtype=torch.float64).T
    theta = networks.MLP.flatten([W1, W2[None]])
    assert torch.allclose(DL.mode_strengths(net, theta, U, V)[0], s)


def test_saxe_time_matches_closed_form_and_quadrature():
    s, u0 = 2.0, 1e-4
    t = DL.saxe_time(s, u0)
    assert abs(DL.saxe_strength(t, s, u0).item() - s / 2) < 1e-12
    # depth-L quadrature reduces to the depth-2 closed form at L = 2 (compare numerically)
    from scipy.integrate import quad
    val, _ = quad(lambda x: 1 / (2 * math.exp(0.0 * x) * (s - math.exp(x))), math.log(u0), math.log(s / 2))
    assert abs(val - t) < 1e-8
    assert DL.saxe_time(s, u0, depth=3) > 0


def test_linear_flow_conserves_imbalance_matrix_and_follows_saxe():
    T, train, U, s, V, net, theta0 = _setup()
    u_eff = DL.effective_initial_strength(net, theta0, U, V)[0]
    pred = [DL.saxe_time(s[k].item(), u_eff[k].item()) for k in range(2)]
    r = DL.simulate(net, train, theta0, U, V, s, 1.2 * max(pred), n_save=50)
    M = r["matrices"][0]
    assert np.abs(M - M[0]).max() / r["theta_sq"].max() < 1e-12
    assert np.allclose(r["plateau_times"], pred, rtol=0.02)


def test_tanh_drifts_and_relu_gd_is_nearly_balanced():
    *_, U, s, V, net, theta0 = _setup("tanh", init=0.5)
    T, train, *_ = _setup()
    r = DL.simulate(net, train, theta0, U, V, s, 2.0, n_save=20)
    assert np.abs(r["delta"] - r["delta"][0]).max() / r["theta_sq"].max() > 1e-4
    *_, netr, th = _setup("relu", init=0.5)
    rr = DL.simulate(netr, train, th, U, V, s, 2.0, n_save=20, step_size=1e-3)
    bound = 2e-3 * (rr["loss"][0] - rr["loss"][-1]) / rr["theta_sq"].max()
    assert np.abs(rr["delta"] - rr["delta"][0]).max() / rr["theta_sq"].max() <= bound
