"""Shared fixtures: an isolated RAFALE_HOME per test and a helper that runs the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def causal_lm(preset: str | None = None, vocab_size: int | None = None, overrides: dict | None = None,
              init_from: str | None = None):
    """The ComposerModel rafale trains for a causal-LM run of this model, built as rafale/build.py does."""
    from rafale.build import network_for
    from rafale.data.causal_lm import CausalLM
    from rafale.task_model import TaskModel

    network = network_for("causal_lm", preset, init_from, overrides, vocab_size)
    return TaskModel(network, CausalLM(CausalLM.Section()), {})


def encoder_model(task: str, preset: str | None, vocab_size: int, pad_id: int, labels: list[str] | None = None,
                  overrides: dict | None = None, init_from: str | None = None):
    """The ComposerModel of an mlm or classification run of this encoder, built as rafale/build.py does."""
    from rafale.build import network_for
    from rafale.data.classification import Classification
    from rafale.data.mlm import MaskedLM
    from rafale.task_model import TaskModel

    network = network_for(task, preset, init_from, overrides, vocab_size, pad_id, labels)
    pipeline = MaskedLM(MaskedLM.Section()) if task == "mlm" else Classification(Classification.Section())
    return TaskModel(network, pipeline, {"labels": labels} if labels else {})
