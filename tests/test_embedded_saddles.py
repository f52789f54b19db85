"""Chapter 08's study (saddle_escape.studies.embedded): each claim's measurement, and wrong inputs
that the claim would reject."""
import numpy as np
import pytest
import torch

from saddle_escape.sim import embedding as em
from saddle_escape.sim.errors import ParameterError
from saddle_escape.studies import embedded as E


@pytest.fixture(scope="module")
def linear():
    return E.problem("linear", 2, 3, 40, 0, output_dim=3)


def test_allowed_embeddings_pass_and_a_perturbed_one_fails(linear):
    rows, theta, _ = E.embeddings(linear, 1, 0)
    assert all(r["allowed"] for r in rows)
    assert max(r["same_map"] for r in rows) <= 1e-12 and max(r["gradient"] for r in rows) <= 1e-10
    wide, th = em.embed(linear.model, theta, "combination")
    perturbed = th + 1e-6 * torch.randn(th.shape, generator=torch.Generator().manual_seed(0), dtype=th.dtype)
    assert em.relative_gradient(wide, perturbed, linear.data).item() > 1e-10


def test_disallowed_constructions_are_flagged_and_fail_visibly():
    p = E.problem("tanh", 2, 3, 40, 0, output_dim=2)
    rows, _, _ = E.embeddings(p, 1, 0)
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["split"]["allowed"] and by_kind["zero"]["allowed"]
    for kind in ("proportional", "combination", E.REFLECTED):
        assert not by_kind[kind]["allowed"] and by_kind[kind]["gradient"] >= 1e-3
    relu = {r["kind"]: r for r in E.embeddings(E.problem("relu", 2, 3, 40, 0, output_dim=2), 1, 0)[0]}
    assert relu["proportional"]["allowed"] and not relu[E.REFLECTED]["allowed"]   # gamma_u < 0 breaks ReLU
    assert relu[E.REFLECTED]["gradient"] >= 1e-3


def test_tangency_rows_flag_non_invariant_manifolds():
    rows = E.tangency(E.problem("quadratic", 2, 3, 40, 0, output_dim=1), 2, 0)
    for r in rows:
        assert (r["normal"] <= 1e-12) if r["allowed"] else (r["normal"] >= 1e-3)


def test_repulsion_rate_measured_matches_derived_and_not_a_wrong_one(linear):
    _, theta, _ = E.embeddings(linear, 1, 0)
    t = E.trajectories(linear, theta, 0)
    assert t.repels
    assert abs(t.rate_measured / t.rate_derived - 1) <= 0.05
    assert float(t.distances.max()) <= 1e-12
    # linear units, whitened inputs: the rate is the largest singular value of the residual
    # correlation; twice it (a factor-2 slip in the normalisation) is rejected by the 5% claim
    assert abs(t.rate_measured / (2 * t.rate_derived) - 1) > 0.05


def test_linear_saddle_eigenvalue_is_minus_s2_in_our_normalisation(linear):
    s = E.saddle(linear, 0)
    assert s.construction == "zero"
    assert abs(s.eigenvalues[0] / -s.teacher_s2 - 1) <= 1e-6
    for wrong in (2.0, 0.5):                               # other normalisations would fail the claim
        assert abs(s.eigenvalues[0] / (-wrong * s.teacher_s2) - 1) > 1e-6
    assert s.new_block > 1e-12                            # type I: the new unit's block is not zero
    assert s.escape_exponent == pytest.approx(2, abs=0.05)


def test_type_three_saddle_is_degenerate_with_a_cubic_escape():
    s = E.saddle(E.problem("quadratic", 2, 3, 40, 0, output_dim=1), 0)
    lam = s.eigenvalues
    assert abs(lam[0] / lam[-1]) <= 1e-8 and s.new_block <= 1e-12
    assert s.escape_exponent == pytest.approx(3, abs=0.02)
    assert s.escape_coefficient == pytest.approx(s.derived_coefficient, rel=1e-3)
    assert abs(s.escape_exponent - 2) > 0.02             # a quadratic (type I) drop would fail the claim


def test_relu_with_one_output_is_not_a_saddle():
    """v*^T M = 0 at the narrow optimum, so with one output M = 0: no negative curvature."""
    s = E.saddle(E.problem("relu", 2, 3, 40, 0, output_dim=1), 0)
    assert s.derived_min == pytest.approx(0.0, abs=1e-12)
    assert s.eigenvalues[0] >= -1e-8 * s.eigenvalues[-1]


def test_problem_refuses_bad_parameters():
    with pytest.raises(ParameterError):
        E.problem("linear", 1, 3, 40, 0)
    with pytest.raises(ParameterError):
        E.problem("linear", 2, 3, 5, 0)
    with pytest.raises(ParameterError):
        E.problem("sigmoid", 2, 3, 40, 0)
