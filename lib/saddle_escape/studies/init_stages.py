"""Initialisation-induced saddle-to-saddle (chapter 11, Proposition 5): quadratic units and
linear attention heads recruited one at a time from a small initialisation.

Both models are ``f(x) = sum_i v_i u_i^T Z(x) u_i`` with scalar ``v_i``:

* quadratic units, ``Z = x x^T`` (``u_i`` in R^D), centred teacher ``y = x^T A x - tr A``,
  inputs ``x ~ N(0, I)``, exact population loss ``||A - M||_F^2 + (tr M)^2 / 2`` with
  ``M = sum_i v_i u_i u_i^T`` (:class:`Quadratic`);
* attention heads with rank-one key and query, ``u = (k, q)``, ``f = v (beta^T k)(q^T x_q)``,
  on in-context linear regression drawn once (:class:`Attention`); the loss is the training-set
  mean, written as a quadratic form in ``W = sum_i v_i k_i q_i^T``.

Near the origin every unit follows its own *decoupled* system ``v' = u^T S u, u' = 2 v S u``
(``S = E[y Z]``). :func:`blowup` solves it in closed form (a particle in a potential, see
chapter 11) from each unit's actual initial weights: the blow-up time and the time its size
reaches a threshold. :func:`run_sweep` integrates the full network in the rescaled time
``tau = eps t`` (all eps share one clock) and records when the k-th unit becomes large.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..sim import counts
from ..sim.data import DTYPE, Dataset
from ..sim.errors import ParameterError
from ..sim.integrate import Event, ODETerm, PIController, SaveAt, solve
from ..sim.twolayer import TwoLayer, incontext_regression

# ------------------------------------------------------------------ the two problems


@dataclass
class Problem:
    """A quadratic-in-u model near its zero-unit saddles: what the study needs of it."""

    name: str
    model: TwoLayer
    S: np.ndarray                   # E[y Z]: the decoupled growth matrix (u_dim x u_dim)
    size_scale: float               # size of a fully learned unit (thresholds are fractions of it)
    n_stages: int                   # how many directions there are to learn (max drops = min(H, n_stages))

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sizes(self, theta: torch.Tensor) -> torch.Tensor:
        """Weight size of each unit: ``|v| |u|^2`` (quadratic) or ``|v| |k| |q|`` (attention): (B, H)."""
        raise NotImplementedError

    def count_inputs(self) -> torch.Tensor:
        """Inputs over which :func:`~saddle_escape.sim.counts.active_units` measures unit outputs."""
        raise NotImplementedError

    def with_width(self, width: int) -> "Problem":
        raise NotImplementedError


def _rotation(d: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    q, r = np.linalg.qr(g.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@dataclass
class Quadratic(Problem):
    """Quadratic units on a centred quadratic teacher ``y = x^T A x - tr A``, ``x ~ N(0, I_D)``."""

    A: np.ndarray = None
    eigenvalues: np.ndarray = None
    eigenvectors: np.ndarray = None

    @classmethod
    def build(cls, teacher_eigenvalues, width: int, seed: int) -> "Quadratic":
        lam = np.asarray(teacher_eigenvalues, dtype=float)
        R = _rotation(len(lam), 10_000 + seed)          # a generic eigenbasis, not the coordinate axes
        A = (R * lam) @ R.T
        return cls("quadratic", TwoLayer.build("quadratic", len(lam), width), 2 * A,
                   float(np.abs(lam).max()), len(lam), A, lam, R)

    def with_width(self, width):
        return Quadratic(self.name, TwoLayer.build("quadratic", self.model.input_dim, width), self.S,
                         self.size_scale, self.n_stages, self.A, self.eigenvalues, self.eigenvectors)

    def M(self, theta):
        V, U = self.model.unflatten(theta)
        return (U * V).transpose(-1, -2) @ U          # sum_i v_i u_i u_i^T (a matmul: einsum is slower here)

    def loss(self, theta):
        """Exact population loss ``1/2 E (y - f)^2`` (Gaussian fourth moments)."""
        A = torch.as_tensor(self.A, dtype=theta.dtype, device=theta.device)
        M = self.M(theta)
        R = A - M
        tr = M.diagonal(dim1=-2, dim2=-1).sum(-1)
        return (R * R).sum((-2, -1)) + 0.5 * tr * tr

    def grad(self, theta):
        """``dL/dtheta`` by hand (``dL/dM = -2(A - M) + tr(M) I``): cheaper than autograd here."""
        V, U = self.model.unflatten(theta)
        v = V[..., 0]
        A = torch.as_tensor(self.A, dtype=theta.dtype, device=theta.device)
        M = (U * v[..., None]).transpose(-1, -2) @ U
        tr = M.diagonal(dim1=-2, dim2=-1).sum(-1)
        G = 2 * (M - A) + tr[..., None, None] * torch.eye(A.shape[0], dtype=theta.dtype, device=theta.device)
        GU = U @ G
        return self.model.flatten(((GU * U).sum(-1))[..., None], 2 * v[..., None] * GU)

    def sizes(self, theta):
        V, U = self.model.unflatten(theta)
        return V[..., 0].abs() * (U * U).sum(-1)

    def grad_np(self, theta: np.ndarray) -> np.ndarray:
        """:meth:`grad` of one run in numpy (``theta`` (P,)): the stiff solver calls it thousands of
        times on a few dozen numbers, where torch's per-call overhead would dominate."""
        H, D = self.model.width, self.model.input_dim
        v, U = theta[:H], theta[H:].reshape(H, D)
        M = (U.T * v) @ U
        G = 2 * (M - self.A) + np.trace(M) * np.eye(D)
        GU = U @ G
        return np.concatenate([(GU * U).sum(1), (2 * v[:, None] * GU).ravel()])

    def sizes_np(self, theta: np.ndarray) -> np.ndarray:
        H = self.model.width
        return np.abs(theta[:H]) * (theta[H:].reshape(H, -1) ** 2).sum(1)

    def count_inputs(self):
        return torch.randn(512, self.model.input_dim, generator=torch.Generator().manual_seed(7), dtype=DTYPE)

    def exact_dataset(self) -> Dataset:
        """A weighted input set on which the sampled loss *is* the population loss: the tensor
        product of 3-point Gauss-Hermite rules, exact for every polynomial of degree <= 5 in each
        coordinate (the loss has degree 4). For checking :meth:`loss` against ``TwoLayer.loss``."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(3)
        weights = weights / weights.sum()
        D = self.model.input_dim
        grid = np.stack(np.meshgrid(*[nodes] * D, indexing="ij"), -1).reshape(-1, D)
        w = np.prod(np.stack(np.meshgrid(*[weights] * D, indexing="ij"), -1).reshape(-1, D), -1)
        x = torch.as_tensor(grid, dtype=DTYPE)
        y = torch.einsum("ni,ij,nj->n", x, torch.as_tensor(self.A, dtype=DTYPE), x) - float(np.trace(self.A))
        return Dataset(x, y[:, None], torch.as_tensor(w, dtype=DTYPE))

    def learned_directions(self, theta_row: torch.Tensor, active: torch.Tensor) -> list[int]:
        """For each active unit, the teacher eigenvector its ``u`` is closest to."""
        _, U = self.model.unflatten(theta_row[None])
        U = U[0][active].detach().numpy()
        overlap = np.abs(U @ self.eigenvectors) / np.linalg.norm(U, axis=1, keepdims=True)
        return [int(j) for j in overlap.argmax(1)]

    def best_loss(self, directions) -> float:
        """Loss of the best network whose units use exactly the eigen-directions ``S``:
        ``sum_{j not in S} lambda_j^2 + (sum_{j in S} lambda_j)^2 / (|S| + 2)`` (derived in ch. 11)."""
        S = sorted(set(directions))
        lam = self.eigenvalues
        out = np.delete(lam, S)
        return float((out ** 2).sum() + lam[S].sum() ** 2 / (len(S) + 2))

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        one = lambda th: self.loss(th.unsqueeze(0)).squeeze(0)  # noqa: E731
        return torch.func.vmap(torch.func.hessian(one))(theta)


@dataclass
class Attention(Problem):
    """Linear attention heads with rank-one key and query on in-context linear regression."""

    data: Dataset = None
    K: torch.Tensor = None          # E[(beta x_q^T)(beta x_q^T)] as a D^2 x D^2 matrix
    b: torch.Tensor = None          # E[y beta x_q^T], flattened
    y2: float = 0.0                 # E[y^2]
    covariance: np.ndarray = None

    @classmethod
    def build(cls, token_dim: int, context_length: int, n_sequences: int, width: int, seed: int,
              token_eigenvalues=None) -> "Attention":
        lam = default_token_eigenvalues(token_dim) if token_eigenvalues is None else np.asarray(token_eigenvalues, float)
        C = torch.as_tensor(np.diag(lam), dtype=DTYPE)
        data = incontext_regression(n_sequences, token_dim, context_length, seed, covariance=C)
        D = token_dim
        beta, xq = data.x[:, :D], data.x[:, D:]
        phi = torch.einsum("ni,nj->nij", beta, xq).reshape(-1, D * D)
        w = data.w
        K = torch.einsum("n,ni,nj->ij", w, phi, phi)
        b = torch.einsum("n,n,ni->i", w, data.y[:, 0], phi)
        y2 = float((w * data.y[:, 0] ** 2).sum())
        B = b.reshape(D, D).numpy()
        S = 0.5 * np.block([[np.zeros((D, D)), B], [B.T, np.zeros((D, D))]])
        Wfull = torch.linalg.solve(K, b).reshape(D, D)
        scale = float(torch.linalg.svdvals(Wfull)[0])
        return cls("attention", TwoLayer.build("attention", D, width), S, scale, D, data, K, b, y2, lam)

    def with_width(self, width):
        return Attention(self.name, TwoLayer.build("attention", self.model.input_dim, width), self.S,
                         self.size_scale, self.n_stages, self.data, self.K, self.b, self.y2, self.covariance)

    def W(self, theta):
        V, U = self.model.unflatten(theta)
        D = self.model.input_dim
        return (U[..., :D] * V).transpose(-1, -2) @ U[..., D:]   # sum_i v_i k_i q_i^T

    def loss(self, theta):
        """Training-set loss ``1/2 mean (y - beta^T W x_q)^2`` as a quadratic form in ``W``."""
        w = self.W(theta).flatten(-2)
        K, b = self.K.to(theta), self.b.to(theta)
        return 0.5 * self.y2 - w @ b + 0.5 * ((w @ K) * w).sum(-1)

    def grad(self, theta):
        """``dL/dtheta`` by hand (``dL/dW = K w - b``): cheaper than autograd here."""
        V, U = self.model.unflatten(theta)
        D = self.model.input_dim
        v, k, q = V[..., 0], U[..., :D], U[..., D:]
        w = self.W(theta).flatten(-2)
        G = (w @ self.K.to(theta) - self.b.to(theta)).unflatten(-1, (D, D))
        Gq = q @ G.transpose(-1, -2)            # rows: G q_i
        Gk = k @ G                               # rows: G^T k_i
        return self.model.flatten((k * Gq).sum(-1)[..., None],
                                  torch.cat([v[..., None] * Gq, v[..., None] * Gk], -1))

    def sizes(self, theta):
        V, U = self.model.unflatten(theta)
        D = self.model.input_dim
        return V[..., 0].abs() * U[..., :D].norm(dim=-1) * U[..., D:].norm(dim=-1)

    def grad_np(self, theta: np.ndarray) -> np.ndarray:
        """:meth:`grad` of one run in numpy (``theta`` (P,)), for the stiff solver."""
        if not hasattr(self, "_Knp"):
            self._Knp, self._bnp = self.K.numpy(), self.b.numpy()
        H, D = self.model.width, self.model.input_dim
        v, U = theta[:H], theta[H:].reshape(H, 2 * D)
        k, q = U[:, :D], U[:, D:]
        G = (self._Knp @ ((k.T * v) @ q).ravel() - self._bnp).reshape(D, D)
        Gq, Gk = q @ G.T, k @ G
        return np.concatenate([(k * Gq).sum(1), np.concatenate([v[:, None] * Gq, v[:, None] * Gk], 1).ravel()])

    def sizes_np(self, theta: np.ndarray) -> np.ndarray:
        H, D = self.model.width, self.model.input_dim
        U2 = theta[H:].reshape(H, 2 * D) ** 2
        return np.abs(theta[:H]) * np.sqrt(U2[:, :D].sum(1) * U2[:, D:].sum(1))

    def directions(self, theta: torch.Tensor, active: torch.Tensor, rel: float = 0.05) -> int:
        """How many distinct directions the active heads realise: the rank of their ``W`` at a
        threshold ``rel`` relative to its largest singular value. Heads that grew together along one
        direction (split copies, Theorem 1's kind 1) add a head but not a direction."""
        V, U = self.model.unflatten(theta[None])
        D = self.model.input_dim
        v, k, q = V[0, active, 0], U[0, active, :D], U[0, active, D:]
        s = torch.linalg.svdvals((k.T * v) @ q)
        return int((s > rel * s[0]).sum()) if len(s) else 0

    def count_inputs(self):
        return self.data.x

    def best_loss(self, rank: int, restarts: int = 4, iters: int = 400) -> float:
        """The smallest training loss of ``rank`` heads: the best rank-``rank`` ``W`` under the
        quadratic form, by alternating least squares (keys given queries, then queries given keys)
        from several starts, the best kept."""
        D = self.model.input_dim
        rank = min(rank, D)                      # a D x D matrix has rank at most D: more heads add nothing
        Kt = self.K.reshape(D, D, D, D)          # K[i j, k l] = E[beta_i xq_j beta_k xq_l]
        Bm = self.b.reshape(D, D)
        best = math.inf
        g = torch.Generator().manual_seed(123)
        for r in range(restarts):
            Q = torch.linalg.svd(Bm)[2][:rank].T.clone() if r == 0 else torch.randn(D, rank, generator=g, dtype=DTYPE)
            for _ in range(iters):
                # W = Kk Q^T: loss quadratic in Kk (D x rank) given Q, and in Q given Kk
                G = torch.einsum("ijkl,ja,lb->iakb", Kt, Q, Q).reshape(D * rank, D * rank)
                Kk = torch.linalg.lstsq(G, (Bm @ Q).reshape(-1, 1)).solution.reshape(D, rank)
                G = torch.einsum("ijkl,ia,kb->jalb", Kt, Kk, Kk).reshape(D * rank, D * rank)
                Q = torch.linalg.lstsq(G, (Bm.T @ Kk).reshape(-1, 1)).solution.reshape(D, rank)
            w = (Kk @ Q.T).flatten()
            best = min(best, float(0.5 * self.y2 - w @ self.b + 0.5 * w @ self.K @ w))
        return best

    def plateau_loss(self, rank: int) -> float:
        """Loss of the rank-``rank`` stationary point that the heads reach: near the origin they
        grow along the top singular pairs of ``B = E[y beta x_q^T]`` (the extreme eigenvectors of
        ``S``), and the plateau is the fixed point of ``rank`` heads continued from there --
        alternating least squares started from those singular vectors (the first start of
        :meth:`best_loss`). It need not be the global best of ``rank`` heads: with the default
        token spectrum at D = 4 the rank-one plateau lies 1.5% above it."""
        return self.best_loss(rank, restarts=1)

    def hessian(self, theta):
        one = lambda th: self.loss(th.unsqueeze(0)).squeeze(0)  # noqa: E731
        return torch.func.vmap(torch.func.hessian(one))(theta)


def default_token_eigenvalues(token_dim: int) -> np.ndarray:
    """Token covariance spectrum ``lambda_j = (D - j + 1) / D``: distinct, so one head per direction."""
    return np.arange(token_dim, 0, -1) / token_dim


# ------------------------------------------------------------------ the decoupled system


def _gauss_legendre(n=96):
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1), 0.5 * w


_GL = _gauss_legendre()


@dataclass
class Decoupled:
    """Per unit: blow-up time, the time its size reaches a threshold, and on which side it blows up."""

    blowup: np.ndarray              # t* of v' = u^T S u, u' = 2 v S u
    reach: np.ndarray               # time at which the unit's size reaches the threshold (nan if none given)
    side: np.ndarray                # +1: s -> +inf (grows along S's positive eigenvalues), -1: negative
    turned: np.ndarray              # the unit's v changed sign first (a turning point)


def blowup(S: np.ndarray, v0: np.ndarray, U0: np.ndarray, size_fn=None, threshold: float | None = None,
           attention_dim: int | None = None) -> Decoupled:
    """Closed-form solution of the decoupled system for each unit (rows of ``U0``, scalars ``v0``).

    With ``S = Q diag(sigma) Q^T``, ``xi = Q^T u0`` and ``s(t) = int_0^t v``, the system gives
    ``u = Q (exp(2 sigma s) xi)`` and ``s'' = sum_j sigma_j xi_j^2 exp(4 sigma_j s)``: a particle
    in a potential with energy ``s'^2 = F(s) = v0^2 + 1/2 sum_j xi_j^2 (exp(4 sigma_j s) - 1)``.
    ``F`` is convex, so the particle either runs off in the direction of ``v0`` or turns once
    (at the zero ``z`` of ``F``) and runs off the other way; it reaches ``|s| = inf`` in finite time

        t* = int ds / sqrt(F(s))      (twice the leg to the turning point, if any, plus the last leg).

    ``size_fn(v, U)`` (unit sizes) and ``threshold`` give also the time at which the size first
    reaches the threshold on the last leg.
    """
    sig, Q = np.linalg.eigh(S)
    xi2 = (np.asarray(U0) @ Q) ** 2
    xi = np.asarray(U0) @ Q
    v0 = np.asarray(v0, float)
    n = len(v0)

    def F(s):          # s: (n,) or (n, m) -> same shape
        e = np.exp(np.clip(4 * sig * s[..., None], -700, 700)) - 1
        return v0.reshape((n,) + (1,) * (s.ndim - 1)) ** 2 + 0.5 * np.einsum(
            "n...j,nj->n...", e, xi2)

    def dF(s):
        e = np.exp(np.clip(4 * sig * s[..., None], -700, 700))
        return 2 * np.einsum("n...j,nj->n...", e * sig, xi2)

    d = np.sign(v0)
    d[d == 0] = 1.0
    # the turning point: along direction d, F first decreases if d F'(0) < 0
    turn = np.zeros(n, bool)
    z = np.zeros(n)
    falling = d * dF(np.zeros(n)) < 0
    if falling.any():
        # minimum of F along d: bisection on d F'(d r) = 0, r in [0, R]
        lo, hi = np.zeros(n), np.full(n, 1.0)
        for _ in range(64):
            grow = (d * dF(d * hi) < 0) & falling
            if not grow.any():
                break
            hi = np.where(grow, 2 * hi, hi)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            neg = d * dF(d * mid) < 0
            lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
        r_min = 0.5 * (lo + hi)
        turn = falling & (F(d * r_min) <= 0)
        lo, hi = np.zeros(n), r_min.copy()
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            pos = F(d * mid) > 0
            lo, hi = np.where(pos, mid, lo), np.where(pos, hi, mid)
        z = np.where(turn, lo, 0.0)
    last = np.where(turn, -d, d)    # direction of the last leg

    # leg to the turning point: r = z - w^2 removes the 1/sqrt singularity at z
    first = np.zeros(n)
    if turn.any():
        x, wts = _tanh_sinh()      # clusters nodes at both ends: also a nearly tangent turn is resolved
        wmax = np.sqrt(z)
        w = wmax[:, None] * x
        r = z[:, None] - w * w
        first = np.where(turn, 2 * (2 * w / np.sqrt(np.maximum(F(d[:, None] * r), 1e-300)) * wts).sum(1) * wmax,
                         0.0)

    # last leg, from s = 0 outwards: integrate r in [0, R] with r = w^2 and tanh-sinh in w
    top = np.where(last > 0, sig.max(), -sig.min())
    if np.any(top <= 0):
        raise ParameterError("S", "no eigenvalue of the needed sign", "S must have eigenvalues of both signs")
    xi_top = np.sqrt(np.maximum(np.where(last[:, None] > 0, xi2 * (sig > 0), xi2 * (sig < 0)).max(1), 1e-300))
    R = (40 + np.log(1 / xi_top).clip(0)) / (2 * top)

    # without a turn F may still dip close to zero at an interior minimum r_min: split there, so
    # that every near-singular point of the integrand is an end of an interval
    split = np.where(falling & ~turn, r_min if falling.any() else 0.0, 0.0)

    def piece(a, b):
        x, wts = _tanh_sinh()
        r = a[:, None] + (b - a)[:, None] * x
        return ((1 / np.sqrt(np.maximum(F(last[:, None] * r), 1e-300))) * wts).sum(1) * (b - a)

    def leg(rmax):
        m = np.minimum(split, rmax)
        return piece(np.zeros(n), m) + piece(m, rmax)

    T = first + leg(R)
    reach = np.full(n, np.nan)
    if size_fn is not None and threshold is not None:
        def size_at(r):
            s = last * r
            vv = last * np.sqrt(np.maximum(F(s), 0))
            UU = (np.exp(2 * sig * s[:, None]) * xi) @ Q.T
            return size_fn(vv, UU)
        lo, hi = np.zeros(n), R.copy()
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = size_at(mid) < threshold
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        reach = first + leg(0.5 * (lo + hi))
    return Decoupled(T, reach, last, turn)


_TS = {}


def _tanh_sinh(h=1 / 24, kmax=4.0):
    """Nodes in (0, 1) and weights of the tanh-sinh rule (clusters nodes at both ends, where the
    integrand of a last leg starting near v = 0 changes on tiny scales)."""
    if "rule" not in _TS:
        k = np.arange(-kmax, kmax + h / 2, h)
        u = 0.5 * np.pi * np.sinh(k)
        x = 0.5 * (1 + np.tanh(u))
        w = 0.5 * h * 0.5 * np.pi * np.cosh(k) / np.cosh(u) ** 2
        keep = (x > 0) & (x < 1) & (w > 1e-300)
        _TS["rule"] = (x[keep], w[keep])
    return _TS["rule"]


def unit_sizes_np(problem: Problem):
    """``size_fn(v, U)`` for :func:`blowup`, in numpy, matching :meth:`Problem.sizes`."""
    if problem.name == "quadratic":
        return lambda v, U: np.abs(v) * (U * U).sum(-1)
    D = problem.model.input_dim
    return lambda v, U: np.abs(v) * np.linalg.norm(U[:, :D], axis=-1) * np.linalg.norm(U[:, D:], axis=-1)


def predict_units(problem: Problem, theta0: torch.Tensor, threshold: float) -> Decoupled:
    """The decoupled prediction for every unit of every run in ``theta0`` (B, P): arrays (B, H)."""
    V, U = problem.model.unflatten(theta0)
    B, H = V.shape[:2]
    out = blowup(problem.S, V[..., 0].reshape(-1).numpy(), U.reshape(B * H, -1).numpy(),
                 unit_sizes_np(problem), threshold)
    return Decoupled(*(a.reshape(B, H) for a in (out.blowup, out.reach, out.side, out.turned)))


# ------------------------------------------------------------------ the full network, all eps on one clock


class ScaledFlow(ODETerm):
    """Gradient flow in the rescaled variables ``tau = eps t``, ``w = theta / eps``: the state is
    ``(w, eps)`` and ``dw/dtau = -grad L(eps w) / eps^2`` (``eps`` is carried as a constant last
    column, so every run keeps its own eps however the batch shrinks). Near the origin the
    right-hand side is the decoupled system, the same for every eps: runs with one seed and
    different eps follow one curve in ``tau`` until they escape, and share one save grid."""

    def __init__(self, grad_fn):
        self.grad_fn = grad_fn
        super().__init__(self._rhs)

    def _rhs(self, t, y):
        eps = y[:, -1:]
        g = self.grad_fn(eps * y[:, :-1])
        return torch.cat([-g / (eps * eps), torch.zeros_like(eps)], dim=-1)


def theta_of(y: torch.Tensor) -> torch.Tensor:
    """Network parameters from a state ``(w, eps)`` of :class:`ScaledFlow`."""
    return y[:, -1:] * y[:, :-1]


@dataclass
class Sweep:
    """Runs ``seeds x eps`` of one problem: drop times and the states at the drops and plateaus."""

    problem: Problem
    seeds: np.ndarray               # (B,) seed of each run
    eps: np.ndarray                 # (B,) eps of each run
    theta0: torch.Tensor            # (B, P)
    threshold: float                # unit size that marks an escape
    drops: np.ndarray               # (B, K) time t (not tau) at which the k-th unit reached the threshold
    mid: torch.Tensor | None        # (B, K, P) parameters half-way through plateau k (after drop k)
    solution: object = field(repr=False, default=None)
    final: torch.Tensor | None = None   # (B, P) where each run ended (stiff_sweep: its horizon or last drop)

    @property
    def censored(self) -> np.ndarray:
        return ~np.isfinite(self.drops)


def _sweep_setup(problem: Problem, eps, seeds, rel_threshold: float, n_drops, tau_max):
    """The runs of a sweep (every seed at every eps), their initial weights, the number of drops,
    the drop threshold and the horizon (default: 100 times the slowest first escape the decoupled
    system predicts)."""
    eps = np.asarray(eps, float)
    seeds = np.asarray(seeds)
    run_seeds = np.repeat(seeds, len(eps))
    run_eps = np.tile(eps, len(seeds))
    theta0 = problem.model.init(torch.as_tensor(run_eps), run_seeds.tolist())
    K = n_drops or min(problem.model.width, problem.n_stages)
    thr = rel_threshold * problem.size_scale
    if tau_max is None:
        pred = predict_units(problem, theta0 / torch.as_tensor(run_eps)[:, None], thr)
        tau_max = 100.0 * float(np.nanmax(pred.blowup.min(1)))
    return run_seeds, run_eps, theta0, K, thr, tau_max


def run_sweep(problem: Problem, eps, seeds, rel_threshold: float = 0.05, tau_max: float | None = None,
              rtol: float = 1e-8, n_drops: int | None = None, save_ts=None, save_fn=None,
              plateaus: bool = True) -> Sweep:
    """Integrate every (seed, eps) pair in one batch until the last expected drop.

    A drop is the k-th largest unit size crossing ``rel_threshold * problem.size_scale`` upwards
    (a fixed fraction of a learned unit's size: far above every eps^3-sized sleeping unit and
    reached O(1) time before the loss falls). With ``plateaus``, a second batch integrates from
    each drop to half-way to the next one and returns those states (the plateau's middle)."""
    run_seeds, run_eps, theta0, K, thr, tau_max = _sweep_setup(problem, eps, seeds, rel_threshold, n_drops, tau_max)

    sorted_sizes = _last_value(lambda y: problem.sizes(theta_of(y)).sort(-1, descending=True).values)
    events = [Event(lambda t, y, runs, k=k: sorted_sizes(y)[:, k] - thr, direction=1,
                    terminal=(k == K - 1 and save_ts is None), name=f"drop{k + 1}") for k in range(K)]
    y0 = torch.cat([theta0 / torch.as_tensor(run_eps)[:, None], torch.as_tensor(run_eps)[:, None]], -1)
    saveat = None if save_ts is None else SaveAt(torch.as_tensor(save_ts, dtype=DTYPE),
                                                  fn=lambda y: save_fn(theta_of(y)))
    sol = solve(ScaledFlow(problem.grad), y0, tau_max, controller=PIController(rtol=rtol, atol=1e-12),
                events=events, saveat=saveat, max_steps=200_000)
    taus = sol.event_times.numpy()
    drops = taus / run_eps[:, None]
    mid = None
    if plateaus:
        mid = _plateau_middles(problem, sol, taus, rtol)
    return Sweep(problem, run_seeds, run_eps, theta0, thr, drops, mid, sol)


def stiff_sweep(problem: Problem, eps, seeds, rel_threshold: float = 0.05, n_drops: int | None = None,
                rtol: float = 1e-9, atol: float = 1e-12, tau_max: float | None = None,
                method: str = "LSODA") -> Sweep:
    """Every drop of every (seed, eps) run, with an implicit integrator: what :func:`run_sweep` does,
    for any eps.

    Why implicit: once a unit has learned it sits at a stable minimum of its manifold and relaxes
    at a rate of order one in ``t``, i.e. ``1/eps`` in ``tau = eps t``, while the next drop waits
    ``Theta(1)`` in ``tau``. An explicit method must resolve the fast rate (``~1/eps`` steps per
    plateau); LSODA (scipy's ``solve_ivp``; it switches to BDF, which is stable for any step,
    when the problem turns stiff) steps over it at the accuracy of the slow motion, so the cost
    barely depends on eps and later drops can be swept over decades (measured: drop times agree
    with :func:`run_sweep` and with Radau IIA to 1e-8 relative). Same variables as
    :class:`ScaledFlow` (``w = theta / eps``), the same drop events (the k-th largest unit size
    crossing the threshold upwards), the plateau middles from the dense output. Runs are
    integrated one by one (the system is a few dozen numbers; ``method`` picks another scipy
    solver, e.g. ``"Radau"``)."""
    from scipy.integrate import solve_ivp
    run_seeds, run_eps, theta0, K, thr, tau_max = _sweep_setup(problem, eps, seeds, rel_threshold, n_drops, tau_max)
    B = len(run_eps)
    taus = np.full((B, K), np.nan)
    mid = torch.full((B, K, problem.model.n_params), math.nan, dtype=DTYPE)
    final = torch.full((B, problem.model.n_params), math.nan, dtype=DTYPE)
    for b in range(B):
        e = float(run_eps[b])

        def rhs(tau, w, e=e):
            return -problem.grad_np(e * w) / (e * e)

        last = {}

        def sorted_sizes(tau, w, e=e):
            # every event asks at the same state: sort the sizes once per state
            if last.get("tau") != tau or last.get("w") is not w:
                last.update(tau=tau, w=w, s=np.sort(problem.sizes_np(e * w))[::-1])
            return last["s"]

        def event(k):
            def g(tau, w):
                return sorted_sizes(tau, w)[k] - thr
            g.direction, g.terminal = 1, k == K - 1
            return g

        sol = solve_ivp(rhs, (0.0, tau_max), theta0[b].numpy() / e, method=method, rtol=rtol, atol=atol,
                        events=[event(k) for k in range(K)], dense_output=True)
        final[b] = torch.as_tensor(e * sol.y[:, -1])
        for k, te in enumerate(sol.t_events):
            if len(te):
                taus[b, k] = te[0]
        ends = np.append(taus[b, 1:], np.nan)
        starts = np.concatenate([[0.0], taus[b, :-1]])
        half = np.where(np.isfinite(ends), 0.5 * (ends - taus[b]), 0.5 * (taus[b] - starts))
        for k in range(K):
            t_mid = taus[b, k] + half[k]
            if np.isfinite(t_mid) and t_mid <= sol.t[-1]:
                mid[b, k] = torch.as_tensor(e * sol.sol(t_mid))
            elif np.isfinite(t_mid) and k == K - 1:      # after the terminal event: integrate on
                more = solve_ivp(rhs, (sol.t[-1], t_mid), sol.y[:, -1], method=method, rtol=rtol, atol=atol)
                mid[b, k] = torch.as_tensor(e * more.y[:, -1])
    return Sweep(problem, run_seeds, run_eps, theta0, thr, taus / run_eps[:, None], mid, final=final)


def _last_value(fn):
    from ..sim.integrate import last_value_cache
    return last_value_cache(fn)


def _plateau_middles(problem, sol, taus, rtol):
    """States half-way between drop k and drop k+1 (after the last drop: half its distance to
    the previous one), integrated from the located drop states."""
    B, K = taus.shape
    nxt = np.concatenate([taus[:, 1:], np.full((B, 1), np.nan)], 1)
    prev = np.concatenate([np.zeros((B, 1)), taus[:, :-1]], 1)
    half = np.where(np.isfinite(nxt), 0.5 * (nxt - taus), 0.5 * (taus - prev))
    starts = torch.stack(sol.event_states, 1)                       # (B, K, P + 1)
    ok = np.isfinite(half) & np.isfinite(taus)
    out = torch.full((B, K, starts.shape[-1] - 1), math.nan, dtype=DTYPE)
    if ok.any():
        rows = torch.as_tensor(ok)
        s = solve(ScaledFlow(problem.grad), starts[rows], torch.as_tensor(half[ok]),
                  controller=PIController(rtol=rtol, atol=1e-12), max_steps=200_000)
        out[rows] = theta_of(s.y_final)
    return out


# ------------------------------------------------------------------ measurements


def first_escapes(problem: Problem, eps, seeds, rel_threshold: float = 0.05) -> tuple[Sweep, Decoupled]:
    """Every (seed, eps) run up to its first drop, and the decoupled prediction for its units."""
    sw = run_sweep(problem, eps, seeds, rel_threshold, n_drops=1, plateaus=False)
    return sw, predict_units(problem, sw.theta0, sw.threshold)


def predicted_first(pred: Decoupled) -> np.ndarray:
    """Predicted first escape of each run: the earliest unit's time to reach the threshold."""
    return pred.reach.min(1)


def drop_increments(sw: Sweep, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t_k(eps_i) - t_k(eps_(i-1))`` between consecutive eps of each seed (eps decreasing), with
    the smaller eps and the seed: ``(eps, increments, seeds)`` for :func:`~saddle_escape.sim.fits.power_law`.

    Why increments: drop k comes at ``t_k = T_k / eps + C_k + o(1)``, the constant ``C_k`` being the
    O(1) duration of the escapes before it (it grows like 1/sigma for a slowly growing direction
    and can be hundreds of time units). A power law fitted to ``t_k`` itself then bends at the
    large-eps end; the increment ``T_k (1/eps_i - 1/eps_(i-1))`` is a pure power law, exponent -1,
    with ``C_k`` gone. Pairs with a missing drop are left out (they are counted as censored)."""
    xs, ys, gs = [], [], []
    for seed in np.unique(sw.seeds):
        r = np.flatnonzero(sw.seeds == seed)
        r = r[np.argsort(-sw.eps[r])]
        t = sw.drops[r, k]
        d = np.diff(t)
        ok = np.isfinite(d)
        xs.append(sw.eps[r][1:][ok]); ys.append(d[ok]); gs.append(np.full(ok.sum(), seed))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


def can_grow(S_eff: np.ndarray, v: np.ndarray, U: np.ndarray, rel_sigma: float = 1e-6,
             rel_component: float = 1e-8) -> np.ndarray:
    """Whether each sleeping quadratic unit (``v`` (n,), ``U`` (n, D)) can still blow up under the
    decoupled flow ``v' = u^T S u, u' = 2 v S u`` with growth matrix ``S_eff`` (:func:`blowup`'s
    particle, ``F(s) = v^2 + 1/2 sum_j xi_j^2 (exp(4 sigma_j s) - 1)``).

    The particle runs off in the direction of ``v``: it blows up there if some eigenvalue
    ``sigma_j`` of the sign of ``v`` has a component ``xi_j`` of ``u``. Otherwise ``F`` only falls
    on that side, to ``v^2 - 1/2 sum xi_j^2`` over the eigenvalues of the other sign; if that stays
    positive the unit never turns and drifts with ``u`` decaying: it is stuck. Eigenvalues below
    ``rel_sigma`` of the largest (the learned directions, where ``S_eff`` vanishes) and components
    below ``rel_component`` of ``|u|`` (decayed to nothing over a plateau) do not count."""
    sig, Q = np.linalg.eigh(S_eff)
    live = np.abs(sig) > rel_sigma * np.abs(sig).max()
    xi = np.asarray(U) @ Q
    present = np.abs(xi) > rel_component * np.linalg.norm(U, axis=1, keepdims=True)
    sv = np.sign(np.asarray(v, float))[:, None]
    same = (np.sign(sig)[None, :] == sv) & live & present
    other = (np.sign(sig)[None, :] == -sv) & live & present
    turns = 2 * np.asarray(v, float) ** 2 < (xi ** 2 * other).sum(1)
    return same.any(1) | turns


def blocked_runs(problem: Problem, sw: Sweep) -> np.ndarray:
    """Runs (B,) whose next drop cannot come: the run has fewer drops than expected and, where it
    ended (its horizon, relaxed on its last plateau), no sleeping unit (size below the threshold) :func:`can_grow` under
    the growth matrix there, ``S_eff = -dL/dM = 2 (A - M) - tr(M) I`` (zero on the learned
    directions). A learned unit does not leave its direction either: rotating it towards a
    remaining direction j changes its growth by ``2 v (sigma_j - 2 c)`` with ``c`` its learned
    strength, negative wherever ``sigma_j < 2 c``. Quadratic units only: a head's sign is not fixed
    (``(v, k) -> (-v, -k)`` gives the same output), so attention is never blocked this way."""
    B, K = sw.drops.shape
    out = np.zeros(B, bool)
    if problem.name != "quadratic" or sw.final is None:
        return out
    for b in range(B):
        n = int(np.isfinite(sw.drops[b]).sum())
        if n == 0 or n == K:
            continue
        th = sw.final[b]
        V, U = problem.model.unflatten(th[None])
        v, U = V[0, :, 0].numpy(), U[0].numpy()
        M = (U.T * v) @ U
        S_eff = 2 * (problem.A - M) - np.trace(M) * np.eye(len(M))
        sleeping = problem.sizes_np(th.numpy()) < sw.threshold
        out[b] = not can_grow(S_eff, v[sleeping], U[sleeping]).any()
    return out


def spectral_ratio(problem: Problem) -> float:
    """Smallest over largest ``|eigenvalue|`` of ``S`` (zeros left out): how much slower the slowest
    direction is learned than the fastest."""
    a = np.abs(np.linalg.eigvalsh(problem.S))
    a = a[a > 1e-12 * a.max()]
    return float(a.min() / a.max())


def relative_errors(measured, predicted) -> np.ndarray:
    return np.asarray(measured, float) / np.asarray(predicted, float) - 1.0


def plateau0_states(problem: Problem, sw: Sweep, rtol: float = 1e-8) -> torch.Tensor:
    """Parameters half-way through the first plateau (t = t_1 / 2) of every run of a first-escape sweep."""
    eps = torch.as_tensor(sw.eps)[:, None]
    y0 = torch.cat([sw.theta0 / eps, eps], -1)
    half = torch.as_tensor(0.5 * sw.drops[:, 0] * sw.eps)
    s = solve(ScaledFlow(problem.grad), y0, half, controller=PIController(rtol=rtol, atol=1e-12))
    return theta_of(s.y_final)


def smallest_hessian_eigenvalue(problem: Problem, theta: torch.Tensor) -> np.ndarray:
    return torch.linalg.eigvalsh(problem.hessian(theta))[:, 0].numpy()


@dataclass
class Plateau:
    """One plateau (after drop k) of one run: measured loss and count, and the derived best loss."""

    seed: int
    eps: float
    k: int
    loss: float
    count: int
    derived: float
    visited: tuple


def plateaus(problem: Problem, sw: Sweep, rel: float = 0.05) -> list[Plateau]:
    """Measured loss and active-unit count in the middle of every plateau of a staircase sweep,
    with the derived loss of the units actually active there (quadratic: the best loss on the
    teacher eigen-directions they use; attention: the stationary point of as many heads as the
    active heads realise directions, :meth:`Attention.plateau_loss`)."""
    out = []
    x = problem.count_inputs()
    best_rank = {}
    B, K, _ = sw.mid.shape
    for b in range(B):
        theta = sw.mid[b]
        ok = torch.isfinite(theta).all(-1)
        if not ok.any():
            continue
        L = problem.loss(theta[ok]).numpy()
        active_count = counts.active_units(problem.model, theta[ok], x, rel).numpy()
        sizes = counts.unit_sizes(problem.model, theta[ok], x)
        for j, k in enumerate(np.flatnonzero(ok.numpy())):
            active = sizes[j] > rel * sizes[j].max()
            if problem.name == "quadratic":
                visited = tuple(sorted(problem.learned_directions(theta[k], active)))
                derived = problem.best_loss(visited)
            else:
                m = problem.directions(theta[k], active, rel)
                visited = (m,)
                if m not in best_rank:
                    best_rank[m] = problem.plateau_loss(m)
                derived = best_rank[m]
            out.append(Plateau(int(sw.seeds[b]), float(sw.eps[b]), k + 1, float(L[j]), int(active_count[j]),
                               derived, visited))
    return out


def expected_minimum(samples: np.ndarray, H: int) -> float:
    """``E[min of H draws]`` from the sample, drawing ``H`` distinct members: the j-th smallest
    ``T_(j)`` is the minimum with probability ``C(n - j, H - 1) / C(n, H)``. (Drawing distinct
    members keeps the few extremely slow units of the sample -- a nearly stuck unit can take
    1e100 time units -- from weighing in: for H >= 2 the slowest one is never the minimum.)"""
    from scipy.special import gammaln
    T = np.asarray(samples, float)
    # nearly stuck units (F almost touching zero) have astronomically long, poorly resolved
    # times; above 1000 medians a time can only be the minimum if all H draws are that slow,
    # so capping it there changes E[min] by a negligible amount for H >= 2
    T = np.sort(np.minimum(T, 1e3 * np.median(T)))
    n = len(T)
    j = np.arange(1, n + 1)
    k = n - j
    ok = k >= H - 1
    logw = np.full(n, -np.inf)
    logw[ok] = (gammaln(k[ok] + 1) - gammaln(H) - gammaln(k[ok] - H + 2)
                - (gammaln(n + 1) - gammaln(H + 1) - gammaln(n - H + 1)))
    w = np.exp(logw)
    return float((T[w > 0] * w[w > 0]).sum())


def reference_times(problem: Problem, eps: float, n_units: int, seed: int, threshold: float) -> np.ndarray:
    """Decoupled first-threshold times of ``n_units`` independent units drawn like the
    initialisation (entries ``eps * N(0, 1)``): the distribution the width prediction uses."""
    g = np.random.default_rng(seed)
    v0 = eps * g.standard_normal(n_units)
    U0 = eps * g.standard_normal((n_units, problem.model.u_dim))
    return blowup(problem.S, v0, U0, unit_sizes_np(problem), threshold).reach


@dataclass
class WidthEffect:
    widths: list
    measured: np.ndarray            # (n_widths,) seed-averaged first escape time
    sem: np.ndarray                 # standard error of that mean
    predicted: np.ndarray           # E[min over H units] of the decoupled times
    per_seed: list = field(repr=False, default=None)


def width_effect(problem: Problem, widths, eps: float, n_seeds: int, n_reference: int = 4000,
                 rel_threshold: float = 0.05, seed: int = 0) -> WidthEffect:
    """First escape time against the number of units: seed average of the full network against
    the extreme-value prediction ``E[min_i t_i]`` from the decoupled times of single units."""
    thr = rel_threshold * problem.size_scale
    ref = reference_times(problem, eps, n_reference, 99_991 + seed, thr)
    meas, sem, pred, per = [], [], [], []
    for H in widths:
        p = problem.with_width(H)
        sw = run_sweep(p, [eps], seed + 1000 * np.arange(1, n_seeds + 1), rel_threshold, n_drops=1, plateaus=False)
        t1 = sw.drops[:, 0]
        t1 = t1[np.isfinite(t1)]
        per.append(t1)
        meas.append(t1.mean())
        sem.append(t1.std(ddof=1) / np.sqrt(len(t1)))
        pred.append(expected_minimum(ref, H))
    return WidthEffect(list(widths), np.array(meas), np.array(sem), np.array(pred), per)


def trajectories(problem: Problem, eps, seed: int, tau_end: float, n_save: int = 1200, rtol: float = 1e-9):
    """Loss and unit sizes of one seed at several eps on a shared grid of ``tau = eps t``
    (integrated like :func:`stiff_sweep`): ``ts``, loss (n_eps, n_save), sizes (n_eps, n_save, H)."""
    from scipy.integrate import solve_ivp
    ts = np.linspace(0.0, tau_end, n_save)
    theta0 = problem.model.init(torch.as_tensor(np.asarray(eps, float)), [seed] * len(eps))
    loss, sizes = [], []
    for b, e in enumerate(eps):
        sol = solve_ivp(lambda tau, w, e=e: -problem.grad_np(e * w) / (e * e), (0.0, tau_end),
                        theta0[b].numpy() / e, method="LSODA", rtol=rtol, atol=1e-12, t_eval=ts)
        theta = torch.as_tensor(e * sol.y.T)
        loss.append(problem.loss(theta).numpy())
        sizes.append(problem.sizes(theta).numpy())
    return ts, np.array(loss), np.array(sizes), None
