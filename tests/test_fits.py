"""Fits recover known laws from synthetic data, with intervals that cover the truth."""
import numpy as np
import pytest

from saddle_escape.sim import fits
from saddle_escape.book.params import ParameterError


def test_power_law_exact_data():
    x = np.logspace(-4, -1, 7)
    fit = fits.power_law(x, 3.0 * x**-2.0)
    assert fit.slope == pytest.approx(-2.0, abs=1e-12)
    assert np.exp(fit.intercept) == pytest.approx(3.0, rel=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.window == (pytest.approx(1e-4), pytest.approx(1e-1)) and fit.n_points == 7


@pytest.mark.parametrize("slope", [-1.0, -2.0, -0.5])
def test_power_law_noisy_ci_covers_truth(slope):
    rng = np.random.default_rng(1)
    x = np.logspace(-5, -1, 15)
    y = 2.0 * x**slope * np.exp(0.05 * rng.standard_normal(x.size))
    fit = fits.power_law(x, y)
    assert fit.ci_low < slope < fit.ci_high
    assert fit.ci_high - fit.ci_low < 0.1
    assert fit.slope == pytest.approx(slope, abs=0.05)


def test_power_law_window_and_censored_points_are_excluded():
    x = np.logspace(-5, 0, 11)
    y = x**-1.0
    y[-3:] = 5.0                          # the pre-asymptotic end bends away
    y[0] = np.inf                         # a censored run
    fit = fits.power_law(x, y, window=(1e-5, 1e-2))
    assert fit.slope == pytest.approx(-1.0, abs=1e-12)
    assert fit.n_points == 6              # 7 in the window, minus the censored one
    assert fit.window[0] == pytest.approx(10**-4.5)


def _seed_data(rng, n_seeds=10, slope=-1.5):
    eps = np.logspace(-4, -1, 6)
    xs, ys, gs = [], [], []
    for s in range(n_seeds):
        amp = np.exp(0.3 * rng.standard_normal())          # each seed: its own prefactor
        xs += list(eps)
        ys += list(amp * eps**slope * np.exp(0.05 * rng.standard_normal(eps.size)))
        gs += [s] * eps.size
    return xs, ys, gs


def test_bootstrap_over_seed_groups():
    xs, ys, gs = _seed_data(np.random.default_rng(0))
    fit = fits.power_law(xs, ys, groups=gs, n_boot=500)
    assert fit.slope == pytest.approx(-1.5, abs=0.03)
    assert fit.ci_low < fit.slope < fit.ci_high
    assert fit.n_points == 60
    # deterministic for a fixed bootstrap seed
    again = fits.power_law(xs, ys, groups=gs, n_boot=500)
    assert (again.ci_low, again.ci_high) == (fit.ci_low, fit.ci_high)


def test_bootstrap_interval_coverage():
    """Over many synthetic data sets the 95% interval covers the true slope most of the time
    (a bootstrap over 10 groups is somewhat anti-conservative, hence the loose bound)."""
    rng = np.random.default_rng(3)
    hits = 0
    trials = 20
    for _ in range(trials):
        xs, ys, gs = _seed_data(rng)
        fit = fits.power_law(xs, ys, groups=gs, n_boot=100, seed=int(rng.integers(1 << 30)))
        hits += fit.ci_low < -1.5 < fit.ci_high
    assert hits >= 0.8 * trials, hits


def test_log_law():
    rng = np.random.default_rng(2)
    eps = np.logspace(-6, -1, 11)
    t = 4.0 + 2.5 * np.log(1 / eps) + 0.01 * rng.standard_normal(eps.size)
    fit = fits.log_law(eps, t)
    assert fit.ci_low < 2.5 < fit.ci_high
    assert fit.slope == pytest.approx(2.5, abs=0.01)
    assert fit.intercept == pytest.approx(4.0, abs=0.1)
    assert fit.r2 > 0.9999
    # a power law is not straight against log(1/eps): R^2 visibly below 1
    assert fits.log_law(eps, eps**-1.0).r2 < 0.9


def test_local_slopes():
    x = np.logspace(-4, -1, 4)
    assert np.allclose(fits.local_slopes(x, x**-2 + 0 * x), -2.0)


def test_too_few_points():
    with pytest.raises(ParameterError) as err:
        fits.power_law([1e-3, 1e-2], [1e3, 1e2])
    assert err.value.name == "fit window"
    with pytest.raises(ParameterError, match="at least 3"):
        fits.power_law(np.logspace(-4, -1, 7), np.logspace(4, 1, 7), window=(5e-2, 1.0))
    with pytest.raises(ParameterError):
        fits.log_law([1e-3, 1e-2, 1e-1], [np.inf, np.nan, 1.0])


def test_fit_as_dict():
    d = fits.power_law([1, 2, 4], [1, 0.5, 0.25]).as_dict()
    assert set(d) == {"slope", "intercept", "ci_low", "ci_high", "r2", "window", "n_points"}


@pytest.mark.parametrize("n_groups, per_group", [(3, 4), (5, 2), (8, 1), (1, 6)])
def test_bootstrap_slopes_equal_linregress_per_resample(n_groups, per_group):
    """The vectorised bootstrap draws the same resamples and gets the same slopes as calling
    linregress on each resample's points (one point per group: resamples of one group are skipped)."""
    from scipy import stats
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(n_groups) * 7 + 3, per_group)
    u = np.log(np.tile(np.logspace(-1, -4, per_group), n_groups)) + (rng.normal(size=groups.size) if per_group == 1 else 0)
    v = 2 - u + 0.05 * rng.normal(size=groups.size)
    draw, labels, expected = np.random.default_rng(0), np.unique(groups), []
    for _ in range(300):
        idx = np.concatenate([np.flatnonzero(groups == g) for g in draw.choice(labels, size=labels.size, replace=True)])
        if np.ptp(u[idx]) > 0:
            expected.append(stats.linregress(u[idx], v[idx]).slope)
    got = fits.bootstrap_slopes(u, v, groups, 300, np.random.default_rng(0))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
