"""The code base stays ruff- and mypy-clean, checked the way a developer runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_reports_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_reports_nothing(tmp_path: Path) -> None:
    # pyproject.toml points mypy at .mypy-tree/flowtap, which links proxy/ and inspector/
    # under the names they install as (flowtap.proxy, flowtap.inspector), and at benchmarks/.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues found in" in result.stdout
