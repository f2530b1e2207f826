"""`rafale prepare --to-mds` and `data.streaming`: the MDS shards hold the cache's blocks token for token,
two real processes see every block exactly once an epoch (the same blocks the cache trains on), a killed streaming run resumes bit for bit,
and bad input is one line with exit code 2."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from streaming import StreamingDataset

from test.conftest import REPO, run_cli

# Records every row each rank trains on (RECORD_DIR/rank<R>.txt) and, with KILL_AT, dies with SIGKILL
# after that step: a crash between two checkpoints.
CALLBACK = '''
import os, signal
from composer.core import Callback

class Record(Callback):
    def batch_start(self, state, logger):
        with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ.get('RANK', '0')}.txt"), "a") as f:
            for row in state.batch["input_ids"].tolist():
                f.write(" ".join(map(str, row)) + "\\n")

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == int(os.environ.get("KILL_AT", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    text = (REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()
    (root / "a.txt").write_text(text[:6_600])
    (root / "b.txt").write_text(text[6_600:9_600])
    (root / "record.py").write_text(CALLBACK)
    cfg = {"run": {"name": "st", "seed": 3}, "model": {"preset": "pythia-micro"},
           "data": {"train": str(root / "a.txt"), "tokenizer": "tinyshakespeare-bpe-4096", "max_seq_len": 32,
                    "val_fraction": 0.11},
           "schedule": {"warmup": "1ba"},
           "train": {"max_duration": "6ba", "global_batch_size": 8, "device_microbatch_size": 8,
                     "eval_interval": "3ba", "save_interval": "2ba",
                     "callbacks": [{"class": str(root / "record.py") + ":Record"}]},
           "monitor": {"progress": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    home = root / "home"
    result = run_cli("prepare", "-c", str(root / "cfg.yaml"), "--to-mds", str(root / "mds"), home=home)
    assert result.returncode == 0, result.stderr
    entry = Path(result.stdout.split(": ", 1)[1].splitlines()[0])
    return {"root": root, "config": root / "cfg.yaml", "home": home, "mds": root / "mds", "entry": entry}


def _mds_rows(directory: Path) -> np.ndarray:
    ds = StreamingDataset(local=str(directory), shuffle=False, batch_size=1)
    return np.stack([ds[i]["input_ids"] for i in range(ds.num_samples)])


def _recorded(record_dir: Path) -> dict[str, list[tuple]]:
    return {p.stem: [tuple(map(int, line.split())) for line in p.read_text().splitlines()]
            for p in sorted(record_dir.glob("rank*.txt"))}


def _losses(home: Path) -> dict[int, float]:
    (run_dir,) = (home / "runs").iterdir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def test_mds_shards_hold_exactly_the_cache_blocks(prepared):
    for split in ("train", "val"):
        cached = np.load(prepared["entry"] / f"{split}.npy")
        mds = _mds_rows(prepared["mds"] / split)
        assert mds.dtype == cached.dtype and mds.shape == cached.shape
        assert np.array_equal(mds, cached)
    meta = json.loads((prepared["mds"] / "rafale-meta.json").read_text())
    assert meta["stats"]["train_blocks"] == len(np.load(prepared["entry"] / "train.npy"))


def test_a_mixture_writes_one_mds_directory_per_source(prepared, tmp_path):
    mix = f"data.train=[{{path: {prepared['root'] / 'a.txt'}, weight: 0.7}}, {{path: {prepared['root'] / 'b.txt'}, weight: 0.3}}]"
    result = run_cli("prepare", "-c", str(prepared["config"]), mix, "--to-mds", str(tmp_path / "mds"),
                     home=prepared["home"])
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "mds/rafale-meta.json").read_text())
    for i, (source, name) in enumerate(zip(meta["mixture"], ("a.txt", "b.txt"))):
        cached = np.load(Path(source["entry"]) / "train.npy")  # the source's own blocks, not the drawn ones
        assert np.array_equal(_mds_rows(tmp_path / f"mds/train/{i}-{name}"), cached)


def test_two_processes_see_every_block_once_an_epoch_and_resume_mid_epoch_bit_for_bit(prepared, tmp_path):
    """Two DDP processes over the MDS shards, a local directory as the remote: an uninterrupted epoch
    gives each rank half of the blocks, every block once; a run killed with SIGKILL after step 3
    resumes from step 2's checkpoint, mid-epoch, with the same losses bit for bit and each rank
    re-reading exactly the rows after the checkpoint."""
    blocks = np.load(prepared["entry"] / "train.npy")
    n = len(blocks)
    gbs = next(g for g in (8, 6, 4, 2) if n % g == 0)  # an epoch of whole batches: nothing dropped or padded
    assert n // gbs >= 4  # the kill after step 3 lands mid-epoch, after step 2's checkpoint
    args = ("train", "-c", str(prepared["config"]), f"data.streaming.remote={prepared['mds']}",
            "train.parallelism.strategy=ddp", "train.max_duration=1ep", f"train.global_batch_size={gbs}",
            f"train.device_microbatch_size={gbs // 2}")
    (tmp_path / "ref").mkdir()
    reference = run_cli(*args, f"data.streaming.local={tmp_path / 'ref-local'}", "--nproc", "2", home=tmp_path / "ref-home",
                        env={"RECORD_DIR": str(tmp_path / "ref")})
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = _recorded(tmp_path / "ref")
    assert sorted(ref) == ["rank0", "rank1"] and len(ref["rank0"]) == len(ref["rank1"]) == n // 2
    assert sorted(ref["rank0"] + ref["rank1"]) == sorted(map(tuple, blocks.tolist()))
    assert ref["rank0"] + ref["rank1"] != list(map(tuple, blocks.tolist()))  # shuffled

    (tmp_path / "cut").mkdir()
    run = (*args, f"data.streaming.local={tmp_path / 'local'}", "--nproc", "2")
    killed = run_cli(*run, home=tmp_path / "home", env={"RECORD_DIR": str(tmp_path / "cut"), "KILL_AT": "3"})
    assert killed.returncode != 0
    resumed = run_cli(*run, home=tmp_path / "home", env={"RECORD_DIR": str(tmp_path / "cut")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming interrupted run" in resumed.stdout
    assert _losses(tmp_path / "home") == _losses(tmp_path / "ref-home")  # same process count: bit for bit
    rows = gbs // 2  # per rank and step
    for rank, cut in _recorded(tmp_path / "cut").items():  # steps 1-3, then 3 to the end again from step 2
        assert cut == ref[rank][:3 * rows] + ref[rank][2 * rows:], rank


def test_a_missing_remote_exits_2_naming_the_key(prepared, tmp_path):
    result = run_cli("train", "-c", str(prepared["config"]), f"data.streaming.remote={tmp_path / 'missing'}",
                     home=tmp_path / "home")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rafale: error: data.streaming.remote:") and "no such directory" in line and "--to-mds" in line
    assert not (tmp_path / "home" / "runs").exists()


def test_without_the_package_streaming_exits_2_with_the_install_line(prepared, tmp_path):
    # A `streaming` module that fails to import, first on the path: the package as if not installed.
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "streaming.py").write_text("raise ImportError('No module named streaming')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)])}
    result = run_cli("train", "-c", str(prepared["config"]), f"data.streaming.remote={prepared['mds']}",
                     home=tmp_path / "home", env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rafale: error: data.streaming") and "pip install 'rafale[streaming]'" in line, line
    assert run_cli("--help", home=tmp_path / "home", env=env).returncode == 0  # the rest does not need it
