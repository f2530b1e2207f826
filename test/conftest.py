"""Shared fixtures: an isolated RAFALE_HOME per test and a helper that runs the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def rafale_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RAFALE_HOME", str(home))
    return home


def run_cli(*args: str, home: Path, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m rafale ARGS` in a fresh process, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
    full_env.update({"RAFALE_HOME": str(home), "PYTHONUNBUFFERED": "1"}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "rafale", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
