"""Start-up: `rafale --help` wall time, and the time from launching `rafale train -c
pythia-tinyshakespeare` to the end of its first training step.

  --help       rafale's console script against `composer --help` (the launcher of the stack rafale is
               built on) and `python -c pass` (the interpreter alone: the floor)
  first step   `rafale train -c pythia-tinyshakespeare data.tokenizer=gpt-neox-20b train.max_duration=1ba`
               (the bundled config as train_throughput.py measures it), in the training install
               (cpu-requirements.txt alone, README's first command: a venv made on first use under
               $RAFALE_BENCH_RUNTIME_VENV, default ~/.cache/rafale-bench/runtime-venv) and in this
               interpreter's install (the test install, with dev-requirements.txt's extras), in a fresh RAFALE_HOME
               whose data cache is already built (data preparation has its own benchmark), timed from
               launch until the step's line lands in metrics.jsonl; against a bare script that
               imports torch and rafale's Decoder, loads the same cached blocks and takes one AdamW
               step on a batch of the same size (16 x 256), and the same script on transformers'
               GPTNeoXForCausalLM. Launch to the step's end, imports included, on every side.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BIN = Path(common.PYTHON).parent
RUNTIME_VENV = Path(os.environ.get("RAFALE_BENCH_RUNTIME_VENV", Path.home() / ".cache/rafale-bench/runtime-venv"))
from train_throughput import CONFIG, OVERRIDES  # noqa: E402  the same workload: GPT-NeoX tokens, 50,304-row head
BATCH = 16  # the bundled config's global_batch_size
STEP_DONE = "first step done"

# The bare first step: imports, cached blocks, model, one AdamW step, then a line on stdout.
BARE_STEP = """
import sys, numpy as np, torch, torch.nn.functional as F
side, npy, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(17)
if side == "hf":
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from rafale.models import preset_config as get_preset
    from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG
    cfg = get_preset("pythia-tiny")
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{h: getattr(cfg, o) for o, h in GPT_NEOX_CONFIG.items()}, use_cache=False))
else:
    from rafale.models import preset_config as get_preset
    from rafale.models.decoder import Decoder
    model = Decoder(get_preset("pythia-tiny"))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
x = torch.from_numpy(np.load(npy, mmap_mode="r")[:batch].astype(np.int64))
if side == "hf":
    loss = model(input_ids=x, labels=x).loss
else:
    loss = F.cross_entropy(model(x).flatten(0, 1), F.pad(x[:, 1:], (0, 1), value=-100).flatten())
loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); loss.item()
print("%s", flush=True)
""" % STEP_DONE


def wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def runtime_bin() -> Path:
    """bin/ of a venv holding cpu-requirements.txt and this checkout (editable), made on first use. The
    launch a user of the training install sees: the test install's extras (transformers, scikit-learn,
    scipy, matplotlib) are imported by torchmetrics at Composer's import whenever they are installed."""
    bin_dir, done = RUNTIME_VENV / "bin", RUNTIME_VENV / "rafale-bench-installed"
    if not done.exists() or done.read_text() != str(common.REPO):
        subprocess.run([sys.executable, "-m", "venv", str(RUNTIME_VENV)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "-r", str(common.REPO / "cpu-requirements.txt"),
                        "-e", str(common.REPO)], check=True)
        done.write_text(str(common.REPO))  # only a finished install is reused
    return bin_dir


def rafale_first_step(shared_data: Path, bin_dir: Path = BIN) -> float:
    with tempfile.TemporaryDirectory(prefix="rafale-bench-start-") as tmp:
        home = Path(tmp)
        shutil.copytree(shared_data, home / "data")
        env = dict(os.environ, RAFALE_HOME=str(home))
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(bin_dir / "rafale"), "train", "-c", CONFIG, *OVERRIDES,
                                 "train.max_duration=1ba"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        first = None
        while first is None:
            if any(p.stat().st_size for p in (home / "runs").glob("*/metrics.jsonl")):
                first = time.perf_counter() - t0
            elif proc.poll() is not None:
                raise RuntimeError(f"rafale train exited {proc.returncode} before its first step")
            else:
                time.sleep(0.005)
        proc.wait()  # it still evaluates and saves its final checkpoint: not part of the figure
        return first


def bare_first_step(side: str, train_npy: Path, python: str = common.PYTHON) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, "-c", BARE_STEP, side, str(train_npy), str(BATCH)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=common.REPO)
    for line in proc.stdout:
        if line.strip() == STEP_DONE:
            elapsed = time.perf_counter() - t0
            proc.wait()
            return elapsed
    raise RuntimeError(f"the bare {side} step exited {proc.wait()} without finishing")


def run(quick: bool, log=print) -> list[dict]:
    reps = 5 if quick else 10
    helps = common.interleave({
        "rafale": lambda: wall([str(BIN / "rafale"), "--help"]),
        "composer": lambda: wall([str(BIN / "composer"), "--help"]),
        "python": lambda: wall([common.PYTHON, "-c", "pass"]),
    }, reps, log=lambda *_: None)
    h = {k: common.median(v) for k, v in helps.items()}
    log(f"    --help: rafale {h['rafale']:.3f}s, composer {h['composer']:.3f}s, python -c pass {h['python']:.3f}s")

    home = Path(tempfile.mkdtemp(prefix="rafale-bench-home-"))
    try:
        from train_throughput import prepare_home

        train_npy = prepare_home(home)
        lean = runtime_bin()
        steps = common.interleave({
            "rafale": lambda: rafale_first_step(home / "data", lean),
            "rafale-dev": lambda: rafale_first_step(home / "data"),
            "bare": lambda: bare_first_step("bare", train_npy, str(lean / "python")),
            "hf": lambda: bare_first_step("hf", train_npy),  # transformers: the test install
        }, 2 if quick else 5, log=log)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    s = {k: common.median(v) for k, v in steps.items()}
    first = f"launch to first train step ({BATCH}x256, warm data cache)"
    return [common.row("rafale --help", "s", h["rafale"], "composer --help", h["composer"], "< 0.5 s",
                       higher_is_better=False, runs=helps),
            common.row("rafale --help", "s", h["rafale"], "python -c pass (floor)", h["python"], "",
                       higher_is_better=False),
            common.row(first, "s", s["rafale"], "bare script, rafale Decoder", s["bare"], "<= 1.3",
                       higher_is_better=False, runs=steps),
            common.row(first, "s", s["rafale"], "bare script, HF GPTNeoX", s["hf"], "", higher_is_better=False),
            common.row(first + ", test install", "s", s["rafale-dev"], "bare script, rafale Decoder", s["bare"],
                       "", higher_is_better=False)]


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r["workload"], r["alternative"], f"{r['rafale']:.3f} vs {r['alt']:.3f}")
