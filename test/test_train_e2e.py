"""End to end through the real CLI: train -> checkpoint -> kill -9 -> resume -> generate, plus the
DATA=1, DEBUG=1 and FORCE=1 switches and `rafale runs`. Tiny model, small data, real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test.conftest import REPO, run_cli

STEPS = 24


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cfg")
    text = (REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:60_000]
    (root / "shakespeare.txt").write_text(text)
    cfg = {
        "run": {"name": "tiny", "seed": 3},
        "model": {"preset": "pythia-micro"},
        "data": {"train": str(root / "shakespeare.txt"), "tokenizer": "gpt-neox-20b",
                 "max_seq_len": 64, "val_fraction": 0.1},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup": "2ba"},
        "train": {"max_duration": f"{STEPS}ba", "global_batch_size": 8, "device_microbatch_size": 4,
                  "eval_interval": "4ba", "save_interval": "4ba"},
        "debug": {"steps": 40, "lr": 3e-3},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def _only_run_dir(home: Path) -> Path:
    dirs = sorted((home / "runs").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_train_kill_resume_matches_uninterrupted_run(tiny_config, tmp_path):
    # Reference: one uninterrupted run.
    ref_home = tmp_path / "ref"
    ref = run_cli("train", "-c", str(tiny_config), home=ref_home)
    assert ref.returncode == 0, ref.stderr
    ref_dir = _only_run_dir(ref_home)
    ref_losses = _losses(ref_dir)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert json.loads((ref_dir / "status.json").read_text())["status"] == "completed"
    assert (ref_dir / "config.yaml").is_file()

    # Same config, killed hard once the first checkpoint exists, then relaunched.
    home = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
    env.update(RAFALE_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "rafale", "train", "-c", str(tiny_config)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    latest = None
    while time.time() < deadline and proc.poll() is None:
        links = list(home.glob("runs/*/checkpoints/latest-rank0.pt"))
        if links and links[0].exists():
            latest = links[0]
            break
        time.sleep(0.01)
    assert latest is not None, "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = _only_run_dir(home)
    killed_at = max(_losses(run_dir), default=0)
    assert killed_at < STEPS, "the run finished before it could be killed"

    listing = run_cli("runs", home=home)
    assert "interrupted" in listing.stdout, listing.stdout

    resumed = run_cli("train", "-c", str(tiny_config), home=home)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming interrupted run" in resumed.stdout
    assert _only_run_dir(home) == run_dir
    # Bit-for-bit the same losses as the uninterrupted run, each step logged once.
    assert _losses(run_dir) == ref_losses

    # Same config again: refused, then FORCE=1 trains in a fresh directory.
    again = run_cli("train", "-c", str(tiny_config), home=home)
    assert again.returncode == 2 and "already completed" in again.stderr and "FORCE=1" in again.stderr
    forced = run_cli("train", "-c", str(tiny_config), home=home, env={"FORCE": "1"})
    assert forced.returncode == 0, forced.stderr
    assert (home / "runs" / f"{run_dir.name}-2" / "status.json").is_file()

    listing = run_cli("runs", home=home)
    assert listing.stdout.count("completed") == 2, listing.stdout

    # Greedy generation from the run's latest checkpoint, as JSON.
    gen = run_cli("generate", "--run", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                  "--json", home=home)
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    assert len(out["output_ids"]) == 12 and out["prompt_ids"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(REPO / "rafale/assets/tokenizers/gpt-neox-20b/tokenizer.json"))
    assert out["prompt_ids"] == tok.encode("ROMEO:", add_special_tokens=False).ids
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=False)


def test_data_only_builds_then_hits_the_cache(tiny_config, tmp_path):
    first = run_cli("train", "-c", str(tiny_config), home=tmp_path, env={"DATA": "1"})
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout and "documents" in first.stdout and "blocks" in first.stdout
    second = run_cli("prepare", "-c", str(tiny_config), "train.global_batch_size=4",
                     "train.device_microbatch_size=4", home=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stdout
    assert not (tmp_path / "runs").exists()


def test_debug_overfits_one_batch_and_fails_loudly_when_it_cannot(tiny_config, tmp_path):
    ok = run_cli("train", "-c", str(tiny_config), home=tmp_path, env={"DEBUG": "1"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "debug: OK" in ok.stdout
    # A zero learning rate cannot fit anything: the check must fail.
    bad = run_cli("debug", "-c", str(tiny_config), "debug.lr=0", "debug.steps=5", home=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "debug: FAILED, the final loss is not below 35% of the first" in bad.stdout


NO_SHIFT = """
from rafale.data.causal_lm import CausalLM, TrainOutput


class NoShift(CausalLM):
    \"\"\"The classic bug: every position's target is its own input token (the labels are not shifted).\"\"\"

    def forward(self, network, batch, training):
        ids = batch["input_ids"]
        return TrainOutput(network(ids, targets=ids), (*ids.shape, network.cfg.vocab_size))
"""


def test_debug_fails_when_the_labels_are_not_shifted(tiny_config, tmp_path):
    """Unshifted labels fit one batch beautifully; DEBUG=1 catches them on a batch it never trained on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    text = (tiny_config.parent / "shakespeare.txt").read_text()
    chars = sorted(set(text))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))  # one token per character
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "chars.json"))
    (tmp_path / "no_shift.py").write_text(NO_SHIFT)
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["data"].update(tokenizer=str(tmp_path / "chars.json"), pipeline=str(tmp_path / "no_shift.py") + ":NoShift")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(cfg))
    broken = run_cli("debug", "-c", str(tmp_path / "broken.yaml"), home=tmp_path / "home")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "check the labels' shift" in broken.stdout, broken.stdout
