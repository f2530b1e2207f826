"""Run directories: where a config's run lives, its status, the resume-or-refuse decision, and the
`Run` object through which generate, eval, export and `rafale runs` read a run.

    $RAFALE_HOME/runs/<run.name>-<config hash>[-N]/
        config.yaml      the resolved config
        status.json      {"status": running|completed|failed|interrupted|preempted, "pid", "host", ...}
        metrics.jsonl    one JSON object per logged step (Composer's metric names)
        checkpoints/     Composer checkpoints; `latest-rank0.pt` links the newest complete one

Same config + completed run -> refuse (FORCE=1 starts a fresh `-N` directory). Same config +
interrupted, preempted or failed run -> resume it: Composer's autoresume loads the latest checkpoint.
"""

import functools
import json
import os
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

from rafale.errors import UserError
from rafale.paths import runs_dir

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest-rank0.pt"  # rank 0's link to the newest complete checkpoint (file or sharded dir)
LATEST_PATTERN = "latest-rank{rank}.pt"  # Composer's per-rank name: one shared name lets ranks delete each other's
_CKPT_RE = re.compile(r"^ep(\d+)-ba(\d+)(-rank\d+\.pt)?$")  # a file, or a directory of FSDP shards


def read_status(run_dir: Path) -> dict:
    """status.json's fields; {} when it is missing or damaged (not a JSON object): such a run reads as
    `new` and the next train resumes it from its checkpoints."""
    try:
        status = json.loads((run_dir / STATUS_FILE).read_bytes())
    except (FileNotFoundError, ValueError):  # ValueError: not JSON, or not UTF-8
        return {}
    return status if isinstance(status, dict) else {}


def write_status(run_dir: Path, **fields) -> None:
    """Merges `fields` into status.json, atomically (a kill never leaves half a file)."""
    status = read_status(run_dir) | fields
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, run_dir / STATUS_FILE)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(status: dict) -> str:
    """'running' is only true while its process lives; a killed run reads as 'interrupted'."""
    state = status.get("status", "new")
    if not isinstance(state, str):
        return "new"
    if state == "running":
        same_host = status.get("host") == socket.gethostname()
        pid = status.get("pid")
        if same_host and not (isinstance(pid, int) and pid > 0 and _process_alive(pid)):
            return "interrupted"
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = run_dir / CHECKPOINTS / LATEST
    return link.resolve() if link.exists() else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be read back (truncated, not a checkpoint), or None. torch.save writes a
    zip archive with its directory at the end, so a cut-short file fails to open as one; this reads
    only that directory (milliseconds, whatever the size). FSDP shard directories are left to
    torch.distributed.checkpoint."""
    if ckpt.is_dir():
        return None
    try:
        with zipfile.ZipFile(ckpt) as archive:
            size = ckpt.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in archive.infolist()):
                return "truncated"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    return None


def drop_damaged_latest(run_dir: Path) -> list[str]:
    """Deletes a `latest` checkpoint that cannot be read back (a kill or a full disk mid-write on a
    filesystem that reordered the writes) and points `latest` at the newest good one before it, so
    autoresume resumes from there. Returns what it did, one line each."""
    said = []
    while (latest := latest_checkpoint(run_dir)) is not None and (problem := checkpoint_problem(latest)):
        link = run_dir / CHECKPOINTS / LATEST
        shutil.rmtree(latest) if latest.is_dir() else latest.unlink()
        link.unlink()
        earlier = sorted((int(m.group(2)), p) for p in latest.parent.glob("ep*-ba*")
                         if (m := _CKPT_RE.match(p.name)))
        if earlier:
            link.symlink_to(earlier[-1][1].name)  # relative, as Composer makes it
        said.append(f"checkpoint {latest.name} is damaged ({problem}); resuming from "
                    f"{earlier[-1][1].name if earlier else 'the start'}")
    return said


def discard_unfinished_checkpoints(run_dir: Path) -> list[Path]:
    """Deletes checkpoint files newer than the one `latest` points to.

    Composer writes a checkpoint file in place and moves the `latest` link only once the file is
    complete, so a file past `latest` is one a kill interrupted: never trusted, and removed so
    autoresume does not find it conflicting with the steps it is about to redo.
    """
    folder = run_dir / CHECKPOINTS
    latest = latest_checkpoint(run_dir)
    keep_upto = int(_CKPT_RE.match(latest.name).group(2)) if latest else -1
    removed = []
    for path in folder.glob("ep*-ba*") if folder.is_dir() else []:
        match = _CKPT_RE.match(path.name)
        if match and int(match.group(2)) > keep_upto:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def candidate_dirs(base: str) -> list[Path]:
    """`base`, `base-2`, `base-3`, ... that exist, oldest first."""
    root = runs_dir()
    found = [(1, root / base)] if (root / base).is_dir() else []
    for path in root.glob(f"{base}-*") if root.is_dir() else []:
        suffix = path.name[len(base) + 1:]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def choose_run_dir(base: str, force: bool) -> tuple[Path, str]:
    """Returns (run_dir, why): a new directory, or the interrupted run to resume.

    Raises UserError when the same config already completed (unless `force`) or is running now.
    """
    existing = candidate_dirs(base)
    if existing:
        last = existing[-1]
        state = effective_status(read_status(last))
        if state == "running":
            raise UserError(f"run {last.name} is already running (pid {read_status(last).get('pid')}); "
                            f"wait for it or stop it first")
        if state in ("interrupted", "preempted", "failed", "new"):
            return last, f"resuming {state} run"
        if state == "completed" and not force:
            raise UserError(f"run {last.name} already completed with this config ({last}); "
                            f"FORCE=1 trains again in a fresh run directory, or change the config")
        n = 1 + max(int(p.name[len(base) + 1:]) if p.name != base else 1 for p in existing)
        return runs_dir() / f"{base}-{n}", "new run (FORCE=1)"
    return runs_dir() / base, "new run"


def last_metrics(run_dir: Path) -> dict:
    """The last line of metrics.jsonl that carries a training loss."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    for record in read_metrics(path, reverse=True):
        if "loss/train/total" in record:
            return record
    return {}


def read_metrics(path: Path, reverse: bool = False) -> list[dict]:
    """metrics.jsonl's records; a line that does not parse (one a full disk or a kill cut short) is
    skipped: it never blocks a resume or a listing."""
    records = []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines) if reverse else lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class Run:
    """A run directory as the commands that read it see it: its config, status, checkpoints, metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    @classmethod
    def open(cls, path: str | Path, where: str = "--run") -> "Run":
        run = cls(path)
        if not (run.path / CONFIG_FILE).is_file():
            raise UserError(f"{where} {path}: not a run directory (no {CONFIG_FILE}); `rafale runs` lists them")
        return run

    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def config(self):
        from rafale.config import load_saved_config

        return load_saved_config(self.path / CONFIG_FILE)

    @property
    def status(self) -> str:
        return effective_status(read_status(self.path))

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def require_checkpoint(self, where: str = "--run") -> Path:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise UserError(f"{where} {self.path}: no checkpoint yet; train longer than train.save_interval "
                            f"({self.config.train.save_interval}) or until the run completes")
        if problem := checkpoint_problem(ckpt):
            raise UserError(damaged_checkpoint(ckpt, problem))
        return ckpt

    def last_metrics(self) -> dict:
        return last_metrics(self.path)


def damaged_checkpoint(ckpt: Path, problem: str) -> str:
    return (f"checkpoint {ckpt} is damaged ({problem}); `rafale train` with the run's config resumes it "
            f"from the last good checkpoint")


def list_runs() -> list[dict]:
    rows = []
    root = runs_dir()
    for run_dir in sorted(root.iterdir() if root.is_dir() else [], key=lambda p: p.stat().st_mtime):
        if not (run_dir / CONFIG_FILE).is_file():
            continue
        run = Run(run_dir)
        metrics = run.last_metrics()
        rows.append({"name": run.name, "status": run.status, "steps": metrics.get("step"),
                     "loss": metrics.get("loss/train/total"), "path": str(run.path)})
    return rows


def mark_started(run_dir: Path, config_hash: str) -> None:
    write_status(run_dir, status="running", pid=os.getpid(), host=socket.gethostname(),
                 config_hash=config_hash, started=time.strftime("%Y-%m-%dT%H:%M:%S"), ended=None)


def mark_ended(run_dir: Path, state: str, **fields) -> None:
    write_status(run_dir, status=state, ended=time.strftime("%Y-%m-%dT%H:%M:%S"), **fields)
