"""Training at a tiny shape, where framework overhead shows: nanoGPT's "baby GPT" recipe for Tiny
Shakespeare at the character level (4 layers, d_model 128, 4 heads, 64-token blocks, batch 12).

The tokenizer is character-level, made here with `tokenizers` from the corpus's 65 characters plus
`<|endoftext|>` (66 tokens, so rafale's decoder gets a 128-row head); the bundled config with that
tokenizer, pythia-tiny and 64-token blocks is the run. Same steps as train_throughput.py (fp32, AdamW
lr 2e-3, clipping at 1.0, per-step schedule, the same cached blocks in the same order), each side in
its own process, the median step after the warm-up ones.

Sides:
  rafale  `rafale.train.train(cfg)`: Composer's Trainer with rafale's callbacks, loggers, progress,
          metrics.jsonl and data loading (eval and checkpoints past the timed window)
  bare    a plain loop around rafale's `Decoder` of that shape (its loss head, models/losses.py, which
          at 128 rows is logits + F.cross_entropy; fused AdamW)
  gpt2    the same loop around the textbook GPT-2 module below (nanoGPT's model.py design: learned
          positions, pre-LayerNorm, fused qkv, SDPA, GELU MLP, tied head; logits + F.cross_entropy)

Run on their own (not in `run`), the bare loop around Decoder configs that differ from pythia-tiny
the way GPT-2 does, to tell architecture from implementation:
  bare-tied  tied head and sequential residual (GPT-2's), Pythia's partial rotary kept
  bare-nope  the same without rotary (rotary_pct 0): GPT-2's shape, no position information at all
and `--side alternate`, bare sides in one process taking turns step by step (see `alternate`).

    python bench/tiny_train.py --side gpt2 --home DIR --warmup 3 --steps 20
    python bench/tiny_train.py --side alternate --sides gpt2,bare,bare-tied,bare-nope --home DIR --steps 60
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_throughput import CLIP, CONFIG, EPS, LR, BETAS, SEED, WD, StepClock, batches, cosine_lambda, rafale_run  # noqa: E402

BATCH, SEQ = 12, 64
SIDES = ("rafale", "bare", "gpt2")
VARIANTS = {"bare": {}, "bare-tied": {"tie_embeddings": True, "parallel_residual": False},
            "bare-nope": {"tie_embeddings": True, "parallel_residual": False, "rotary_pct": 0.0}}
CORPUS = common.REPO / "rafale/assets/tinyshakespeare/input.txt"


def char_tokenizer(path: Path) -> Path:
    """A character-level tokenizer.json of the corpus: one token per character, <|endoftext|> last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(CORPUS.read_text()))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character its own piece
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def overrides(home: Path) -> list[str]:
    return [f"data.tokenizer={home / 'char.json'}", f"data.max_seq_len={SEQ}", "model.preset=pythia-tiny"]


def prepare(home: Path) -> Path:
    from train_throughput import prepare_home

    char_tokenizer(home / "char.json")
    return prepare_home(home, CONFIG, overrides(home))


def gpt2(vocab_size: int, d: int = 128, n_layers: int = 4, n_heads: int = 4, block: int = SEQ):
    """nanoGPT's GPT, written out: token + learned position embeddings, pre-LN blocks (fused qkv, SDPA
    causal attention, 4d GELU MLP), a final LayerNorm and a head tied to the token embedding."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.c_proj(y)
            return x + self.proj(F.gelu(self.fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab_size, d), nn.Embedding(block, d)
            self.h = nn.ModuleList(Block() for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for b in self.h:
                x = b(x)
            return self.lm_head(self.ln_f(x))

    return GPT()


def bare_step(side: str, vocab_size: int, total: int):
    """The model and optimizer of one bare side, and a function taking one training step on a batch."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from rafale.models import preset_config
    from rafale.models.decoder import Decoder

    torch.manual_seed(SEED)
    if side == "gpt2":
        model = gpt2(vocab_size)
    else:
        model = Decoder(dataclasses.replace(preset_config("pythia-tiny"), vocab_size=vocab_size, **VARIANTS[side]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))

    def step(x):
        targets = F.pad(x[:, 1:], (0, 1), value=-100)
        if side == "gpt2":
            loss = F.cross_entropy(model(x).flatten(0, 1), targets.flatten(), ignore_index=-100)
        else:
            loss = model(x, targets=targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def bare_loop(side: str, train_npy: Path, vocab_size: int, warmup: int, steps: int) -> dict:
    total = warmup + steps
    step = bare_step(side, vocab_size, total)
    clock = StepClock(total)
    for _, x in zip(range(total), batches(train_npy, BATCH)):
        step(x)
        clock.tick()
    return clock.result(warmup, BATCH, side, SEQ)


def alternate(sides: list[str], train_npy: Path, vocab_size: int, warmup: int, steps: int) -> dict:
    """Bare sides in one process, taking turns step by step on the same batches: on a shared machine a
    change in load then hits every side within milliseconds, where separate processes see it seconds
    apart. Median process CPU time per step."""
    import time

    total = warmup + steps
    stepper = {s: bare_step(s, vocab_size, total) for s in sides}
    cpu = {s: [] for s in sides}
    for i, x in zip(range(total), batches(train_npy, BATCH)):
        for s, step in stepper.items():
            t = time.process_time()
            step(x)
            if i >= warmup:
                cpu[s].append(time.process_time() - t)
    return {"side": "alternate", "cpu_step_s": {s: common.median(v) for s, v in cpu.items()}}


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=SIDES + tuple(VARIANTS)[1:] + ("alternate",), required=True)
    p.add_argument("--sides", default="gpt2,bare,bare-tied,bare-nope",
                   help="with --side alternate: the bare sides that take turns in one process")
    p.add_argument("--home", required=True, help="a RAFALE_HOME prepared by this module (char.json, data/)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    shared = Path(a.home)
    with tempfile.TemporaryDirectory(prefix="rafale-bench-") as tmp:
        home = Path(tmp)
        (home / "data").symlink_to(shared / "data")
        shutil.copy(shared / "char.json", home / "char.json")
        os.environ["RAFALE_HOME"] = str(home)
        from train_throughput import prepare_home

        train_npy = prepare_home(home, CONFIG, overrides(home))  # a cache hit
        if a.side == "rafale":
            result = rafale_run(home, BATCH, a.warmup, a.steps, CONFIG, overrides(home))
        else:
            from rafale.build import padded_vocab

            vocab = padded_vocab(len(set(CORPUS.read_text())) + 1)  # the size rafale gives the same tokenizer
            if a.side == "alternate":
                result = alternate(a.sides.split(","), train_npy, vocab, a.warmup, a.steps)
            else:
                result = bare_loop(a.side, train_npy, vocab, a.warmup, a.steps)
    common.emit(result)


def run(quick: bool, log=print) -> list[dict]:
    warmup, steps, reps = (3, 15, 2) if quick else (3, 40, 3)
    home = Path(tempfile.mkdtemp(prefix="rafale-bench-home-"))
    try:
        prepare(home)
        args = ["--home", str(home), "--warmup", str(warmup), "--steps", str(steps)]
        runs = common.interleave({s: (lambda s=s: common.run_worker("tiny_train.py", ["--side", s, *args]))
                                  for s in SIDES}, reps, log=log)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    tps = {s: common.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    step_ms = {s: 1000 * common.median(r["step_s"] for r in rs) for s, rs in runs.items()}
    log("    step: " + ", ".join(f"{s} {ms:.1f} ms" for s, ms in step_ms.items()))
    shape = f"tiny, char-level, 4x128, {BATCH}x{SEQ} tokens, fp32"
    return [common.row(f"train step ({shape})", "tokens/s", tps["rafale"], "bare loop, rafale Decoder",
                       tps["bare"], ">= 0.9", runs={"rafale": runs["rafale"], "bare": runs["bare"]}, step_ms=step_ms),
            common.row(f"train step ({shape}), bare loops", "tokens/s", tps["bare"],
                       "bare loop, textbook GPT-2 module (nanoGPT design)", tps["gpt2"], ">= 1.0",
                       runs={"gpt2": runs["gpt2"]})]


if __name__ == "__main__":
    worker(sys.argv[1:])
