"""The two-layer family: autograd gradients against finite differences for every unit, the
Hessian against finite differences of the gradient, and exact population losses against sampled ones."""
import pytest
import torch

from saddle_escape.sim import twolayer as tl
from saddle_escape.sim.data import Dataset, gaussian_samples


def _problem(unit, width=3, d=4, m=2, n=40, seed=0):
    if tl.UNITS[unit].form == "attention":
        return tl.TwoLayer.build(unit, d, width, 1), tl.incontext_regression(n, d, 5, seed)
    kernel = 3 if tl.UNITS[unit].form == "conv" else None
    model = tl.TwoLayer.build(unit, d, width, m, kernel=kernel)
    x = gaussian_samples(n, d, seed)
    y = torch.randn(n, m, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, Dataset(x, y, torch.full((n,), 1.0 / n, dtype=torch.float64))


def _grad(model, theta, data):
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.loss(th, data).sum(), th)
    return g


@pytest.mark.parametrize("unit", list(tl.UNITS))
def test_gradient_matches_finite_differences(unit):
    model, data = _problem(unit)
    theta = model.init(0.7, [3])
    g = _grad(model, theta, data)[0]
    h = 1e-6
    fd = torch.empty_like(g)
    for p in range(theta.shape[1]):
        e = torch.zeros_like(theta)
        e[0, p] = h
        fd[p] = (model.loss(theta + e, data) - model.loss(theta - e, data))[0] / (2 * h)
    assert (fd - g).abs().max() <= 1e-7 * g.abs().max()


def test_finite_difference_check_catches_a_wrong_gradient():
    model, data = _problem("tanh")
    theta = model.init(0.7, [3])
    g = _grad(model, theta, data)[0]
    wrong = g.clone()
    wrong[0] *= 1.01
    e = torch.zeros_like(theta)
    e[0, 0] = 1e-6
    fd0 = (model.loss(theta + e, data) - model.loss(theta - e, data))[0] / 2e-6
    assert abs(fd0 - wrong[0]) > 1e-7 * g.abs().max()


@pytest.mark.parametrize("unit", ["quadratic", "attention", "relu_conv"])
def test_hessian_matches_finite_differences_of_the_gradient(unit):
    model, data = _problem(unit, width=2)
    theta = model.init(0.7, [5, 6])
    H = model.hessian(theta, data)
    h = 1e-6
    for p in range(theta.shape[1]):
        e = torch.zeros_like(theta)
        e[:, p] = h
        col = (_grad(model, theta + e, data) - _grad(model, theta - e, data)) / (2 * h)
        assert (col - H[:, :, p]).abs().max() <= 1e-6 * H.abs().max()
    assert torch.allclose(H, H.transpose(-1, -2), atol=1e-12)


def test_linear_population_loss_matches_samples():
    d, m, n = 4, 3, 200_000
    model = tl.TwoLayer.build("linear", d, 2, m)
    theta = model.init(0.5, [0, 1])
    T = torch.randn(m, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = gaussian_samples(n, d, 3)
    data = Dataset(x, x @ T.T, torch.full((n,), 1.0 / n, dtype=torch.float64))
    exact = tl.population_loss_linear(model, theta, T)
    sampled = model.loss(theta, data)
    assert torch.allclose(sampled, exact, rtol=0.02)
    # whitened samples reproduce it to round-off (the sample covariance is exactly I)
    xw = x - x.mean(0)
    xw = xw @ torch.linalg.inv(torch.linalg.cholesky(xw.T @ xw / n)).T
    white = Dataset(xw, xw @ T.T, data.w)
    assert torch.allclose(model.loss(theta, white), exact, rtol=1e-10)


def test_quadratic_population_loss_matches_samples_and_needs_isserlis():
    d, n = 3, 400_000
    model = tl.TwoLayer.build("quadratic", d, 2, 1)
    theta = model.init(0.5, [0])
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    A = A + A.T + 3 * torch.eye(d, dtype=torch.float64)  # a trace, so the (tr C)^2 term matters
    x = gaussian_samples(n, d, 5)
    y = torch.einsum("ni,ij,nj->n", x, A, x).unsqueeze(-1)
    data = Dataset(x, y, torch.full((n,), 1.0 / n, dtype=torch.float64))
    exact = tl.population_loss_quadratic(model, theta, A)
    sampled = model.loss(theta, data)
    assert torch.allclose(sampled, exact, rtol=0.03)
    # dropping the trace term of Isserlis' formula is visibly wrong
    V, U = model.unflatten(theta)
    C = A - torch.einsum("bh,bhi,bhj->bij", V[..., 0], U, U)
    naive = (C * C).sum((-1, -2))
    assert not torch.allclose(sampled, naive, rtol=0.03)


def test_population_losses_refuse_other_units():
    model = tl.TwoLayer.build("relu", 3, 2)
    with pytest.raises(tl.ParameterError):
        tl.population_loss_linear(model, model.init(0.1, [0]), torch.eye(3)[:1])
