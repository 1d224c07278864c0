"""The code base stays ruff- and mypy-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_reports_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "proxy", "inspector", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_reports_nothing(tmp_path: Path) -> None:
    # The packages install as flowtap.proxy and flowtap.inspector; give mypy that layout.
    package = tmp_path / "flowtap"
    package.mkdir()
    (package / "proxy").symlink_to(REPO / "proxy")
    (package / "inspector").symlink_to(REPO / "inspector")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "flowtap.proxy",
            "-p",
            "flowtap.inspector",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
