"""The layer imbalances and the two sides of the imbalance identity (Theorem 1).

``Delta_l = ||W_{l+1}||^2 - ||W_l||^2``. Along gradient flow

    dDelta_l/dt = 2 E[ < W_{l+1}^T grad_{z_{l+1}} l , phi_sigma(z_l) > ].

:func:`rate_autograd` computes the left side as the directional derivative of Delta along
``-grad L`` (torch.func.jvp); :func:`rate_identity` computes the right side from one forward and
backward pass. They are computed independently, so their agreement is a real check.
"""
from __future__ import annotations

import torch
from torch.func import jvp

from .data import Dataset
from .networks import MLP, expected, get_loss


def imbalances(net: MLP, theta: torch.Tensor) -> torch.Tensor:
    """``Delta_l`` for l = 1..L-1, shape (B, L-1)."""
    sq = torch.stack([W.flatten(-2).pow(2).sum(-1) for W in net.unflatten(theta)], dim=-1)
    return sq[..., 1:] - sq[..., :-1]


def loss_gradient(net: MLP, data: Dataset, loss: str, theta: torch.Tensor) -> torch.Tensor:
    """``grad L(theta)`` (B, P) of the population loss."""
    ell = get_loss(loss)
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        yhat, _ = net.forward(th, data.x)
        (g,) = torch.autograd.grad(expected(ell(yhat, data.y), data).sum(), th)
    return g


def rate_autograd(net: MLP, data: Dataset, loss: str, theta: torch.Tensor) -> torch.Tensor:
    """Left side: ``dDelta/dt = D Delta(theta)[-grad L]`` (B, L-1)."""
    v = -loss_gradient(net, data, loss, theta)
    _, rate = jvp(lambda th: imbalances(net, th), (theta,), (v,))
    return rate


def rate_identity(net: MLP, data: Dataset, loss: str, theta: torch.Tensor, phi=None) -> torch.Tensor:
    """Right side: ``2 E[<W_{l+1}^T grad_{z_{l+1}} l, phi_sigma(z_l)>]`` (B, L-1).

    ``phi`` replaces the activation's ``phi_sigma`` evaluation (e.g. a series that stays
    accurate at tiny ``z``, :func:`saddle_escape.studies.drift.series_phi`)."""
    ell = get_loss(loss)
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        yhat, zs = net.forward(th, data.x)
        # gradients of E[l] with respect to the intermediate z's: the per-sample backprop
        # signals, already multiplied by the sample weights, so summing over samples is E[.]
        grads = torch.autograd.grad(expected(ell(yhat, data.y), data).sum(), zs[1:])
    Ws = net.unflatten(theta)
    phi = net.activation.phi if phi is None else phi
    terms = [2.0 * ((grads[l] @ Ws[l + 1]) * phi(zs[l].detach())).sum(dim=(-1, -2))
             for l in range(net.depth - 1)]
    return torch.stack(terms, dim=-1)
