"""The reduced L-dimensional flow equals the full width-N network on the symmetric manifold."""
import pytest
import torch

from saddle_escape.sim import data, networks, reduced
from saddle_escape.sim.imbalance import loss_gradient
from saddle_escape.sim.integrate import GradientFlow, PIController, SaveAt, solve

TEACHER = data.ScalarTeacher(1.0, 0.3, 0.2)


def _project(net, theta, w_star):
    """Layer scales X_l = <W_l, D_l> of the orthogonal projection onto the manifold directions."""
    dirs = networks.symmetric_directions(net, w_star)
    return torch.stack([(W * D).flatten(-2).sum(-1) for W, D in zip(net.unflatten(theta), dirs)], -1)


@pytest.mark.parametrize("act,depth,width,loss", [
    ("tanh", 4, 3, "mse"), ("gelu", 3, 5, "mse"), ("sigmoid", 5, 2, "huber"),
    ("quadratic", 2, 4, "mse"), ("softplus", 6, 3, "logistic"), ("relu", 4, 3, "mse")])
def test_loss_and_gradient_match_full_network(act, depth, width, loss):
    chain = reduced.ScalarChain(act, depth, TEACHER, width=width, loss=loss, n_nodes=60)
    d = 3
    net, ds = chain.full_network(d)
    w_star = data.direction(d)
    # random manifold points: project He-normal weights onto the manifold directions
    X = _project(net, networks.he_normal(net, [0, 1, 2, 3]), w_star)
    X = X + 0.3 * torch.sign(X)   # keep away from 0 so every layer contributes
    theta = chain.lift(X, d)
    full = networks.population_loss(net, ds, loss)(theta)
    assert torch.allclose(chain.loss(X), full, rtol=1e-13, atol=1e-15)
    # the full gradient lies on the manifold and its coordinates are the reduced gradient
    g_full = loss_gradient(net, ds, loss, theta)
    g_red = -chain.term()(0.0, X)      # the term is -grad L
    assert torch.allclose(chain.lift(g_red, d), g_full, rtol=1e-11, atol=1e-13)
    assert torch.allclose(_project(net, g_full, w_star), g_red, rtol=1e-11, atol=1e-13)


def test_lift_is_on_the_manifold_with_the_given_norms():
    chain = reduced.ScalarChain("tanh", 5, TEACHER, width=7)
    X = torch.tensor([[0.3, -1.2, 0.8, 1e-3, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    net, _ = chain.full_network(4)
    theta = chain.lift(X, 4)
    assert theta.shape == (2, net.n_params)
    assert networks.manifold_distance(net, theta).amax() < 1e-14
    assert torch.allclose(networks.layer_norms(net, theta), X.abs(), rtol=1e-14, atol=0)
    # off the manifold the distance is not round-off
    noisy = theta + 1e-3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)
    assert (networks.manifold_distance(net, noisy) > 1e-4).all()


def test_short_trajectory_matches_full_network():
    chain = reduced.ScalarChain("tanh", 4, TEACHER, width=3, n_nodes=40)
    d = 2
    net, ds = chain.full_network(d)
    X0 = reduced.bottleneck_scales(4, 2, [0.5, 0.3], big=1.0)
    ts = torch.linspace(0, 3, 7, dtype=torch.float64)
    ctrl = PIController(rtol=1e-9, atol=1e-13)
    red = solve(chain.term(), X0, 3.0, controller=ctrl, saveat=SaveAt(ts))
    full_term = GradientFlow(networks.population_loss(net, ds))
    full = solve(full_term, chain.lift(X0, d), 3.0, controller=ctrl,
                 saveat=SaveAt(ts, fn=lambda th: torch.cat(
                     [_project(net, th, data.direction(d)), networks.manifold_distance(net, th)[:, None]], -1)))
    assert torch.allclose(full.ys[..., :4], red.ys, rtol=1e-7, atol=1e-9)
    assert full.ys[..., 4].amax() < 1e-12
    # and the run did move
    assert (red.ys[:, -1] - red.ys[:, 0]).abs().amax() > 1e-2


def test_bottleneck_scales_and_errors():
    X = reduced.bottleneck_scales(5, 2, [1e-2, 1e-3], big=1.5)
    assert X.tolist() == [[1.5, 1.5, 1.5, 1e-2, 1e-2], [1.5, 1.5, 1.5, 1e-3, 1e-3]]
    X = reduced.bottleneck_scales(4, 1, 0.1, layers=[2])
    assert X.tolist() == [[1.0, 0.1, 1.0, 1.0]]
    from saddle_escape.book.params import ParameterError
    with pytest.raises(ParameterError, match="^r = "):
        reduced.bottleneck_scales(4, 5, 0.1)
    with pytest.raises(ParameterError, match="^eps = "):
        reduced.bottleneck_scales(4, 2, -0.1)
    with pytest.raises(ParameterError, match="^depth = "):
        reduced.ScalarChain("tanh", 1)
