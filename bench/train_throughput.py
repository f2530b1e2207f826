"""Training step throughput (tokens/s, steady state) and peak RSS, rafale against bare loops.

Same model shape (pythia-tiny: 4 layers, d_model 128, 4 heads, vocab 50304), batch, sequence length
(256), fp32, AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0,
a per-step LR schedule, the same cached Tiny Shakespeare blocks in the same order (Composer's
sampler is torch's DistributedSampler: randperm seeded with the run seed). Each side runs in its own
process; a step is timed from the end of the previous one, data loading included, and the first
`warmup` steps are skipped. Peak RSS is the process's at the end of the last timed step.

Sides:
  rafale      `rafale.train.train(cfg)`, the function `rafale train -c pythia-tinyshakespeare` runs (run
              directory, metrics.jsonl, progress, Composer's Trainer), eval and checkpoint intervals
              past the timed window (both still run once at the end, untimed)
  bare        a plain PyTorch loop around rafale's `Decoder` with rafale's kernels (the fused head+loss,
              torch's fused AdamW): the ceiling, zero framework overhead
  bare-ce     the same loop written the textbook way: logits, then F.cross_entropy; torch's default AdamW
  hf          a plain loop around transformers' GPTNeoXForCausalLM of the same shape (use_cache=False,
              SDPA attention, loss from `labels`), fused AdamW
  hf-trainer  transformers' Trainer on that model, optim adamw_torch_fused (needs `accelerate`;
              skipped when missing)

    python bench/train_throughput.py --side bare --batch 8 --warmup 2 --steps 6   # one measurement
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIG = "pythia-tinyshakespeare"
# The bundled config as this workload has always measured it: GPT-NeoX's tokenizer, a 50,304-row head
# (the config itself now trains a 4,096-token BPE of the corpus; bench/tiny_train.py has small heads).
OVERRIDES = ["data.tokenizer=gpt-neox-20b"]
SEQ = 256
SEED = 17
LR, BETAS, EPS, WD, CLIP = 2e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
SIDES = ("rafale", "bare", "bare-ce", "hf", "hf-trainer")


def prepare_home(home: Path, config: str = CONFIG, overrides: list[str] = OVERRIDES) -> Path:
    """Builds a config's data cache under `home` (by default this workload's); returns its train.npy."""
    os.environ["RAFALE_HOME"] = str(home)
    from rafale.config import load_config
    from rafale.build import build_data

    return build_data(load_config(config, overrides)).path / "train.npy"


class StepClock:
    """Step end times and the peak RSS at the last timed step."""

    def __init__(self, total: int):
        self.total, self.ends, self.cpu, self.rss = total, [], [], None

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())  # CPU seconds too: on a shared machine wall time is noise
        if len(self.ends) == self.total:
            self.rss = common.peak_rss_mb()

    def result(self, warmup: int, batch: int, side: str, seq: int = SEQ) -> dict:
        import torch

        # Step i (1-based) took ends[i-1] - ends[i-2]; the first timed one is warmup + 1.
        times = [b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:])]
        step = common.median(times)
        cpu = common.median(b - a for a, b in zip(self.cpu[warmup - 1:], self.cpu[warmup:]))
        return {"side": side, "step_s": step, "tokens_per_s": batch * seq / step, "step_times": times,
                "cpu_step_s": cpu,
                "peak_rss_mb": self.rss, "torch_threads": torch.get_num_threads()}


def cosine_lambda(total: int):
    warm = max(1, round(0.05 * total))
    return lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))


def batches(train_npy: Path, batch: int):
    """The rafale side's batches, in its order: DistributedSampler(shuffle, seed) on one rank."""
    import numpy as np
    import torch

    blocks = np.load(train_npy, mmap_mode="r")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(SEED)).tolist()
    for i in range(0, len(order) - batch + 1, batch):
        yield torch.from_numpy(blocks[order[i:i + batch]].astype(np.int64))


def bare_loop(side: str, train_npy: Path, batch: int, warmup: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    total = warmup + steps
    torch.manual_seed(SEED)
    if side == "hf":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        from rafale.models import preset_config as get_preset
        from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG

        cfg = get_preset("pythia-tiny")
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**{hf: getattr(cfg, ours) for ours, hf in GPT_NEOX_CONFIG.items()},
                                                 attention_dropout=0.0, hidden_dropout=0.0, use_cache=False))
    else:
        from rafale.models import preset_config as get_preset
        from rafale.models.decoder import Decoder

        model = Decoder(get_preset("pythia-tiny"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # rafale's optimizer is torch's fused AdamW; the textbook loop keeps torch's default.
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, fused=side != "bare-ce")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))
    clock = StepClock(total)
    for step, x in zip(range(total), batches(train_npy, batch)):
        targets = F.pad(x[:, 1:], (0, 1), value=-100)
        if side == "hf":
            loss = model(input_ids=x, labels=x).loss
        elif side == "bare-ce":
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        else:
            loss = model(x, targets=targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock.tick()
    return clock.result(warmup, batch, side)


def rafale_run(home: Path, batch: int, warmup: int, steps: int, config: str = CONFIG,
               overrides: list[str] = OVERRIDES) -> dict:
    from composer.core import Callback

    import rafale.train
    from rafale.cli import _quiet_libraries
    from rafale.config import load_config

    _quiet_libraries()
    total = warmup + steps
    clock = StepClock(total)

    class Clock(Callback):
        def batch_end(self, state, logger):
            clock.tick()

    build = rafale.train.build_trainer

    def build_with_clock(*args, extra_callbacks=(), **kwargs):
        return build(*args, extra_callbacks=[*extra_callbacks, Clock()], **kwargs)

    rafale.train.build_trainer = build_with_clock
    far = "1000000ba"
    cfg = load_config(config, [*overrides, f"train.max_duration={total}ba", f"train.global_batch_size={batch}",
                               f"train.device_microbatch_size={batch}", f"train.eval_interval={far}",
                               f"train.save_interval={far}", "run.name=bench"])
    rafale.train.train(cfg)
    return clock.result(warmup, batch, "rafale", cfg.data.max_seq_len)


def hf_trainer(train_npy: Path, batch: int, warmup: int, steps: int, out: Path) -> dict:
    import numpy as np
    import torch
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainerCallback,
                              TrainingArguments)

    from rafale.models import preset_config as get_preset
    from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG

    total = warmup + steps
    torch.manual_seed(SEED)
    cfg = get_preset("pythia-tiny")
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{hf: getattr(cfg, ours) for ours, hf in GPT_NEOX_CONFIG.items()},
                                             attention_dropout=0.0, hidden_dropout=0.0, use_cache=False))
    blocks = np.load(train_npy, mmap_mode="r")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            x = torch.from_numpy(blocks[i].astype(np.int64))
            return {"input_ids": x, "labels": x}

    clock = StepClock(total)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=total,
                             learning_rate=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                             adam_epsilon=EPS, max_grad_norm=CLIP, lr_scheduler_type="cosine",
                             warmup_ratio=0.05, logging_strategy="no", save_strategy="no", report_to=[],
                             optim="adamw_torch_fused", use_cpu=True, dataloader_num_workers=0, seed=SEED,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    return clock.result(warmup, batch, "hf-trainer")


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--home", required=True, help="a RAFALE_HOME whose data/ holds the prepared cache")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    assert a.warmup >= 1
    shared = Path(a.home)
    with tempfile.TemporaryDirectory(prefix="rafale-bench-") as tmp:
        # A fresh RAFALE_HOME per run (no earlier runs to resume) sharing the prepared data cache.
        home = Path(tmp)
        (home / "data").symlink_to(shared / "data")
        os.environ["RAFALE_HOME"] = str(home)
        train_npy = prepare_home(home)
        if a.side == "rafale":
            result = rafale_run(home, a.batch, a.warmup, a.steps)
        elif a.side == "hf-trainer":
            result = hf_trainer(train_npy, a.batch, a.warmup, a.steps, home / "hf-out")
        else:
            result = bare_loop(a.side, train_npy, a.batch, a.warmup, a.steps)
    common.emit(result)


def run(quick: bool, log=print) -> list[dict]:
    batch = 8
    warmup, steps, reps = (2, 3, 2) if quick else (2, 8, 3)
    sides = ["rafale", "bare", "bare-ce", "hf"]
    try:
        import accelerate  # noqa: F401  transformers' Trainer needs it
        sides.append("hf-trainer")
    except ImportError:
        log("  (hf-trainer skipped: pip install accelerate to include transformers' Trainer)")
    home = Path(tempfile.mkdtemp(prefix="rafale-bench-home-"))
    try:
        prepare_home(home)
        args = ["--home", str(home), "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps)]
        runs = common.interleave({s: (lambda s=s: common.run_worker("train_throughput.py", ["--side", s, *args]))
                                  for s in sides}, reps, log=log)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    tps = {s: common.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    rss = {s: common.median(r["peak_rss_mb"] for r in rs) for s, rs in runs.items()}
    shape = f"pythia-tiny, {batch}x{SEQ} tokens, fp32"
    labels = {"bare": "bare loop, rafale Decoder + same kernels", "bare-ce": "textbook loop, logits + F.cross_entropy",
              "hf": "bare loop, HF GPTNeoX", "hf-trainer": "HF Trainer, GPTNeoX"}
    goals = {"bare": ">= 0.97", "hf": ">= 1.05"}
    rows = []
    for s in sides[1:]:
        rows.append(common.row(f"train step ({shape})", "tokens/s", tps["rafale"], labels[s], tps[s], goals.get(s, ""),
                               runs={"rafale": runs["rafale"], s: runs[s]}))
    for s in sides[1:]:
        rows.append(common.row(f"train peak RSS ({shape})", "MB", rss["rafale"], labels[s], rss[s],
                               "<= 0.6" if s == "hf" else "", higher_is_better=False))
    return rows


if __name__ == "__main__":
    worker(sys.argv[1:])
