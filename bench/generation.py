"""Greedy generation with a KV cache (new tokens/s), `rafale.generate.generate` against transformers'
`generate(do_sample=False)` on the same weights.

A pythia-tiny `Decoder` with random weights (seeded) is copied into a GPTNeoXForCausalLM through the
literal name map (rafale/models/gpt_neox.py). Both continue the same 32-token prompts by 256 tokens,
batch 1 and batch 8, no early stop; the two sides alternate in one process (A B A B ...), one
untimed call each first, and every timed call also checks that both produced the same tokens.

    python bench/generation.py --batch 1 --reps 3     # one measurement
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT, NEW = 32, 256


def models():
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rafale.models.decoder import Decoder
    from rafale.models import preset_config as get_preset
    from rafale.models.family import inverse, rename
    from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG, NAMES as GPT_NEOX

    cfg = get_preset("pythia-tiny", {"init_std": 0.1})  # above 0.02, so argmax is not a near-tie
    torch.manual_seed(0)
    ours = Decoder(cfg).eval()
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{hf: getattr(cfg, k) for k, hf in GPT_NEOX_CONFIG.items()})).eval()
    hf.load_state_dict(rename(ours.state_dict(), inverse(GPT_NEOX)), strict=True)
    return ours, hf


def measure(batch: int, reps: int) -> dict:
    import torch

    from rafale.generate import generate

    ours, hf = models()
    x = torch.randint(0, 50277, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))

    def rafale_side():
        return generate(ours, x, NEW)

    def hf_side():
        with torch.inference_mode():
            return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                               min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)[:, PROMPT:]

    sides = {"rafale": rafale_side, "hf": hf_side}
    for fn in sides.values():
        fn()  # untimed: first-call allocations and lazy imports
    times = {name: [] for name in sides}
    outputs = {}
    for _ in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
        assert outputs["rafale"].shape == (batch, NEW)
    same = bool(torch.equal(outputs["rafale"], outputs["hf"]))
    return {"batch": batch, "same_tokens": same, "torch_threads": torch.get_num_threads(),
            "tokens_per_s": {n: batch * NEW / common.median(t) for n, t in times.items()}, "times": times}


def run(quick: bool, log=print) -> list[dict]:
    reps = 3 if quick else 7
    rows = []
    for batch in (1, 8):
        r = common.run_worker("generation.py", ["--batch", str(batch), "--reps", str(reps)])
        log(f"    batch {batch}: rafale {r['tokens_per_s']['rafale']:.0f} tok/s, hf {r['tokens_per_s']['hf']:.0f} "
            f"tok/s, same tokens: {r['same_tokens']}")
        rows.append(common.row(f"generate greedy, batch {batch}, {PROMPT}+{NEW} tokens", "new tokens/s",
                               r["tokens_per_s"]["rafale"], "hf generate", r["tokens_per_s"]["hf"],
                               ">= 1.5" if batch == 1 else "", same_tokens=r["same_tokens"], times=r["times"]))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    common.emit(measure(a.batch, a.reps))
