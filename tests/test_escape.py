"""Escape times on the scalar chain: the r = 3 law, censoring, and the error paths."""
import math

import numpy as np
import pytest
import torch

from saddle_escape.sim import escape, fits, reduced
from saddle_escape.sim.data import ScalarTeacher
from saddle_escape.book.params import ParameterError

DEPTH, R = 4, 3
EPS = [1e-1, 1e-2, 1e-3, 1e-4]


@pytest.fixture(scope="module")
def setup():
    chain = reduced.ScalarChain("tanh", DEPTH, ScalarTeacher(1.0, 0.3))
    term = chain.term()
    norm_fn = lambda X: X[:, -R:].norm(dim=-1)          # the bottleneck norm
    pilot = reduced.bottleneck_scales(DEPTH, R, 0.3)
    ref = escape.post_escape_reference(term, pilot, norm_fn, t_max=1e3)
    return chain, term, norm_fn, ref


def test_reference_is_after_the_escape(setup):
    chain, term, norm_fn, ref = setup
    L0 = term.loss(reduced.bottleneck_scales(DEPTH, R, 0.3)).item()
    assert ref.loss < 0.5 * L0
    assert ref.norm > 0.3 * math.sqrt(R) and ref.time > 0


def test_r3_escape_time_scales_as_one_over_eps(setup):
    chain, term, norm_fn, ref = setup
    X0 = reduced.bottleneck_scales(DEPTH, R, EPS)
    res = escape.escape_times(term, X0, 1e7, ref, norm_fn)
    assert res.times.shape == (len(EPS), 2) and not res.censored.any()
    for j in range(2):
        t = res.times[:, j].numpy()
        assert np.all(np.diff(t) > 0)
        slopes = fits.local_slopes(EPS, t)
        assert slopes[-1] == pytest.approx(-(R - 2), abs=0.01), slopes
    rows = res.rows(eps=EPS)
    assert [r["eps"] for r in rows] == EPS
    assert all(r["censored"] is False and r["t_esc_loss"] > 0 and r["t_esc_norm"] > 0 for r in rows)
    # the runs stopped shortly after escaping, not at t_max
    assert (res.solution.t_final < 2 * res.times.amax(-1)).all()


def test_censored_rows_when_t_max_is_too_small(setup):
    chain, term, norm_fn, ref = setup
    X0 = reduced.bottleneck_scales(DEPTH, R, [1e-1, 1e-3])
    res = escape.escape_times(term, X0, 200.0, ref, norm_fn)
    rows = res.rows(eps=[1e-1, 1e-3])
    assert rows[0]["censored"] is False and rows[0]["t_esc_loss"] is not None
    assert rows[1]["censored"] is True
    assert rows[1]["t_esc_loss"] is None and rows[1]["t_esc_norm"] is None
    assert torch.isinf(res.times[1]).all() and res.censored[1].all()
    assert res.solution.t_final[1].item() == pytest.approx(200.0)


def test_bad_definition_name(setup):
    chain, term, norm_fn, ref = setup
    X0 = reduced.bottleneck_scales(DEPTH, R, [1e-2])
    with pytest.raises(ParameterError) as err:
        escape.escape_times(term, X0, 1e3, ref, norm_fn, definitions=("loss", "gradient"))
    assert err.value.name == "definition" and "loss" in str(err.value)


def test_single_definition(setup):
    chain, term, norm_fn, ref = setup
    X0 = reduced.bottleneck_scales(DEPTH, R, [1e-2])
    res = escape.escape_times(term, X0, 1e5, ref, norm_fn, definitions=("norm",))
    assert res.times.shape == (1, 1) and res.definitions == ("norm",)
    assert set(res.rows()[0]) == {"t_esc_norm", "censored"}
