"""Fast checks of the chapter-03 helpers (class table, phi slopes, prefactors, escape sweeps)."""
import math

import numpy as np
import pytest

from saddle_escape.studies import universality as U
from saddle_escape.sim.data import ScalarTeacher


def test_class_rows_and_slopes():
    assert U.class_row("tanh")["class"] == "B" and U.class_row("tanh")["q"] == 3
    assert U.class_row("gelu")["class"] == "C" and U.class_row("sigmoid")["class"] == "D"
    assert U.class_row("relu")["class"] == "A"
    assert U.phi_slope("tanh") == pytest.approx(3, abs=0.01)
    assert U.phi_slope("swish") == pytest.approx(2, abs=0.01)
    assert math.isnan(U.phi_slope("linear"))


def test_prefactors_and_spread():
    assert U.prefactor("gelu", 5) == pytest.approx(0.5**4)
    assert U.prefactor("tanh", 5, "writeup") == pytest.approx(2 / 3)
    assert np.allclose(U.relative_spread([[1.0, 2.0], [1.0, 2.2]]), [0.0, 0.2 / 2.1])
    with pytest.raises(ValueError):
        U.prefactor("tanh", 5, "nonsense")


def test_rescaled_escape_times_approach_master():
    teacher = ScalarTeacher(1.0, 0.5)
    eps = [0.03, 0.01]
    lin = U.chain_escape_times("linear", 4, eps, teacher, rtol=1e-9)
    tanh = U.chain_escape_times("tanh", 4, eps, teacher, rtol=1e-9, reference=None)
    dev = np.abs(U.prefactor("tanh", 4) * tanh.times / lin.times - 1)
    assert np.all(np.isfinite(lin.times)) and dev[1] < dev[0] < 0.02
