"""Embedded fixed points (Theorem 1) and invariant manifolds (Theorem 3) of the two-layer family.

A fixed point ``theta*`` of a width-(H-1) :class:`~.twolayer.TwoLayer` becomes a fixed point of
the width-H network, with the same input-output map, by four constructions (:func:`embed`):

* ``split`` (any phi): ``u_H = u_i*``, ``v_H = gamma v_i*``, ``v_i = (1 - gamma) v_i*``;
* ``zero`` (phi(x; 0) = 0): ``u_H = 0``, ``v_H = 0``;
* ``proportional`` (phi degree-1 homogeneous; ``gamma_u >= 0`` when only positively so):
  ``u_H = gamma_u u_i*``, ``v_H = gamma_v v_i*``, ``v_i = (1 - gamma_u gamma_v) v_i*``;
* ``combination`` (phi linear in u): ``u_H = sum_j gu_j u_j*``, ``v_H = sum_j gv_j v_j*``,
  ``v_j = v_j* - gu_j v_H``.

The invariant manifolds (``MANIFOLDS``) relate the last unit to the others:
``equal`` (theta_H = theta_1), ``zero`` (theta_H = 0), ``proportional`` (theta_H = gamma theta_1)
and ``combination`` (theta_H = sum_j gamma_j theta_j). Distances, projections and the normal
component of the gradient-flow vector field are all *relative* (divided by the size of the terms
they compare), so they read the same at any scale of the weights.

Every function takes a batch of flat parameter vectors (B, P), as the rest of the engine does.
"""
from __future__ import annotations

import dataclasses

import torch

from .data import DTYPE, Dataset
from .errors import ParameterError
from .twolayer import TwoLayer

CONSTRUCTIONS = ("split", "zero", "proportional", "combination")
MANIFOLDS = ("equal", "zero", "proportional", "combination")
#: the manifold of Theorem 3 on which each construction of Theorem 1 lands, for the same property
MANIFOLD_OF = {"split": "equal", "zero": "zero", "proportional": "proportional", "combination": "combination"}


def wider(model: TwoLayer, extra: int = 1) -> TwoLayer:
    """The same network with `extra` more units."""
    return dataclasses.replace(model, width=model.width + extra)


def unit_params(model: TwoLayer, theta: torch.Tensor) -> torch.Tensor:
    """Each unit's ``theta_i = (v_i, u_i)`` as a row: (B, H, v_dim + u_dim)."""
    V, U = model.unflatten(theta)
    return torch.cat([V.reshape(*V.shape[:2], model.v_dim), U], dim=-1)


def from_unit_params(model: TwoLayer, rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unit_params`."""
    V, U = rows.split([model.v_dim, model.u_dim], dim=-1)
    return model.flatten(V.reshape(*V.shape[:2], *model.v_shape), U)


# ------------------------------------------------------------------ Theorem 1

def embed(model: TwoLayer, theta: torch.Tensor, kind: str, unit: int = 0, gamma: float = 0.3,
          gamma_u: float = 0.6, gamma_v: float = 0.5, gammas: torch.Tensor | None = None
          ) -> tuple[TwoLayer, torch.Tensor]:
    """Embed width-(H-1) parameters `theta` (B, P) into width H by construction `kind`.

    `unit` is the unit ``i*`` that ``split`` and ``proportional`` copy; ``gammas`` (2, H-1) are
    the ``(gu, gv)`` coefficients of ``combination`` (default: fixed numbers in [-0.8, 0.8]).
    The construction is applied whatever phi is: that a phi does not allow it shows in the map.
    """
    if kind not in CONSTRUCTIONS:
        raise ParameterError("kind", kind, f"must be one of {', '.join(CONSTRUCTIONS)}")
    if not 0 <= unit < model.width:
        raise ParameterError("unit", unit, f"must be in [0, {model.width - 1}]")
    V, U = model.unflatten(theta)
    V, U = V.clone(), U.clone()
    if kind == "split":
        v_new, u_new = gamma * V[:, unit], U[:, unit]
        V[:, unit] = (1 - gamma) * V[:, unit]
    elif kind == "zero":
        v_new, u_new = torch.zeros_like(V[:, 0]), torch.zeros_like(U[:, 0])
    elif kind == "proportional":
        v_new, u_new = gamma_v * V[:, unit], gamma_u * U[:, unit]
        V[:, unit] = (1 - gamma_u * gamma_v) * V[:, unit]
    else:
        gu, gv = default_gammas(model.width) if gammas is None else torch.as_tensor(gammas, dtype=theta.dtype)
        u_new = torch.einsum("j,bjk->bk", gu, U)
        v_new = torch.einsum("j,bj...->b...", gv, V)
        V = V - gu.reshape(1, -1, *[1] * len(model.v_shape)) * v_new.unsqueeze(1)
    wide = wider(model)
    return wide, wide.flatten(torch.cat([V, v_new.unsqueeze(1)], 1), torch.cat([U, u_new.unsqueeze(1)], 1))


def default_gammas(n: int) -> torch.Tensor:
    """Fixed, unremarkable combination coefficients ``(gu, gv)``: (2, n)."""
    j = torch.arange(n, dtype=DTYPE)
    return torch.stack([0.8 * torch.cos(1.3 * j + 0.4), 0.7 * torch.sin(0.9 * j + 1.1)])


def map_difference(narrow: TwoLayer, theta_narrow: torch.Tensor, wide: TwoLayer, theta_wide: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
    """``||f_wide - f_narrow|| / ||f_narrow||`` over the inputs `x`: (B,)."""
    f0 = narrow.forward(theta_narrow, x)
    d = wide.forward(theta_wide, x) - f0
    return d.flatten(1).norm(dim=1) / f0.flatten(1).norm(dim=1)


def gradient_parts(model: TwoLayer, theta: torch.Tensor, data: Dataset) -> tuple[torch.Tensor, ...]:
    """``grad L`` and the two terms it is the difference of: ``grad (1/2) E||f||^2`` and
    ``grad E[y.f]`` (each (B, P)). A stationary point is where they cancel."""
    with torch.enable_grad():
        th = theta.detach().clone().requires_grad_(True)
        f = model.forward(th, data.x)
        quad = 0.5 * ((f * f).sum(-1) * data.w).sum(-1)
        cross = ((f * data.y).sum(-1) * data.w).sum(-1)
        g_quad, g_cross = (torch.autograd.grad(t.sum(), th, retain_graph=True)[0] for t in (quad, cross))
    return g_quad - g_cross, g_quad, g_cross


def relative_gradient(model: TwoLayer, theta: torch.Tensor, data: Dataset) -> torch.Tensor:
    """``||grad L|| / (||grad (1/2)E||f||^2|| + ||grad E[y.f]||)``: (B,), 0 at a fixed point, O(1)
    where the two terms do not cancel; independent of the scale of ``y``."""
    g, a, b = gradient_parts(model, theta, data)
    return g.norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1))


# ------------------------------------------------------------------ fixed points

def newton_polish(model: TwoLayer, theta: torch.Tensor, data: Dataset, steps: int = 30,
                  rcond: float = 1e-10, target: float = 1e-14) -> torch.Tensor:
    """Newton steps on ``grad L = 0`` with the pseudo-inverse of the Hessian.

    The Hessian of the family is singular along symmetry orbits (rescaling ``v`` against ``u``,
    mixing units of a linear net); the gradient has no component there, so dropping eigenvalues
    below ``rcond`` times the largest keeps quadratic convergence. Stops early per run once its
    relative gradient is below `target`.
    """
    theta = theta.clone()
    for _ in range(steps):
        rel = relative_gradient(model, theta, data)
        todo = rel > target
        if not bool(todo.any()):
            break
        g = gradient_parts(model, theta[todo], data)[0]
        lam, Q = torch.linalg.eigh(model.hessian(theta[todo], data))
        keep = lam.abs() > rcond * lam.abs().amax(-1, keepdim=True)
        coef = torch.where(keep, (Q.transpose(-1, -2) @ g.unsqueeze(-1)).squeeze(-1) / torch.where(keep, lam, 1.0), 0.0)
        theta[todo] = theta[todo] - (Q @ coef.unsqueeze(-1)).squeeze(-1)
    return theta


def converge(model: TwoLayer, data: Dataset, seeds, eps: float = 0.5, iterations: int = 500,
             newton_steps: int = 30) -> torch.Tensor:
    """A fixed point of gradient flow reached from ``N(0, eps^2)`` init: L-BFGS on the loss
    (it lands where the flow lands, a minimum, at a fraction of the flow's cost), then
    :func:`newton_polish` down to round-off. The runs are independent, so L-BFGS minimises their
    summed loss."""
    theta = model.init(eps, seeds).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, tolerance_grad=1e-10,
                            tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        L = model.loss(theta, data).sum()
        L.backward()
        return L

    with torch.enable_grad():
        opt.step(closure)
    return newton_polish(model, theta.detach(), data, steps=newton_steps)


def fixed_points(model: TwoLayer, data: Dataset, n: int, seed: int, eps: float = 0.5, tol: float = 1e-13,
                 max_tries: int = 20) -> tuple[torch.Tensor, int]:
    """`n` fixed points (n, P) from the seeds ``1000 seed + k``, k = 0, 1, ..., keeping those whose
    relative gradient ends below `tol`; returns them and how many seeds were tried.

    A run can end where the loss is not differentiable (a ReLU kink sitting exactly on a
    training input: a minimum of a piecewise-smooth loss where no gradient vanishes); such runs
    are no fixed points of the flow and are skipped, and the count of tries says how often.
    """
    found, tried = [], 0
    while len(found) < n:
        if tried >= max_tries:
            raise RuntimeError(f"only {len(found)} of {n} runs reached a smooth fixed point in {tried} tries")
        theta = converge(model, data, [1000 * seed + tried], eps=eps)
        tried += 1
        if float(relative_gradient(model, theta, data)[0]) <= tol:
            found.append(theta)
    return torch.cat(found), tried


# ------------------------------------------------------------------ Theorem 3

def on_manifold(model: TwoLayer, theta: torch.Tensor, kind: str, gamma: float = 0.7,
                gammas: torch.Tensor | None = None) -> torch.Tensor:
    """`theta` with its last unit replaced so that the relation `kind` holds with unit 0 (or all
    other units, for ``combination``)."""
    rows = unit_params(model, theta).clone()
    H = model.width
    if kind not in MANIFOLDS:
        raise ParameterError("kind", kind, f"must be one of {', '.join(MANIFOLDS)}")
    if H < 2:
        raise ParameterError("width", H, "must be at least 2 for a relation between units")
    if kind == "equal":
        rows[:, -1] = rows[:, 0]
    elif kind == "zero":
        rows[:, -1] = 0.0
    elif kind == "proportional":
        rows[:, -1] = gamma * rows[:, 0]
    else:
        g = default_gammas(H - 1)[0] if gammas is None else torch.as_tensor(gammas, dtype=theta.dtype)
        rows[:, -1] = torch.einsum("j,bjp->bp", g, rows[:, :-1])
    return from_unit_params(model, rows)


def relation_coefficients(model: TwoLayer, theta: torch.Tensor, kind: str) -> torch.Tensor:
    """The coefficients ``c`` (B, H-1) of the nearest relation ``theta_H = sum_j c_j theta_j``
    of this `kind` (``equal``: c = e_1; ``zero``: c = 0; ``proportional``: least squares on unit 0;
    ``combination``: least squares on all)."""
    rows = unit_params(model, theta)
    B, H = rows.shape[:2]
    c = torch.zeros(B, H - 1, dtype=theta.dtype)
    if kind == "equal":
        c[:, 0] = 1.0
    elif kind == "proportional":
        a, b = rows[:, 0], rows[:, -1]
        c[:, 0] = (a * b).sum(-1) / (a * a).sum(-1)
    elif kind == "combination":
        A = rows[:, :-1].transpose(-1, -2)                       # (B, p, H-1)
        c = torch.linalg.lstsq(A, rows[:, -1].unsqueeze(-1)).solution.squeeze(-1)
    elif kind != "zero":
        raise ParameterError("kind", kind, f"must be one of {', '.join(MANIFOLDS)}")
    return c


def distance(model: TwoLayer, theta: torch.Tensor, kind: str) -> torch.Tensor:
    """Relative distance of the last unit from the relation `kind`: ``||theta_H - sum_j c_j theta_j||``
    over ``||theta_H|| + sum_j |c_j| ||theta_j||`` (``zero``: over the largest unit): (B,)."""
    rows = unit_params(model, theta)
    c = relation_coefficients(model, theta, kind)
    gap = (rows[:, -1] - torch.einsum("bj,bjp->bp", c, rows[:, :-1])).norm(dim=-1)
    if kind == "zero":
        return gap / rows.norm(dim=-1).amax(-1)
    return gap / (rows[:, -1].norm(dim=-1) + (c.abs() * rows[:, :-1].norm(dim=-1)).sum(-1))


def project(model: TwoLayer, theta: torch.Tensor, kind: str) -> torch.Tensor:
    """`theta` with its last unit moved onto the relation `kind` (the nearest point that changes
    the last unit only)."""
    rows = unit_params(model, theta).clone()
    c = relation_coefficients(model, theta, kind)
    rows[:, -1] = torch.einsum("bj,bjp->bp", c, rows[:, :-1])
    return from_unit_params(model, rows)


def normal_component(model: TwoLayer, theta: torch.Tensor, data: Dataset, kind: str,
                     coefficients: torch.Tensor | None = None) -> torch.Tensor:
    """How far the gradient-flow vector field ``F`` leaves the relation at `theta` (on it):
    ``||F_H - sum_j c_j F_j||`` relative to ``||F_H|| + sum_j |c_j| ||F_j||`` (``zero``: relative
    to the largest unit's ``||F_j||``): (B,). Zero when the manifold is invariant."""
    c = relation_coefficients(model, theta, kind) if coefficients is None else coefficients
    F = unit_params(model, -gradient_parts(model, theta, data)[0])
    gap = (F[:, -1] - torch.einsum("bj,bjp->bp", c, F[:, :-1])).norm(dim=-1)
    if kind == "zero":
        return gap / F.norm(dim=-1).amax(-1)
    return gap / (F[:, -1].norm(dim=-1) + (c.abs() * F[:, :-1].norm(dim=-1)).sum(-1))


# ------------------------------------------------------------------ saddle curvature, derived

def _g_derivatives(model: TwoLayer, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g'(z)`` and ``g''(z)`` of the unit's scalar nonlinearity, elementwise."""
    with torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(model.unit.g(z).sum(), z, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), z, allow_unused=True)[0] if d1.requires_grad else None
    return d1.detach(), (torch.zeros_like(z) if d2 is None else d2.detach())


def residual_curvature(model: TwoLayer, theta: torch.Tensor, data: Dataset, unit: int) -> torch.Tensor:
    """``K = -E[ sum_m r_m d^2 f_{i,m} / d theta_i^2 ]`` for unit ``i`` with residual ``r = y - f``,
    written out from phi's derivatives (not from autograd of the loss): (B, p, p) in the order
    ``(v_i, u_i)`` of :func:`unit_params`.

    It is the part of the Hessian block of one unit that the residual makes. Where a unit is
    zero (``v_i = 0, u_i = 0``) it is that block entirely, so its eigenvalues are the curvature of
    a zero-unit embedding; for two equal units it is ``H_11 - H_12``, the curvature of their
    difference, i.e. minus the linear growth rates off the equal-unit manifold.
    """
    V, U = model.unflatten(theta)
    B = theta.shape[0]
    x, w = data.x, data.w
    r = data.y - model.forward(theta, x)                                   # (B, n, m)
    v, u = V[:, unit], U[:, unit]
    m = model.output_dim
    form = model.unit.form
    if form == "dense":
        z = x @ u.unsqueeze(-1)                                            # (B, n, 1)
        g1, g2 = _g_derivatives(model, z)
        M = torch.einsum("bnm,bn,nk,n->bmk", r, g1[..., 0], x, w)         # E[r_m g'(z) x_k]
        S = torch.einsum("bn,bn,nk,nl,n->bkl", (r * v.unsqueeze(1)).sum(-1), g2[..., 0], x, x, w)
    elif form == "conv":
        p = model.kernel or model.input_dim
        P = x.unfold(-1, p, model.stride)                                  # (n, J, k)
        z = torch.einsum("njk,bk->bnj", P, u)
        g1, g2 = _g_derivatives(model, z)
        M = torch.einsum("bnm,bnj,njk,n->bjmk", r, g1, P, w).reshape(B, model.v_dim, p)
        rv = torch.einsum("bnm,bjm->bnj", r, v)                             # sum_m r_m V_jm
        S = torch.einsum("bnj,bnj,njk,njl,n->bkl", rv, g2, P, P, w)
    else:
        D = model.input_dim
        beta, xq = x[:, :D], x[:, D:]
        k, q = u[:, :D], u[:, D:]
        bk, qx = beta @ k.T, xq @ q.T                                       # (n, B) each
        bk, qx = bk.T, qx.T
        J = torch.cat([beta * qx.unsqueeze(-1), xq * bk.unsqueeze(-1)], -1)  # (B, n, 2D) d phi / d u
        M = torch.einsum("bnm,bnk,n->bmk", r, J, w)
        rv = (r * v.unsqueeze(1)).sum(-1)                                   # (B, n)
        cross = torch.einsum("bn,nk,nl,n->bkl", rv, beta, xq, w)           # d^2 phi / dk dq
        S = torch.zeros(B, 2 * D, 2 * D, dtype=theta.dtype)
        S[:, :D, D:] = cross
        S[:, D:, :D] = cross.transpose(-1, -2)
    nv = model.v_dim
    K = torch.zeros(B, nv + model.u_dim, nv + model.u_dim, dtype=theta.dtype)
    K[:, :nv, nv:] = -M.reshape(B, nv, model.u_dim)
    K[:, nv:, :nv] = K[:, :nv, nv:].transpose(-1, -2)
    K[:, nv:, nv:] = -S
    return K


def unit_block(model: TwoLayer, hessian: torch.Tensor, unit: int) -> torch.Tensor:
    """The Hessian block of one unit's parameters, in the order of :func:`unit_params`: (B, p, p)."""
    H, nv, nu = model.width, model.v_dim, model.u_dim
    idx = torch.cat([torch.arange(unit * nv, (unit + 1) * nv), H * nv + torch.arange(unit * nu, (unit + 1) * nu)])
    return hessian[:, idx][:, :, idx]


def leading_part(model: TwoLayer, u: torch.Tensor, x: torch.Tensor, order: int, scale: float = 1e-5) -> torch.Tensor:
    """``lim_{t->0} phi(x; t u) / t^order``, the lowest-order term of phi in u: (B, n, positions)."""
    from .units import phi
    return phi(model, scale * u, x) / scale ** order
