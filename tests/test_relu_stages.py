"""Tests of the chapter-10 study module (ReLU networks on the circle): each tool on inputs with a
known answer, and a realistic wrong input that must give a different answer."""
import math

import numpy as np
import pytest
import torch

from saddle_escape.sim.errors import ParameterError
from saddle_escape.sim.integrate import PIController, solve
from saddle_escape.studies import relu_stages as rs


def _problem(teacher=None, width=6):
    return rs.CircleProblem(teacher or rs.default_teacher(3), width)


def test_closed_form_loss_equals_the_angle_grid():
    p = _problem()
    theta = p.model.init(0.7, [0, 1, 2])
    exact = p.loss(theta)
    grid = p.model.loss(theta, p.grid_data(7200))
    assert torch.allclose(exact, grid, rtol=2e-6, atol=0)
    # a wrong kernel (the cross term |u x w| dropped) is far off
    def wrong(u, w):
        dot = (u * w).sum(-1)
        cross = (u[..., 0] * w[..., 1] - u[..., 1] * w[..., 0]).abs()
        return (math.pi - torch.atan2(cross, dot)) * dot / (4 * math.pi)
    old = rs.kernel
    try:
        rs.kernel = wrong
        assert not torch.allclose(p.loss(theta), grid, rtol=1e-3)
    finally:
        rs.kernel = old


def test_gradient_is_finite_on_the_proportional_manifold():
    p = _problem(width=3)
    V = torch.tensor([[[0.5], [0.25], [-0.3]]], dtype=torch.float64)
    U = torch.tensor([[[1.0, 0.5], [2.0, 1.0], [-0.2, 0.7]]], dtype=torch.float64)   # units 0, 1 parallel
    theta = p.model.flatten(V, U).requires_grad_(True)
    (g,) = torch.autograd.grad(p.loss(theta).sum(), theta)
    assert torch.isfinite(g).all()


def test_balanced_init_stays_balanced_along_the_flow():
    p = _problem(width=5)
    theta0 = rs.balanced_init(p.model, 0.3, [4])
    V, U = p.model.unflatten(theta0)
    assert torch.allclose(V[..., 0].abs(), U.norm(dim=-1))
    sol = solve(p.flow(), theta0, 5.0, controller=PIController(rtol=1e-10, atol=1e-14))
    V, U = p.model.unflatten(sol.y_final)
    assert torch.allclose(V[..., 0] ** 2, U.norm(dim=-1) ** 2, atol=1e-9)


def _two_ray_theta(model, tiny=1e-6):
    H = model.width
    ang = torch.tensor([0.3, 0.3001, 0.2999, 2.0, 2.0002] + [k * 0.7 for k in range(H - 5)], dtype=torch.float64)
    r = torch.tensor([0.8, 0.5, 0.3, 0.6, 0.2] + [tiny] * (H - 5), dtype=torch.float64)
    U = r[:, None] * torch.stack([ang.cos(), ang.sin()], -1)
    return model.flatten((r[:, None])[None], U[None])


def test_rays_count_proportional_groups_relative_to_the_target():
    model = rs.TwoLayer.build("relu", 2, 12)
    theta = _two_ray_theta(model)
    found = rs.rays(model, theta, scale=1.0)[0]
    assert len(found) == 2
    assert sorted(round(x.angle, 2) for x in found) == [0.3, 2.0]
    assert rs.ray_count(model, theta * 1e-3, scale=1.0) == [0]          # the origin plateau: none
    # a wrong grouping (cosine threshold loose enough to merge the two rays) counts one
    assert len(rs.rays(model, theta, scale=1.0, cos=-0.5)[0]) == 1


def test_kink_lines_one_per_ray():
    model = rs.TwoLayer.build("relu", 2, 12)
    theta = _two_ray_theta(model)
    assert rs.kink_lines(model, theta, scale=1.0) == [2]
    assert rs.kink_lines(model, theta * 1e-3, scale=1.0) == [0]
    # one threshold with the rays: the weak ray (amplitude 0.4, size 0.2) drops out of both at scale 5
    assert rs.ray_count(model, theta, scale=5.0) == [1] and rs.kink_lines(model, theta, scale=5.0) == [1]
    # the raw full-circle count is twice that (antipodal pairs)
    from saddle_escape.sim import counts
    _, x = counts.circle_inputs(7200)
    assert int(counts.kinks(model.forward(theta, x)[..., 0])[0]) == 4


def test_plateau_rule_finds_deep_minima_only():
    t = np.linspace(0, 10, 1001)
    g = 1e-6 + np.exp(-((t - 2) ** 2) * 8) + 0.8 * np.exp(-((t - 6) ** 2) * 8) + 0.3 * np.exp(-((t - 7) ** 2) * 50)
    idx = rs.plateau_indices(g)
    assert idx[0] == 0 and idx[-1] == len(g) - 1
    assert len(idx) == 3 and abs(t[idx[1]] - 4.0) < 0.2      # the shallow dip between 6 and 7 is not one


def test_strongest_direction_of_one_unit_teacher():
    teacher = rs.Teacher((0.7,), (2.0,))
    theta, g = teacher.strongest_direction()
    assert abs(theta - 0.7) < 1e-8 and abs(g - 0.5) < 1e-12          # G* = a E[relu^2] = a / 4


def test_narrow_fixed_point_and_best_loss():
    teacher = rs.Teacher((0.0, 2.3), (1.0, 0.5))
    L2, found = rs.narrow_fixed_point(teacher, [rs.Ray(0.1, 0.8, 1), rs.Ray(2.2, 0.4, 1)])
    assert L2 < 1e-12 and len(found) == 2
    L1, _ = rs.narrow_fixed_point(teacher, [rs.Ray(0.2, 1.0, 1)])
    assert 0 < L1 < 0.5 * teacher.energy()
    assert rs.best_loss(teacher, 1, n_starts=8) <= L1 + 1e-10


def test_predicted_first_escape_matches_the_flow():
    teacher = rs.Teacher((0.4, 2.6), (1.0, 0.5))
    p = rs.CircleProblem(teacher, 4)
    unit = rs.balanced_init(p.model, 1.0, [3])[0]
    eps = 1e-3
    pred = rs.predicted_escape_time(teacher, unit, p.model, eps)
    L0 = 0.5 * teacher.energy()
    from saddle_escape.sim.integrate import Event
    ev = Event(lambda t, y, runs: p.loss(y) - 0.99 * L0, direction=-1)
    sol = solve(p.flow(), eps * unit[None], 4 * pred["time"], events=[ev],
                controller=PIController(rtol=1e-9, atol=1e-14))
    t_meas = float(sol.event_times[0, 0])
    assert abs(t_meas / pred["time"] - 1) < 0.01
    # the direction of the leading unit at that moment is the early flow's
    V, U = p.model.unflatten(sol.event_states[0])
    lead = int(torch.argmax(V[0, :, 0] * U[0].norm(dim=-1)))
    measured = math.atan2(float(U[0, lead, 1]), float(U[0, lead, 0])) % (2 * math.pi)
    assert abs(measured - pred["angle"]) < 1e-3
    # and as eps -> 0 the early flow's direction tends to the maximum of the correlation G
    theta_star, g_star = teacher.strongest_direction()
    assert abs(rs.predicted_escape_time(teacher, unit, p.model, 1e-12)["angle"] - theta_star) < 1e-3
    assert abs(pred["angle"] - theta_star) > 1e-2          # ... which eps = 1e-3 has not reached
    # a wrong derivation (the norms growing at G, not the loss drop at 2G) misses by far
    wrong = math.log(0.01 * L0 / (eps * g_star)) / g_star
    assert abs(t_meas / wrong - 1) > 0.05


@pytest.mark.parametrize("bad", [0, 7, True, [[0, 1.0], [10, 0.5]], [[0, -1.0]], [[0, 1.0], [180, 0.5]], "x"])
def test_make_teacher_refuses(bad):
    with pytest.raises(ParameterError, match="teacher_units"):
        rs.make_teacher(bad)


def test_make_teacher_accepts():
    assert rs.make_teacher(3).size == 3
    t = rs.make_teacher([[0, 1.0], [130, 0.4]])
    assert t.size == 2 and abs(t.angles[1] - math.radians(130)) < 1e-12


def test_kinks_of_one_spread_ray_merge_like_its_units():
    model = rs.TwoLayer.build("relu", 2, 3)
    ang = torch.tensor([1.0, 1.05, 1.1], dtype=torch.float64)          # one ray, units 3 degrees apart
    U = torch.stack([ang.cos(), ang.sin()], -1)
    theta = model.flatten(torch.ones(1, 3, 1, dtype=torch.float64), U[None])
    assert rs.ray_count(model, theta, scale=1.0) == [1]
    assert rs.kink_lines(model, theta, scale=0.5) == [1]
    # without the angular tolerance the three units' kinks are three lines
    assert rs.kink_lines(model, theta, scale=0.5, cos=0.99999) == [3]
