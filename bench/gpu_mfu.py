"""GPU training throughput and MFU of rafale's train path: Pythia-410M and the Llama-style 1B preset
under bf16 autocast, SDPA attention, FSDP2 and torch.compile. The reference is llm-foundry's
published table: 41.8% MFU for a 1B model at sequence 2048 on H100 (bf16, FSDP, flash attention).

The model, data, optimizer, scheduler and Trainer are built by the same functions `rafale train`
uses (rafale.build.build_*, rafale.train.build_trainer), with no run directory (no checkpoint or metrics file to write, as in
llm-foundry's throughput table). A step is timed from the end of the previous one, data loading
included, after `--warmup` steps (compilation and the allocator's warm-up); the median is quoted.
MFU = the model's `flops_per_batch` (6 x parameters x tokens plus attention, the PaLM formula
llm-foundry uses) x processes / step time / the GPU's dense bf16 peak from Composer's table
(989 TFLOP/s for H100 SXM).

    python bench/gpu_mfu.py                              # every GPU of this machine, both presets
    python bench/gpu_mfu.py --presets gpt-1b --micro 4   # one preset, a smaller micro-batch
    python bench/gpu_mfu.py --cpu-check                  # the same path on a tiny model on CPU (plumbing only)

Several GPUs: it starts itself through `rafale train`'s launcher (`--nproc`, default all GPUs).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REFERENCE_MFU = 0.418  # llm-foundry, 1B, seq 2048, H100, bf16
CORPUS = "tinystories/tinystories_train_2MiB.txt"  # bundled; cycled over as many epochs as needed
TOKENIZERS = {"pythia": "gpt-neox-20b", "gpt": "smollm2"}


def config(preset: str, seq: int, micro: int, world: int, steps: int, cpu_check: bool):
    from rafale.config import from_dict

    family = preset.split("-")[0]
    return from_dict({
        "run": {"name": f"mfu-{preset}", "seed": 17},
        "model": {"preset": preset, "max_seq_len": seq},
        "data": {"train": CORPUS, "tokenizer": TOKENIZERS[family], "max_seq_len": seq, "val_fraction": 0.0,
                 "doc_separator": "<|endoftext|>"},
        "optim": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1},
        "schedule": {"name": "cosine", "warmup": "10ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": micro * world,
                  "device_microbatch_size": micro, "precision": "fp32" if cpu_check else "amp_bf16",
                  "clip_norm": 1.0, "compile": not cpu_check,
                  "parallelism": {"strategy": "none" if cpu_check and world == 1 else "fsdp"}},
        "monitor": {"progress": False, "grad_norm_interval": 0},
    })


def measure(preset: str, args) -> dict:
    """One preset in this process (a rank, when launched on several GPUs)."""
    import torch
    from composer.callbacks.speed_monitor import get_gpu_flops_available
    from composer.core import Callback
    from composer.utils import dist

    from rafale import build, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = config(preset, args.seq, args.micro, world, args.warmup + args.steps, args.cpu_check)
    train._start_distributed()
    data = build.build_data(cfg)
    model = build.build_model(cfg, data.meta)
    n_params = sum(p.numel() for p in model.parameters())

    class StepTimes(Callback):
        def __init__(self):
            self.ends, self.flops, self.peak = [], None, None

        def batch_end(self, state, logger):
            if state.device.name == "gpu":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            if self.flops is None:
                self.flops = model.flops_per_batch(state.batch)
                self.peak = get_gpu_flops_available(state)

    clock = StepTimes()
    trainer = train.build_trainer(cfg, model, data, run_dir=None, extra_callbacks=[clock])
    trainer.fit()
    trainer.close()
    steps = [b - a for a, b in zip(clock.ends[args.warmup - 1:], clock.ends[args.warmup:])]
    step = statistics.median(steps)
    tokens = args.micro * args.seq * world
    mfu = clock.flops * world / step / (clock.peak * world) if clock.peak else None
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else common.peak_rss_mb() / 1024
    return {"preset": preset, "params": n_params, "processes": world, "seq": args.seq, "micro": args.micro,
            "step_s": step, "tokens_per_s": tokens / step, "tokens_per_s_per_device": tokens / step / world,
            "mfu": mfu, "peak_memory_gib": memory, "rank": dist.get_global_rank()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="pythia-410m,gpt-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: every GPU)")
    p.add_argument("--cpu-check", action="store_true", help="tiny model, fp32, no compile, on CPU")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a launched rank: measure this preset
    args = p.parse_args()
    if args.cpu_check:
        args.presets, args.seq, args.micro, args.warmup, args.steps = "pythia-micro", 64, 4, 2, 3
    if args.one:
        result = measure(args.one, args)
        if result["rank"] == 0:
            common.emit(result)
        return 0

    import torch

    os.environ.setdefault("RAFALE_HOME", str(common.REPO / ".bench_home"))
    nproc = args.nproc or max(1, torch.cuda.device_count())
    print(json.dumps(common.machine()))
    rows = []
    for preset in args.presets.split(","):
        worker = ["--one", preset, "--seq", str(args.seq), "--micro", str(args.micro), "--warmup",
                  str(args.warmup), "--steps", str(args.steps)] + (["--cpu-check"] if args.cpu_check else [])
        if nproc > 1:  # the launcher rafale train uses, running this file on every rank
            import subprocess

            out = subprocess.run([sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc),
                                  str(Path(__file__).resolve()), *worker], capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith(common.RESULT_PREFIX)]
            if out.returncode or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(lines[-1][len(common.RESULT_PREFIX):]))
        else:
            rows.append(common.run_worker("gpu_mfu.py", worker, timeout=3600))
    print(f"\n{'preset':<12} {'params':>8} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>9} {'MFU':>6} "
          f"{'vs 41.8%':>8} {'memory':>9}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        ratio = f"{r['mfu'] / REFERENCE_MFU:.2f}" if r["mfu"] else "-"
        print(f"{r['preset']:<12} {r['params'] / 1e6:>7.0f}M {r['processes']:>4} {r['tokens_per_s']:>10,.0f} "
              f"{r['tokens_per_s_per_device']:>9,.0f} {mfu:>6} {ratio:>8} {r['peak_memory_gib']:>7.1f} GiB")
    if not args.cpu_check:
        out = common.REPO / "bench" / "gpu_results.json"
        out.write_text(json.dumps({"machine": common.machine(), "rows": rows}, indent=1))
        print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
