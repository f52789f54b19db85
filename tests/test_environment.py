"""environment.yml (conda) and pyproject.toml (pip) must list the same dependencies."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> str:
    return "".join(requirement.split()).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    from_pip = {_normalise(r) for r in project["dependencies"]}
    from_conda = {_normalise(r) for r in pip_sections[0]}
    assert from_conda == from_pip, (
        f"only in environment.yml: {sorted(from_conda - from_pip)}; "
        f"only in pyproject.toml: {sorted(from_pip - from_conda)}")


def test_environment_yml_pins_python_and_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in plain and "pip" in plain


def test_torch_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
