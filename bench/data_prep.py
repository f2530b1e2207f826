"""Data preparation (MB/s of text turned into cached blocks of 256 token ids), rafale against the
usual alternatives, on the same corpus and tokenizer.

Corpus: the bundled Tiny Shakespeare (one 1.1 MB document) and TinyStories sample (2 MiB, stories
separated by <|endoftext|>), 3.2 MB in all; tokenizer: the bundled GPT-NeoX-20B tokenizer.json.
Each measurement is a fresh process with a fresh cache directory; the clock starts after the imports
and stops when the blocks are on disk, so it includes loading the tokenizer.

Sides:
  rafale    `rafale.data.cache.prepare_causal_lm` (what `rafale prepare` runs): hash the sources, tokenize
            (exactly: documents are cut only where the tokens cannot change), join with EOS, chunk,
            write train/val .npy atomically
  datasets  transformers' run_clm.py recipe: `load_dataset("text")`, `Dataset.map(tokenize,
            batched=True, num_proc=2)` with the fast tokenizer, `map(group_texts, batched=True,
            num_proc=2)`, Arrow cache files
  raw       the ceiling: `tokenizers` encode_batch_fast over ~4 KB runs of whole lines of each file, EOS
            after each file, one numpy array, reshape, np.save; no hashing, no exactness, no atomicity

    python bench/data_prep.py --side raw      # one measurement

A second workload, not in bench/run.py (it takes minutes): a large .jsonl corpus (TinyStories stories
repeated to the size asked), `rafale-jsonl` (prepare_causal_lm on it: the row reader, exact tokenization,
the manifest, the atomic entry) against `raw-jsonl` (json.loads per line + encode_batch_fast + numpy, the
ceiling), each side's peak RSS measured in its own process:

    python bench/data_prep.py --jsonl-mb 150 [--reps 3]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ASSETS = common.REPO / "rafale" / "assets"
FILES = [ASSETS / "tinyshakespeare" / "input.txt", ASSETS / "tinystories" / "tinystories_train_2MiB.txt"]
TOKENIZER = ASSETS / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
SEQ = 256
SIDES = ("rafale", "datasets", "raw")
JSONL_SIDES = ("rafale-jsonl", "raw-jsonl")


def corpus_mb() -> float:
    return sum(f.stat().st_size for f in FILES) / 1e6


def prepare_rafale(out: Path) -> int:
    import os

    os.environ["RAFALE_HOME"] = str(out)
    from rafale.data.causal_lm import prepare_causal_lm

    t0 = time.perf_counter()
    data = prepare_causal_lm(train=[str(f) for f in FILES], tokenizer=str(TOKENIZER), max_seq_len=SEQ,
                             doc_separator="<|endoftext|>")
    assert not data.hit
    return time.perf_counter() - t0, data.meta["stats"]["tokens"]


def prepare_datasets(out: Path):
    from datasets import disable_progress_bars, load_dataset
    from transformers import PreTrainedTokenizerFast

    disable_progress_bars()
    t0 = time.perf_counter()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    raw = load_dataset("text", data_files={"train": [str(f) for f in FILES]}, keep_linebreaks=True,
                       cache_dir=str(out))

    def tokenize(examples):
        return tok(examples["text"])

    def group_texts(examples):
        ids = [i for seq in examples["input_ids"] for i in seq]
        n = len(ids) // SEQ * SEQ
        return {"input_ids": [ids[i:i + SEQ] for i in range(0, n, SEQ)]}

    tokenized = raw.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    blocks = tokenized.map(group_texts, batched=True, num_proc=2,
                           remove_columns=[c for c in tokenized["train"].column_names if c != "input_ids"])
    seconds = time.perf_counter() - t0
    return seconds, len(blocks["train"]) * SEQ


def line_groups(text: str, size: int = 4096) -> list[str]:
    """The text cut after the first newline past every `size` characters: pieces big enough that
    encode_batch's per-input overhead vanishes, many enough to keep every core busy."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def prepare_raw(out: Path):
    import numpy as np
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(TOKENIZER))
    eos = tok.token_to_id("<|endoftext|>")
    arrays = []
    for f in FILES:
        encodings = tok.encode_batch_fast(line_groups(f.read_text(encoding="utf-8")), add_special_tokens=False)
        arrays += [np.array(e.ids, dtype=np.uint16) for e in encodings]
        arrays.append(np.array([eos], dtype=np.uint16))
    stream = np.concatenate(arrays)
    blocks = stream[:len(stream) // SEQ * SEQ].reshape(-1, SEQ)
    np.save(out / "train.npy", blocks)
    return time.perf_counter() - t0, len(stream)


def write_jsonl_corpus(path: Path, mb: float) -> None:
    import gzip

    rows = gzip.open(ASSETS / "tinystories" / "tinystories_train_stories.jsonl.gz").read()
    with open(path, "wb") as f:
        for _ in range(max(1, round(mb * 1e6 / len(rows)))):
            f.write(rows)


def prepare_rafale_jsonl(out: Path, corpus: Path):
    import os

    os.environ["RAFALE_HOME"] = str(out)
    from rafale.data.causal_lm import prepare_causal_lm

    t0 = time.perf_counter()
    data = prepare_causal_lm(train=str(corpus), tokenizer=str(TOKENIZER), max_seq_len=SEQ)
    assert not data.hit
    return time.perf_counter() - t0, data.meta["stats"]["tokens"]


def prepare_raw_jsonl(out: Path, corpus: Path):
    import json

    import numpy as np
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(TOKENIZER))
    eos = tok.token_to_id("<|endoftext|>")
    arrays, batch, chars = [], [], 0

    def flush():
        for e in tok.encode_batch_fast(batch, add_special_tokens=False):
            arrays.append(np.array(e.ids + [eos], dtype=np.uint16))
        batch.clear()

    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            chars += len(batch[-1])
            if chars >= 8 << 20:
                flush()
                chars = 0
    flush()
    stream = np.concatenate(arrays)
    np.save(out / "train.npy", stream[:len(stream) // SEQ * SEQ].reshape(-1, SEQ))
    return time.perf_counter() - t0, len(stream)


def measure_jsonl(side: str, corpus: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="rafale-bench-data-") as tmp:
        fn = prepare_rafale_jsonl if side == "rafale-jsonl" else prepare_raw_jsonl
        seconds, tokens = fn(Path(tmp), corpus)
    mb = corpus.stat().st_size / 1e6
    return {"side": side, "seconds": seconds, "mb_per_s": mb / seconds, "tokens": tokens,
            "peak_rss_mb": common.peak_rss_mb(), "corpus_mb": mb}


def run_jsonl(mb: float, reps: int, log=print) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="rafale-bench-jsonl-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_jsonl_corpus(corpus, mb)
        size = corpus.stat().st_size / 1e6
        runs = common.interleave({s: (lambda s=s: common.run_worker("data_prep.py", ["--side", s, "--corpus", str(corpus)]))
                                  for s in JSONL_SIDES}, reps, log=log)
    med = {s: {k: common.median(r[k] for r in rs) for k in ("mb_per_s", "peak_rss_mb")} for s, rs in runs.items()}
    name = f"data prep, {size:.0f} MB jsonl -> {SEQ}-token blocks"
    return [common.row(name, "MB/s", med["rafale-jsonl"]["mb_per_s"], "json.loads + encode_batch_fast + numpy",
                       med["raw-jsonl"]["mb_per_s"], ">= 0.9", runs=runs),
            common.row(f"{name}, peak RSS", "MB", med["rafale-jsonl"]["peak_rss_mb"], "same raw side",
                       med["raw-jsonl"]["peak_rss_mb"], "< 1,500 at 1 GB", runs={})]


def measure(side: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="rafale-bench-data-") as tmp:
        fn = {"rafale": prepare_rafale, "datasets": prepare_datasets, "raw": prepare_raw}[side]
        seconds, tokens = fn(Path(tmp))
    return {"side": side, "seconds": seconds, "mb_per_s": corpus_mb() / seconds, "tokens": tokens}


def run(quick: bool, log=print) -> list[dict]:
    reps = 3 if quick else 7
    runs = common.interleave({s: (lambda s=s: common.run_worker("data_prep.py", ["--side", s])) for s in SIDES},
                             reps, log=log)
    mbps = {s: common.median(r["mb_per_s"] for r in rs) for s, rs in runs.items()}
    name = f"data prep ({corpus_mb():.1f} MB text -> {SEQ}-token blocks)"
    return [common.row(name, "MB/s", mbps["rafale"], "raw encode_batch+numpy", mbps["raw"], ">= 0.9",
                       runs={"rafale": runs["rafale"], "raw": runs["raw"]}),
            common.row(name, "MB/s", mbps["rafale"], "datasets.map num_proc=2", mbps["datasets"], ">= 1.4",
                       runs={"datasets": runs["datasets"]})]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=SIDES + JSONL_SIDES)
    p.add_argument("--corpus", type=Path, help="the .jsonl corpus of a *-jsonl side")
    p.add_argument("--jsonl-mb", type=float, help="run the jsonl workload on a corpus of about this size")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.jsonl_mb is not None:
        for r in run_jsonl(args.jsonl_mb, args.reps):
            print(json.dumps({k: v for k, v in r.items() if k != "runs"}))
    elif args.side in JSONL_SIDES:
        common.emit(measure_jsonl(args.side, args.corpus))
    else:
        common.emit(measure(args.side))
