import math

import numpy as np
import pytest

from saddle_escape.book import params as P
from saddle_escape.book.params import ParameterError


def test_message_names_parameter_value_and_what_is_allowed():
    with pytest.raises(ParameterError) as err:
        P.check_positive("eps_min", -1.0)
    assert str(err.value) == "eps_min = -1.0 is not allowed: must be a number > 0"
    assert isinstance(err.value, ValueError)
    assert (err.value.name, err.value.value) == ("eps_min", -1.0)


@pytest.mark.parametrize("bad", [0, -1e-9, math.nan, math.inf, "1e-3", None, True, [1.0]])
def test_check_positive_rejects(bad):
    with pytest.raises(ParameterError, match="must be a number > 0"):
        P.check_positive("eps", bad)


def test_check_positive_accepts_and_normalises():
    assert P.check_positive("eps", 3) == 3.0
    assert P.check_positive("eps", np.float64(1e-5)) == 1e-5
    assert P.check_nonnegative("x", 0) == 0.0


def test_int_range():
    assert P.check_int_range("r", 3, 1, 5) == 3
    assert P.check_int_range("r", np.int64(2), 1) == 2
    for bad in (0, 6, 2.0, True, "3"):
        with pytest.raises(ParameterError, match=r"must be an integer in \[1, 5\]"):
            P.check_int_range("r", bad, 1, 5)
    with pytest.raises(ParameterError, match="must be an integer >= 1"):
        P.check_positive_int("width", -4)


def test_number_range():
    assert P.check_number("a", 0.5, 0, 1) == 0.5
    with pytest.raises(ParameterError, match=r"in \[0, 1\]"):
        P.check_number("a", 2, 0, 1)


def test_choice_and_lists():
    assert P.check_choice("activation", "tanh", ["tanh", "relu"]) == "tanh"
    with pytest.raises(ParameterError) as err:
        P.check_choice("activation", "tahn", ["tanh", "relu"])
    assert str(err.value) == "activation = 'tahn' is not allowed: must be one of 'tanh', 'relu'"
    assert P.check_nonempty_list("r_values", (3, 4)) == [3, 4]
    with pytest.raises(ParameterError, match="r_values = \\[\\] is not allowed: must be a non-empty list"):
        P.check_nonempty_list("r_values", [])
    assert P.check_list_of("eps", [1e-3, 1e-4], P.check_positive) == [1e-3, 1e-4]
    with pytest.raises(ParameterError, match=r"eps\[1\] = -0.1 is not allowed"):
        P.check_list_of("eps", [1e-3, -0.1], P.check_positive)
    with pytest.raises(ParameterError, match=r"acts\[0\] = 'x'"):
        P.check_list_of_choices("acts", ["x"], ["tanh"])


def test_standard_parameters():
    assert P.check_profile("quick") == "quick"
    with pytest.raises(ParameterError, match="profile = 'fast' is not allowed: must be one of 'quick', 'full'"):
        P.check_profile("fast")
    assert P.check_seed(0) == 0
    with pytest.raises(ParameterError):
        P.check_seed(-1)
    assert P.check_bool("flag", False) is False
    with pytest.raises(ParameterError):
        P.check_bool("flag", 1)
    with pytest.raises(ParameterError, match="non-empty path"):
        P.check_path("results_dir", "")


def test_require_for_cross_parameter_constraints():
    P.require(3 <= 5, "r", 3, "must be <= L = 5")
    with pytest.raises(ParameterError, match="r = 6 is not allowed: must be <= L = 5"):
        P.require(6 <= 5, "r", 6, "must be <= L = 5")
