"""The wheel: a non-editable install holds every fedllm module and the shipped scenarios
(simulations/ as the data package fedllm.scenarios), so `fedllm simulate demo` runs from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO


def test_the_wheel_holds_every_module_and_the_scenarios(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fedllm", "simulations"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    # --no-build-isolation: the installed setuptools builds it, no index needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "whl"), str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "whl").glob("fedllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "fedllm").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()  # the package list in pyproject.toml misses none
    scenarios = {f"fedllm/scenarios/{p.relative_to(REPO / 'simulations').as_posix()}"
                 for p in (REPO / "simulations").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"fedllm/scenarios/demo/sites.toml", "fedllm/scenarios/smoke/data/smoke.jsonl",
            "fedllm/scenarios/bank/data/bank.jsonl", "fedllm/scenarios/bank/make_data.py"} <= scenarios
    assert scenarios - names == set()
