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
"""

import argparse
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
    p.add_argument("--side", choices=SIDES, required=True)
    common.emit(measure(p.parse_args().side))
