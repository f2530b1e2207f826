"""Observability: every logger chosen in `monitor.loggers` receives the losses metrics.jsonl holds
(read back with each tool's own reader), memory is logged, the profiler writes a trace, and the
loss guard stops a run on a spike or a non-finite loss."""

import glob
import json
import math

import pytest
import torch
import yaml
from composer.core import State, Timestamp
from composer.devices import DeviceCPU

from rafale.config import from_dict
from rafale.errors import UserError
from rafale.monitoring import Diverged, LossGuard
from test.conftest import REPO, run_cli

STEPS = 6


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """One CLI run with every logger, memory logging and a 2-step profile."""
    root = tmp_path_factory.mktemp("mon")
    (root / "text.txt").write_text((REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:20_000])
    cfg = {"run": {"name": "mon", "seed": 3}, "model": {"preset": "pythia-micro", "n_layers": 1},
           "data": {"train": str(root / "text.txt"), "max_seq_len": 32, "val_fraction": 0.0},
           "train": {"max_duration": f"{STEPS}ba", "global_batch_size": 4, "device_microbatch_size": 4},
           "monitor": {"loggers": ["console", "file", "tensorboard", "wandb", "mlflow"], "console_interval": "1ba",
                       "memory": True, "profile_steps": 2}}
    path = root / "mon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    home = root / "home"
    result = run_cli("train", "-c", str(path), home=home)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (home / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run_dir, rows, losses, result.stdout


def _by_order(values) -> list[float]:
    return [v for _, v in sorted(values)]


def test_tensorboard_holds_the_losses(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, losses, _ = monitored_run
    scalars = []
    for events in glob.glob(str(run_dir / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        if "loss/train/total" in acc.Tags()["scalars"]:
            scalars += [(e.step, e.value) for e in acc.Scalars("loss/train/total")]
    assert _by_order(scalars) == pytest.approx(_by_order(losses.items()), rel=1e-6)


def test_mlflow_local_store_holds_the_losses(monitored_run):
    from mlflow import MlflowClient

    run_dir, _, losses, _ = monitored_run
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "mon"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name
    history = client.get_metric_history(run.info.run_id, "loss/train/total")
    assert _by_order((m.step, m.value) for m in history) == pytest.approx(_by_order(losses.items()), rel=1e-6)


def test_wandb_offline_run_holds_the_losses(monitored_run):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    run_dir, _, losses, _ = monitored_run
    (run_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(run_file)
    logged = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "loss/train/total" in items:
                logged.append((items["_step"], items["loss/train/total"]))
    assert _by_order(logged) == pytest.approx(_by_order(losses.items()), rel=1e-6)


def test_console_and_file_loggers_print_each_step(monitored_run):
    run_dir, _, losses, stdout = monitored_run
    printed = [f"loss/train/total: {loss:.4f}" for loss in losses.values()]
    assert all(line in stdout for line in printed), stdout[-2000:]
    (log,) = (run_dir / "logs").glob("*-rank0.txt")
    text = log.read_text()
    assert all(line in text for line in printed)


def test_memory_is_logged_every_step(monitored_run):
    _, rows, _, _ = monitored_run
    peaks = [r["memory/peak_rss_mb"] for r in rows if "memory/peak_rss_mb" in r]
    assert len(peaks) == STEPS
    assert peaks == sorted(peaks)  # a peak never falls
    assert peaks[0] > 200  # torch, Composer and the model are resident: hundreds of MB at least


def test_profiler_traces_the_requested_steps(monitored_run):
    run_dir, _, _, _ = monitored_run
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    ops = {e.get("name") for e in events}
    assert "aten::mm" in ops or "aten::addmm" in ops  # the model's matmuls were recorded
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert len(steps) == 2, steps


def _guard_state() -> State:
    return State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="g", device=DeviceCPU(), max_duration="100ba")


def _feed(guard: LossGuard, state: State, losses: list[float], start: int = 0) -> int:
    """Feeds losses as Composer does at the end of each step; returns the step that raised, or -1."""
    for i, loss in enumerate(losses, start=start + 1):
        state.timestamp = Timestamp(batch=i)
        state.total_loss_dict = {"loss/train/total": loss}
        try:
            guard.batch_end(state, logger=None)
        except Diverged:
            return i
    return -1


def test_loss_guard_stops_on_a_sustained_spike_only():
    state = _guard_state()
    calm = [3.0, 2.9, 3.1, 2.8, 3.0]
    # One step over 2x the median (3.0) is tolerated and kept out of the window; three in a row stop.
    assert _feed(LossGuard(2.0, window=5, patience=3), state, calm + [7.0, 3.0, 6.1, 6.2, 2.9]) == -1
    assert _feed(LossGuard(2.0, window=5, patience=3), state, calm + [6.1, 6.2, 6.3, 3.0]) == 8
    # Before `window` steps of history nothing counts as a spike (the first steps fall fast).
    assert _feed(LossGuard(2.0, window=5, patience=1), state, [10.0, 25.0, 30.0]) == -1
    assert _feed(LossGuard(None), state, [3.0, 300.0, 3000.0]) == -1  # off by default
    assert _feed(LossGuard(None), state, [3.0, math.inf]) == 2
    assert _feed(LossGuard(None), state, [3.0, 2.0, math.nan]) == 3


def test_loss_guard_resumes_from_its_checkpointed_history():
    state = _guard_state()
    losses = [3.0, 2.9, 3.1, 2.8, 3.0, 6.1, 6.2, 6.3]
    first = LossGuard(2.0, window=5, patience=3)
    assert _feed(first, state, losses[:6]) == -1  # interrupted after one spiking step
    resumed = LossGuard(2.0, window=5, patience=3)
    resumed.load_state_dict(first.state_dict())
    assert _feed(resumed, state, losses[6:], start=6) == 8  # same step as an uninterrupted run


def test_bad_monitor_settings_are_user_errors():
    with pytest.raises(UserError, match=r"monitor.loggers: unknown \['tensorbord'\]"):
        from_dict({"monitor": {"loggers": ["tensorbord"]}})
    with pytest.raises(UserError, match="monitor.loss_spike_factor: must be > 1"):
        from_dict({"monitor": {"loss_spike_factor": 0.5}})
    with pytest.raises(UserError, match="monitor.console_interval"):
        from_dict({"monitor": {"console_interval": "0.1dur"}})
    # What a run reports does not change its numbers, so it does not change the run directory.
    assert from_dict({"monitor": {"loggers": ["tensorboard"], "memory": True}}).hash() == from_dict({}).hash()
