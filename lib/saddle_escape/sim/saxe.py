"""Linear networks in closed form: the loss from second moments, Saxe's mode ODE, the best
rank-k losses, and the initial mode overlaps of a small random initialisation.

For any network whose map is a matrix ``W`` (a two-layer linear net ``W = V^T U``, a deep linear
net ``W = W_L ... W_1``), the squared loss over a data set depends on the data only through
three moments:

    L(W) = 1/2 E||y||^2 - tr(W Sigma_xy) + 1/2 tr(W Sigma_xx W^T),   grad_W L = W Sigma_xx - Sigma_yx,

so a training set of any size is as cheap as its moments (:class:`Moments`). With whitened inputs
(``Sigma_xx = I``) and ``Sigma_yx = sum_k s_k a_k b_k^T``, a balanced mode of a two-layer net has
strength ``u`` obeying ``du/dt = 2u(s - u)`` (Saxe et al. 2014, our normalisation: the 1/2 in the
loss, unit learning rate), the logistic :func:`saxe_strength`. A small random init grows mode k from
the hidden vector ``z_k = (V a_k + U b_k)/2`` (the growing half of the linear phase); once earlier
modes are learned only the part of ``z_k`` orthogonal to ``z_1..z_{k-1}`` keeps growing, so the
effective initial strength of mode k is ``R_kk^2`` of the QR factorisation of ``[z_1 ... z_K]``
(:func:`growing_overlaps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import DTYPE, Dataset
from .errors import ParameterError
from .integrate import GradientFlow
from .twolayer import TwoLayer


@dataclass(frozen=True)
class Moments:
    """``Sigma_xx`` (d, d), ``Sigma_yx`` (m, d) and ``E||y||^2`` of a weighted data set."""

    sxx: torch.Tensor
    syx: torch.Tensor
    yy: float

    @classmethod
    def of(cls, data: Dataset) -> "Moments":
        w = data.w[:, None]
        return cls(data.x.T @ (w * data.x), data.y.T @ (w * data.x), float((data.w * (data.y ** 2).sum(-1)).sum()))

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        """``1/2 E||y - W x||^2`` for a batch of maps ``W`` (B, m, d): (B,)."""
        cross = (W * self.syx).sum((-1, -2))
        quad = ((W @ self.sxx) * W).sum((-1, -2))
        return 0.5 * self.yy - cross + 0.5 * quad

    def residual(self, W: torch.Tensor) -> torch.Tensor:
        """``Sigma_yx - W Sigma_xx = -grad_W L`` (B, m, d)."""
        return self.syx - W @ self.sxx

    def best_rank_losses(self) -> torch.Tensor:
        """Loss of the best map of rank k, k = 0 .. min(m, d): reduced-rank regression, i.e.
        Eckart--Young on ``Sigma_yx Sigma_xx^{-1/2}`` (on the support of ``Sigma_xx``)."""
        c = whitened_singular_values(self)
        tail = torch.flip(torch.cumsum(torch.flip(c ** 2, [0]), 0), [0])       # sum_{j >= k} c_j^2
        ols = 0.5 * self.yy - 0.5 * float((c ** 2).sum())                       # best full-rank loss
        return torch.cat([ols + 0.5 * tail, torch.tensor([ols], dtype=c.dtype)])


def whitened_singular_values(moments: Moments, rcond: float = 1e-10) -> torch.Tensor:
    """Singular values of ``Sigma_yx Sigma_xx^{-1/2}``, largest first (equal to those of
    ``Sigma_yx`` when the inputs are whitened)."""
    lam, Q = torch.linalg.eigh(moments.sxx)
    keep = lam > rcond * lam.max()
    root_inv = Q[:, keep] / lam[keep].sqrt()
    return torch.linalg.svdvals(moments.syx @ root_inv)


def linear_flow(model: TwoLayer, moments: Moments, scale=1.0) -> GradientFlow:
    """Gradient flow of a linear fully connected :class:`~saddle_escape.sim.twolayer.TwoLayer` (``W = V^T U``) on the exact
    moment loss, with the hand-written gradient ``-dL/dV = U R^T``, ``-dL/dU = V R``
    (``R = Sigma_yx - W Sigma_xx``): the same flow as ``model.flow(data)`` at a cost independent of
    the number of samples. ``scale`` (a number, or one per run) multiplies the loss: gradient
    descent with step ``eta`` is unit steps on ``eta L``, so runs of different ``eta`` share a clock."""
    if model.unit.name != "linear":
        raise ParameterError("unit", model.unit.name, "must be linear for the moment-form flow")
    c = torch.as_tensor(scale, dtype=moments.sxx.dtype)
    c_rows = c if c.ndim == 0 else c[:, None]

    def loss(theta):
        V, U = model.unflatten(theta)
        return c * moments.loss(V.transpose(-1, -2) @ U)

    def neg_grad_and_loss(theta):
        V, U = model.unflatten(theta)
        W = V.transpose(-1, -2) @ U
        R = moments.residual(W)
        return c_rows * model.flatten(U @ R.transpose(-1, -2), V @ R), c * moments.loss(W)

    return GradientFlow(loss, neg_grad_and_loss)


def whitened_teacher_data(T: torch.Tensor) -> Dataset:
    """The smallest data set with whitened inputs and targets ``y = T x``: ``x = sqrt(d) e_mu``,
    mu = 1..d, equal weights. Its moments (``Sigma_xx = I``, ``Sigma_yx = T``) are those of any
    whitened sample of the teacher, so every loss and gradient agree with that sample's."""
    m, d = T.shape
    x = math.sqrt(d) * torch.eye(d, dtype=T.dtype)
    return Dataset(x, x @ T.T, torch.full((d,), 1.0 / d, dtype=T.dtype))


# ------------------------------------------------------------------ Saxe's mode ODE

def saxe_strength(t, s: float, u0) -> torch.Tensor:
    """Logistic solution ``u(t) = s e^{2st} / (e^{2st} - 1 + s/u0)`` of ``du/dt = 2u(s - u)``."""
    t = torch.as_tensor(t, dtype=DTYPE)
    e = torch.exp(2 * s * t)
    return s * e / (e - 1 + s / torch.as_tensor(u0, dtype=DTYPE))


def saxe_time(s: float, u0, fraction: float) -> torch.Tensor:
    """Time for ``du/dt = 2u(s - u)`` to grow from ``u0`` to ``fraction * s``:
    ``ln[(s/u0 - 1) f/(1 - f)] / (2s)``."""
    if not 0 < fraction < 1:
        raise ParameterError("fraction", fraction, "must be in (0, 1)")
    u0 = torch.as_tensor(u0, dtype=DTYPE)
    return torch.log((s / u0 - 1) * fraction / (1 - fraction)) / (2 * s)


LOSS_MIDPOINT = 1 - 1 / math.sqrt(2)
"""Fraction of ``s_k`` at which mode k's loss term ``(s_k - u)^2 / 2`` is half-way down: the loss
is midway between the plateaus ``L*_{k-1}`` and ``L*_k`` when ``u_k = (1 - 1/sqrt 2) s_k``."""


def hidden_growth_vectors(model: TwoLayer, theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``z_k = (V a_k + U b_k) / 2`` for every mode (columns of ``a`` (m, K), ``b`` (d, K)):
    (B, H, K). In the linear phase ``V a_k`` and ``U b_k`` both approach ``z_k e^{s_k t}``."""
    V, U = model.unflatten(theta)
    return (V @ a + U @ b) / 2


def growing_overlaps(model: TwoLayer, theta0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Effective initial strength (B, K) of each mode: ``R_kk^2`` of ``QR([z_1 ... z_K])``, the
    squared part of ``z_k`` orthogonal to the hidden directions of the modes learned before it.
    Needs ``width >= K`` (a narrower net cannot learn mode K)."""
    Z = hidden_growth_vectors(model, theta0, a, b)
    if Z.shape[-2] < Z.shape[-1]:
        raise ParameterError("width", Z.shape[-2], f"must be >= the number of modes {Z.shape[-1]}")
    R = torch.linalg.qr(Z, mode="r").R
    return R.diagonal(dim1=-2, dim2=-1) ** 2


def expected_log_overlap_shift(width: int, k: int) -> float:
    """``E ln(R_kk^2 / (eps^2 / 2))`` for i.i.d. N(0, eps^2) weights: ``R_kk^2 ~ (eps^2/2) chi^2_{H-k+1}``,
    and ``E ln chi^2_n = psi(n/2) + ln 2``."""
    from scipy.special import digamma
    n = width - k + 1
    if n < 1:
        raise ParameterError("width", width, f"must be >= k = {k}")
    return float(digamma(n / 2) + math.log(2))


def var_log_overlap(width: int, k: int) -> float:
    """``Var ln chi^2_{H-k+1} = psi'((H-k+1)/2)``."""
    from scipy.special import polygamma
    return float(polygamma(1, (width - k + 1) / 2))
