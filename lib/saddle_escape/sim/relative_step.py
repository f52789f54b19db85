"""Gradient descent with a step set by the state: every layer moves by at most a fraction ``c``.

``RelativeStepGD(sizes, c)`` is explicit Euler on a gradient term without error control, whose
step is ``h = min(h_max, c * min_l ||W_l|| / ||dW_l/dt||)`` over the layers (``sizes``: the
parameter count of each layer, in the order of the flat parameter vector). It is passed to
:func:`~saddle_escape.sim.integrate.solve` as both ``solver`` and ``controller``, so events and
saves work as with any other stepper (linear interpolation within a step).

Why: near a saddle of small initialisation every curvature is small -- the bottleneck's gradients
carry ``eps^(r-1)`` and its weights ``eps`` -- so the natural time step grows like
``eps^-(r-2)`` and a sweep that takes ``t_esc ~ eps^-(r-2)`` needs a number of steps independent
of eps (each step grows the bottleneck by a fixed fraction). An error-controlled integrator does
the same for a smooth flow but chatters where the field is discontinuous (ReLU's kink, where
pre-activations slide along 0); this scheme does not, and its error is first order in ``c``: on
the deep-linear plateau ``dy/dt = y^(r-1)`` it multiplies every step's ``y`` by ``1 + c`` and
overestimates the escape time by the factor ``(r - 2) c / (1 - (1 + c)^-(r-2)) ~ 1 + (r - 1) c / 2``
-- the same at every eps (the plateau is scale invariant), so a power-law exponent is unchanged.

Use it up to the escape, not past it: once the weights are O(1), a move of ``c ||W_l||`` is no
longer small against the curvature, and near a later saddle (ReLU's second plateau in chapter 06)
the loss oscillates by several percent from step to step instead of falling, for thousands of
steps. Chapter 06 therefore stops ReLU runs inside their first drop (at 0.9 L(0)); a pilot that
must go further caps the step with ``h_max``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import ParameterError
from .integrate import _Dense


class RelativeStepGD:
    """Solver and step controller in one (see the module docstring)."""

    order = 1
    adaptive = False

    def __init__(self, sizes: Sequence[int], c: float = 0.05, h_max: float = math.inf):
        if not (isinstance(c, (int, float)) and 0 < c < 1):
            raise ParameterError("step_fraction", c, "must be a number in (0, 1)")
        if not h_max > 0:
            raise ParameterError("h_max", h_max, "must be > 0")
        self.sizes, self.c, self.h_max = list(sizes), float(c), float(h_max)
        self._next = None

    def step_size(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``min(h_max, c * min_l ||y_l|| / ||f_l||)`` per run (B,)."""
        ratios = [yl.norm(dim=-1) / fl.norm(dim=-1).clamp_min(1e-300)
                  for yl, fl in zip(torch.split(y, self.sizes, -1), torch.split(f, self.sizes, -1))]
        return (self.c * torch.stack(ratios, -1).amin(-1)).clamp(max=self.h_max)

    # as a controller
    def initial(self, term, t, y, f0, order):
        return self.step_size(y, f0)

    def error_norm(self, err, y0, y1):
        return torch.zeros(y0.shape[0], dtype=y0.dtype, device=y0.device)

    def propose(self, h, errn, history, order):
        return self._next

    # as a solver
    def step(self, term, t, y, f0, h):
        y1 = y + h[:, None] * f0
        f1 = term(t + h, y1)
        self._next = self.step_size(y1, f1)   # solve() asks for it right after, for the same rows
        return y1, f1, None, _Dense([y1 - y, y])
