"""Where a result came from: package versions, git commit, machine.

Versions are read from installed package metadata so that recording them never imports torch.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RECORDED_PACKAGES = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "saddle_escape": "saddle-escape"}


def package_version(distribution: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: str | Path | None = None) -> str:
    """Commit hash of the git checkout holding `path` (default: this package), or ``"unknown"``."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def environment(device: str = "cpu", dtype: str = "float64") -> dict:
    """The record stored under ``"environment"`` in every results JSON."""
    env = {"python": platform.python_version()}
    env.update({name: package_version(dist) for name, dist in RECORDED_PACKAGES.items()})
    env.update(
        git_commit=git_commit(),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        platform=platform.platform(),
        executable=sys.executable,
    )
    return env
