"""Data pipeline and cache: tokens against the tokenizer's own whole-text encode, blocks against the
EOS-joined stream, cache hits / misses / interrupted builds on real files, and the DataLoader."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from rafale.data import cache, tokenize as pipelines
from rafale.data.causal_lm import prepare_causal_lm
from rafale.errors import UserError
from rafale.paths import ASSETS_DIR, resolve_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHAKESPEARE = ASSETS_DIR / "tinyshakespeare" / "input.txt"
STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"
NEOX = "gpt-neox-20b"
GPT2 = str(FIXTURES / "tokenizers" / "gpt2")
EOT = "<|endoftext|>"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def neox() -> Tokenizer:
    return Tokenizer.from_file(str(resolve_tokenizer(NEOX)))


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def shakespeare(n_chars: int) -> str:
    return SHAKESPEARE.read_text()[:n_chars]


def stories(n: int) -> list[str]:
    return [s.strip() for s in STORIES.read_text().split(EOT)[:n]]


# --- tokenization -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tinyshakespeare", "tinystories"])
def test_cut_pieces_tokenize_like_the_whole_document(neox, name):
    text = SHAKESPEARE.read_text() if name == "tinyshakespeare" else STORIES.read_text()[:300_000]
    pieces = pipelines.split_pieces(text)
    assert "".join(pieces) == text and len(pieces) > 50  # enough pieces for encode_batch's threads
    got = [i for e in neox.encode_batch_fast(pieces, add_special_tokens=False) for i in e.ids]
    assert got == ids(neox, text)


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_style() -> str:
    """GPT-2's vocabulary behind Llama-3's pre-tokenizer regex (which glues punctuation to newlines)."""
    j = json.loads((Path(GPT2) / "tokenizer.json").read_text())
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return json.dumps(j)


@pytest.mark.parametrize("tokenizer", ["gpt2", "smollm2", "bert-base-uncased", "llama3-regex"])
def test_cutting_at_every_safe_point_is_exact_for_other_tokenizers(tokenizer):
    js = _llama3_style() if tokenizer == "llama3-regex" else resolve_tokenizer(
        GPT2 if tokenizer == "gpt2" else tokenizer).read_text()
    tok = pipelines.load_tokenizer(js)
    wiki = (ASSETS_DIR / "wikitext-2" / "valid.txt").read_text()[:20_000]  # " \n \n " between lines
    for text in (shakespeare(20_000), "\n\n".join(stories(20)), wiki):
        pieces = pipelines.split_pieces(text, size=1)  # a cut at every safe point
        assert len(pieces) > 1000
        assert [i for e in tok.encode_batch_fast(pieces, add_special_tokens=False) for i in e.ids] == ids(tok, text)


def test_tokenizer_that_cutting_would_change_is_not_cut(home, tmp_path):
    # add_prefix_space puts a space before every input: cut pieces would each gain one.
    j = json.loads((Path(GPT2) / "tokenizer.json").read_text())
    j["pre_tokenizer"]["add_prefix_space"] = True
    tok_path = write(tmp_path / "prefix" / "tokenizer.json", json.dumps(j))
    tok = pipelines.load_tokenizer(tok_path.read_text())
    assert not pipelines.cutting_is_exact(tok, "")
    text = shakespeare(30_000)
    data = prepare_causal_lm(str(write(tmp_path / "s.txt", text)), str(tok_path), 8, val_fraction=0)
    stream = ids(tok, text.strip()) + [tok.token_to_id(EOT)]
    assert data.train.ravel().tolist() == stream[:len(stream) // 8 * 8]


# --- blocks and splits --------------------------------------------------------------------------

def test_blocks_are_the_eos_joined_stream_of_sorted_files(home, tmp_path, neox):
    docs = stories(12)
    # A directory is read recursively in sorted path order: a/0.txt, a/b/1.txt, c.txt.
    files = {"a/0.txt": EOT.join(docs[:5]), "a/b/1.txt": f"\n{EOT}\n".join(docs[5:9]) + f"\n{EOT}\n",
             "c.txt": EOT.join(docs[9:]), ".hidden": "not corpus text"}
    for name, text in files.items():
        write(tmp_path / "corpus" / name, text)
    data = prepare_causal_lm(str(tmp_path / "corpus"), NEOX, 32, val_fraction=0, doc_separator=EOT)
    stream = [i for doc in docs for i in ids(neox, doc) + [0]]
    n = len(stream) // 32
    assert data.train.dtype == np.uint16 and data.val is None
    assert np.array_equal(data.train, np.array(stream[:n * 32]).reshape(n, 32))
    s = data.meta["stats"]
    assert (s["documents"], s["tokens"], s["train_blocks"], s["val_blocks"]) == (12, len(stream), n, 0)
    assert [Path(x["path"]).name for x in data.meta["sources"]["train"]] == ["0.txt", "1.txt", "c.txt"]


def test_a_list_keeps_its_order_and_a_file_is_one_document(home, tmp_path, neox):
    a, b = write(tmp_path / "z.txt", "Second file.\n\nStill second."), write(tmp_path / "a.txt", "Third.")
    data = prepare_causal_lm([str(a), str(b)], NEOX, 2, val_fraction=0)
    stream = ids(neox, "Second file.\n\nStill second.") + [0] + ids(neox, "Third.") + [0]
    assert data.train.ravel().tolist() == stream[:len(stream) // 2 * 2]


def test_val_fraction_takes_the_last_blocks(home, tmp_path):
    src = str(write(tmp_path / "s.txt", shakespeare(40_000)))
    whole = prepare_causal_lm(src, NEOX, 64, val_fraction=0)
    n = len(whole.train)
    split = prepare_causal_lm(src, NEOX, 64, val_fraction=0.1)
    n_val = round(n * 0.1)
    assert (len(split.train), len(split.val)) == (n - n_val, n_val)
    assert np.array_equal(split.train, whole.train[:n - n_val]) and np.array_equal(split.val, whole.train[n - n_val:])
    tiny = prepare_causal_lm(src, NEOX, 64, val_fraction=1e-6)  # at least one val block
    assert (len(tiny.train), len(tiny.val)) == (n - 1, 1)
    assert split.meta["stats"]["val_blocks"] == n_val and split.meta["stats"]["train_blocks"] == n - n_val


def test_explicit_val_files(home, tmp_path, neox):
    train = write(tmp_path / "train.txt", shakespeare(20_000))
    val_text = "\n\n".join(stories(5))
    val = write(tmp_path / "val.txt", val_text)
    data = prepare_causal_lm(str(train), NEOX, 16, val=str(val), val_fraction=0.5)
    val_stream = ids(neox, val_text) + [0]
    assert data.val.ravel().tolist() == val_stream[:len(val_stream) // 16 * 16]
    assert len(data.train) == (len(ids(neox, shakespeare(20_000).strip())) + 1) // 16  # val_fraction unused
    # With explicit val files, val_fraction does not enter the key.
    assert prepare_causal_lm(str(train), NEOX, 16, val=str(val), val_fraction=0.2).hit


def test_corpus_too_small_names_its_size(home, tmp_path):
    src = str(write(tmp_path / "s.txt", "Only a few words here."))
    # 6 word tokens + EOS
    with pytest.raises(UserError, match=r"^data\.train: the corpus is 7 tokens, fewer than 1 training block "
                                        r"of data\.max_seq_len=64 tokens"):
        prepare_causal_lm(src, NEOX, 64, val_fraction=0)
    with pytest.raises(UserError, match=r"plus 1 validation block.*data\.val_fraction to 0"):
        prepare_causal_lm(src, NEOX, 7)  # exactly one block: nothing left to train on
    assert len(prepare_causal_lm(src, NEOX, 7, val_fraction=0).train) == 1


# --- cache ----------------------------------------------------------------------------------------

def test_cache_hit_on_repeat_and_with_unrelated_changes(home, tmp_path):
    src = write(tmp_path / "s.txt", shakespeare(30_000))
    first = prepare_causal_lm(str(src), NEOX, 32)
    again = prepare_causal_lm(str(src), NEOX, 32)
    assert (first.hit, again.hit) == (False, True) and again.path == first.path
    assert isinstance(again.train, np.memmap) and isinstance(first.train, np.memmap)
    assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
    assert first.path.parent == home / "data" and first.path.name.startswith("causal_lm-")
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["key"].startswith(first.path.name.split("-")[1]) and meta["vocab_size"] == 50277
    # Same bytes at another path, a bundled name for the same tokenizer file, another key prefix.
    moved = write(tmp_path / "elsewhere" / "copy.txt", src.read_text())
    same_tok = str(resolve_tokenizer(NEOX))
    assert prepare_causal_lm(str(moved), same_tok, 32, key_prefix="other").hit


@pytest.mark.parametrize("change", ["tokenizer", "max_seq_len", "source bytes", "doc_separator",
                                    "val_fraction", "eos_token"])
def test_cache_miss_when_what_decides_the_blocks_changes(home, tmp_path, change):
    src = write(tmp_path / "s.txt", shakespeare(30_000))
    args = dict(train=str(src), tokenizer=NEOX, max_seq_len=32)
    first = prepare_causal_lm(**args)
    if change == "tokenizer":
        args["tokenizer"] = GPT2
    elif change == "max_seq_len":
        args["max_seq_len"] = 48
    elif change == "source bytes":
        src.write_text(src.read_text().replace("Citizen", "Citizens"))  # same path, edited bytes
    elif change == "doc_separator":
        args["doc_separator"] = "\n\n"
    elif change == "val_fraction":
        args["val_fraction"] = 0.2
    else:
        args["eos_token"] = "<|padding|>"
    second = prepare_causal_lm(**args)
    assert not second.hit and second.path != first.path
    assert first.path.exists()  # the old entry is left alone


def test_damaged_or_interrupted_entries_are_rebuilt_not_reused(home, tmp_path):
    src = str(write(tmp_path / "s.txt", shakespeare(20_000)))
    good = prepare_causal_lm(src, NEOX, 32)
    reference = np.array(good.train)
    meta = good.path / "meta.json"
    for damage in ("truncated meta.json", "no meta.json", "short train.npy"):
        if damage == "truncated meta.json":
            meta.write_text(meta.read_text()[:100])
        elif damage == "no meta.json":
            meta.unlink()
        else:
            np.save(good.path / "train.npy", reference[:-1])
        leftover = home / "data" / f".{good.path.name}.tmp-999999"
        write(leftover / "train.npy", "half a file")
        rebuilt = prepare_causal_lm(src, NEOX, 32)
        assert not rebuilt.hit and np.array_equal(rebuilt.train, reference)
        assert not leftover.exists()
        assert prepare_causal_lm(src, NEOX, 32).hit


BUILDER = """
import os, sys, time
from rafale.data import cache
from rafale.data.causal_lm import prepare_causal_lm
def stop_before_rename(src, dst):  # the build is written, not yet in place: die here
    open(sys.argv[2], "w").close()
    time.sleep(600)
cache.os.rename = stop_before_rename
prepare_causal_lm(sys.argv[1], "gpt-neox-20b", 32)
"""


def test_killed_builder_leaves_nothing_that_is_reused(home, tmp_path):
    src = str(write(tmp_path / "s.txt", shakespeare(20_000)))
    marker = tmp_path / "about-to-rename"
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, src, str(marker)], cwd=REPO, env=os.environ)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the builder died before renaming"
            time.sleep(0.05)
        tmp_dirs = list((home / "data").glob(".causal_lm-*.tmp-*"))
        assert len(tmp_dirs) == 1 and (tmp_dirs[0] / "meta.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list((home / "data").glob("causal_lm-*"))  # nothing under a final name
    data = prepare_causal_lm(src, NEOX, 32)  # the dead builder's lock is free; its files are not used
    assert not data.hit and not tmp_dirs[0].exists()
    assert prepare_causal_lm(src, NEOX, 32).hit


RACER = """
import sys, time
from rafale.data.causal_lm import prepare_causal_lm
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(prepare_causal_lm(sys.argv[1], "gpt-neox-20b", 64).hit)
"""


def test_concurrent_builders_build_once(home, tmp_path):
    src = str(write(tmp_path / "s.txt", SHAKESPEARE.read_text()))
    start = str(time.time() + 2)  # both past their imports, then both call prepare at once
    procs = [subprocess.Popen([sys.executable, "-c", RACER, src, start], cwd=REPO, env=os.environ,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    hits = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert hits == ["False", "True"]
    assert len(list((home / "data").glob("causal_lm-*"))) == 1


# --- user errors ----------------------------------------------------------------------------------

def test_user_errors_name_the_key(home, tmp_path):
    with pytest.raises(UserError, match=r"^data\.train: no file or directory 'nope\.txt'"):
        prepare_causal_lm("nope.txt", NEOX, 32)
    with pytest.raises(UserError, match=r"^data\.val: no file or directory"):
        prepare_causal_lm(str(SHAKESPEARE), NEOX, 32, val=str(tmp_path / "missing.txt"))
    empty = write(tmp_path / "empty" / "a.txt", "")
    write(tmp_path / "empty" / "b.txt", " \n\n ")
    with pytest.raises(UserError, match=r"^data\.train: its 2 file\(s\) hold no text"):
        prepare_causal_lm(str(empty.parent), NEOX, 32)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match=r"^data\.train: directory .* holds no files"):
        prepare_causal_lm(str(tmp_path / "nothing"), NEOX, 32)
    with pytest.raises(UserError, match=r"^data\.max_seq_len: must be at least 2"):
        prepare_causal_lm(str(SHAKESPEARE), NEOX, 1)
    with pytest.raises(UserError, match=r"^cfg\.data\.eos_token: '<eos>' is not a token"):
        prepare_causal_lm(str(SHAKESPEARE), NEOX, 32, eos_token="<eos>", key_prefix="cfg.data")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"^data\.train: .*latin1\.txt is not UTF-8 text"):
        prepare_causal_lm(str(latin1), NEOX, 2)
    with pytest.raises(UserError, match=r"^data\.tokenizer: 'nope'"):
        prepare_causal_lm(str(SHAKESPEARE), "nope", 32)


def test_eos_defaults_to_the_first_known_end_token(home, tmp_path):
    text = shakespeare(5_000)
    src = str(write(tmp_path / "s.txt", text))
    bert_dir = ASSETS_DIR / "tokenizers" / "bert-base-uncased"
    data = prepare_causal_lm(src, str(bert_dir), 16, val_fraction=0)
    bert = Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    assert bert.truncation is not None  # baked in (max 128): the pipeline must switch it off
    bert.no_truncation()
    assert data.meta["tokenizer"]["eos_token"] == "[SEP]"
    assert data.meta["stats"]["tokens"] == len(ids(bert, text.strip())) + 1
    neox = prepare_causal_lm(src, NEOX, 16).meta["tokenizer"]
    assert (neox["eos_token"], neox["eos_id"]) == (EOT, 0)


# --- loaders --------------------------------------------------------------------------------------

def test_dataloader_shapes_and_seeded_order(home, tmp_path):
    import torch
    from rafale.data.loaders import BlockDataset, build_dataloader

    data = prepare_causal_lm(str(write(tmp_path / "s.txt", shakespeare(30_000))), NEOX, 32, val_fraction=0)
    n = len(data.train)

    def order(seed, shuffle=True, drop_last=True, batch_size=4):
        batches = list(build_dataloader(BlockDataset(data.train), batch_size, shuffle, seed, drop_last))
        assert all(b["input_ids"].dtype == torch.int64 for b in batches)
        return batches

    batches = order(1)
    assert len(batches) == n // 4 and all(b["input_ids"].shape == (4, 32) for b in batches)
    rows = torch.cat([b["input_ids"] for b in batches])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, order(1)))
    assert not torch.equal(rows, torch.cat([b["input_ids"] for b in order(2)]))
    in_order = order(0, shuffle=False, drop_last=False, batch_size=5)
    assert len(in_order) == -(-n // 5) and in_order[-1]["input_ids"].shape[0] == n - 5 * (n // 5)
    assert np.array_equal(torch.cat([b["input_ids"] for b in in_order]).numpy(), data.train)
