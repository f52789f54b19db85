"""Deep MLPs on a flat, batched parameter vector; losses; initialisations.

Parameters of ``B`` independent networks live in one tensor ``theta`` of shape (B, P), so one
gradient evaluation serves a whole sweep over seeds or scales. The network is

    z_1 = W_1 x,   z_l = W_l sigma(z_{l-1}),   y_hat = z_L,

with ``W_l`` of shape (widths[l], widths[l-1]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import activations
from .activations import Activation
from .data import DTYPE, Dataset
from .errors import ParameterError


@dataclass(frozen=True)
class MLP:
    """Fully connected network ``widths = (d, N_1, ..., N_{L-1}, m)`` with one activation."""

    widths: tuple
    activation: Activation

    def __post_init__(self):
        if len(self.widths) < 3:
            raise ParameterError("depth", len(self.widths) - 1, "must be an integer >= 2")
        for w in self.widths:
            if int(w) != w or w < 1:
                raise ParameterError("width", w, "must be a positive integer")

    @classmethod
    def build(cls, input_dim: int, width: int, depth: int, activation="tanh", output_dim: int = 1) -> "MLP":
        """``depth`` layers, all hidden layers of the same ``width``."""
        if int(depth) != depth or depth < 2:
            raise ParameterError("depth", depth, "must be an integer >= 2")
        return cls((input_dim,) + (width,) * (depth - 1) + (output_dim,), activations.get(activation))

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(self.widths[l + 1], self.widths[l]) for l in range(self.depth)]

    @property
    def sizes(self) -> list[int]:
        return [a * b for a, b in self.shapes]

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """Views ``W_l`` of shape (B, out, in) into ``theta`` (B, P)."""
        parts = torch.split(theta, self.sizes, dim=-1)
        return [p.reshape(*theta.shape[:-1], *s) for p, s in zip(parts, self.shapes)]

    @staticmethod
    def flatten(weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`."""
        lead = weights[0].shape[:-2]
        return torch.cat([w.reshape(*lead, -1) for w in weights], dim=-1)

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs (B, n, m) and all pre-activations ``[z_1, ..., z_L]``, each (B, n, N_l)."""
        sigma = self.activation.fn
        zs = []
        h = x
        for l, W in enumerate(self.unflatten(theta)):
            z = h @ W.transpose(-1, -2)
            zs.append(z)
            h = sigma(z) if l < self.depth - 1 else z
        return zs[-1], zs


# ---------------------------------------------------------------- losses (per sample, summed over outputs)

def _mse(yhat, y):
    return 0.5 * ((yhat - y) ** 2).sum(-1)


def _logistic(yhat, y):
    # log(1 + exp(-y yhat)): the logistic loss for +-1 labels, smooth for any real target.
    return F.softplus(-y * yhat).sum(-1)


def _huber(yhat, y, delta: float = 1.0):
    return F.huber_loss(yhat, y.expand_as(yhat), reduction="none", delta=delta).sum(-1)


LOSSES: dict[str, Callable] = {"mse": _mse, "logistic": _logistic, "huber": _huber}


def get_loss(name: str) -> Callable:
    """Per-sample loss ``l(y_hat, y)`` by name (``mse``, ``logistic``, ``huber``)."""
    if name not in LOSSES:
        raise ParameterError("loss", name, f"must be one of {', '.join(LOSSES)}")
    return LOSSES[name]


def expected(values: torch.Tensor, data: Dataset) -> torch.Tensor:
    """``E[values]`` over the dataset's weighted samples (last-but-nothing: values is (..., n))."""
    return values @ data.w


def population_loss(net: MLP, data: Dataset, loss: str = "mse") -> Callable[[torch.Tensor], torch.Tensor]:
    """``theta (B, P) -> E[l(net(x), y)]`` of shape (B,)."""
    ell = get_loss(loss)

    def f(theta):
        yhat, _ = net.forward(theta, data.x)
        return expected(ell(yhat, data.y), data)

    return f


# ---------------------------------------------------------------- initialisations

def he_normal(net: MLP, seeds: Sequence[int], eps=None, bottleneck: Sequence[int] = (),
              dtype=DTYPE, device=None) -> torch.Tensor:
    """He-normal weights ``W_l ~ N(0, 2/fan_in)`` for each seed, stacked to (B, P).

    Layers listed in ``bottleneck`` (1-based) are multiplied by ``eps`` -- a scalar, or one value
    per seed -- so a sweep over eps that reuses a seed keeps the same random directions.
    """
    for l in bottleneck:
        if not 1 <= l <= net.depth:
            raise ParameterError("bottleneck layer", l, f"must be a layer index in 1..{net.depth}")
    seeds = list(seeds)
    eps_t = torch.ones(len(seeds), dtype=dtype) if eps is None else torch.as_tensor(eps, dtype=dtype).expand(len(seeds))
    thetas = []
    for b, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(s))
        ws = [torch.randn(o, i, generator=gen, dtype=dtype) * math.sqrt(2.0 / i) for o, i in net.shapes]
        ws = [w * eps_t[b] if l + 1 in bottleneck else w for l, w in enumerate(ws)]
        thetas.append(MLP.flatten(ws))
    return torch.stack(thetas).to(device)


def symmetric_directions(net: MLP, w_star: torch.Tensor) -> list[torch.Tensor]:
    """Unit-Frobenius-norm directions of the permutation-symmetric manifold.

    ``W_1 = X_1 1 w*^T / sqrt(N_1)`` (identical rows along w*), ``W_l = X_l 1 1^T / sqrt(N_l N_{l-1})``;
    with these, the layer scale ``X_l`` is exactly ``||W_l||_F``.
    """
    dirs = []
    for l, (o, i) in enumerate(net.shapes):
        right = w_star.to(DTYPE) / w_star.norm() if l == 0 else torch.ones(i, dtype=DTYPE) / math.sqrt(i)
        dirs.append(torch.outer(torch.ones(o, dtype=DTYPE) / math.sqrt(o), right))
    return dirs


def symmetric_weights(net: MLP, scales: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """Parameters (B, P) on the symmetric manifold with layer scales ``scales`` (B, L)."""
    scales = torch.as_tensor(scales, dtype=DTYPE)
    if scales.ndim == 1:
        scales = scales[None]
    if scales.shape[-1] != net.depth:
        raise ParameterError("init_scales", scales.tolist(), f"needs one entry per layer ({net.depth})")
    dirs = symmetric_directions(net, w_star)
    return MLP.flatten([scales[:, l, None, None] * d for l, d in enumerate(dirs)])


def layer_norms(net: MLP, theta: torch.Tensor) -> torch.Tensor:
    """Frobenius norms ``||W_l||_F``, shape (B, L)."""
    return torch.stack([W.flatten(-2).norm(dim=-1) for W in net.unflatten(theta)], dim=-1)


def manifold_distance(net: MLP, theta: torch.Tensor) -> torch.Tensor:
    """Distance (B,) from the permutation-symmetric manifold: how far rows (and, for layers
    after the first, entries within a row) are from their means, summed over layers in quadrature."""
    total = 0.0
    for l, W in enumerate(net.unflatten(theta)):
        sym = W.mean(dim=-2, keepdim=True)
        if l > 0:
            sym = sym.mean(dim=-1, keepdim=True)
        total = total + ((W - sym) ** 2).flatten(-2).sum(-1)
    return torch.sqrt(total)
