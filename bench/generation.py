"""Greedy generation with a KV cache (new tokens/s), rafale's against transformers'
`generate(do_sample=False)` on the same weights.

A pythia-tiny `Decoder` with random weights (seeded) is copied into a GPTNeoXForCausalLM through the
literal name map (rafale/models/gpt_neox.py). Both continue the same prompts by 256 tokens, no early
stop: 32-token prompts at batch 1 and 8 (`rafale.generate.generate`), and a batch of 8 prompts of 4 to
60 tokens (32 on average), left-padded on both sides (`rafale.generate.generate_batch`; transformers
with an attention mask). The two sides alternate in one process (A B A B ...), one untimed call each
first, and every timed call also checks that both produced the same tokens.

    python bench/generation.py --batch 1 --reps 3     # one measurement
    python bench/generation.py --mixed --reps 3       # the mixed-length batch
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT, NEW = 32, 256
MIXED = (4, 12, 20, 28, 36, 44, 52, 60)  # prompt lengths of the mixed batch: 32 on average, as PROMPT


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


def measure(batch: int, reps: int, mixed: bool) -> dict:
    import torch

    from rafale.generate import generate, generate_batch

    ours, hf = models()
    g = torch.Generator().manual_seed(batch)
    if mixed:
        batch = len(MIXED)
        prompts = [torch.randint(0, 50277, (n,), generator=g).tolist() for n in MIXED]
        x = torch.zeros(batch, max(MIXED), dtype=torch.long)  # left-padded with 0, as HF tokenizers pad
        for b, p in enumerate(prompts):
            x[b, x.shape[1] - len(p):] = torch.tensor(p)
        hf_mask = (torch.arange(x.shape[1]) >= x.shape[1] - torch.tensor(MIXED)[:, None]).long()

        def rafale_side():
            return torch.tensor([c.output_ids for c in generate_batch(ours, prompts, NEW)])
    else:
        x = torch.randint(0, 50277, (batch, PROMPT), generator=g)
        hf_mask = torch.ones_like(x)

        def rafale_side():
            return generate(ours, x, NEW)

    def hf_side():
        with torch.inference_mode():
            return hf.generate(x, attention_mask=hf_mask, do_sample=False, max_new_tokens=NEW,
                               min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)[:, x.shape[1]:]

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
    return {"batch": batch, "mixed": mixed, "same_tokens": same, "torch_threads": torch.get_num_threads(),
            "tokens_per_s": {n: batch * NEW / common.median(t) for n, t in times.items()}, "times": times}


def run(quick: bool, log=print) -> list[dict]:
    reps = 3 if quick else 7
    rows = []
    for batch, mixed in ((1, False), (8, False), (8, True)):
        r = common.run_worker("generation.py", ["--batch", str(batch), "--reps", str(reps)] + ["--mixed"] * mixed)
        what = f"batch {batch}, {min(MIXED)}-{max(MIXED)}+{NEW} tokens, left-padded" if mixed else \
            f"batch {batch}, {PROMPT}+{NEW} tokens"
        log(f"    {what}: rafale {r['tokens_per_s']['rafale']:.0f} tok/s, hf {r['tokens_per_s']['hf']:.0f} "
            f"tok/s, same tokens: {r['same_tokens']}")
        rows.append(common.row(f"generate greedy, {what}", "new tokens/s", r["tokens_per_s"]["rafale"],
                               "hf generate", r["tokens_per_s"]["hf"], ">= 1.5", same_tokens=r["same_tokens"],
                               times=r["times"]))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mixed", action="store_true", help=f"prompts of {', '.join(map(str, MIXED))} tokens instead")
    a = p.parse_args()
    common.emit(measure(a.batch, a.reps, a.mixed))
