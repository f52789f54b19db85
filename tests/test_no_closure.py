"""Chapter 07 core: Thue--Morse matched moments, the moment flow, the mixed-loop block."""
import numpy as np
import pytest
import torch

from saddle_escape.studies import moments as mo, multimode as mm
from saddle_escape.sim.networks import MLP
from saddle_escape.book.params import ParameterError


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_thue_morse_power_sums(K):
    A, B = mo.thue_morse_split(K)
    assert len(A) == len(B) == 2 ** K
    for j in range(K + 1):
        assert (A.astype(float) ** j).sum() == (B.astype(float) ** j).sum()
    assert (A.astype(float) ** (K + 1)).sum() != (B.astype(float) ** (K + 1)).sum()


def test_matched_moments_and_linear_closure():
    data = mm.mode_data(mm.ModeTeacher((1.5, 0.7)), 6)
    tanh = MLP.build(2, 8, 2, "tanh", output_dim=2)
    lin = MLP.build(2, 8, 2, "linear", output_dim=2)
    r = mo.closure_test(tanh, data, 2, spread=6.0)
    assert r["moment_mismatch"] < 1e-13 and r["next_moment_mismatch"] > 1e-6
    assert r["derivative_difference"] > 1e-3
    assert mo.closure_test(lin, data, 2, spread=6.0)["derivative_difference"] < 1e-12
    with pytest.raises(ParameterError):
        mo.matched_pair(tanh, 4)  # needs width >= 16


def test_moment_velocity_is_chain_rule():
    net = MLP.build(2, 4, 2, "tanh", output_dim=2)
    data = mm.mode_data(mm.ModeTeacher((1.0, 0.5)), 6)
    theta = torch.randn(1, net.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    M, dM = mo.moment_velocity(net, data, theta, 2)
    u = mo.units(net, theta)[0]
    p = theta.clone().requires_grad_(True)
    from saddle_escape.sim.networks import population_loss
    (g,) = torch.autograd.grad(population_loss(net, data)(p).sum(), p)
    du = mo.units(net, -g)[0]
    assert torch.allclose(dM[0], du.mean(0), atol=1e-14)
    assert torch.allclose(dM[1], (du.T @ u + u.T @ du) / u.shape[0], atol=1e-14)


@pytest.mark.parametrize("gain", [0.7, 1.4])
def test_mixed_block_matches_autograd(gain):
    teacher = mm.teacher_at_gain(gain, 2, 1, n_nodes=8)
    spec = mm.saddle_spectrum(teacher, 1, 8)
    assert spec.gradient_norm < 1e-13 and spec.leakage < 1e-13
    assert abs(spec.top_mixed - mm.predicted_growth_rate(teacher, 0, 1, 8)) < 1e-12
    assert np.sign(spec.top_mixed) == np.sign(gain - 1)
    assert abs(mm.mixed_loop_gain(teacher, 0, 1, 8) - gain) < 1e-12
