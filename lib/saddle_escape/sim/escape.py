"""Escape times from a saddle, and sweeps that report censored runs explicitly.

Two definitions (both located to round-off by the integrator's event machinery):

* ``"loss"`` -- the loss crosses halfway between its plateau value ``L(0)`` and the value the
  escape reaches, ``L_ref``;
* ``"norm"`` -- the bottleneck norm reaches a fixed fraction of its post-escape value.

The post-escape references come from a pilot run (:func:`post_escape_reference`) integrated
until the loss has dropped and stopped moving -- the next plateau or the minimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .integrate import Event, GradientFlow, PIController, solve
from .errors import ParameterError

DEFINITIONS = ("loss", "norm")


@dataclass(frozen=True)
class Reference:
    """Post-escape values: the loss the escape reaches, the bottleneck norm there, and when."""

    loss: float
    norm: float
    time: float


def post_escape_reference(term: GradientFlow, theta0: torch.Tensor, norm_fn: Callable, t_max: float,
                          drop: float = 0.5, settle: float = 0.2, rtol: float = 1e-9,
                          atol: float = 1e-12, min_norm: float = 0.0) -> Reference:
    """Integrate one pilot run (``theta0`` of shape (1, P)) until it has *escaped* -- the loss has
    fallen below ``drop * L(0)`` and the weight norm ``|theta|`` is at least ``min_norm`` -- and
    is *settled*: the loss changes by less than ``settle`` relative per e-fold of time,
    ``t |dL/dt| < settle * L``. The norm guard is for a slow escape that is not separated from the
    start, where the loss guard alone lets a mid-escape lull pass for a plateau."""
    L0 = term.loss(theta0)

    def settled(t, y, runs):
        L = term.loss(y)
        g = term(t, y)
        rate = t * (g * g).sum(-1)            # t |dL/dt| under gradient flow
        escaped = (L < drop * L0[runs]) & (y.norm(dim=-1) >= min_norm)
        return torch.where(escaped, rate - settle * L, torch.ones_like(L))

    sol = solve(term, theta0, t_max, controller=PIController(rtol=rtol, atol=atol),
                events=[Event(settled, direction=-1)])
    if sol.censored[0, 0]:
        raise RuntimeError(f"the pilot run did not escape and settle before t_max = {t_max:g}; "
                           "raise t_max or use a larger eps for the pilot")
    y = sol.event_states[0]
    return Reference(loss=term.loss(y).item(), norm=norm_fn(y).item(), time=sol.event_times[0, 0].item())


def per_run(norm_fn: Callable) -> Callable:
    """Mark ``norm_fn(y, runs)`` as a norm that depends on the batch rows ``runs`` it is given, for
    a batch that mixes problems of one parameter count (chapter 05's chains of one depth with
    different bottleneck sizes r). Plain norms take ``y`` alone."""
    norm_fn.per_run = True
    return norm_fn


def _rows_norm(norm_fn: Callable) -> Callable:
    return norm_fn if getattr(norm_fn, "per_run", False) else (lambda y, runs: norm_fn(y))


def escape_events(term: GradientFlow, theta0: torch.Tensor, ref: Reference, norm_fn: Callable,
                  definitions: Sequence[str] = DEFINITIONS, norm_fraction: float = 0.5) -> list[Event]:
    """Non-terminal events for the requested escape definitions; thresholds are per run.

    ``ref``'s loss and norm are numbers, or tensors of one value per run (a mixed batch, with a
    :func:`per_run` norm)."""
    for d in definitions:
        if d not in DEFINITIONS:
            raise ParameterError("definition", d, f"must be one of {', '.join(DEFINITIONS)}")
    half = 0.5 * (term.loss(theta0) + torch.as_tensor(ref.loss, dtype=theta0.dtype))
    target = (norm_fraction * torch.as_tensor(ref.norm, dtype=theta0.dtype)).expand(theta0.shape[0])
    norm = _rows_norm(norm_fn)
    fns = {"loss": lambda t, y, runs: term.loss(y) - half[runs],
           "norm": lambda t, y, runs: target[runs] - norm(y, runs)}
    return [Event(fns[d], -1, terminal=False, name=d) for d in definitions]


@dataclass
class EscapeResult:
    """Escape times (B, n_definitions), ``inf`` for runs that did not escape before t_max."""

    times: torch.Tensor
    definitions: tuple
    reference: Reference
    solution: object

    @property
    def censored(self) -> torch.Tensor:
        return torch.isinf(self.times)

    def rows(self, **columns) -> list[dict]:
        """Tidy rows, one per run, with the given per-run ``columns`` (sequences of length B);
        a censored time is ``None`` and the row says ``censored=True``."""
        out = []
        for b in range(self.times.shape[0]):
            row = {k: (v[b].item() if torch.is_tensor(v) else v[b]) for k, v in columns.items()}
            for j, d in enumerate(self.definitions):
                t = self.times[b, j].item()
                row[f"t_esc_{d}"] = t if math.isfinite(t) else None
            row["censored"] = bool(self.censored[b].any())
            out.append(row)
        return out


def escape_times(term: GradientFlow, theta0: torch.Tensor, t_max: float, ref: Reference, norm_fn: Callable,
                 definitions: Sequence[str] = DEFINITIONS, rtol: float = 1e-9, atol: float = 1e-14,
                 norm_fraction: float = 0.5, stop_after: bool = True, progress: bool = False,
                 origin: torch.Tensor | None = None) -> EscapeResult:
    """Escape times of all runs in ``theta0`` (B, P) in one batched integration.

    With ``stop_after`` a run stops once the loss is 90% of the way down to ``L_ref`` and the
    norm is past its threshold -- after every definition has fired. Runs that never escape are
    integrated to ``t_max`` and come back censored (``inf``). ``origin`` (default ``theta0``) is
    the initial state the loss thresholds refer to: a run resumed part-way (its clock restarted)
    keeps the thresholds of where it began.
    """
    origin = theta0 if origin is None else origin
    events = escape_events(term, origin, ref, norm_fn, definitions, norm_fraction)
    if stop_after:
        L0 = term.loss(origin)
        past = L0 + 0.9 * (torch.as_tensor(ref.loss, dtype=L0.dtype) - L0)
        target = (norm_fraction * torch.as_tensor(ref.norm, dtype=L0.dtype)).expand(L0.shape[0])
        norm = _rows_norm(norm_fn)
        events.append(Event(lambda t, y, runs: torch.maximum(term.loss(y) - past[runs], target[runs] - norm(y, runs)),
                            -1, terminal=True, name="stop"))
    sol = solve(term, theta0, t_max, controller=PIController(rtol=rtol, atol=atol), events=events,
                progress=progress, desc="escape sweep")
    return EscapeResult(sol.event_times[:, : len(definitions)], tuple(definitions), ref, sol)
