"""Experiments on the permutation-symmetric manifold (chapter 04).

The manifold is the fixed-point set of the symmetry group of the single-index population loss:
permutations of the hidden units of every layer (``W_l -> P_l W_l P_{l-1}^T``) and rotations of
the inputs that fix ``w*``. Its points are ``W_1 = X_1 1 w*^T / sqrt(N)`` and
``W_l = X_l 1 1^T / N`` (see :func:`~saddle_escape.sim.networks.symmetric_weights`).

* :func:`identical_rows_weights` -- weights with identical rows in every layer but *non-constant*
  rows after the first: the larger set that is not flow-invariant.
* :func:`row_spread` -- how far the rows of each layer are from their mean row.
* :func:`transverse_perturbation` -- a random direction orthogonal to the manifold that stays
  inside the subspace where the quadrature data are exact (first-layer rows parallel to ``w*``).
* :func:`gradient_descent_batch` -- gradient descent with several learning rates in one batch.

Chapter 04's experiments, each one call:

* :func:`full_vs_reduced` -- the full network on the manifold (and perturbed off it) against the
  reduced chain, on one time grid;
* :func:`gradient_row_spread` -- does one gradient step keep a layer's rows identical?
* :func:`gd_errors` -- gradient descent against the flow, for several learning rates;
* :func:`balance_check` -- how far the imbalances drift on the plateau, and the estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sim import networks
from ..sim.data import DTYPE, direction
from ..sim.integrate import ConstantStep, Euler, GradientFlow, ODETerm, PIController, SaveAt, solve
from ..sim.networks import MLP
from ..sim.errors import ParameterError
from ..sim.reduced import ScalarChain


def row_spread(net: MLP, theta: torch.Tensor) -> torch.Tensor:
    """Per-layer distance (B, L) of the rows of ``W_l`` from their mean row."""
    out = []
    for W in net.unflatten(theta):
        out.append((W - W.mean(dim=-2, keepdim=True)).flatten(-2).norm(dim=-1))
    return torch.stack(out, dim=-1)


def identical_rows_weights(net: MLP, scales: torch.Tensor, w_star: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``W_l = X_l 1 v_l^T / sqrt(N_l)`` with ``v_1 = w*`` and random unit ``v_l`` for l >= 2.

    Every layer has identical rows, but after the first layer the rows are not constant vectors,
    so these points are *not* fixed by the hidden-unit permutations.
    """
    scales = torch.as_tensor(scales, dtype=DTYPE)
    if scales.ndim == 1:
        scales = scales[None]
    gen = torch.Generator().manual_seed(int(seed))
    ws = []
    for l, (o, i) in enumerate(net.shapes):
        v = w_star.to(DTYPE) if l == 0 else torch.randn(i, generator=gen, dtype=DTYPE).abs() + 0.5
        v = v / v.norm()
        d = torch.outer(torch.ones(o, dtype=DTYPE) / math.sqrt(o), v)
        ws.append(scales[:, l, None, None] * d)
    return MLP.flatten(ws)


def transverse_perturbation(net: MLP, theta: torch.Tensor, w_star: torch.Tensor, size: float,
                            seed: int = 0) -> torch.Tensor:
    """A random perturbation (B, P) orthogonal to the symmetric manifold, of Frobenius norm
    ``size * ||theta||`` per run.

    First-layer rows stay parallel to ``w*`` (``dW_1 = a w*^T`` with ``sum(a) = 0``): on that
    subspace the network sees x only through ``w*.x``, so the quadrature data remain the exact
    population loss. Later layers get a random matrix with its mean entry removed.
    """
    if not (size > 0 and math.isfinite(size)):
        raise ParameterError("perturbation_size", size, "must be a finite number > 0")
    gen = torch.Generator().manual_seed(int(seed))
    B = theta.shape[0]
    u = w_star.to(DTYPE) / w_star.norm()
    parts = []
    for l, (o, i) in enumerate(net.shapes):
        if l == 0:
            a = torch.randn(B, o, generator=gen, dtype=DTYPE)
            a = a - a.mean(-1, keepdim=True)
            parts.append(a[:, :, None] * u[None, None, :])
        else:
            M = torch.randn(B, o, i, generator=gen, dtype=DTYPE)
            parts.append(M - M.mean(dim=(-2, -1), keepdim=True))
    # Orthogonal to every manifold direction by construction (zero-sum a against 1 w*^T, zero-mean
    # M against 1 1^T), so no projection is needed; tests/test_manifold.py checks it to round-off.
    delta = MLP.flatten(parts)
    return delta * (size * theta.norm(dim=-1) / delta.norm(dim=-1))[:, None]


def gradient_descent_batch(loss_fn, X0: torch.Tensor, step_sizes, t_max: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gradient descent ``X_{k+1} = X_k - eta_b grad L(X_k)`` for every ``eta_b`` in one batch.

    Run ``b`` is explicit Euler with unit step on the field ``-eta_b grad L`` (identical iterates
    to Euler with step ``eta_b`` on ``-grad L``), for ``ceil(t_max / eta_b)`` steps, every iterate
    saved. Returns the iterates (B, K+1, L) (NaN past each run's end) and, per run, the times
    ``k eta_b`` of its iterates.
    """
    etas = torch.as_tensor(step_sizes, dtype=DTYPE).reshape(-1)
    if etas.numel() == 0 or torch.any(etas <= 0):
        raise ParameterError("step_sizes", etas.tolist(), "must be a non-empty list of numbers > 0")
    n_steps = torch.ceil(t_max / etas - 1e-9)
    L = X0.shape[-1]
    y0 = torch.cat([X0.expand(etas.numel(), -1), etas[:, None]], dim=-1)

    def field(t, y):  # the learning rate rides along in the state (d eta / dt = 0)
        with torch.enable_grad():
            X = y[:, :L].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(X).sum(), X)
        return torch.cat([-y[:, L:] * g, torch.zeros_like(y[:, L:])], dim=-1)

    K = int(n_steps.max())
    ts = torch.arange(K + 1, dtype=DTYPE)
    sol = solve(ODETerm(field), y0, n_steps, solver=Euler(), controller=ConstantStep(1.0),
                saveat=SaveAt(ts, fn=lambda y: y[:, :L]), max_steps=K + 10)
    times = [torch.arange(int(n) + 1, dtype=DTYPE) * e for n, e in zip(n_steps.tolist(), etas.tolist())]
    return sol.ys, times


# --------------------------------------------------------------------------- chapter 04's experiments

@dataclass
class Trajectories:
    """The reduced chain and the full network, on the common grid ``ts``. Run 0 of the full
    network starts on the manifold, run 1 a transverse ``perturbation`` away."""

    ts: torch.Tensor
    X_red: torch.Tensor        # (T, L) layer scales of the reduced flow
    loss_red: torch.Tensor     # (T,)
    X_full: torch.Tensor       # (2, T, L) layer norms ||W_l||_F of the full network
    loss_full: torch.Tensor    # (2, T)
    dist: torch.Tensor         # (2, T) distance from the manifold
    norm: torch.Tensor         # (2, T) ||theta||
    net: MLP
    term: GradientFlow         # the full network's flow
    theta0: torch.Tensor       # (1, P) the on-manifold start
    theta_end: torch.Tensor | None = None   # (2, P) both runs' weights at ts[-1]


def full_vs_reduced(chain: ScalarChain, X0: torch.Tensor, input_dim: int, ts: torch.Tensor,
                    rtol: float, perturbation: float, seed: int = 0) -> Trajectories:
    """Integrate the reduced flow and the full width-``chain.width`` network (population loss by
    quadrature along ``w*``) with the same adaptive integrator, saving both on ``ts``."""
    net, dataset = chain.full_network(input_dim)
    controller = PIController(rtol=rtol, atol=1e-14)
    red = solve(chain.term(), X0, float(ts[-1]), controller=controller,
                saveat=SaveAt(ts, fn=lambda X: torch.cat([X, chain.loss(X)[:, None]], -1)))
    theta0 = chain.lift(X0, input_dim)
    delta = transverse_perturbation(net, theta0, direction(input_dim), perturbation, seed=seed)
    term = GradientFlow(networks.population_loss(net, dataset))
    observe = lambda th: torch.cat([networks.layer_norms(net, th), term.loss_fn(th)[:, None],
                                    networks.manifold_distance(net, th)[:, None],
                                    th.norm(dim=-1)[:, None]], -1)
    full = solve(term, torch.cat([theta0, theta0 + delta]), float(ts[-1]), controller=controller,
                 saveat=SaveAt(ts, fn=observe), progress=True, desc="full network")
    L = chain.depth
    return Trajectories(ts, red.ys[0, :, :L], red.ys[0, :, L], full.ys[:, :, :L], full.ys[:, :, L],
                        full.ys[:, :, L + 1], full.ys[:, :, L + 2], net, term, theta0, full.y_final)


def distance_phases(traj: Trajectories, i_p: int, i_e: int, run: int = 1) -> dict:
    """How the perturbed run's distance from the manifold evolves, phase by phase: the relative
    distance ``dist / ||theta||`` at the end of the plateau (grid index ``i_p``) over its start
    value, at the end of the grid over the plateau end, and -- when the grid runs at least half an
    escape time past the escape ``i_e`` -- the change of the *absolute* distance over the second
    half of the post-escape stretch (``after_change``; it depends on how far the run has settled
    by the end of the grid, so chapter 04 reports it but claims :func:`transverse_curvature`).
    Relative distances do not grow just because the weights grow, so they can show either answer."""
    dist, rel = traj.dist[run], traj.dist[run] / traj.norm[run]
    n = traj.ts.numel()
    out = {"rel_plateau": (rel[i_p] / rel[0]).item(), "rel_after": (rel[-1] / rel[i_p]).item(),
           "rel_total": (rel[-1] / rel[0]).item(), "abs_total": (dist[-1] / dist[0]).item(),
           "abs_escape": (dist[i_e] / dist[0]).item(), "after_change": None}
    if traj.ts[-1] >= 1.5 * traj.ts[i_e]:
        i_mid = (i_e + n - 1) // 2
        out["after_change"] = (dist[-1] / dist[i_mid] - 1).item()
    return out


def manifold_basis(net: MLP, w_star: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (P, L) of the symmetric manifold: the directions ``E_l`` of
    :func:`~saddle_escape.sim.networks.symmetric_directions`, one per layer."""
    dirs = networks.symmetric_directions(net, w_star)
    cols = []
    for l, d in enumerate(dirs):
        parts = [d if k == l else torch.zeros_like(d) for k, d in enumerate(dirs)]
        cols.append(MLP.flatten([p[None] for p in parts])[0])
    return torch.stack(cols, dim=-1)


def transverse_basis(net: MLP, w_star: torch.Tensor, E: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis (P, K) of the *exact* transverse subspace: first-layer rows parallel to
    ``w*`` with zero-sum coefficients, later layers zero-mean matrices (the subspace of
    :func:`transverse_perturbation`, ``K = N_1 - 1 + sum_{l>=2} (N_l N_{l-1} - 1)``); ``E``: the
    :func:`manifold_basis`, when the caller has it already."""
    u = w_star.to(DTYPE) / w_star.norm()
    cols = []
    for l, (o, i) in enumerate(net.shapes):
        eye = torch.eye(o if l == 0 else o * i, dtype=DTYPE)
        blocks = []
        for k, (o2, i2) in enumerate(net.shapes):
            if k != l:
                blocks.append(torch.zeros(eye.shape[0], o2, i2, dtype=DTYPE))
            elif l == 0:
                blocks.append(eye[:, :, None] * u[None, None, :])
            else:
                blocks.append(eye.reshape(-1, o, i))
        cols.append(MLP.flatten(blocks).T)
    S = torch.cat(cols, dim=-1)                       # the exact subspace, orthonormal columns
    E = manifold_basis(net, w_star) if E is None else E
    U, sv, _ = torch.linalg.svd(S - E @ (E.T @ S), full_matrices=False)
    return U[:, sv > 0.5]                             # singular values are 1 (kept) or 0 (M itself)


def transverse_curvature(loss_fn, net: MLP, theta: torch.Tensor, w_star: torch.Tensor,
                         delta: torch.Tensor | None = None) -> dict:
    """Curvature of the loss felt by the transverse part of ``theta`` (P,), at ``theta``.

    ``delta`` (default: ``theta`` minus its orthogonal projection onto the manifold) is the
    perturbation; ``q = delta^T H delta / (|delta|^2 lambda_max)``, with ``H`` the Hessian of
    ``loss_fn`` at ``theta`` and ``lambda_max`` its largest eigenvalue in absolute value. To first
    order in ``delta``, ``d ln|delta| / dt = -q lambda_max`` under the gradient flow, so ``q``
    is the perturbation's restoring rate in units of the network's stiffest rate: 0 neutral,
    > 0 attracting, < 0 repelling. Also returns ``lambda_max``, the eigenvalues of ``H``
    restricted to the exact transverse subspace (:func:`transverse_basis`) over ``lambda_max``
    (ascending) with their eigenvectors (P, K), and the loss at ``theta``."""
    theta = theta.detach().reshape(-1).to(DTYPE)
    E = manifold_basis(net, w_star)
    if delta is None:
        delta = theta - E @ (E.T @ theta)
    H = torch.autograd.functional.hessian(lambda th: loss_fn(th[None])[0], theta)
    H = (H + H.T) / 2
    lam_max = torch.linalg.eigvalsh(H).abs().max().item()
    q = (delta @ H @ delta / (delta @ delta) / lam_max).item()
    T = transverse_basis(net, w_star, E)
    ev, vec = torch.linalg.eigh(T.T @ H @ T)
    return {"q": q, "lam_max": lam_max, "transverse": (ev / lam_max).numpy(), "transverse_vectors": T @ vec,
            "loss": loss_fn(theta[None])[0].item(), "delta_norm": delta.norm().item()}


def gradient_row_spread(term: GradientFlow, net: MLP, theta: torch.Tensor, layer: int) -> float:
    """Row spread of the loss gradient of layer ``layer`` (1-based) relative to its norm: zero
    when a gradient step keeps that layer's rows identical."""
    g = term(0.0, theta)   # -grad L: the sign does not change either norm
    return (row_spread(net, g)[0, layer - 1] / net.unflatten(g)[layer - 1].norm()).item()


def plateau_end(loss: torch.Tensor, fraction: float = 0.01) -> int:
    """First grid index where the loss has fallen by ``fraction`` of its total drop."""
    drop = loss[0] - loss.min()
    return int(torch.nonzero(loss <= loss[0] - fraction * drop)[0, 0])


def relative_error(X: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``max_l |X_l - ref_l| / max_l |ref_l|`` at each time (last axis = layers)."""
    return (X - ref).abs().amax(-1) / ref.abs().amax(-1)


def gd_errors(chain: ScalarChain, X0: torch.Tensor, step_sizes, traj: Trajectories, i_p: int):
    """Gradient descent on the chain for every learning rate in one batch, against the flow, on
    the plateau window ``ts[0] .. ts[i_p]`` (fixed by the loss rule of :func:`plateau_end`, not by
    the errors): (errors maximised over the window, errors at ``i_p``, iterates on the window's
    grid per rate). Every rate must divide the grid spacing ``ts[1]``.

    The window stops at the end of the plateau because past it the steps are not bounded by the
    plateau's curvature: for GELU and Swish the curvature keeps growing after the escape (the
    first layer shrinks while the others grow), and a step that is accurate on the plateau
    oscillates there."""
    spacing = traj.ts[1].item()
    X, _ = gradient_descent_batch(chain.loss, X0, step_sizes, float(traj.ts[i_p]))
    n = i_p + 1
    on_grid = [X[b, : (n - 1) * round(spacing / eta) + 1 : round(spacing / eta)]
               for b, eta in enumerate(step_sizes)]
    worst = [relative_error(Xg, traj.X_red[:n]).max().item() for Xg in on_grid]
    at_p = [relative_error(Xg[i_p], traj.X_red[i_p]).item() for Xg in on_grid]
    return worst, at_p, on_grid


def gd_roundoff_bound(n_steps: int, chain: ScalarChain) -> float:
    """Largest round-off disagreement allowed between gradient descent on the full network and on
    the chain after ``n_steps`` identical steps: ``n_steps * (n_nodes + N) * u``, ``u = 2^-53``.

    Each step's gradient is a sum over the quadrature nodes (and, in the full network, over the
    N units of a layer); the classical worst-case bound for a sum of n terms is ``(n - 1) u`` of
    the sum of magnitudes (Higham, Accuracy and Stability, 4.2), and on the plateau the flow
    neither amplifies nor damps a relative error of the growing mode, so the errors of the steps
    add up. A modelling difference (another teacher, width or map) is not made of round-off and
    does not scale with ``u``."""
    return float(n_steps * (chain.n_nodes + chain.width) * torch.finfo(DTYPE).eps / 2)


def gd_order(step_sizes, errors) -> dict:
    """The order of convergence of gradient descent, with its pre-asymptotic bias removed.

    The error of a first-order method is ``e = A eta (1 + b eta + ...)``, so the local log-log slope
    between two steps ``eta_1 < eta_2`` is ``p + b m`` to first order, ``m = (eta_2 - eta_1) /
    ln(eta_2 / eta_1)`` (their logarithmic mean): a straight line in ``m``. Its intercept at
    ``m = 0`` is the order ``p`` (Richardson extrapolation of the local slopes; two local slopes fix
    it, more are a least-squares fit). A straight-line fit of log e on log eta instead averages the
    local slopes and keeps the bias ``b * (typical eta)``, which its interval does not cover.

    Returns ``order`` (the extrapolated p) and ``order_ci`` (its 95% interval from three local
    slopes on; NaN below), ``local`` (the local slopes, steps ascending),
    ``bias`` (mean local slope minus the order), and ``fit`` (the straight-line power-law fit)."""
    from ..sim import fits
    import numpy as np
    eta = np.asarray(step_sizes, float)
    err = np.asarray(errors, float)
    o = np.argsort(eta)
    eta, err = eta[o], err[o]
    local = np.diff(np.log(err)) / np.diff(np.log(eta))
    m = np.diff(eta) / np.diff(np.log(eta))
    ci = (math.nan, math.nan)
    if len(local) == 1:        # two steps: no extrapolation possible, the one local slope
        order = float(local[0])
    else:
        b, order = fits.linear_fit(m, local)[:2]
        n = len(local)
        if n >= 3:             # the intercept's 95% interval (ordinary least squares, Student t)
            from scipy import stats
            resid = local - order - b * m
            se = math.sqrt(resid @ resid / (n - 2) * (1 / n + m.mean() ** 2 / ((m - m.mean()) @ (m - m.mean()))))
            half = float(stats.t.ppf(0.975, n - 2) * se)
            ci = (order - half, order + half)
    return {"order": float(order), "order_ci": ci, "local": local, "bias": float(local.mean() - order),
            "fit": fits.power_law(eta, err)}


def gd_full_network(traj: Trajectories, step: float, i_end: int) -> torch.Tensor:
    """Gradient descent on the full network with learning rate ``step`` up to ``ts[i_end]``:
    layer norms (i_end + 1, L) on the grid (``step`` must equal the grid spacing)."""
    net = traj.net
    # half a step past the window's end: k * step accumulated in float64 can land a hair before
    # ts[i_end], and a save point past the last step would come back NaN
    sol = solve(traj.term, traj.theta0, float(traj.ts[i_end]) + 0.5 * step, solver=Euler(), controller=ConstantStep(step),
                saveat=SaveAt(traj.ts[: i_end + 1], fn=lambda th: networks.layer_norms(net, th)), max_steps=10_000_000)
    return sol.ys[0]


def balance_check(chain: ScalarChain, X: torch.Tensor, i_p: int):
    """On the plateau (grid indices ``<= i_p``): the drift of the imbalances relative to the
    largest squared scale, the estimate ``|h/beta1| E|g|^(q+1) z_p^(q-1)`` of eq. (ch04-balance)
    (None for classes A and D), and ``z_p``, the largest rms pre-activation."""
    act = chain.activation
    delta = X[:, 1:] ** 2 - X[:, :-1] ** 2
    drift = ((delta[: i_p + 1] - delta[0]).abs().amax() / (X[: i_p + 1] ** 2).amax()).item()
    z_rms = torch.stack([torch.sqrt((z ** 2) @ chain.w) for z in chain.preactivations(X[: i_p + 1])])
    z_p = z_rms.max().item()
    if act.cls not in ("B", "C"):
        return drift, None, z_p
    moment = float((chain.g.abs() ** (act.q + 1)) @ chain.w)
    return drift, abs(act.h_sigma / act.beta1) * moment * z_p ** (act.q - 1), z_p


def plateau_rate_factor(chain: ScalarChain, delta: float = 1e-6) -> float:
    """How fast the chain leaves the saddle relative to a linear chain: ``kappa = kappa_1 beta_1^(L-2)``.

    On the plateau every pre-activation is small. The first layer's feature correlates with the
    teacher's linear part through ``kappa_1 = E[g sigma(delta g)] / delta`` (``beta_1`` for a smooth
    sigma, 1/2 for ReLU, which passes only half of g), and each later hidden layer multiplies by
    ``beta_1`` (for ReLU its inputs are positive on the manifold, where sigma' = 1). The plateau
    equations are then those of the linear chain times ``kappa``, so every time up to the escape
    scales as ``1 / kappa`` (tanh, sin: 1; erf: 1.44; ReLU: 1/2; GELU, Swish: 1/8 at L = 4)."""
    act = chain.activation
    g, w = chain.g, chain.w
    kappa1 = float((w * g * act.fn(delta * g)).sum() / delta)
    return kappa1 * act.beta1 ** (chain.depth - 2)
