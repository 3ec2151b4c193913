"""The static checks the project holds itself to, run with the suite so they cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["apps", "notify", "config", "tests", "scripts"]


def test_types_check_with_the_django_plugin():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "config/mypy.ini", "notify", "apps", "config"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "type-check")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_and_format():
    ruff = [sys.executable, "-m", "ruff"]
    config = ["--config", "config/ruff.toml"]
    check = subprocess.run([*ruff, "check", *config, *SOURCES], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([*ruff, "format", "--check", *config, *SOURCES], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
