"""Tests of the chapter-10 study module (ReLU networks on the sphere): each tool on inputs with a
known answer, and a realistic wrong input that must give a different answer."""
import math

import numpy as np
import pytest
import torch

from saddle_escape.sim.errors import ParameterError
from saddle_escape.sim.integrate import PIController, solve
from saddle_escape.studies import relu_stages as rs


@pytest.fixture(scope="module")
def teacher3():
    return rs.make_teacher(3)


@pytest.mark.parametrize("patches", [1, 3])
def test_closed_form_loss_equals_the_sample_average(patches):
    p = rs.SphereProblem(rs.make_teacher(3, patches=patches), 5)
    theta = rs.balanced_init(p.model, 0.6, [0, 1])
    gap, se = rs.sampled_loss_gap(p, theta, 100_000, seed=1)
    assert gap < 4 * se
    # a wrong kernel (the sin term dropped) is many standard errors off
    old = rs.Inputs.kernel

    def wrong(self, U, W):
        nu, nw, _, cos, sin, delta = self._parts(U, W)
        return nu * nw * ((PI_ - delta) * cos / (2 * PI_ * self.dim * self.patches)
                          + (1 - 1 / self.patches) * rs.relu_mean(self.dim) ** 2)
    PI_ = math.pi
    try:
        rs.Inputs.kernel = wrong
        gap_wrong, se_wrong = rs.sampled_loss_gap(p, theta, 100_000, seed=1)
        assert gap_wrong > 10 * se_wrong
    finally:
        rs.Inputs.kernel = old


def test_relu_mean_on_the_circle_and_the_sphere():
    assert rs.relu_mean(2) == pytest.approx(1 / math.pi, rel=1e-14)
    assert rs.relu_mean(3) == pytest.approx(0.25, rel=1e-14)


@pytest.mark.parametrize("patches", [1, 2])
def test_written_out_gradient_matches_finite_differences(patches):
    p = rs.SphereProblem(rs.make_teacher(3, patches=patches), 4)
    theta = p.model.init(0.5, [3])
    neg, _ = p.neg_grad_and_loss(theta)
    h = 1e-6
    for i in range(theta.shape[1]):
        e = torch.zeros_like(theta)
        e[0, i] = h
        fd = (p.loss(theta + e) - p.loss(theta - e)) / (2 * h)
        assert float((fd + neg[0, i]).abs()) < 1e-9


def test_gradient_is_finite_on_the_proportional_manifold_and_for_tiny_units():
    p = rs.SphereProblem(rs.make_teacher(2), 3)
    V = torch.tensor([[[0.5], [0.25], [-1e-60]]], dtype=torch.float64)
    U = torch.tensor([[[1.0, 0.5], [2.0, 1.0], [-0.2e-60, 0.7e-60]]], dtype=torch.float64)   # units 0, 1 parallel
    neg, L = p.neg_grad_and_loss(p.model.flatten(V, U))
    assert torch.isfinite(neg).all() and torch.isfinite(L).all()


def test_balanced_init_stays_balanced_along_the_flow(teacher3):
    p = rs.SphereProblem(teacher3, 5)
    theta0 = rs.balanced_init(p.model, 0.3, [4])
    V, U = p.model.unflatten(theta0)
    assert torch.allclose(V[..., 0].abs(), U.norm(dim=-1))
    sol = solve(p.flow(), theta0, 20.0, controller=PIController(rtol=1e-10, atol=1e-14))
    V, U = p.model.unflatten(sol.y_final)
    assert torch.allclose(V[..., 0] ** 2, U.norm(dim=-1) ** 2, atol=1e-9)


def _network(p, rays_, tiny=1e-6):
    """Units on the given rays (direction, amplitude, copies), the other units tiny."""
    H, d = p.width, p.inputs.dim
    U, V = [], []
    g = torch.Generator().manual_seed(0)
    for z, a, copies in rays_:
        z = torch.tensor(z, dtype=torch.float64)
        z = z / z.norm()
        for c in range(copies):
            r = math.sqrt(abs(a) / copies)
            U.append(r * (z + 1e-4 * c * torch.randn(d, generator=g, dtype=torch.float64)))
            V.append(math.copysign(r, a))
    while len(U) < H:
        U.append(tiny * torch.randn(d, generator=g, dtype=torch.float64))
        V.append(tiny)
    return p.model.flatten(torch.tensor(V)[None, :, None], torch.stack(U)[None])


def test_rays_and_kink_lines_count_clusters_not_units(teacher3):
    p = rs.SphereProblem(teacher3, 8)
    two = _network(p, [((1, 0, 0), 1.0, 3), ((0, 0.5, 1), -0.7, 2)])
    assert rs.ray_count(p, two) == [2]
    assert rs.kink_lines(p, two) == [2]
    # a third ray far below the threshold is not counted; one above it is
    weak = _network(p, [((1, 0, 0), 1.0, 1), ((0, 0.5, 1), -0.7, 1), ((-1, 1, 0), 1e-3, 1)])
    strong = _network(p, [((1, 0, 0), 1.0, 1), ((0, 0.5, 1), -0.7, 1), ((-1, 1, 0), 0.4, 1)])
    assert rs.ray_count(p, weak) == [2] and rs.kink_lines(p, weak) == [2]
    assert rs.ray_count(p, strong) == [3] and rs.kink_lines(p, strong) == [3]


def test_plateau_rule_finds_one_visit_per_plateau_only_after_the_loss_fell():
    g = np.array([0.001, 0.0005, 0.002, 1.0, 0.003, 0.002, 0.5, 0.001, 0.0009])
    L = np.array([1.0, 1.0, 1.0, 0.6, 0.3, 0.3, 0.2, 0.1, 0.1])
    assert rs.plateau_indices(g, L) == [0, 5, 8]      # index 1: a minimum, but on the origin plateau
    # wiggles of the gradient on one plateau (no drop between them) are one visit, its deepest minimum
    g = np.array([0.001, 1.0, 0.004, 0.006, 0.002, 0.005, 0.003, 0.007, 0.8, 0.001, 0.0005])
    L = np.array([1.0, 0.5, 0.3, 0.3, 0.2999, 0.2999, 0.2998, 0.2998, 0.1, 0.01, 0.01])
    assert rs.plateau_indices(g, L) == [0, 4, 10]


def test_narrow_fixed_point_from_the_teacher_rays_is_the_teacher(teacher3):
    rays_ = [rs.Ray(w, a, 1) for w, a in zip(teacher3.directions, teacher3.amplitudes)]
    loss, found = rs.narrow_fixed_point(teacher3, rays_)
    assert loss < 1e-12 * teacher3.energy() and len(found) == 3
    # one ray started off the teacher converges to a fixed point of one unit, with a loss well above 0
    loss1, found1 = rs.narrow_fixed_point(teacher3, [rs.Ray((0.9, 0.3, 0.1), 0.8, 1)])
    assert loss1 > 0.1 * 0.5 * teacher3.energy()
    assert len(found1) == 1


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_default_teachers_have_one_basin_per_unit(k):
    rs.check_teacher(rs.default_teacher(k))


def test_teachers_whose_basins_merge_are_refused():
    with pytest.raises(ParameterError, match="own basin"):
        rs.check_teacher(rs.make_teacher([[[1, 0, 0], 1.0], [[0, 1, 0], 0.8]]))


@pytest.mark.parametrize("bad", [0, 5, True, "3", [[[1, 0], 0.0]], [[[1, 0], 1.0], [[2, 0], 0.5]],
                                 [[[1, 0], 1.0], [[0, 1], 0.5], [[1, 1], 0.2]]])
def test_bad_teachers_are_refused(bad):
    with pytest.raises(ParameterError, match="teacher_units"):
        rs.make_teacher(bad)


def test_more_units_than_dimensions_is_refused():
    with pytest.raises(ParameterError, match="input_dim"):
        rs.make_teacher(3, input_dim=2)


@pytest.fixture(scope="module")
def run3(teacher3):
    p = rs.SphereProblem(teacher3, 10)
    good = [s for s, m in zip(range(4), rs.unpopulated_basins(teacher3, rs.balanced_init(p.model, 1.0, range(4)), p.model))
            if not m][:1]
    return rs.simulate(p, [1e-9], good, t_max=3000, rtol=1e-6)


def test_first_escape_prediction_holds_and_a_naive_one_fails(run3, teacher3):
    check = rs.first_escape_check(run3, 0)
    assert abs(check["measured"] - check["predicted"]) / check["measured"] < 5e-3
    assert check["angle_deg"] < 0.5
    # naive: the strongest teacher unit's own rate, from the largest initial unit
    g1 = float(teacher3.correlation(torch.tensor(teacher3.directions[0])))
    naive = math.log(1 / 1e-9) / g1
    assert abs(naive - check["measured"]) / check["measured"] > 5e-3
    # and the first ray does not leave along the teacher's first direction
    z = np.asarray(rs.basins(teacher3)[0])
    assert math.degrees(math.acos(z @ np.asarray(teacher3.directions[0]))) > 5


def test_staircase_and_plateau_checks_pass_and_fail(run3, teacher3):
    (summary,) = rs.summarise(run3)
    assert rs.staircase_ok(summary, 3)
    gaps = rs.plateau_gaps(teacher3, summary)
    assert [g["k"] for g in gaps] == [1, 2] and max(g["rel"] for g in gaps) < 1e-3
    # a skipped stage fails the staircase; a plateau loss 1% off fails the fixed-point check
    merged = rs.RunSummary(summary.eps, summary.seed, [], [summary.stages[0], summary.stages[1], summary.stages[3]], True)
    assert not rs.staircase_ok(merged, 3)
    stage = summary.stages[1]
    off = rs.RunSummary(summary.eps, summary.seed, [], [summary.stages[0],
                        rs.Stage(stage.time, 1.01 * stage.loss, stage.rays, stage.kinks)] + summary.stages[2:], True)
    assert rs.plateau_gaps(teacher3, off)[0]["rel"] > 1e-3


def test_four_unit_teacher_steps_one_ray_at_a_time_and_the_old_amplitudes_merge():
    # the chosen amplitudes at eps = 1e-11 step 0..4; with 0.5, -0.35 the last three stages arrive in one drop
    new = rs.default_teacher(4)
    old = rs.Teacher(new.directions, (1.0, -0.7, 0.5, -0.35), new.inputs)
    for teacher, ok in ((new, True), (old, False)):
        problem = rs.SphereProblem(teacher, 12)
        tr = rs.simulate(problem, [1e-11], [0], t_max=rs.time_horizon(teacher, 1e-11), rtol=1e-6)
        assert rs.staircase_ok(rs.summarise(tr)[0], 4) == ok
