"""Fits of escape-time laws: power law on log-log axes, log law for r = 2, with intervals.

Every fit reports the window it used, so a reader can see which points entered. With repeated
seeds the confidence interval is a bootstrap over seeds; with one deterministic curve it is the
ordinary least-squares interval (Student t, 95%).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import numpy as np
from scipy import stats

from .errors import ParameterError


@dataclass(frozen=True)
class Fit:
    """``y = intercept + slope * x`` on the transformed axes, fitted on ``window`` of the raw x."""

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    r2: float
    window: tuple
    n_points: int

    def as_dict(self) -> dict:
        return asdict(self)


def _select(x, y, window):
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if window is not None:
        lo, hi = window
        keep &= (x >= lo) & (x <= hi)
    if keep.sum() < 3:
        raise ParameterError("fit window", window, f"must contain at least 3 finite points (has {int(keep.sum())})")
    return keep


def linear_fit(u, v, groups=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Least squares ``v = a + b u`` with a CI for ``b``: bootstrap over ``groups`` when given."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    res = stats.linregress(u, v)
    if groups is None:
        tq = stats.t.ppf(0.5 + level / 2, max(len(u) - 2, 1))
        lo, hi = res.slope - tq * res.stderr, res.slope + tq * res.stderr
    else:
        slopes = bootstrap_slopes(u, v, groups, n_boot, np.random.default_rng(seed))
        lo, hi = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return float(res.slope), float(res.intercept), float(lo), float(hi), float(res.rvalue**2)


def bootstrap_slopes(u, v, groups, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Least-squares slopes of ``v`` on ``u`` over ``n_boot`` resamples of whole groups (with
    replacement; resamples whose ``u`` are all equal are skipped). A resample's slope comes from the
    per-group sums weighted by how often it drew each group, so its cost does not grow with the
    number of points (calling ``linregress`` per resample took 1.2 s per fit)."""
    u, v, groups = np.asarray(u, float), np.asarray(v, float), np.asarray(groups)
    labels, member = np.unique(groups, return_inverse=True)
    k = len(labels)
    counts = np.stack([np.bincount(np.searchsorted(labels, rng.choice(labels, size=k, replace=True)), minlength=k)
                       for _ in range(n_boot)]).astype(float)
    du, dv = u - u.mean(), v - v.mean()           # the slope is shift-invariant; centred sums stay small
    sums = np.stack([np.bincount(member, w, minlength=k) for w in (np.ones_like(du), du, dv, du * du, du * dv)])
    n, su, sv, suu, suv = (counts @ sums.T).T
    drawn = counts > 0
    u_min = np.array([u[member == g].min() for g in range(k)])
    u_max = np.array([u[member == g].max() for g in range(k)])
    varied = np.where(drawn, u_max, -np.inf).max(1) > np.where(drawn, u_min, np.inf).min(1)
    return ((n * suv - su * sv) / (n * suu - su * su))[varied]


def power_law(x, y, window=None, groups=None, **kw) -> Fit:
    """Fit ``y = C x^slope`` by least squares of log y on log x inside ``window`` (on x)."""
    keep = _select(x, y, window)
    x, y = np.asarray(x, float)[keep], np.asarray(y, float)[keep]
    g = None if groups is None else np.asarray(groups)[keep]
    b, a, lo, hi, r2 = linear_fit(np.log(x), np.log(y), g, **kw)
    return Fit(b, a, lo, hi, r2, (float(x.min()), float(x.max())), int(keep.sum()))


def log_law(eps, t, window=None, groups=None, **kw) -> Fit:
    """Fit ``t = a + b log(1/eps)`` (the r = 2 law); ``r2`` measures how straight it is."""
    keep = _select(eps, t, window)
    e, t = np.asarray(eps, float)[keep], np.asarray(t, float)[keep]
    g = None if groups is None else np.asarray(groups)[keep]
    b, a, lo, hi, r2 = linear_fit(np.log(1 / e), t, g, **kw)
    return Fit(b, a, lo, hi, r2, (float(e.min()), float(e.max())), int(keep.sum()))


def local_slopes(x, y) -> np.ndarray:
    """``d log y / d log x`` between consecutive points (to show where a law becomes asymptotic)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return np.diff(ly) / np.diff(lx)
