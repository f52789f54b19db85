"""Chapter 11's study: the decoupled blow-up formula, the two models, and each claim family
fed a realistic wrong input (it must fail)."""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from saddle_escape.sim import counts, fits
from saddle_escape.studies import init_stages as st

QUAD = st.Quadratic.build([2.0, -1.5, 1.0], 3, 0)


@pytest.fixture(scope="module")
def attention():
    return st.Attention.build(2, 15, 200, 3, 0)


def _direct_time(S, v0, u0, size, threshold):
    """Reference: integrate the decoupled system until the unit's size reaches `threshold`."""
    def rhs(t, y):
        return np.r_[y[1:] @ S @ y[1:], 2 * y[0] * S @ y[1:]]
    ev = lambda t, y: size(y[:1], y[None, 1:])[0] - threshold  # noqa: E731
    ev.terminal = True
    sol = solve_ivp(rhs, [0, 1e3], np.r_[v0, u0], rtol=1e-12, atol=1e-14, method="DOP853", events=ev)
    return sol.t_events[0][0]


def test_blowup_formula_matches_direct_integration_including_turns():
    g = np.random.default_rng(3)
    v0, U0 = 0.3 * g.standard_normal(60), g.standard_normal((60, 3))
    size = st.unit_sizes_np(QUAD)
    out = st.blowup(QUAD.S, v0, U0, size, 1e3)
    picks = list(np.flatnonzero(out.turned)[:3]) + list(np.flatnonzero(~out.turned)[:2])
    assert out.turned.any() and (~out.turned).any()
    for i in picks:
        assert out.reach[i] == pytest.approx(_direct_time(QUAD.S, v0[i], U0[i], size, 1e3), rel=1e-6)
    assert np.all(out.blowup >= out.reach)


def test_blowup_time_scales_exactly_as_one_over_eps():
    g = np.random.default_rng(4)
    v0, U0 = g.standard_normal(20), g.standard_normal((20, 3))
    T1 = st.blowup(QUAD.S, v0, U0).blowup
    T2 = st.blowup(QUAD.S, 1e-3 * v0, 1e-3 * U0).blowup
    np.testing.assert_allclose(T2 * 1e-3, T1, rtol=1e-7)


def test_losses_and_gradients(attention):
    th = QUAD.model.init(0.7, [1, 2])
    exact = QUAD.exact_dataset()
    np.testing.assert_allclose(QUAD.loss(th), QUAD.model.loss(th, exact), rtol=1e-12)
    for prob in (QUAD, attention):
        th = prob.model.init(0.5, [5]).requires_grad_(True)
        (g,) = torch.autograd.grad(prob.loss(th).sum(), th)
        np.testing.assert_allclose(prob.grad(th.detach()), g, rtol=1e-10, atol=1e-14)
    th = attention.model.init(0.5, [5])
    np.testing.assert_allclose(attention.loss(th), attention.model.loss(th, attention.data), rtol=1e-12)


def test_quadratic_plateau_formula_is_a_fixed_point_and_a_wrong_set_fails():
    lam, R = QUAD.eigenvalues, QUAD.eigenvectors
    S = [0, 2]
    tau = lam[S].sum() / (1 + len(S) / 2)
    c = lam[S] - tau / 2
    V = torch.tensor([[c[0]], [c[1]], [0.0]])
    U = torch.tensor(np.stack([R[:, 0], R[:, 2], np.zeros(3)]))
    theta = QUAD.model.flatten(V, U)[None]
    assert float(QUAD.loss(theta)) == pytest.approx(QUAD.best_loss(S), rel=1e-12)
    assert float(QUAD.grad(theta).abs().max()) < 1e-12
    # the realistic wrong inputs: the "top |lambda|" set, or Eckart-Young without the trace term
    assert abs(QUAD.best_loss([0, 1]) / QUAD.best_loss(S) - 1) > 0.01
    eckart_young = float((np.delete(lam, S) ** 2).sum())
    assert abs(eckart_young / QUAD.best_loss(S) - 1) > 0.01


def test_attention_best_loss_is_below_every_head_count_and_wrong_rank_fails(attention):
    L1, L2 = attention.best_loss(1), attention.best_loss(2)
    assert L2 < L1 < 0.5 * attention.y2
    w = torch.linalg.solve(attention.K, attention.b)
    assert L2 == pytest.approx(float(0.5 * attention.y2 - 0.5 * w @ attention.b), rel=1e-8)  # full rank = LS
    assert abs(L2 / L1 - 1) > 0.01


def test_sweep_prediction_and_exponent_and_wrong_inputs_fail():
    prob = st.Quadratic.build([2.0, -1.5], 2, 0)
    eps = [1e-2, 1e-3, 1e-4]
    sw, pred = st.first_escapes(prob, eps, [1])
    t1 = sw.drops[:, 0]
    err = st.relative_errors(t1, st.predicted_first(pred))
    assert np.abs(err).max() <= 0.01
    assert fits.power_law(sw.eps, t1).slope == pytest.approx(-1.0, abs=0.02)
    # wrong: the paper's one-dimensional intuition t = 1/(sigma_max v(0)) for the largest v(0)
    V, _ = prob.model.unflatten(sw.theta0)
    naive = 1 / (np.linalg.eigvalsh(prob.S).max() * V[..., 0].abs().max(1).values.numpy())
    assert np.abs(st.relative_errors(t1, naive)).max() > 0.01
    # wrong: a log(1/eps) law (linear units) has no -1 exponent
    assert abs(fits.power_law(sw.eps, np.log(1 / sw.eps)).slope + 1) > 0.02
    # degenerate saddle: |lambda_min| at the first plateau scales as eps; a strict saddle would not
    lam = st.smallest_hessian_eigenvalue(prob, st.plateau0_states(prob, sw))
    assert (lam < 0).all()
    assert fits.power_law(sw.eps, np.abs(lam)).slope == pytest.approx(1.0, abs=0.02)
    assert abs(fits.power_law(sw.eps, np.full(3, 0.7) + 0 * lam).slope - 1) > 0.02


def test_staircase_counts_and_a_simultaneous_escape_fails():
    prob = st.Quadratic.build([2.0, -1.5], 4, 0)
    sw = st.run_sweep(prob, [0.05], [7])
    plats = st.plateaus(prob, sw)
    assert [p.count for p in plats] == [p.k for p in plats] == [1, 2]
    assert [p.loss for p in plats] == pytest.approx([prob.best_loss(p.visited) for p in plats], rel=0.01)
    # wrong: all units large at once (what linear units would do) counts H, not 1
    th = prob.model.init(0.5, [1])
    assert int(counts.active_units(prob.model, th, prob.count_inputs())[0]) != 1


def test_expected_minimum_and_a_width_independent_input_fails():
    g = np.random.default_rng(0)
    x = g.exponential(size=200_000)
    for H in (1, 4, 16):
        assert st.expected_minimum(x, H) == pytest.approx(1 / H, rel=0.02)
    predicted = np.array([st.expected_minimum(x, H) for H in (4, 16)])
    flat = np.full(2, predicted[0])              # plateaus that do not shorten with width
    assert np.abs(flat / predicted - 1).max() > 0.05


def test_stiff_sweep_agrees_with_the_explicit_batch_and_fits_every_drop():
    prob = st.Quadratic.build([2.0, -1.5, 1.0], 6, 0)
    explicit = st.run_sweep(prob, [0.05], [1], plateaus=False)
    stiff = st.stiff_sweep(prob, [0.05], [1])
    np.testing.assert_allclose(stiff.drops, explicit.drops, rtol=1e-6)
    sw = st.stiff_sweep(prob, [1e-2, 1e-3, 1e-4, 1e-5], [1])
    assert np.isfinite(sw.drops).all() and sw.drops.shape[1] == 3
    for k in range(3):
        assert fits.power_law(sw.eps, sw.drops[:, k]).slope == pytest.approx(-1.0, abs=0.02)
    # wrong: later plateaus of the data-induced kind, ln(1/eps)/s long after an eps^-1 first escape
    t_wrong = sw.drops[:, 0] + 5.0 * np.log(1 / sw.eps)
    assert abs(fits.power_law(sw.eps, t_wrong).slope + 1) > 0.02
    # every plateau of every eps is at its derived loss, one more unit per drop
    plats = st.plateaus(prob, sw)
    assert [p.count for p in plats] == [p.k for p in plats]
    assert max(abs(p.loss / p.derived - 1) for p in plats) < 1e-3


def test_attention_plateau_is_the_stationary_point_the_heads_grow_into():
    prob = st.Attention.build(4, 31, 1000, 6, 0)
    sw = st.stiff_sweep(prob, [1e-3], [1])
    first = st.plateaus(prob, sw)[0]
    assert first.count == 1 and first.visited == (1,)
    assert first.loss == pytest.approx(prob.plateau_loss(1), rel=1e-3)
    # wrong: the global best of one head (lower than the visited stationary point at D = 4)
    assert abs(first.loss / prob.best_loss(1) - 1) > 0.01


def test_split_heads_add_a_head_but_not_a_direction(attention):
    V, U = attention.model.unflatten(attention.model.init(0.5, [2]))
    U[0, 1] = 0.7 * U[0, 0]                       # head 1 a proportional copy of head 0
    V[0, 2], U[0, 2] = 0.0, 0.0                   # head 2 off
    theta = attention.model.flatten(V, U)[0]
    active = torch.tensor([True, True, False])
    assert attention.directions(theta, active) == 1
    assert int(active.sum()) == 2                 # counted as heads, the split is two


def _increment_fit(sw, k=0):
    e, d, g = st.drop_increments(sw, k)
    return fits.power_law(e, d, groups=g)


def test_drop_increments_remove_the_escape_duration_and_a_log_law_still_fails():
    eps = np.array([1e-2, 1e-3, 1e-4, 1e-5] * 2)
    seeds = np.repeat([1, 2], 4)
    T, C = np.where(seeds == 1, 1.3, 2.9), 300.0         # C: a slow direction's O(1) escape duration
    sw = st.Sweep(QUAD, seeds, eps, None, 0.1, (T / eps + C)[:, None], None)
    assert abs(fits.power_law(eps, sw.drops[:, 0], groups=seeds).slope + 1) > 0.02   # the bent raw fit
    assert _increment_fit(sw).slope == pytest.approx(-1.0, abs=1e-9)
    # wrong: a plateau that grows like ln(1/eps)/eps (not the 1/eps law) fails on increments too
    sw.drops = (T * np.log(1 / eps) / eps)[:, None]
    assert abs(_increment_fit(sw).slope + 1) > 0.02


def test_spectral_ratio_and_the_default_eps_rule():
    assert st.spectral_ratio(QUAD) == pytest.approx(0.5)
    assert st.spectral_ratio(st.Quadratic.build([3.0, -1.0, -2.0, 0.5], 2, 0)) == pytest.approx(0.5 / 3)


# ------------------------------------------------------------------ blocked runs (a drop that cannot come)

def test_can_grow_needs_the_sign_or_a_turn():
    S = np.diag([0.0, 0.0, 0.0, 1.0])                 # learned directions 1-3, +1 left (teacher [3, -1, -2, 0.5])
    U = np.array([[0.5, -1.3, 0.1, 0.1], [0.5, -1.3, 0.1, 0.1], [0.5, -1.3, 0.1, 2.0]])
    v = np.array([0.2, -0.2, -0.2])
    # v > 0 grows; v < 0 with 2 v^2 > u_4^2 is stuck (its learned-direction components do not count);
    # v < 0 with 2 v^2 < u_4^2 turns and grows
    assert st.can_grow(S, v, U).tolist() == [True, False, True]
    # a rule that counted every component of u for the turn (the conserved 2v^2 - |u|^2) would call the
    # second unit free: it is not
    assert 2 * v[1] ** 2 < (U[1] ** 2).sum()


def test_blocked_runs_explain_the_missing_fourth_drop():
    prob = st.Quadratic.build([3.0, -1.0, -2.0, 0.5], 6, 0)
    sw = st.stiff_sweep(prob, [1e-3], [1, 4])             # seed 1: three drops; seed 4: all four
    assert np.isfinite(sw.drops[0]).sum() == 3 and np.isfinite(sw.drops[1]).all()
    assert st.blocked_runs(prob, sw).tolist() == [True, False]
    # a run cut off before its fourth drop (horizon tau = 0.56, the drop comes at 0.60) is censored, not blocked
    cut = st.stiff_sweep(prob, [1e-3], [4], tau_max=0.56)
    assert np.isfinite(cut.drops[0]).sum() == 3
    assert not st.blocked_runs(prob, cut).any()
    att = st.Attention.build(3, 31, 200, 4, 0)
    assert not st.blocked_runs(att, st.stiff_sweep(att, [1e-2], [1])).any()
