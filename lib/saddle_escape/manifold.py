"""Experiments on the permutation-symmetric manifold (chapter 04).

The manifold is the fixed-point set of the symmetry group of the single-index population loss:
permutations of the hidden units of every layer (``W_l -> P_l W_l P_{l-1}^T``) and rotations of
the inputs that fix ``w*``. Its points are ``W_1 = X_1 1 w*^T / sqrt(N)`` and
``W_l = X_l 1 1^T / N`` (see :func:`~saddle_escape.networks.symmetric_weights`).

* :func:`identical_rows_weights` -- weights with identical rows in every layer but *non-constant*
  rows after the first: the larger set that is not flow-invariant.
* :func:`row_spread` -- how far the rows of each layer are from their mean row.
* :func:`transverse_perturbation` -- a random direction orthogonal to the manifold that stays
  inside the subspace where the quadrature data are exact (first-layer rows parallel to ``w*``).
* :func:`gradient_descent_batch` -- gradient descent with several learning rates in one batch.
"""
from __future__ import annotations

import math

import torch

from .data import DTYPE
from .integrate import ConstantStep, Euler, ODETerm, SaveAt, solve
from .networks import MLP, symmetric_directions
from .params import ParameterError


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
    delta = MLP.flatten(parts)
    # remove any component along the manifold directions (exactly orthogonal up to round-off)
    dirs = MLP.flatten([d[None] for d in symmetric_directions(net, w_star)])
    delta = delta - (delta @ dirs[0])[:, None] * dirs
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
