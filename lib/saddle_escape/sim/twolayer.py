"""The two-layer family of Part II: ``f(x) = sum_i phi(x; u_i) v_i`` over ``H`` units.

One unit is a hidden neuron (fully connected), a convolution kernel, or an attention head. Its
parameters are ``theta_i = (v_i, u_i)``: ``u_i`` enters the nonlinearity, ``v_i`` reads it out.
A :class:`TwoLayer` holds the shapes; every method works on a batch of flat parameter vectors
``theta`` of shape (B, P), so an eps sweep or a set of seeds is one call to the integrator, as
for Part I's :class:`~saddle_escape.sim.networks.MLP`.

The units (``UNITS``), with ``z = u^T x`` the pre-activation:

=============  ============================================  ========================
name           phi(x; u)                                     v_i
=============  ============================================  ========================
linear         z                                             vector (output_dim)
relu           max(z, 0)                                     vector (output_dim)
quadratic      z^2                                           vector
xtanh          z tanh z                                      vector
cubic          z^3                                           vector
tanh           tanh z                                        vector
linear_conv    (u . p_j(x))_j over patch positions j          (positions, output_dim)
relu_conv      (max(u . p_j(x), 0))_j                          (positions, output_dim)
attention      (beta^T k)(q^T x_q), u = (k, q)               vector
=============  ============================================  ========================

For ``attention`` the input row is ``x = (beta, x_q)`` (2D numbers): the in-context summary
``beta = (1/N) sum_n y_n x_n`` and the query token (see :func:`incontext_regression`).
For the convolutions the input row is the signal; :func:`patches` cuts it into windows of
``kernel`` numbers every ``stride`` steps.

Initialisation: every entry of ``theta`` is ``eps * xi`` with ``xi ~ N(0, 1)`` drawn from the
run's seed, so runs with one seed and different eps start on the same ray (``t * eps``
collapses across eps for homogeneous units).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .data import DTYPE, Dataset
from .errors import ParameterError
from .integrate import GradientFlow


@dataclass(frozen=True)
class Unit:
    """A unit type: its scalar nonlinearity ``g`` and how its pre-activations are formed."""

    name: str
    g: Callable[[torch.Tensor], torch.Tensor]
    form: str   # "dense" (z = u.x), "conv" (z_j = u.p_j(x)), "attention" (z = (beta.k)(q.x_q))
    description: str


def _identity(z):
    return z


UNITS: dict[str, Unit] = {u.name: u for u in (
    Unit("linear", _identity, "dense", "linear fully connected"),
    Unit("relu", torch.relu, "dense", "ReLU fully connected, no bias"),
    Unit("quadratic", torch.square, "dense", "quadratic"),
    Unit("xtanh", lambda z: z * torch.tanh(z), "dense", "x tanh(x)"),
    Unit("cubic", lambda z: z ** 3, "dense", "cubic"),
    Unit("tanh", torch.tanh, "dense", "tanh fully connected"),
    Unit("linear_conv", _identity, "conv", "linear convolution"),
    Unit("relu_conv", torch.relu, "conv", "ReLU convolution"),
    Unit("attention", _identity, "attention", "linear attention head, rank-one key and query"),
)}


def get_unit(name: str) -> Unit:
    """The unit called `name`; a :class:`~saddle_escape.sim.errors.ParameterError` lists the known names otherwise."""
    if name not in UNITS:
        raise ParameterError("unit", name, f"must be one of {', '.join(UNITS)}")
    return UNITS[name]


def n_positions(input_dim: int, kernel: int, stride: int) -> int:
    """How many windows of `kernel` numbers, every `stride` steps, fit in `input_dim` numbers."""
    return (input_dim - kernel) // stride + 1


def patches(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Windows of a batch of signals: (n, d) -> (n, positions, kernel)."""
    return x.unfold(-1, kernel, stride)


@dataclass(frozen=True)
class TwoLayer:
    """``H`` units of one type between ``input_dim`` inputs and ``output_dim`` outputs.

    ``kernel`` and ``stride`` are used by the convolutional units only (``kernel = None`` means
    the whole input: one position). For ``attention``, ``input_dim`` is the token dimension D and
    an input row holds ``(beta, x_q)``.
    """

    unit: Unit
    input_dim: int
    width: int
    output_dim: int = 1
    kernel: int | None = None
    stride: int = 1

    def __post_init__(self):
        for name in ("input_dim", "width", "output_dim", "stride"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ParameterError(name, value, "must be a positive integer")
        if self.unit.form == "conv" and not (self.kernel is None or 1 <= self.kernel <= self.input_dim):
            raise ParameterError("kernel", self.kernel, f"must be an integer in [1, input_dim = {self.input_dim}]")

    @classmethod
    def build(cls, unit: str, input_dim: int, width: int, output_dim: int = 1, kernel: int | None = None,
              stride: int = 1) -> "TwoLayer":
        return cls(get_unit(unit), input_dim, width, output_dim, kernel, stride)

    # -------------------------------------------------------------- shapes

    @property
    def positions(self) -> int:
        """Patch positions of a convolution (1 for the other units)."""
        if self.unit.form != "conv":
            return 1
        return n_positions(self.input_dim, self.kernel or self.input_dim, self.stride)

    @property
    def u_dim(self) -> int:
        """Length of one ``u_i``: the kernel for convolutions, ``(k, q)`` for attention."""
        if self.unit.form == "conv":
            return self.kernel or self.input_dim
        return 2 * self.input_dim if self.unit.form == "attention" else self.input_dim

    @property
    def v_shape(self) -> tuple[int, ...]:
        return (self.positions, self.output_dim) if self.unit.form == "conv" else (self.output_dim,)

    @property
    def v_dim(self) -> int:
        return self.positions * self.output_dim

    @property
    def n_params(self) -> int:
        return self.width * (self.v_dim + self.u_dim)

    def unflatten(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``V`` ``(B, H, *v_shape)`` and ``U`` (B, H, u_dim) into ``theta`` (B, P)."""
        lead = theta.shape[:-1]
        v, u = torch.split(theta, [self.width * self.v_dim, self.width * self.u_dim], dim=-1)
        return v.reshape(*lead, self.width, *self.v_shape), u.reshape(*lead, self.width, self.u_dim)

    def flatten(self, V: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`unflatten`."""
        lead = U.shape[:-2]
        return torch.cat([V.reshape(*lead, -1), U.reshape(*lead, -1)], dim=-1)

    # -------------------------------------------------------------- the map

    def activations(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``phi(x; u_i)`` of every unit: (B, n, H) or, for convolutions, (B, n, H, positions)."""
        _, U = self.unflatten(theta)
        form = self.unit.form
        if form == "dense":
            return self.unit.g(x @ U.transpose(-1, -2))
        if form == "conv":
            p = patches(x, self.kernel or self.input_dim, self.stride)          # (n, J, k)
            return self.unit.g(torch.einsum("njk,...hk->...nhj", p, U))
        D = self.input_dim
        beta, xq = x[..., :D], x[..., D:]
        k, q = U[..., :D], U[..., D:]
        return (beta @ k.transpose(-1, -2)) * (xq @ q.transpose(-1, -2))

    def unit_outputs(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each unit's contribution ``phi(x; u_i) v_i``: (B, n, H, output_dim)."""
        V, _ = self.unflatten(theta)
        a = self.activations(theta, x)
        if self.unit.form == "conv":
            return torch.einsum("...nhj,...hjm->...nhm", a, V)
        return a.unsqueeze(-1) * V.unsqueeze(-3)

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``f(x)``: (B, n, output_dim)."""
        V, _ = self.unflatten(theta)
        a = self.activations(theta, x)
        if self.unit.form == "conv":
            return torch.einsum("...nhj,...hjm->...nm", a, V)
        return a @ V

    # -------------------------------------------------------------- training

    def loss(self, theta: torch.Tensor, data: Dataset) -> torch.Tensor:
        """``1/2 E ||y - f(x)||^2`` over the weighted training set: (B,)."""
        r = self.forward(theta, data.x) - data.y
        return 0.5 * ((r * r).sum(-1) * data.w).sum(-1)

    def flow(self, data: Dataset) -> GradientFlow:
        """The gradient-flow vector field of :meth:`loss` on `data`, for :func:`~.integrate.solve`."""
        return GradientFlow(lambda theta: self.loss(theta, data))

    def hessian(self, theta: torch.Tensor, data: Dataset) -> torch.Tensor:
        """The loss Hessian at each run's parameters: (B, P, P) for `theta` (B, P).

        Row by row with double backward (the runs are independent, so one backward pass of the
        summed gradient's entry p gives row p of every run's Hessian). ``torch.func.hessian``
        gives the same numbers but its first call imports torch._dynamo, 10-20 s on a busy machine.
        """
        with torch.enable_grad():
            th = theta.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss(th, data).sum(), th, create_graph=True)
            rows = [torch.autograd.grad(g[:, p].sum(), th, retain_graph=True, allow_unused=True)[0]
                    for p in range(th.shape[-1])]
        return torch.stack([torch.zeros_like(th) if r is None else r for r in rows], dim=1).detach()

    def init(self, eps, seeds: Sequence[int], dtype=DTYPE, device=None) -> torch.Tensor:
        """``theta = eps * xi``, ``xi ~ N(0, 1)`` per entry from each run's seed: (B, P).

        `eps` is a number or one value per run (same length as `seeds`).
        """
        xi = torch.stack([torch.randn(self.n_params, generator=torch.Generator().manual_seed(int(s)),
                                      dtype=DTYPE) for s in seeds]).to(dtype=dtype, device=device)
        eps = torch.as_tensor(eps, dtype=dtype, device=device).reshape(-1, 1)
        if eps.shape[0] not in (1, len(seeds)):
            raise ParameterError("eps", tuple(eps.flatten().tolist()), f"must be one value or {len(seeds)} values")
        if not bool((eps > 0).all()):
            raise ParameterError("eps", tuple(eps.flatten().tolist()), "must be > 0")
        return eps * xi


# ------------------------------------------------------------------ data

def incontext_regression(n_sequences: int, token_dim: int, context_length: int, seed: int,
                         covariance: torch.Tensor | None = None, dtype=DTYPE) -> Dataset:
    """In-context linear regression, drawn once: per sequence a task ``w ~ N(0, I)``, tokens
    ``x_1..x_N, x_q ~ N(0, Lambda)``, labels ``y_n = w^T x_n``.

    The rows of the returned dataset are ``x = (beta, x_q)`` with ``beta = (1/N) sum_n y_n x_n``,
    and the target ``y = w^T x_q``: all that a linear attention head with rank-one key and query
    sees of a sequence (its prediction is ``v (beta^T k)(q^T x_q)``).
    """
    if n_sequences < 1:
        raise ParameterError("n_sequences", n_sequences, "must be a positive integer")
    if context_length < 1:
        raise ParameterError("context_length", context_length, "must be a positive integer")
    D, N = token_dim, context_length
    g = torch.Generator().manual_seed(int(seed))
    C = torch.eye(D, dtype=DTYPE) if covariance is None else torch.as_tensor(covariance, dtype=DTYPE)
    root = torch.linalg.cholesky(C)
    w = torch.randn(n_sequences, D, generator=g, dtype=DTYPE)
    tokens = torch.randn(n_sequences, N + 1, D, generator=g, dtype=DTYPE) @ root.T
    xs, xq = tokens[:, :N], tokens[:, N]
    ys = (xs @ w.unsqueeze(-1)).squeeze(-1)
    beta = (ys.unsqueeze(-1) * xs).mean(1)
    x = torch.cat([beta, xq], dim=-1)
    y = (xq * w).sum(-1, keepdim=True)
    weights = torch.full((n_sequences,), 1.0 / n_sequences, dtype=DTYPE)
    return Dataset(x.to(dtype), y.to(dtype), weights.to(dtype))


# ------------------------------------------------------------------ exact population losses

def population_loss_linear(model: TwoLayer, theta: torch.Tensor, teacher: torch.Tensor,
                           covariance: torch.Tensor | None = None) -> torch.Tensor:
    """``1/2 E||T x - W x||^2`` for ``x ~ N(0, Sigma)`` (Sigma = I by default), linear FC only:
    ``1/2 tr((T - W) Sigma (T - W)^T)`` with ``W = sum_i v_i u_i^T``: (B,)."""
    if model.unit.name != "linear":
        raise ParameterError("unit", model.unit.name, "must be linear for this population loss")
    V, U = model.unflatten(theta)
    D = teacher.to(theta.dtype) - V.transpose(-1, -2) @ U                    # (B, m, d)
    S = torch.eye(model.input_dim, dtype=theta.dtype) if covariance is None else covariance.to(theta.dtype)
    return 0.5 * torch.einsum("bmi,ij,bmj->b", D, S, D)


def population_loss_quadratic(model: TwoLayer, theta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1/2 E||y - f(x)||^2`` for quadratic units, ``x ~ N(0, I)`` and the teacher
    ``y_m = x^T A_m x`` (`teacher` (m, d, d), or (d, d) for one output): (B,).

    The student is ``f_m = x^T B_m x`` with ``B_m = sum_i V_im u_i u_i^T``; for a symmetric
    ``C = A_m - B_m``, Isserlis' theorem gives ``E[(x^T C x)^2] = (tr C)^2 + 2 tr(C^2)``.
    """
    if model.unit.name != "quadratic":
        raise ParameterError("unit", model.unit.name, "must be quadratic for this population loss")
    A = teacher.to(theta.dtype)
    A = A.unsqueeze(0) if A.ndim == 2 else A
    A = 0.5 * (A + A.transpose(-1, -2))
    V, U = model.unflatten(theta)                                           # (B, H, m), (B, H, d)
    Bm = torch.einsum("bhm,bhi,bhj->bmij", V, U, U)
    C = A.unsqueeze(0) - Bm
    tr = torch.diagonal(C, dim1=-2, dim2=-1).sum(-1)
    return 0.5 * (tr ** 2 + 2 * (C * C).sum((-1, -2))).sum(-1)
