"""Fault injection: torn and damaged files of rafale's own (metrics, status, checkpoints, cache arrays,
exports), Ctrl-C, a full disk (a file-size limit in a child process), an unwritable home, and bad
input that must end in one line and exit code 2, never a traceback.

One tiny run is trained once (module fixture) and copied into each test that damages it. Real CLI
processes where the exit code, the message or a signal is the claim; `cli.main` in-process where a
second Composer import would only cost time.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from rafale import cli
from test.conftest import REPO, run_cli

STEPS = 6
TEXT = (REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()


def _config(root: Path, **train) -> Path:
    (root / "corpus.txt").write_text(TEXT[:30_000])
    cfg = {"run": {"name": "tiny", "seed": 3},
           "model": {"preset": "pythia-micro"},
           "data": {"train": str(root / "corpus.txt"), "tokenizer": "gpt-neox-20b", "max_seq_len": 32,
                    "val_fraction": 0.1},
           "train": {"max_duration": f"{STEPS}ba", "global_batch_size": 4, "device_microbatch_size": 4,
                     "eval_interval": "3ba", "save_interval": "2ba", **train}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss/train/total"]) for r in rows if "loss/train/total" in r]
    assert len(losses) == len(dict(losses)), "a step was logged twice"
    return dict(losses)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _one_line(text: str) -> str:
    """stderr of a failed command: exactly one line, no traceback."""
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


def _limited(max_file_bytes: int):
    """preexec_fn: a disk that fills up after `max_file_bytes` per file (writes then fail with EFBIG)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    return limit


def _cli_process(*args, home: Path, fsize: int | None = None, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
    env.update(RAFALE_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "rafale", *args], cwd=REPO, env=env, text=True,
                            preexec_fn=_limited(fsize) if fsize else None, **popen)


def _run_limited(*args, home: Path, fsize: int) -> subprocess.CompletedProcess:
    proc = _cli_process(*args, home=home, fsize=fsize, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trained")
    config = _config(root)
    home = root / "home"
    done = run_cli("train", "-c", str(config), home=home)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (home / "runs").iterdir()
    return {"config": config, "home": home, "run": run_dir.name, "losses": _losses(run_dir)}


@pytest.fixture
def home(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained home, RAFALE_HOME pointing at it."""
    copy = tmp_path / "home"
    shutil.copytree(trained["home"], copy, symlinks=True)
    monkeypatch.setenv("RAFALE_HOME", str(copy))
    return copy


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _killed_after(run_dir: Path, step: int) -> None:
    """The run as a `kill -9` after the checkpoint of `step` leaves it: later checkpoints gone, status
    still `running` with a pid that no longer lives."""
    ckpts = run_dir / "checkpoints"
    for path in ckpts.glob("ep*-ba*"):
        if int(path.name.split("-ba")[1].split("-")[0]) > step:
            path.unlink()
    (ckpts / "latest-rank0.pt").unlink()
    (ckpts / "latest-rank0.pt").symlink_to(f"ep0-ba{step}-rank0.pt")
    status = _status(run_dir) | {"status": "running", "pid": _dead_pid(), "host": socket.gethostname()}
    (run_dir / "status.json").write_text(json.dumps(status))


# --- 1 + 3: a kill mid-write: torn metrics line, truncated latest checkpoint -------------------------

def test_torn_metrics_and_truncated_checkpoint_resume_from_the_last_good_one(trained, home, capsys):
    run_dir = home / "runs" / trained["run"]
    _killed_after(run_dir, 4)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-40])  # the last line cut short
    ckpt = run_dir / "checkpoints" / "ep0-ba4-rank0.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    assert cli.main(["runs"]) == 0
    assert "interrupted" in capsys.readouterr().out

    resumed = run_cli("train", "-c", str(trained["config"]), home=home)
    assert resumed.returncode == 0, resumed.stderr
    assert "ep0-ba4-rank0.pt is damaged" in resumed.stderr and "ep0-ba2-rank0.pt" in resumed.stderr
    assert _status(run_dir)["status"] == "completed"
    assert _losses(run_dir) == trained["losses"]  # the same run as the uninterrupted one


# --- 2: Ctrl-C ---------------------------------------------------------------------------------------

def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_twice_quits_at_once(tmp_path):
    # 64 micro-batches of 1 make a step long enough to press Ctrl-C twice inside it.
    config = _config(tmp_path, max_duration="200ba", global_batch_size=64, device_microbatch_size=1,
                     save_interval="1000ba", eval_interval="1000ba")
    home = tmp_path / "home"
    metrics = lambda: list(home.glob("runs/*/metrics.jsonl"))  # noqa: E731

    def logged_a_loss():
        return metrics() and "loss/train/total" in metrics()[0].read_text()

    twice = _cli_process("train", "-c", str(config), home=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(logged_a_loss, twice)
    twice.send_signal(signal.SIGINT)
    time.sleep(0.2)
    twice.send_signal(signal.SIGINT)
    out, err = twice.communicate(timeout=600)
    assert twice.returncode == 130, err
    assert "quitting at once" in out and "Traceback" not in err, err
    run_dir = metrics()[0].parent
    assert _status(run_dir)["status"] == "interrupted"
    assert not (run_dir / "checkpoints" / "latest-rank0.pt").exists()  # no step finished cleanly

    (run_dir / "metrics.jsonl").unlink()  # so that the loss waited for below is the new process's
    once = _cli_process("train", "-c", str(config), home=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(logged_a_loss, once)
    once.send_signal(signal.SIGINT)
    out, err = once.communicate(timeout=600)
    assert once.returncode == 130, err
    assert "resuming interrupted run" in out
    assert _one_line(err).startswith("rafale: interrupted") and "run the same command to resume" in err
    assert _status(run_dir)["status"] == "interrupted"
    latest = (run_dir / "checkpoints" / "latest-rank0.pt").resolve()
    assert latest.name == f"ep0-ba{max(_losses(run_dir))}-rank0.pt"  # checkpointed at the step it stopped


def test_ctrl_c_during_prepare_takes_effect_within_a_second_and_leaves_nothing(tmp_path):
    # One 24 MB document: tokenised in bounded pieces, so the interrupt lands between two of them.
    root = tmp_path / "cfg"
    root.mkdir()
    config = _config(root)
    (root / "corpus.txt").write_text(TEXT * 24)
    home = tmp_path / "home"
    # What one encode call of BATCH_CHARS takes on this machine now (0.2 s on 2 idle cores): the wait
    # the interrupt may have, plus the process's exit; without the bound pieces it waits for the whole
    # document (x 24 here).
    from rafale.data import tokenize

    tok = tokenize.load_tokenizer((REPO / "rafale/assets/tokenizers/gpt-neox-20b/tokenizer.json").read_bytes())
    t0 = time.perf_counter()
    tok.encode_batch_fast(tokenize.split_pieces(TEXT[:tokenize.BATCH_CHARS]), add_special_tokens=False)
    allowed = 1.0 + 3 * (time.perf_counter() - t0)
    proc = _cli_process("prepare", "-c", str(config), home=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []  # (time, line) of stderr as it comes: the interrupt's line, before the process's exit
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), line) for line in proc.stderr))
    reader.start()
    _wait_for(lambda: list(home.glob("data/.*.lock")), proc)
    time.sleep(1.0)
    assert proc.poll() is None, "prepare ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    proc.wait(timeout=600)
    reader.join()
    err = "".join(line for _, line in lines)
    assert proc.returncode == 130 and lines and "interrupted" in lines[-1][1], err
    assert lines[-1][0] - t0 < allowed, (lines[-1][0] - t0, allowed)
    assert "Traceback" not in err and "interrupted" in err
    # No entry and no temporary directory: only locks, and the manifest of the source hashes already taken.
    assert [p.name for p in (home / "data").iterdir() if not p.name.endswith(".lock")] in ([], ["manifest.json"])


# --- 3: no run left `running` ------------------------------------------------------------------------

def test_refusal_after_the_data_is_built_leaves_no_run_running(trained, home, capsys):
    assert cli.main(["train", "-c", str(trained["config"]), "run.name=big", "train.global_batch_size=1024"]) == 2
    assert "larger than the" in _one_line(capsys.readouterr().err)
    for run_dir in (home / "runs").iterdir():
        assert _status(run_dir)["status"] != "running", run_dir


def test_full_disk_while_checkpointing_fails_in_one_line_and_keeps_the_last_good_one(trained, home):
    run_dir = home / "runs" / trained["run"]
    _killed_after(run_dir, 2)
    full = _run_limited("train", "-c", str(trained["config"]), home=home, fsize=20 << 20)
    assert full.returncode == 2, full.stderr
    assert "no space" in _one_line(full.stderr)
    assert _status(run_dir)["status"] == "failed"
    assert (run_dir / "checkpoints" / "latest-rank0.pt").resolve().name == "ep0-ba2-rank0.pt"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ep0-ba2-rank0.pt", "latest-rank0.pt"]


# --- 4: damaged cache arrays -------------------------------------------------------------------------

@pytest.mark.parametrize("byte", [0xFF, 0x00])
def test_damaged_cache_entry_is_named_and_rebuilt(trained, home, capsys, byte):
    (entry,) = (home / "data").glob("causal_lm-*")
    good = np.load(entry / "train.npy").copy()
    with open(entry / "train.npy", "r+b") as f:
        f.seek(1000)
        f.write(bytes([byte]) * 200)
    assert cli.main(["prepare", "-c", str(trained["config"])]) == 0
    out = capsys.readouterr()
    assert f"{entry.name} is damaged (train.npy" in out.err and "rebuilding" in out.err
    assert "built in" in out.out
    np.testing.assert_array_equal(np.load(entry / "train.npy"), good)
    assert cli.main(["prepare", "-c", str(trained["config"])]) == 0
    assert "cache hit" in capsys.readouterr().out


# --- 5: malformed status.json ------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"[1, 2]", b'"running"', b"\xff\xfe\x00garbage",
                                     b'{"status": "running", "pid": "abc", "host": "HOST"}'])
def test_malformed_status_never_breaks_runs_or_train(trained, home, capsys, content):
    run_dir = home / "runs" / trained["run"]
    (run_dir / "status.json").write_bytes(content.replace(b"HOST", socket.gethostname().encode()))
    assert cli.main(["runs"]) == 0
    assert trained["run"] in capsys.readouterr().out
    # Unreadable status: the run is resumed from its checkpoints (here: the final one, nothing to do).
    assert cli.main(["train", "-c", str(trained["config"])]) == 0, capsys.readouterr().err
    assert _status(run_dir)["status"] == "completed"


# --- 6: one line, exit 2 -----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b'{"model": ', b'{"version": "1.0"}', b"\x00\x01\x02\xff" * 64])
def test_garbage_tokenizer_is_one_line(trained, home, tmp_path, capsys, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    assert cli.main(["prepare", "-c", str(trained["config"]), f"data.tokenizer={tmp_path / 'tokenizer.json'}"]) == 2
    assert "is not a valid tokenizer.json" in _one_line(capsys.readouterr().err)


def test_tokenizer_ids_beyond_its_vocabulary_are_refused(trained, home, tmp_path, capsys):
    tok = json.loads((REPO / "rafale/assets/tokenizers/gpt-neox-20b/tokenizer.json").read_text())
    tok["model"]["vocab"]["the"] = 70000  # an id past the 50,277-token vocabulary
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert cli.main(["prepare", "-c", str(trained["config"]), f"data.tokenizer={tmp_path / 'tokenizer.json'}"]) == 2
    assert "id 70000" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["generate", "--prompt", "ROMEO:", "--max-new-tokens", "2"], ["eval"],
                                     ["export", "--to-hf", "OUT"]])
def test_truncated_checkpoint_is_one_line(trained, home, tmp_path, capsys, command):
    run_dir = home / "runs" / trained["run"]
    ckpt = (run_dir / "checkpoints" / "latest-rank0.pt").resolve()
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    command = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert cli.main([command[0], "--run", str(run_dir), *command[1:]]) == 2
    assert f"{ckpt.name} is damaged" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_unwritable_home_is_one_line(trained, tmp_path, monkeypatch, capsys):
    # Tests run as root here, where chmod does not stop writes: a home below a file cannot be written either.
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        monkeypatch.setenv("RAFALE_HOME", str(bad))
        assert cli.main(["prepare", "-c", str(trained["config"])]) == 2
        assert "RAFALE_HOME" in _one_line(capsys.readouterr().err)
    monkeypatch.setenv("RAFALE_HOME", "")
    assert cli.main(["runs"]) == 2
    assert "RAFALE_HOME is empty" in _one_line(capsys.readouterr().err)


def test_full_disk_during_prepare_and_export_is_one_line_and_leaves_nothing(trained, home, tmp_path):
    fresh = tmp_path / "fresh"
    full = _run_limited("prepare", "-c", str(trained["config"]), home=fresh, fsize=8 << 10)
    assert full.returncode == 2 and "no space" in _one_line(full.stderr), full.stderr
    # No entry and no temporary file: only locks, and the manifest of the source hashes already taken.
    assert [p.name for p in (fresh / "data").iterdir() if not p.name.endswith(".lock")] in ([], ["manifest.json"])

    out = tmp_path / "hf"
    run_dir = home / "runs" / trained["run"]
    full = _run_limited("export", "--run", str(run_dir), "--to-hf", str(out), "--max-shard-size", "4MB",
                        home=home, fsize=10 << 20)
    assert full.returncode == 2 and "no space" in _one_line(full.stderr), full.stderr
    assert not out.exists() and list(tmp_path.glob(".hf*")) == []  # no partial shards, no temp sibling
    assert cli.main(["export", "--run", str(run_dir), "--to-hf", str(out), "--max-shard-size", "4MB"]) == 0
    files = sorted(out.iterdir())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1 and (out / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}


def test_debug_divergence_is_one_line_naming_debug_lr(trained, home, capsys):
    assert cli.main(["debug", "-c", str(trained["config"]), "debug.lr=1e6", "debug.steps=8",
                     "train.clip_norm=null"]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "debug.lr" in err and "optim.lr" not in err


def test_internal_fault_is_one_line_exit_1_unless_traceback_asked(trained, home, monkeypatch, capsys):
    run_dir = home / "runs" / trained["run"]
    (run_dir / "config.yaml").write_text("data: [1, 2]\n")  # damaged by hand: reading the run fails
    assert cli.main(["generate", "--run", str(run_dir), "--prompt", "x"]) == 2
    _one_line(capsys.readouterr().err)
    monkeypatch.setattr("rafale.cli._cmd_runs", lambda *args: 1 / 0)
    assert cli.main(["runs"]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "ZeroDivisionError" in err and "RAFALE_TRACEBACK=1" in err
    monkeypatch.setenv("RAFALE_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["runs"])


# --- 9: labels ---------------------------------------------------------------------------------------

def test_labels_sparse_negative_or_mixed_are_refused():
    from rafale.data.classification import label_ids
    from rafale.errors import UserError

    for labels, message in [([0, 2_000_000, 0], "2,000,001 classes"), ([0, -1, 1], "negative"),
                            ([0, "pos", 1.0, True], "mix"), (["1", "7", "1"], "8 classes")]:
        with pytest.raises(UserError, match=message):
            label_ids(labels, [], "data")
    names, ids, _ = label_ids(["2", 0, 1], [], "data")  # TSV digit strings count as integers
    assert names == ["0", "1", "2"] and ids.tolist() == [2, 0, 1]
    assert label_ids([1, 3, 1], [], "data")[0] == ["0", "1", "2", "3"]  # a few unused ids are kept


# --- 10: small ones ----------------------------------------------------------------------------------

def test_config_and_command_line_mistakes_are_one_line(trained, home, tmp_path, capsys):
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    cases = [(["train", "-c", str(tmp_path / "dup.yaml")], "duplicate key 'lr'"),
             (["train", "-c", str(tmp_path / "empty.yaml")], "is empty"),
             (["train", "-c", str(trained["config"]), "--nproc", "0"], "--nproc"),
             (["train", "-c", str(trained["config"]), "DATA=1"], "environment variable"),
             (["trian", "-c", str(trained["config"])], "did you mean train"),
             ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in _one_line(capsys.readouterr().err), argv


def test_eval_says_when_the_data_changed_since_training(trained, home, tmp_path, capsys):
    cfg = yaml.safe_load(trained["config"].read_text())
    corpus = Path(cfg["data"]["train"])
    saved = corpus.read_text()
    try:
        corpus.write_text(saved[:-2000])
        assert cli.main(["eval", "--run", str(home / "runs" / trained["run"])]) == 0
        assert "data changed since training" in capsys.readouterr().err
    finally:
        corpus.write_text(saved)
