"""The simulation core on CUDA gives the CPU's numbers (float64). Skipped where no GPU exists
(CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``."""
import pytest
import torch

from saddle_escape.sim import data, escape, imbalance, networks, reduced
from saddle_escape.sim.data import ScalarTeacher
from saddle_escape.sim.integrate import Dopri5, GradientFlow, PIController, SaveAt, solve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_escape_sweep_on_cuda_matches_cpu():
    depth, r, eps = 5, 3, [1e-1, 1e-2, 1e-3]
    out = {}
    for device in ("cpu", "cuda"):
        chain = reduced.ScalarChain("tanh", depth, ScalarTeacher(1.0, 0.3), device=device)
        term = chain.term()
        norm_fn = lambda X: X[:, -r:].norm(dim=-1)
        ref = escape.post_escape_reference(term, reduced.bottleneck_scales(depth, r, 0.3).to(device),
                                           norm_fn, t_max=1e3)
        res = escape.escape_times(term, reduced.bottleneck_scales(depth, r, eps).to(device), 1e7,
                                  ref, norm_fn)
        assert res.times.device.type == "cpu" or res.times.is_cuda == (device == "cuda")
        out[device] = res.times.cpu()
    assert torch.isfinite(out["cpu"]).all()
    assert torch.allclose(out["cuda"], out["cpu"], rtol=1e-6, atol=0), out


def test_identity_and_flow_on_cuda_match_cpu():
    net = networks.MLP.build(3, 8, 4, "tanh", output_dim=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    ds = data.Dataset(x, torch.tanh(x[:, :1]), torch.full((64,), 1 / 64, dtype=torch.float64))
    theta = networks.he_normal(net, (0, 1))
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    got = {}
    for device in ("cpu", "cuda"):
        th, dd = theta.to(device), ds.to(device)
        lhs = imbalance.rate_autograd(net, dd, "mse", th)
        rhs = imbalance.rate_identity(net, dd, "mse", th)
        assert lhs.device.type == device
        assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-14)
        term = GradientFlow(networks.population_loss(net, dd, "mse"))
        sol = solve(term, th, 1.0, solver=Dopri5(), controller=PIController(rtol=1e-8, atol=1e-12),
                    saveat=SaveAt(ts))
        got[device] = (rhs.cpu(), sol.ys.cpu())
    assert torch.allclose(got["cuda"][0], got["cpu"][0], rtol=1e-9, atol=1e-14)
    assert torch.allclose(got["cuda"][1], got["cpu"][1], rtol=1e-6, atol=1e-10)
