"""Fast checks of lib/saddle_escape/studies/manifold.py."""
import math

import pytest
import torch

from saddle_escape.sim import data, networks, reduced
from saddle_escape.studies import manifold
from saddle_escape.sim.errors import ParameterError


def _setup(depth=3, width=4, d=3):
    chain = reduced.ScalarChain("tanh", depth, data.ScalarTeacher(1.0, 0.3), width=width, n_nodes=20)
    net, ds = chain.full_network(d)
    X0 = torch.tensor([[0.3, 0.5, 0.7][:depth]], dtype=torch.float64)
    return chain, net, ds, X0, data.direction(d)


def _grad(net, ds, theta):
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(networks.population_loss(net, ds)(th).sum(), th)
    return g


def test_gradient_stays_on_manifold_but_not_for_identical_rows():
    chain, net, ds, X0, w = _setup()
    on = chain.lift(X0, 3)
    assert networks.manifold_distance(net, _grad(net, ds, on)).item() < 1e-14
    rows = manifold.identical_rows_weights(net, X0, w, seed=0)
    assert manifold.row_spread(net, rows).max().item() < 1e-14
    assert manifold.row_spread(net, _grad(net, ds, rows))[0, 1].item() > 1e-6


def test_transverse_perturbation_is_orthogonal_and_sized():
    chain, net, ds, X0, w = _setup()
    th = chain.lift(X0, 3)
    dlt = manifold.transverse_perturbation(net, th, w, 1e-3, seed=1)
    assert torch.allclose(dlt.norm(dim=-1), 1e-3 * th.norm(dim=-1))
    assert abs((dlt * th).sum().item()) < 1e-15
    assert torch.allclose(networks.manifold_distance(net, dlt), dlt.norm(dim=-1))
    W1 = net.unflatten(dlt)[0]
    assert W1[..., 1:].abs().max().item() == 0.0  # first-layer rows stay parallel to w*


def test_gradient_descent_batch_matches_manual_loop():
    chain, *_ , X0, _ = _setup()
    ys, times = manifold.gradient_descent_batch(chain.loss, X0, [0.2, 0.1], 1.0)
    X = X0.clone()
    for _ in range(10):
        Xg = X.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(chain.loss(Xg).sum(), Xg)
        X = X - 0.1 * g
    assert torch.allclose(ys[1, 10], X[0], rtol=0, atol=1e-14)
    assert torch.isnan(ys[0, 6]).all() and len(times[0]) == 6 and abs(times[1][-1].item() - 1.0) < 1e-12


def test_full_network_follows_the_chain_and_gd_is_first_order():
    chain = reduced.ScalarChain("tanh", 3, data.ScalarTeacher(1.0, 0.0), width=3)
    X0 = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    ts = torch.arange(41, dtype=torch.float64) * 0.5
    traj = manifold.full_vs_reduced(chain, X0, 2, ts, 1e-10, 1e-6)
    assert manifold.relative_error(traj.X_full[0], traj.X_red).max() < 1e-7
    assert (traj.dist[0] / traj.norm[0]).max() < 1e-12 < traj.dist[1, 0]
    worst, at_end, _ = manifold.gd_errors(chain, X0, [0.5, 0.25, 0.125], traj, len(ts) - 1)
    ratios = [a / b for a, b in zip(at_end, at_end[1:])]
    assert all(1.8 < q < 2.2 for q in ratios), ratios        # halving eta halves the error


def test_balance_check_drift_and_estimate():
    # scales growing uniformly by (1 + k/100): Delta_l grows by the same factor squared
    X = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64) * (1 + 0.01 * torch.arange(5, dtype=torch.float64))[:, None]
    linear = reduced.ScalarChain("linear", 3, data.ScalarTeacher(1.0, 0.0))
    drift, bound, z_p = manifold.balance_check(linear, X, 4)
    assert drift == pytest.approx((0.3**2 - 0.2**2) * (1.04**2 - 1) / (0.3 * 1.04) ** 2, rel=1e-12)
    assert bound is None and z_p > 0                        # class A: no estimate is claimed
    tanh = reduced.ScalarChain("tanh", 3, data.ScalarTeacher(1.0, 0.0))
    assert manifold.balance_check(tanh, X, 4)[1] > 0


@pytest.mark.parametrize("activation, kappa", [("tanh", 1.0), ("relu", 0.5), ("gelu", 0.125), ("erf", (2 / math.pi ** 0.5) ** 3)])
def test_plateau_rate_factor(activation, kappa):
    # kappa_1 beta_1^(L-2) at L = 4: ReLU passes half of g, GELU's slope at 0 is 1/2 in every layer
    chain = reduced.ScalarChain(activation, 4, data.ScalarTeacher(1.0, 0.0), width=4)
    assert abs(manifold.plateau_rate_factor(chain) - kappa) < 1e-6


def test_chapter04_refuses_a_horizon_without_the_escape(tmp_path):
    # ReLU's plateau lasts twice tanh's: with tanh's quick horizon the chain never escapes, and the
    # phase claims would be measured on a plateau that never ends
    import jupytext
    from pathlib import Path
    nb = jupytext.read(Path(__file__).resolve().parents[1] / "chapters" / "04_symmetric_manifold.md")
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    ns: dict = {}
    exec(compile(cells[0], "parameters", "exec"), ns)
    ns.update(profile="quick", activation="relu", t_max=150.0, step_sizes=[0.05, 0.025],
              results_dir=str(tmp_path / "r"), figures_dir=str(tmp_path / "f"))
    last = next(i for i, s in enumerate(cells) if "traj = manifold.full_vs_reduced" in s)
    with pytest.raises(ParameterError, match="t_max.*has not escaped"):
        for k, src in enumerate(cells[1: last + 1]):
            exec(compile(src, f"cell{k + 1}", "exec"), ns)


def test_gd_full_vs_chain_roundoff_bound_fails_for_a_wrong_chain():
    # the claim manifold.gd_full_vs_reduced: GD on the full network against GD on the chain over a
    # window, bounded by steps * (nodes + N) * u. The right chain sits far below the bound; a chain
    # whose teacher is off by 1e-6 (a modelling error, not round-off) lands far above it
    teacher = data.ScalarTeacher(1.0, 0.0)
    chain = reduced.ScalarChain("tanh", 3, teacher, width=3)
    X0 = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    ts = torch.arange(41, dtype=torch.float64) * 0.5
    traj = manifold.full_vs_reduced(chain, X0, 2, ts, 1e-9, 1e-6)
    i_end = 40
    full = manifold.gd_full_network(traj, 0.5, i_end)
    bound = manifold.gd_roundoff_bound(i_end, chain)
    right = manifold.gd_errors(chain, X0, [0.5, 0.25], traj, i_end)[2][0]
    assert manifold.relative_error(full, right).max().item() < bound
    wrong_chain = reduced.ScalarChain("tanh", 3, data.ScalarTeacher(1.0 + 1e-6, 0.0), width=3)
    wrong = manifold.gd_errors(wrong_chain, X0, [0.5, 0.25], traj, i_end)[2][0]
    assert manifold.relative_error(full, wrong).max().item() > 100 * bound


def test_transverse_basis_spans_the_perturbations_and_the_output_does_not_see_it():
    chain, net, ds, X0, w = _setup(depth=3, width=4, d=3)
    T, E = manifold.transverse_basis(net, w), manifold.manifold_basis(net, w)
    assert T.shape[1] == (4 - 1) + (16 - 1) + (4 - 1)
    assert torch.allclose(T.T @ T, torch.eye(T.shape[1], dtype=T.dtype), atol=1e-13)
    assert (E.T @ T).abs().max().item() < 1e-14
    theta = chain.lift(X0, 3)
    dlt = manifold.transverse_perturbation(net, theta, w, 1e-3, seed=2)[0]
    assert (dlt - T @ (T.T @ dlt)).norm().item() < 1e-12 * dlt.norm().item()
    # the chapter's argument: on the manifold the output's gradient is permutation invariant, so it
    # has no transverse component and the transverse Hessian is the residual term alone
    J = torch.autograd.functional.jacobian(lambda th: net.forward(th[None], ds.x)[0].reshape(-1), theta[0])
    assert (J @ T).abs().max().item() < 1e-13 * J.abs().max().item()


def test_transverse_curvature_is_the_decay_rate_of_the_distance():
    chain = reduced.ScalarChain("tanh", 3, data.ScalarTeacher(1.0, 0.0), width=3, n_nodes=20)
    X0 = torch.tensor([[0.05, 0.07, 0.09]], dtype=torch.float64)
    ts = torch.arange(41, dtype=torch.float64) * 0.5
    traj = manifold.full_vs_reduced(chain, X0, 2, ts, 1e-9, 1e-6)
    c = manifold.transverse_curvature(traj.term.loss_fn, traj.net, traj.theta_end[1], data.direction(2))
    assert abs(c["delta_norm"] - traj.dist[1, -1].item()) < 1e-6 * c["delta_norm"]
    # d ln dist / dt = -q lambda_max to first order in delta (backward difference over the last step)
    rate = -(math.log(traj.dist[1, -1].item()) - math.log(traj.dist[1, -2].item())) / 0.5
    assert rate == pytest.approx(c["q"] * c["lam_max"], rel=0.05)
