"""Checking the imbalance identity (Theorem 1) and measuring how fast the imbalances drift.

Three jobs, one per experiment of chapter 02:

* :func:`identity_check` -- both sides of ``dDelta_l/dt = 2 E[<W_{l+1}^T delta_{l+1}, phi(z_l)>]``
  at given weights, with a relative error that stays meaningful when both sides vanish
  (linear, ReLU): the error is divided by the size of the two terms whose difference is the
  left side, ``2|<W_l, G_l>| + 2|<W_{l+1}, G_{l+1}>|``, which is what round-off scales with.
* :func:`augmented_flow` -- gradient flow with the running integral ``I_l(t)`` of the right side
  appended to the state, so ``Delta_l(t) - Delta_l(0)`` and ``I_l(t)`` come from one integration.
* :func:`drift_rates` -- the right side near the saddle, where every ``z_l`` is tiny and the
  textbook form ``z sigma'(z) - sigma(z)`` loses all its digits to cancellation; there phi is
  evaluated from its exact Taylor series (:func:`series_phi`). :func:`drift_exponents` gives the
  derived law ``|dDelta_l/dt| ~ eps^(L - l + q l)`` when every layer is at scale eps.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..sim import activations
from ..sim.data import Dataset
from ..sim.imbalance import imbalances, loss_gradient, rate_autograd, rate_identity
from ..sim.integrate import ODETerm, PIController, SaveAt, solve
from ..sim.networks import MLP, expected, get_loss, he_normal, layer_norms, population_loss
from ..sim.errors import ParameterError
from ..sim.progress import bar

SERIES_CUTOFF = 1e-3  # below |z| = 1e-3 the series (through z^6) beats the cancelling closed form


def term_scale(net: MLP, data: Dataset, loss: str, theta: torch.Tensor) -> torch.Tensor:
    """``2|<W_l, G_l>| + 2|<W_{l+1}, G_{l+1}>|`` (B, L-1): the size of the terms that cancel."""
    grads = net.unflatten(loss_gradient(net, data, loss, theta))
    dots = torch.stack([2.0 * (W * G).flatten(-2).sum(-1).abs()
                        for W, G in zip(net.unflatten(theta), grads)], dim=-1)
    return dots[..., 1:] + dots[..., :-1]


def identity_check(net: MLP, data: Dataset, loss: str, theta: torch.Tensor, phi=None) -> dict:
    """Both sides of Theorem 1 and their relative error, each (B, L-1).

    ``rel_error = |lhs - rhs| / max(|lhs|, |rhs|, term_scale)``; where everything is exactly
    zero the error is reported as 0. ``phi`` replaces the network's Euler defect on the right
    side (the tests feed a wrong one to see the check fail).
    """
    lhs = rate_autograd(net, data, loss, theta)
    rhs = rate_identity(net, data, loss, theta, phi=phi)
    scale = torch.maximum(torch.maximum(lhs.abs(), rhs.abs()), term_scale(net, data, loss, theta))
    err = (lhs - rhs).abs() / scale.clamp_min(torch.finfo(scale.dtype).tiny)
    return {"lhs": lhs, "rhs": rhs, "scale": scale, "rel_error": err}


def series_phi(activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """``phi_sigma`` accurate to a few ulps also at tiny ``|z|``.

    Uses the exact Taylor coefficients of phi (from sympy) for ``|z| < SERIES_CUTOFF`` and the
    closed form elsewhere.
    """
    act = activations.get(activation)
    coeffs = [float(c) for c in act.phi_coefficients]

    def phi(z: torch.Tensor) -> torch.Tensor:
        poly = torch.zeros_like(z)
        for c in reversed(coeffs):  # Horner
            poly = poly * z + c
        return torch.where(z.abs() < SERIES_CUTOFF, poly, act.phi(z))

    return phi


def drift_rates(net: MLP, data: Dataset, loss: str, theta: torch.Tensor) -> torch.Tensor:
    """The right side of Theorem 1 (B, L-1) with phi from :func:`series_phi` (no cancellation)."""
    return rate_identity(net, data, loss, theta, phi=series_phi(net.activation))


def drift_exponents(activation, depth: int) -> list[int]:
    """Derived ``p_l = L - l + q l`` (l = 1..L-1) for all layers at scale eps, sigma(0) = 0."""
    act = activations.get(activation)
    if act.cls not in ("B", "C"):
        raise ParameterError("activation", act.name,
                             "the drift law eps^(L - l + q l) needs an activation of class B or C "
                             f"({act.name} is class {act.cls})")
    return [depth - l + act.q * l for l in range(1, depth)]


def augmented_flow(net: MLP, data: Dataset, loss: str = "mse", phi=None) -> ODETerm:
    """ODE for the state ``(theta, I)`` (B, P + L - 1): ``dtheta/dt = -grad L``,
    ``dI/dt = rate_identity(theta)``. Start it with ``I = 0``. ``phi``: the Euler defect in the
    right side (default the network's own; the tests feed a wrong one).

    One forward and one backward pass per evaluation give both ``grad L`` and the backprop
    signals ``delta_{l+1}`` that the right side of Theorem 1 needs."""
    ell = get_loss(loss)
    P = net.n_params
    phi = net.activation.phi if phi is None else phi

    def f(t, y):
        with torch.enable_grad():
            th = y[:, :P].detach().requires_grad_(True)
            yhat, zs = net.forward(th, data.x)
            g, *deltas = torch.autograd.grad(expected(ell(yhat, data.y), data).sum(), [th, *zs[1:]])
        Ws = net.unflatten(y[:, :P])
        rhs = [2.0 * ((deltas[l] @ Ws[l + 1]) * phi(zs[l].detach())).sum(dim=(-1, -2))
               for l in range(net.depth - 1)]
        return torch.cat([-g, torch.stack(rhs, dim=-1)], dim=-1)

    return ODETerm(f)


def split_augmented(net: MLP, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, I)`` from an augmented state."""
    return y[..., : net.n_params], y[..., net.n_params:]


def imbalance_and_integral(net: MLP) -> Callable[[torch.Tensor], torch.Tensor]:
    """SaveAt observable for :func:`augmented_flow`: ``[Delta_1..Delta_{L-1}, I_1..I_{L-1}]``."""
    def fn(y):
        theta, integral = split_augmented(net, y)
        return torch.cat([imbalances(net, theta), integral], dim=-1)
    return fn


# ------------------------------------------------------------------ the chapter's three experiments

def unit_preactivations(net: MLP, data: Dataset, theta: torch.Tensor) -> torch.Tensor:
    """He-normal directions rescaled layer by layer so that every pre-activation has rms 1 on the
    data: a test point where every activation works at O(1) arguments. (Plain He-normal weights
    send a deep quadratic network's pre-activations to ~1e24, where both sides of the identity are
    ~1e49 and the check only tests float64 at that scale.)"""
    Ws = [W.clone() for W in net.unflatten(theta)]
    h = data.x
    for l, W in enumerate(Ws):
        z = h @ W.transpose(-1, -2)                                  # (B, n, N_l)
        rms = torch.sqrt((z ** 2).mean(dim=(-2, -1)))                 # (B,)
        W /= rms[:, None, None]
        h = net.activation.fn(z / rms[:, None, None])
    return MLP.flatten(Ws)


def identity_sweep(activation_names, losses, depths, width: int, data: Dataset,
                   seeds=(0, 1), progress: bool = True) -> list[dict]:
    """Theorem 1 at He-normal weights for every activation x loss x depth x layer x seed.

    One tidy row per (activation, loss, depth, layer): both sides of the identity for the worst
    seed, and the largest relative error over the seeds.
    """
    rows = []
    combos = [(a, lo, L) for a in activation_names for lo in losses for L in depths]
    for a, lo, L in bar(combos, desc="identity sweep", enabled=progress):
        net = MLP.build(data.input_dim, width, L, a, output_dim=data.output_dim)
        check = identity_check(net, data, lo, unit_preactivations(net, data, he_normal(net, seeds)))
        worst = check["rel_error"].argmax(dim=0)
        for l in range(L - 1):
            b = worst[l]
            rows.append(dict(activation=a, cls=activations.get(a).cls, loss=lo, depth=L, layer=l + 1,
                             lhs=check["lhs"][b, l].item(), rhs=check["rhs"][b, l].item(),
                             scale=check["scale"][b, l].item(),
                             rel_error=check["rel_error"][b, l].item()))
    return rows


def trajectory_check(activation, depth: int, width: int, data: Dataset, loss: str = "mse",
                     init_scale: float = 0.5, t_max: float = 40.0, rtol: float = 1e-9,
                     atol: float = 1e-12, n_save: int = 101, seed: int = 0, phi=None) -> dict:
    """Integrate the augmented flow from He-normal weights times ``init_scale`` (all layers).

    Returns the save times, ``Delta_l(t) - Delta_l(0)`` and ``I_l(t)`` (T, L-1), the loss (T,),
    the number of steps and the relative discrepancy
    ``max |Delta(t) - Delta(0) - I(t)| / scale``, where ``scale`` is the largest change of any
    squared layer norm ``||W_l||^2`` along the run (the quantities whose difference is Delta;
    this stays meaningful when Delta is conserved, as for linear and ReLU nets). ``phi`` replaces
    the Euler defect in the integrated right side (see :func:`augmented_flow`).
    """
    net = MLP.build(data.input_dim, width, depth, activation, output_dim=data.output_dim)
    theta0 = he_normal(net, [seed], eps=init_scale, bottleneck=range(1, depth + 1))
    y0 = torch.cat([theta0, torch.zeros(1, depth - 1, dtype=theta0.dtype)], dim=-1)
    loss_fn = population_loss(net, data, loss)
    observe = imbalance_and_integral(net)

    def observables(y):
        theta = split_augmented(net, y)[0]
        return torch.cat([observe(y), loss_fn(theta)[:, None], layer_norms(net, theta) ** 2], dim=-1)

    ts = torch.linspace(0.0, float(t_max), n_save, dtype=theta0.dtype)
    sol = solve(augmented_flow(net, data, loss, phi), y0, float(t_max),
                controller=PIController(rtol=rtol, atol=atol), saveat=SaveAt(ts, fn=observables))
    ys = sol.ys[0]
    L1 = depth - 1
    moved = ys[:, :L1] - ys[0, :L1]
    integral = ys[:, L1:2 * L1]
    sq = ys[:, 2 * L1 + 1:]
    scale = torch.maximum((sq - sq[0]).abs().max(), moved.abs().max()).clamp_min(1e-300)
    err = ((moved - integral).abs().max() / scale).item()
    return dict(t=ts.numpy(), moved=moved.numpy(), integral=integral.numpy(),
                loss=ys[:, 2 * L1].numpy(), n_steps=int(sol.n_steps[0]), rel_error=err)


def drift_scaling(activation, depth: int, width: int, data: Dataset, eps_values,
                  loss: str = "mse", seed: int = 0) -> dict:
    """``|dDelta_l/dt|`` at t = 0 with every layer He-normal(seed) times eps.

    ``rate``: the right side with the series phi (accurate at any eps); ``rate_autograd``: the
    left side from autograd, which bottoms out at round-off of the cancelling terms.
    Both (n_eps, L-1).
    """
    net = MLP.build(data.input_dim, width, depth, activation, output_dim=data.output_dim)
    eps = torch.as_tensor(list(eps_values), dtype=torch.float64)
    theta = he_normal(net, [seed] * len(eps), eps=eps, bottleneck=range(1, depth + 1))
    return dict(eps=eps.numpy(), rate=drift_rates(net, data, loss, theta).abs().numpy(),
                rate_autograd=rate_autograd(net, data, loss, theta).abs().numpy())
