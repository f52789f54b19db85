"""Smoke test of benchmarks/escape_sweep.py: it runs end to end and prints its JSON summary.
(The real benchmark is `make bench`; its timings are not tested.)"""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_runs_and_reports_json():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "escape_sweep.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("speedup_vs_sgd", "speedup_vs_scipy", "max_rel_error", "overhead_fraction",
                "network_speedup_vs_scipy", "network_max_rel_error", "speedup_vs_scipy_chapter05",
                "max_rel_error_chapter05", "speedup_vs_scipy_part2", "max_rel_error_part2"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["smoke"] is True
    # accuracy is machine independent: every adaptive method met its tolerance's promise
    assert summary["max_rel_error"] <= 1e-3
    assert summary["network_max_rel_error"] <= 1e-5
    # the batched rows: chapter 05's sweep (grouped by depth, in legs) and the Part II network
    assert summary["max_rel_error_chapter05"] <= 1e-3 and summary["max_rel_error_part2"] <= 1e-3
    assert summary["chapter05_runs"] == 6 and summary["part2_runs"] == 4
    assert "speedup_vs_scipy_chapter05" in summary["targets_met"]
    assert 0.0 <= summary["overhead_fraction"] < 1.0
    assert summary["grad_calls_package"] < summary["grad_evals_scipy"] + 50
    text = proc.stdout
    for method in ("(a) torch GD loop", "(b) scipy solve_ivp RK45", "(c) torchdiffeq dopri5", "(d) this package"):
        assert method in text
    assert "extrapolated" in text
