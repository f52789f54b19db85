"""The symmetric-manifold reduction: an L-dimensional gradient flow in the layer scales.

On the permutation-symmetric manifold (see :func:`~saddle_escape.sim.networks.symmetric_weights`) a width-N network
with layer scales ``X_l = ||W_l||_F`` computes, for ``g = w*.x``,

    y_hat(g) = sqrt(N) X_L sigma(X_{L-1} sigma( ... X_2 sigma(X_1 g / sqrt(N)) ... )),

and because the manifold directions have unit norm, gradient flow of the full network restricted
to the manifold is exactly ``dX_l/dt = -dL/dX_l``. Expectations over g use Gauss--Hermite
quadrature, so the reduced loss is the population loss to round-off.
"""
from __future__ import annotations

import math

import torch

from . import activations
from .data import DTYPE, ScalarTeacher, gauss_hermite, single_index_quadrature, direction
from .integrate import GradientFlow
from .networks import MLP, get_loss, symmetric_weights
from .errors import ParameterError


class ScalarChain:
    """Reduced dynamics of a depth-``depth`` network on the symmetric manifold."""

    def __init__(self, activation="tanh", depth: int = 4, teacher: ScalarTeacher | None = None,
                 width: int = 1, loss: str = "mse", n_nodes: int = 80, device=None):
        if int(depth) != depth or depth < 2:
            raise ParameterError("depth", depth, "must be an integer >= 2")
        if int(width) != width or width < 1:
            raise ParameterError("width", width, "must be a positive integer")
        self.activation = activations.get(activation)
        self.depth = int(depth)
        self.width = int(width)
        self.teacher = teacher or ScalarTeacher()
        self.loss_name = loss
        self.ell = get_loss(loss)
        self.n_nodes = n_nodes
        self.g, self.w = gauss_hermite(n_nodes, device=device)
        self.y = self.teacher(self.g)

    def forward(self, X: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The chain's forward pass at scales ``X`` (B, L): pre-activations ``[z_1, ..., z_{L-1}]``,
        layer inputs ``[u_0 = g/sqrt(N), u_1 = sigma(z_1), ..., u_{L-1}]`` (each (B, n_nodes) but
        ``u_0``, which is (1, n_nodes)) and ``y_hat`` (B, n_nodes). One loop serves the loss, the
        pre-activations and the hand-written backward pass of chapter 05's ``ChainFlow``."""
        sigma = self.activation.fn
        rootN = math.sqrt(self.width)
        us, zs = [self.g[None, :] / rootN], []
        for l in range(self.depth - 1):
            zs.append(X[:, l:l + 1] * us[-1])
            us.append(sigma(zs[-1]))
        return zs, us, rootN * X[:, -1:] * us[-1]

    def preactivations(self, X: torch.Tensor) -> list[torch.Tensor]:
        """``z_1, ..., z_{L-1}`` at the quadrature nodes, each (B, n_nodes), for scales ``X`` (B, L)."""
        return self.forward(X)[0]

    def output(self, X: torch.Tensor) -> torch.Tensor:
        """``y_hat`` at the quadrature nodes, shape (B, n_nodes), for scales ``X`` (B, L)."""
        return self.forward(X)[2]

    def loss(self, X: torch.Tensor) -> torch.Tensor:
        """Population loss (B,) at layer scales ``X`` (B, L)."""
        yhat = self.output(X)
        return self.ell(yhat[..., None], self.y[None, :, None]) @ self.w

    def term(self) -> GradientFlow:
        """The reduced gradient flow ``dX/dt = -grad L(X)``."""
        return GradientFlow(self.loss)

    def full_network(self, input_dim: int = 2) -> tuple[MLP, "object"]:
        """The width-N network this chain reduces, with its exact (quadrature) population data."""
        net = MLP.build(input_dim, self.width, self.depth, self.activation)
        data = single_index_quadrature(self.teacher, input_dim, self.n_nodes)
        return net, data

    def lift(self, X: torch.Tensor, input_dim: int = 2) -> torch.Tensor:
        """Full-network parameters on the manifold with layer scales ``X`` (B, L)."""
        net, _ = self.full_network(input_dim)
        return symmetric_weights(net, X, direction(input_dim))


def bottleneck_layers(depth: int, r: int) -> tuple:
    """The last ``r`` of ``depth`` layers (1-based): the default bottleneck."""
    if int(r) != r or not 1 <= r <= depth:
        raise ParameterError("r", r, f"must be an integer in 1..L = {depth}")
    return tuple(range(depth - r + 1, depth + 1))


def bottleneck_scales(depth: int, r: int, eps, big: float = 1.0, layers=None) -> torch.Tensor:
    """Initial layer scales (B, L): ``r`` bottleneck layers at each ``eps``, the rest at ``big``.

    By default the bottleneck is the last ``r`` layers; ``layers`` (1-based) chooses others.
    """
    default = list(bottleneck_layers(depth, r))
    eps = torch.as_tensor(eps, dtype=DTYPE).reshape(-1)
    if torch.any(eps <= 0):
        raise ParameterError("eps", eps.tolist(), "must be > 0")
    layers = default if layers is None else list(layers)
    if len(layers) != r or not all(1 <= l <= depth for l in layers):
        raise ParameterError("layers", layers, f"must be {r} distinct layer indices in 1..{depth}")
    X = torch.full((eps.numel(), depth), float(big), dtype=DTYPE)
    for l in layers:
        X[:, l - 1] = eps
    return X
