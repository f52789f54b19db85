"""Embedding and manifold tools of saddle_escape.sim.embedding, on small problems with known answers."""
import pytest
import torch

from saddle_escape.sim import embedding as em, twolayer as tl
from saddle_escape.sim.data import Dataset, gaussian_samples
from saddle_escape.sim.errors import ParameterError

D = torch.float64


def _data(model, n=60, seed=0):
    x = gaussian_samples(n, model.input_dim, seed)
    y = torch.randn(n, model.output_dim, generator=torch.Generator().manual_seed(seed + 1), dtype=D)
    return Dataset(x, y, torch.full((n,), 1.0 / n, dtype=D))


def test_unit_params_round_trip_and_wider():
    model = tl.TwoLayer.build("relu_conv", 5, 3, 2, kernel=3)
    theta = model.init(1.0, [0, 1])
    assert torch.equal(em.from_unit_params(model, em.unit_params(model, theta)), theta)
    assert em.wider(model).width == 4


@pytest.mark.parametrize("kind", em.CONSTRUCTIONS)
def test_every_construction_keeps_a_linear_map(kind):
    model = tl.TwoLayer.build("linear", 3, 2, 2)
    theta = model.init(1.0, [0])
    x = gaussian_samples(20, 3, 1)
    wide, th = em.embed(model, theta, kind)
    assert wide.width == 3
    assert em.map_difference(model, theta, wide, th, x).item() < 1e-14


def test_a_construction_phi_does_not_allow_changes_the_map():
    model = tl.TwoLayer.build("tanh", 3, 2, 1)
    theta = model.init(1.0, [0])
    x = gaussian_samples(20, 3, 1)
    wide, th = em.embed(model, theta, "proportional")
    assert em.map_difference(model, theta, wide, th, x).item() > 1e-3


def test_relative_gradient_is_zero_at_a_fixed_point_and_not_elsewhere():
    model = tl.TwoLayer.build("tanh", 3, 1, 1)
    data = _data(model)
    theta, tried = em.fixed_points(model, data, 1, seed=0)
    assert em.relative_gradient(model, theta, data).item() < 1e-13
    assert em.relative_gradient(model, theta + 0.05, data).item() > 1e-3


def test_distances_and_projections():
    model = tl.TwoLayer.build("linear", 3, 3, 2)
    theta = model.init(1.0, [0])
    for kind in em.MANIFOLDS:
        on = em.on_manifold(model, theta, kind)
        assert em.distance(model, on, kind).item() < 1e-14
        assert em.distance(model, theta, kind).item() > 1e-2        # a random point is off every manifold
        assert em.distance(model, em.project(model, theta, kind), kind).item() < 1e-14
    # a push of relative size 1e-6 off the proportional manifold reads about 1e-6
    on = em.on_manifold(model, theta, "proportional")
    rows = em.unit_params(model, on)
    push = torch.zeros_like(rows)
    push[0, -1, 0] = 1e-6 * rows[0, -1].norm()
    pushed = em.from_unit_params(model, rows + push)
    assert 1e-8 < em.distance(model, pushed, "proportional").item() < 1e-6


@pytest.mark.parametrize("unit, kind, invariant", [
    ("relu", "proportional", True), ("relu", "combination", False),
    ("quadratic", "zero", True), ("quadratic", "proportional", False),
    ("tanh", "equal", True), ("tanh", "proportional", False),
    ("attention", "zero", True), ("linear_conv", "combination", True)])
def test_normal_component(unit, kind, invariant):
    if tl.UNITS[unit].form == "attention":
        model, data = tl.TwoLayer.build(unit, 3, 3, 1), tl.incontext_regression(30, 3, 4, 0)
    else:
        model = tl.TwoLayer.build(unit, 4, 3, 2, kernel=3 if unit.endswith("conv") else None)
        data = _data(model)
    on = em.on_manifold(model, model.init(0.5, [1, 2]), kind)
    normal = em.normal_component(model, on, data, kind).max().item()
    assert (normal < 1e-12) if invariant else (normal > 1e-3)


def test_zero_manifold_off_it_is_not_tangent():
    model = tl.TwoLayer.build("tanh", 3, 2, 1)
    data = _data(model)
    theta = model.init(0.5, [0])
    rows = em.unit_params(model, theta)
    rows[0, -1, :model.v_dim] = 0.0                     # v_H = 0 but u_H != 0: not the zero unit
    th = em.from_unit_params(model, rows)
    c = torch.zeros(1, 1, dtype=D)
    assert em.normal_component(model, th, data, "zero", coefficients=c).item() > 1e-3


@pytest.mark.parametrize("unit", ["linear", "tanh", "quadratic", "relu_conv", "attention"])
def test_residual_curvature_is_the_hessian_difference_of_two_equal_units(unit):
    if tl.UNITS[unit].form == "attention":
        model, data = tl.TwoLayer.build(unit, 3, 1, 1), tl.incontext_regression(30, 3, 4, 0)
    else:
        model = tl.TwoLayer.build(unit, 4, 1, 2, kernel=3 if unit.endswith("conv") else None)
        data = _data(model)
    theta = model.init(0.6, [3])
    wide, th = em.embed(model, theta, "split", gamma=0.5)
    H = wide.hessian(th, data)
    nv, nu = wide.v_dim, wide.u_dim
    i0 = torch.cat([torch.arange(nv), 2 * nv + torch.arange(nu)])
    i1 = torch.cat([nv + torch.arange(nv), 2 * nv + nu + torch.arange(nu)])
    diff = H[:, i0][:, :, i0] - H[:, i0][:, :, i1]
    K = em.residual_curvature(wide, th, data, 0)
    assert (diff - K).abs().max() <= 1e-12 * H.abs().max()


def test_zero_unit_block_is_the_residual_curvature():
    model = tl.TwoLayer.build("linear", 4, 1, 3)
    data = _data(model)
    theta = model.init(0.6, [3])
    wide, th = em.embed(model, theta, "zero")
    H = wide.hessian(th, data)
    assert torch.allclose(em.unit_block(wide, H, 1), em.residual_curvature(wide, th, data, 1), atol=1e-14)


def test_bad_arguments_are_refused():
    model = tl.TwoLayer.build("linear", 3, 2, 1)
    theta = model.init(1.0, [0])
    with pytest.raises(ParameterError):
        em.embed(model, theta, "copy")
    with pytest.raises(ParameterError):
        em.embed(model, theta, "split", unit=5)
    with pytest.raises(ParameterError):
        em.on_manifold(tl.TwoLayer.build("linear", 3, 1, 1), model.init(1.0, [0])[:, :4], "equal")
