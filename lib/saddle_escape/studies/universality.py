"""Activation classes and universality of the escape time on the symmetric-manifold chain.

Chapter 03 uses these helpers:

* :func:`class_row` -- one row of the class table, computed from the registry;
* :func:`phi_slope` -- the log-log slope of ``|phi_sigma(z)|`` near 0 (it is ``q``);
* :func:`chain_escape_times` -- escape time vs eps for one activation on :class:`~saddle_escape.sim.reduced.ScalarChain`
  with all ``L`` layers at scale eps (one pilot for the post-escape reference, one batched sweep);
* :func:`prefactor` -- the rescaling constants ``K^(sigma)``: ``"chain"`` is ``beta1^(L-1)`` (derived
  from ``y_hat ~ beta1^(L-1) prod X_l g`` near the saddle), ``"writeup"`` is the write-up's
  ``beta1 |h_sigma| alpha^(L-1) / sqrt(N)`` with ``alpha = beta1``;
* :func:`relative_spread` -- ``(max - min) / mean`` across curves at each eps;
* :func:`offset_trap` -- what a Class D chain does instead of escaping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sim import activations, escape, fits, integrate
from ..sim.data import DTYPE, ScalarTeacher
from ..sim.reduced import ScalarChain, bottleneck_scales


def class_row(name: str) -> dict:
    """The class-table row of one activation: symbolic sigma and phi series, q, beta1, h, class."""
    import sympy as sp
    a = activations.get(name)
    return {"activation": a.name, "label": a.label, "sigma": f"${sp.latex(a.expr)}$",
            "phi_series": f"${a.phi_series_latex()}$", "q": "–" if a.q is None else a.q,
            "beta1": a.beta1, "h_sigma": a.h_sigma, "sigma0": a.sigma0, "class": a.cls}


def phi_values(name: str, z: np.ndarray) -> np.ndarray:
    """``|phi_sigma(z)|`` on a grid, in float64 torch (from ``fn`` and ``dfn``)."""
    a = activations.get(name)
    x = torch.as_tensor(np.asarray(z, float), dtype=DTYPE)
    return a.phi(x).abs().numpy()


def phi_slope(name: str, z_min: float = 1e-3, z_max: float = 1e-2, n: int = 9) -> float:
    """Fitted slope of ``log |phi_sigma(z)|`` vs ``log z`` on ``[z_min, z_max]`` (= q; nan for class A).

    Cancellation in ``z sigma' - sigma`` costs digits at small z, so the window stays well above
    ``(machine eps)^(1/q)``.
    """
    z = np.logspace(math.log10(z_min), math.log10(z_max), n)
    p = phi_values(name, z)
    if np.all(p == 0):
        return float("nan")
    return fits.linear_fit(np.log(z), np.log(p))[0]


def last_layer_norm(X: torch.Tensor) -> torch.Tensor:
    """The bottleneck norm used by the ``"norm"`` escape definition: the output layer's scale."""
    return X[:, -1].abs()


@dataclass
class Sweep:
    """Escape times (``inf`` = censored) of one activation over ``eps``, with its reference."""

    name: str
    eps: np.ndarray
    times: np.ndarray
    reference: escape.Reference
    n_steps: int
    seconds: float


def chain_escape_times(name: str, depth: int, eps, teacher: ScalarTeacher, *, pilot_eps: float = 0.3,
                       t_max: float = 1e15, rtol: float = 1e-11, n_nodes: int = 80,
                       reference: escape.Reference | None = None) -> Sweep:
    """Escape time (``"loss"`` definition) of the chain with all ``depth`` layers at each eps.

    The reference loss comes from one pilot at ``pilot_eps`` for this activation, so each curve
    crosses halfway between its own plateau and its own post-escape loss -- the same definition
    for every activation. Pass ``reference`` to reuse an earlier pilot.
    """
    chain = ScalarChain(name, depth, teacher, n_nodes=n_nodes)
    term = chain.term()
    pilot = bottleneck_scales(depth, depth, pilot_eps)
    ref = reference or escape.post_escape_reference(term, pilot, last_layer_norm, t_max=1e6, rtol=1e-7,
                                                    atol=1e-10)
    X0 = bottleneck_scales(depth, depth, eps)
    res = escape.escape_times(term, X0, t_max, ref, last_layer_norm, definitions=("loss",), rtol=rtol)
    sol = res.solution
    return Sweep(name, np.asarray(eps, float), res.times[:, 0].numpy(), ref,
                 int(sol.n_steps.max()), float(sol.seconds))


def integration_error(sweep: Sweep, depth: int, teacher: ScalarTeacher, rtol: float,
                      n_nodes: int = 80) -> float:
    """Relative change of the escape time at the sweep's last (smallest) eps when it is re-run with
    ``rtol / 10`` and the same reference: the integration error of ``t_esc`` that a deviation from
    the master curve must dwarf to be a measurement."""
    check = chain_escape_times(sweep.name, depth, sweep.eps[-1:], teacher, rtol=rtol / 10,
                               n_nodes=n_nodes, reference=sweep.reference).times[0]
    return float(abs(check / sweep.times[-1] - 1))


def deviation(sweep: Sweep, master: Sweep, depth: int) -> np.ndarray:
    """``|K t_sigma / t_master - 1|`` at each eps, ``K = beta1^(L-1)``: how far a rescaled curve is
    from the master (linear) curve."""
    return np.abs(prefactor(sweep.name, depth) * sweep.times / master.times - 1)


def prefactor(name: str, depth: int, kind: str = "chain", width: int = 1) -> float:
    """``K^(sigma)`` for the all-layers-at-eps chain.

    ``"chain"``: ``beta1^(L-1)``. Near the saddle every pre-activation is small, so
    ``y_hat = beta1^(L-1) (prod_l X_l) g + ...`` and the escape ODE ``dy/dt = a y^(L-1)`` has
    ``a`` proportional to ``beta1^(L-1)``; the escape time is ``1/a`` times a sigma-free integral.
    ``"writeup"``: ``beta1 |h_sigma| alpha^(L-1) / sqrt(N)``, alpha the linear coefficient (= beta1).
    """
    a = activations.get(name)
    if kind == "chain":
        return a.beta1 ** (depth - 1)
    if kind == "writeup":
        return a.beta1 * abs(a.h_sigma) * a.beta1 ** (depth - 1) / math.sqrt(width)
    raise ValueError(f"unknown prefactor kind {kind!r}")


def relative_spread(curves: np.ndarray) -> np.ndarray:
    """``(max - min) / mean`` over the first axis (curves) at each point of the second."""
    curves = np.asarray(curves, float)
    return (curves.max(0) - curves.min(0)) / curves.mean(0)


@dataclass
class Trap:
    """A Class D run: whether it escaped by ``t_max``, and how fast the output layer died."""

    name: str
    eps: np.ndarray
    t_max: np.ndarray
    escaped: np.ndarray          # loss reached the threshold before t_max
    final_loss: np.ndarray
    final_last_layer: np.ndarray  # X_L(t_max) / eps
    decay_rate: np.ndarray       # -d log X_L / dt averaged over the first ``decay_window``
    offset_power: np.ndarray     # E[sigma(z_(L-1))^2] at t = 0: the predicted decay rate
    ts: np.ndarray
    loss_path: np.ndarray        # (runs, len(ts))
    last_layer_path: np.ndarray  # (runs, len(ts))


def offset_trap(name: str, depth: int, eps, teacher: ScalarTeacher, t_max, threshold: float,
                decay_window: float = 2.0, n_save: int = 60, rtol: float = 1e-8) -> Trap:
    """Integrate a chain (meant for Class D) to ``t_max`` (per run) and record the trap.

    With ``sigma(0) != 0`` the constant ``sigma(0)`` reaches the output through ``X_L``; the target
    has mean zero, so ``dX_L/dt = -X_L E[sigma(z_(L-1))^2] + O(eps^(L-1))`` and the output layer
    decays at rate ``sigma(0)^2`` before any signal is learned.
    """
    chain = ScalarChain(name, depth, teacher)
    term = chain.term()
    X0 = bottleneck_scales(depth, depth, eps)
    eps = np.asarray(eps, float).reshape(-1)
    t_max = np.broadcast_to(np.asarray(t_max, float), eps.shape).copy()
    ts = torch.as_tensor(np.concatenate([[decay_window], np.logspace(-1, math.log10(t_max.max()), n_save)]),
                         dtype=DTYPE)
    ts, _ = torch.sort(ts)
    thr = torch.full((len(eps),), float(threshold), dtype=DTYPE)
    ev = integrate.Event(lambda t, y, runs: term.loss(y) - thr[runs], -1, terminal=True, name="escape")
    sol = integrate.solve(term, X0, torch.as_tensor(t_max, dtype=DTYPE),
                          controller=integrate.PIController(rtol=rtol, atol=1e-14), events=[ev],
                          saveat=integrate.SaveAt(ts, fn=lambda y: torch.stack([term.loss(y), y[:, -1]], 1)))
    ys = sol.ys.numpy()
    k = int(torch.nonzero(ts == decay_window)[0, 0])
    rate = -np.log(ys[:, k, 1] / eps) / decay_window
    unit = X0.clone()
    unit[:, -1] = 1.0
    power = (chain.output(unit) ** 2 @ chain.w).numpy() / chain.width
    return Trap(name, eps, t_max, np.isfinite(sol.event_times[:, 0].numpy()), term.loss(sol.y_final).numpy(),
                sol.y_final[:, -1].numpy() / eps, rate, power, ts.numpy(), ys[:, :, 0], ys[:, :, 1])
