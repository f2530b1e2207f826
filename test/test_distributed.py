"""Real multi-process runs on CPU (gloo) through the CLI and Composer's launcher: DDP across two
"nodes" on loopback, FSDP2 with sharded checkpoints killed and resumed, and SIGTERM preemption.
Each compares its losses with a single-process run of the same config."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rafale.signals import PREEMPTED_EXIT_CODE
from test.conftest import REPO, run_cli

STEPS = 8


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    (root / "text.txt").write_text((REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:40_000])
    cfg = {"run": {"name": "dist", "seed": 5}, "model": {"preset": "pythia-micro"},
           "data": {"train": str(root / "text.txt"), "max_seq_len": 64, "val_fraction": 0.1},
           "optim": {"lr": 3e-3}, "schedule": {"warmup": "2ba"},
           "train": {"max_duration": f"{STEPS}ba", "global_batch_size": 8, "device_microbatch_size": 4,
                     "eval_interval": "4ba", "save_interval": "4ba"}}
    path = root / "dist.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference_losses(config, tmp_path_factory) -> dict[int, float]:
    home = tmp_path_factory.mktemp("ref")
    result = run_cli("train", "-c", str(config), home=home)
    assert result.returncode == 0, result.stderr
    return _losses(home)


def _run_dir(home: Path) -> Path:
    (run_dir,) = (home / "runs").iterdir()
    return run_dir


def _losses(home: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (_run_dir(home) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def _eval_steps(home: Path) -> list[int]:
    rows = [json.loads(x) for x in (_run_dir(home) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "metrics/eval/LanguageCrossEntropy" in r]


def _close(a: dict, b: dict, rel: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in a)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
    return env | {"RAFALE_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _wait_for_first_step(proc: subprocess.Popen, home: Path) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = next(home.glob("runs/*/metrics.jsonl"), None)
        if metrics is not None and metrics.stat().st_size > 0:
            return
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_loopback_nodes_matches_one_process(config, reference_losses, tmp_path):
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "rafale", "train", "-c", str(config), "train.parallelism.strategy=ddp",
         "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-port", str(port)],
        cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    losses = _losses(tmp_path)
    assert _close(losses, reference_losses), (losses, reference_losses)


def test_fsdp_sharded_checkpoint_survives_kill_and_resumes(config, reference_losses, tmp_path):
    args = [sys.executable, "-m", "rafale", "train", "-c", str(config), "train.parallelism.strategy=fsdp",
            "--nproc", "2"]
    # Killed hard (launcher and both ranks) once the first sharded checkpoint is complete.
    proc = subprocess.Popen(args, cwd=REPO, env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.exists() for p in tmp_path.glob("runs/*/checkpoints/latest-rank0.pt")):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = _run_dir(tmp_path)
    latest = (run_dir / "checkpoints" / "latest-rank0.pt").resolve()
    assert latest.is_dir() and list(latest.glob("*.distcp")), "expected a sharded checkpoint directory"
    assert max(_losses(tmp_path)) < STEPS, "the run finished before it could be killed"

    resumed = subprocess.run(args, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming interrupted run" in resumed.stdout
    assert _close(_losses(tmp_path), reference_losses)

    # The sharded checkpoint is consolidated for generation.
    gen = run_cli("generate", "--run", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "5", "--json",
                  home=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["output_ids"]) == 5


def test_sigterm_checkpoints_exits_75_and_relaunch_finishes_identically(config, reference_losses, tmp_path):
    args = [sys.executable, "-m", "rafale", "train", "-c", str(config), "train.save_interval=100ba"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_first_step(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "preempted" in err
    run_dir = _run_dir(tmp_path)
    stopped_at = json.loads((run_dir / "status.json").read_text())
    assert stopped_at["status"] == "preempted" and stopped_at["steps"] < STEPS
    # save_interval is 100ba, so this checkpoint exists only because of the signal.
    assert (run_dir / "checkpoints" / f"ep0-ba{stopped_at['steps']}-rank0.pt").is_file()

    resumed = subprocess.run(args, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming preempted run" in resumed.stdout
    assert _losses(tmp_path) == reference_losses  # same process count: bit for bit
    # No evaluation at the stop: only at the eval interval (4ba) and the end, as uninterrupted.
    assert _eval_steps(tmp_path) == [4, 8]


def test_sigterm_during_start_up_stops_at_the_first_step(config, tmp_path):
    """A signal before training starts (data, model, Trainer being built) neither kills the process
    (exit 143, which a job script cannot tell from a crash) nor is lost: the first step checkpoints."""
    proc = subprocess.Popen([sys.executable, "-m", "rafale", "train", "-c", str(config)], cwd=REPO,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = proc.stdout.readline()  # "new run: ...", printed before the model and Trainer are built
    assert first_line.startswith("new run"), first_line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    run_dir = _run_dir(tmp_path)
    assert json.loads((run_dir / "status.json").read_text())["steps"] == 1
    assert (run_dir / "checkpoints" / "ep0-ba1-rank0.pt").is_file()



def test_sigusr1_to_the_launching_process_preempts_every_rank(config, tmp_path):
    """A scheduler may signal only the main process: `rafale train --nproc 2` passes it to both ranks,
    which checkpoint at the same step and exit 75, and the launcher reports 75."""
    args = [sys.executable, "-m", "rafale", "train", "-c", str(config), "train.parallelism.strategy=ddp",
            "train.save_interval=100ba", "--nproc", "2"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_first_step(proc, tmp_path)
    proc.send_signal(signal.SIGUSR1)  # the launching process only, not its process group
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    run_dir = _run_dir(tmp_path)
    stopped_at = json.loads((run_dir / "status.json").read_text())
    assert stopped_at["status"] == "preempted" and stopped_at["steps"] < STEPS
    assert (run_dir / "checkpoints" / f"ep0-ba{stopped_at['steps']}-rank0.pt").is_file()
    # Both ranks stopped at that step: a 2-process checkpoint has each rank's RNG state.
    state = torch.load(run_dir / "checkpoints" / f"ep0-ba{stopped_at['steps']}-rank0.pt", weights_only=False)
    assert len(state["rng"]) == 2
    # (Resuming a multi-process run, losses against the single process: the FSDP kill test.)

def test_llama_style_decoder_trains_under_fsdp2_and_its_shards_load_back(config, tmp_path):
    args = ["train", "-c", str(config), "train.parallelism.strategy=fsdp", "model.preset=gpt-micro",
            "train.max_duration=4ba", "--nproc", "2"]
    result = run_cli(*args, home=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = _run_dir(tmp_path)
    assert (run_dir / "checkpoints" / "latest-rank0.pt").resolve().is_dir()
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    # Consolidated from the shards into the single-process model, then greedy decoding.
    gen = run_cli("generate", "--run", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "4", "--json",
                  home=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["output_ids"]) == 4



HSDP_PROBE = """
import json, sys
from composer import Trainer
from composer.utils import dist
from rafale import train
from rafale.build import network_for
from rafale.data.causal_lm import CausalLM
from rafale.task_model import TaskModel

network = network_for("causal_lm", "pythia-micro", vocab_size=128, overrides={"n_layers": 1})
model = TaskModel(network, CausalLM(CausalLM.Section()), {})
trainer = Trainer(model=model, parallelism_config={"fsdp": train._fsdp2_config(replicas=2)()}, device="cpu")
weight = trainer.state.model.model.embed_in.weight
with open(f"{sys.argv[1]}/rank{dist.get_global_rank()}.json", "w") as f:
    json.dump({"mesh": weight.device_mesh.mesh.tolist(), "names": list(weight.device_mesh.mesh_dim_names),
               "placements": [str(p) for p in weight.placements], "local_rows": weight.to_local().shape[0],
               "rows": weight.shape[0]}, f)
"""


def test_hsdp_builds_a_replicate_by_shard_mesh(tmp_path):
    """HSDP's layout on 4 processes: 2 replica groups, each sharding the weights over 2 processes.
    (Training under HSDP needs GPUs: torch's FSDP2 cannot run its backward on CPU processes.)"""
    probe = tmp_path / "probe.py"
    probe.write_text(HSDP_PROBE)
    result = subprocess.run([sys.executable, "-m", "composer.cli.launcher", "-n", "4", "--master_port",
                             str(_free_port()), str(probe), str(tmp_path)], cwd=REPO, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r in ranks:
        assert r["mesh"] == [[0, 1], [2, 3]]
        assert r["names"] == ["data_parallel_replicate", "data_parallel_shard"]
        assert r["placements"] == ["R", "S(0)"]  # replicated across groups, sharded on dim 0 within
        assert r["local_rows"] == r["rows"] // 2  # sharded over 2 processes, not 4
