"""`rafale plot`: the Figure holds exactly the series of the runs' metrics.jsonl (training loss as logged
and smoothed as pandas' adjusted EWM computes it, validation points, tokens on x), the PNG the CLI
writes has the figure's size, ink, and each run's colour, a torn last line is skipped, and bad
inputs are one-line errors. The metrics files are written as training writes them."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rafale.cli import main
from rafale.plot import SMOOTHING_SHARE, plot_runs
from test.conftest import run_cli

TOKENS_PER_STEP = 4096


def make_run(root, name: str, steps: int, eval_every: int, start_loss: float, seed: int):
    """A run directory whose metrics.jsonl has Composer's per-step records, eval records, and a torn line."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"run: {{name: {name}}}\n")
    rng = np.random.default_rng(seed)
    losses = start_loss * np.exp(-np.arange(steps) / steps) + rng.normal(0, 0.2, steps)
    lines = [{"step": 0, "time/epoch": 0}]
    evals = {}
    for s in range(1, steps + 1):
        lines.append({"step": s, "time/batch": s - 1, "time/token": (s - 1) * TOKENS_PER_STEP,
                      "loss/train/total": float(losses[s - 1]), "lr-AdamW/group0": 1e-3})
        if s % eval_every == 0:
            evals[s] = float(losses[s - 1]) + 0.3
            lines.append({"step": s, "metrics/eval/LanguageCrossEntropy": evals[s],
                          "metrics/eval/LanguagePerplexity": float(np.exp(evals[s]))})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": %d, "loss/train/total": 1' % (steps + 1)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir, list(losses), evals


@pytest.fixture
def two_runs(tmp_path):
    return [make_run(tmp_path, "a-1234abcd", 200, 50, 10.0, 0), make_run(tmp_path, "b-5678ef01", 120, 40, 9.0, 1)]


def test_figure_holds_the_runs_series(two_runs):
    fig = plot_runs([str(d) for d, _, _ in two_runs], x="tokens")
    loss_ax, ppl_ax = fig.axes
    assert loss_ax.get_title() == "loss" and ppl_ax.get_title() == "LanguagePerplexity"
    assert loss_ax.get_xlabel() == "tokens"
    lines = loss_ax.get_lines()
    assert len(lines) == 6  # per run: raw, smoothed, validation
    for (run_dir, losses, evals), (raw, smoothed, val) in zip(two_runs, [lines[:3], lines[3:]]):
        steps = np.arange(1, len(losses) + 1)
        np.testing.assert_array_equal(raw.get_xdata(), steps * TOKENS_PER_STEP)
        np.testing.assert_array_equal(raw.get_ydata(), losses)  # the torn line is not there
        alpha = 1 / (SMOOTHING_SHARE * len(losses))  # pandas' EWM, start-up bias corrected (adjust=True)
        np.testing.assert_allclose(smoothed.get_ydata(), pd.Series(losses).ewm(alpha=alpha).mean(), rtol=1e-12)
        assert smoothed.get_label() == f"{run_dir.name} (smoothed)" and smoothed.get_color() == raw.get_color()
        np.testing.assert_array_equal(val.get_xdata(), np.array(list(evals)) * TOKENS_PER_STEP)
        np.testing.assert_array_equal(val.get_ydata(), list(evals.values()))
        assert val.get_label() == f"{run_dir.name} validation"
    assert lines[0].get_color() != lines[3].get_color()
    # Smoothing removes noise: the smoothed curve moves less from step to step than the raw one.
    assert np.abs(np.diff(lines[1].get_ydata())).mean() < 0.3 * np.abs(np.diff(lines[0].get_ydata())).mean()
    ppl = ppl_ax.get_lines()
    np.testing.assert_allclose(ppl[0].get_ydata(), np.exp(list(two_runs[0][2].values())))

    fig = plot_runs([str(two_runs[1][0])], metrics=["lr-AdamW/group0", "perplexity"])
    assert [ax.get_title() for ax in fig.axes] == ["lr-AdamW/group0", "LanguagePerplexity"]
    (lr,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(lr.get_xdata(), np.arange(1, 121))  # steps, as logged (not smoothed)
    np.testing.assert_array_equal(lr.get_ydata(), [1e-3] * 120)


def test_cli_writes_the_png(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    proc = run_cli("plot", *(str(d) for d, _, _ in two_runs), "-o", str(out), "--x", "tokens", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out} (2 run(s), 2 panel(s))"
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (480, 1280, 3)  # two 6.4 x 4.8 in panels at 100 dpi
    ink = (image < 250).any(axis=2)
    assert 0.03 < ink.mean() < 0.5  # drawn on, not a blank or a filled canvas
    assert ink[:, :640].mean() > 0.02 and ink[:, 640:].mean() > 0.02  # both panels
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's C0 and C1: one per run
        assert (np.abs(image - colour).sum(axis=2) < 30).sum() > 200, colour
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_inputs_are_one_line(two_runs, tmp_path, capsys):
    run = str(two_runs[0][0])
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("run: {name: fresh}\n")
    cases = {
        (str(tmp_path),): "not a run directory",
        (str(tmp_path / "fresh"),): "no metrics logged yet",
        (run, "--metric", "accuracy"): "--metric accuracy: no such metric in metrics.jsonl; logged: ",
        (run, "--metric", "Language"): "--metric Language: several metrics match",
        (run, "--x", "epochs"): "--x epochs: choose steps or tokens",
        (run, "-o", str(tmp_path / "nowhere" / "p.png")): "no directory",
    }
    for args, message in cases.items():
        assert main(["plot", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
