"""Step-time overhead of `data.packing: document` over `concat` (the goal: <= 15%), at T = 256 and 1024.

Same model (pythia-tiny, max_seq_len raised to 1024), the same TinyStories blocks (the bundled 2 MiB
slice, documents cut at <|endoftext|>), 2,048 tokens a step (8 x 256 or 2 x 1024), fp32, fused AdamW.
Each side is a plain loop over rafale's own pieces: the pipeline's DataLoader (document indices included
for `document`), the TaskModel's forward and loss (the decoder with SDPA and a (B, 1, T, T) document
mask for `document`; SDPA's is_causal path for `concat`), backward, optimizer step. What the Trainer
adds around a step is the same on both sides and left out, so the ratio is packing's own cost. A
step is timed from the end of the previous one (data loading included), in wall and process CPU time;
the first `warmup` are skipped.

    python bench/packing.py --side document --seq 1024 --steps 6 --warmup 2   # one measurement
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOKENS_PER_STEP = 2048
SEQS = (256, 1024)
SIDES = ("concat", "document")


def measure(side: str, seq: int, steps: int, warmup: int) -> dict:
    os.environ["RAFALE_HOME"] = tempfile.mkdtemp(prefix="rafale-bench-packing-")
    import torch

    from rafale.build import network_for
    from rafale.data.causal_lm import CausalLM
    from rafale.data.loaders import pipeline_loader
    from rafale.paths import ASSETS_DIR
    from rafale.task_model import TaskModel

    torch.manual_seed(0)
    section = CausalLM.Section(train=str(ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"),
                               max_seq_len=seq, val_fraction=0, doc_separator="<|endoftext|>", packing=side)
    pipeline = CausalLM(section)
    data = pipeline.prepare()
    batch_size = TOKENS_PER_STEP // seq
    loader = pipeline_loader(pipeline, data.train, data.meta, batch_size=batch_size, shuffle=True, seed=17,
                             drop_last=True)
    model = TaskModel(network_for("causal_lm", "pythia-tiny", overrides={"max_seq_len": 1024},
                                  vocab_size=data.meta["vocab_size"]), pipeline, data.meta).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ends, cpu, docs_per_row = [time.perf_counter()], [time.process_time()], []
    for i, batch in enumerate(loader):
        if i == steps + warmup:
            break
        if "documents" in batch:
            docs_per_row.append(float(batch["documents"][:, -1].float().mean()) + 1)
        loss = model.loss(model(batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
    times = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]
    cpu_times = [b - a for a, b in zip(cpu[warmup:], cpu[warmup + 1:])]
    return {"side": side, "seq": seq, "batch": batch_size, "step_s": common.median(times), "steps": times,
            "cpu_step_s": common.median(cpu_times),
            "docs_per_row": common.median(docs_per_row) if docs_per_row else 1.0}


def run(quick: bool, log=print) -> list[dict]:
    reps, steps = (2, 4) if quick else (3, 6)
    rows = []
    for seq in SEQS:
        sides = {s: (lambda s=s: common.run_worker("packing.py", ["--side", s, "--seq", str(seq), "--steps", str(steps),
                                                                  "--warmup", "2"])) for s in SIDES}
        runs = common.interleave(sides, reps, log=log)
        step = {s: common.median(r["step_s"] for r in rs) for s, rs in runs.items()}
        cpu = {s: common.median(r["cpu_step_s"] for r in rs) for s, rs in runs.items()}
        docs = common.median(r["docs_per_row"] for r in runs["document"])
        # cpu_ratio: the same ratio in process CPU time, steadier than wall time when other processes load the CPU.
        rows.append(common.row(f"train step, packing document vs concat, {TOKENS_PER_STEP // seq} x {seq} tokens "
                               f"({docs:.1f} documents a row)", "s", step["document"], "concat", step["concat"],
                               "<= 1.15", higher_is_better=False, cpu_ratio=cpu["document"] / cpu["concat"],
                               runs=runs))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--seq", type=int, choices=SEQS, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    common.emit(measure(a.side, a.seq, a.steps, a.warmup))
