"""The imbalance identity (Theorem 1): autograd's dDelta/dt equals the forward/backward right side,
and Delta_l is exactly conserved when phi_sigma == 0 (linear, ReLU)."""
import pytest
import torch

from saddle_escape.sim import activations, data, imbalance, networks
from saddle_escape.sim.integrate import Dopri5, GradientFlow, PIController, SaveAt, solve


def _setup(act, loss, depth, seeds=(0, 1)):
    net = networks.MLP.build(3, 4, depth, act, output_dim=2)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    if loss == "logistic":
        y = torch.sign(y)
    w = torch.rand(12, generator=gen, dtype=torch.float64)
    ds = data.Dataset(x, y, w / w.sum())
    theta = networks.he_normal(net, seeds)
    return net, ds, theta


def _term_scale(net, ds, loss, theta):
    """Size of the two terms whose difference is dDelta_l/dt (so a cancelling zero is judged
    against the magnitudes that cancel): |2 <W_l, grad_{W_l} L>| + |2 <W_{l+1}, grad_{W_{l+1}} L>|."""
    g = net.unflatten(imbalance.loss_gradient(net, ds, loss, theta))
    Ws = net.unflatten(theta)
    dots = torch.stack([2 * (W * G).flatten(-2).sum(-1).abs() for W, G in zip(Ws, g)], -1)
    return dots[..., 1:] + dots[..., :-1]


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("loss", sorted(networks.LOSSES))
@pytest.mark.parametrize("act", activations.NAMES)
def test_identity_lhs_equals_rhs(act, loss, depth):
    net, ds, theta = _setup(act, loss, depth)
    lhs = imbalance.rate_autograd(net, ds, loss, theta)
    rhs = imbalance.rate_identity(net, ds, loss, theta)
    assert lhs.shape == rhs.shape == (2, depth - 1)
    scale = torch.maximum(lhs.abs().amax(), _term_scale(net, ds, loss, theta).amax())
    assert scale > 0
    assert ((lhs - rhs).abs() <= 1e-10 * scale).all(), (lhs, rhs)
    if act not in ("linear", "relu"):
        # a non-trivial rate for the smooth classes: the check is not 0 == 0
        assert rhs.abs().amax() > 1e-6 * scale


def test_imbalances_definition():
    net, _, theta = _setup("tanh", "mse", 4)
    Ws = net.unflatten(theta)
    sq = [W.pow(2).sum(dim=(-1, -2)) for W in Ws]
    D = imbalance.imbalances(net, theta)
    for l in range(3):
        assert torch.allclose(D[:, l], sq[l + 1] - sq[l], rtol=1e-14, atol=0)


@pytest.mark.parametrize("act", ["linear", "relu"])
def test_delta_conserved_along_dopri5_trajectory(act):
    net, ds, theta0 = _setup(act, "mse", 4, seeds=(0,))
    theta0 = 0.7 * theta0
    term = GradientFlow(networks.population_loss(net, ds, "mse"))
    ts = torch.linspace(0, 2, 11, dtype=torch.float64)
    rtol = 1e-8
    sol = solve(term, theta0, 2.0, solver=Dopri5(), controller=PIController(rtol=rtol, atol=1e-12),
                saveat=SaveAt(ts, fn=lambda th: imbalance.imbalances(net, th)))
    assert sol.saved.all()
    D = sol.ys
    # the trajectory moves (the loss drops), yet every Delta_l stays put to the rtol level
    assert (term.loss(sol.y_final) < 0.995 * term.loss(theta0)).all()
    sq = networks.layer_norms(net, sol.y_final) ** 2
    drift = (D - D[:, :1]).abs().amax()
    assert drift <= 100 * rtol * sq.amax(), drift
    # while for tanh the same start changes Delta_l at O(1) rates
    net_t = networks.MLP.build(3, 4, 4, "tanh", output_dim=2)
    rate = imbalance.rate_identity(net_t, ds, "mse", theta0)
    assert rate.abs().amax() > 1e4 * drift
