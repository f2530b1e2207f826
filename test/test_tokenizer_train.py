"""Tokenizer training: the same corpus gives the same file bytes (bpe, wordpiece; in this process and
in a fresh one with one thread), what decode(encode(x)) gives back for each kind, and the files
working as `data.tokenizer` of the causal-LM and masked-LM pipelines, ids checked against the
tokenizer's own encode of every document."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from rafale import cli
from rafale.data import tokenize as pipelines
from rafale.data.causal_lm import prepare_causal_lm
from rafale.data.mlm import prepare_mlm
from rafale.errors import UserError
from rafale.paths import ASSETS_DIR
from rafale.tokenizer_train import train_tokenizer
from test.conftest import run_cli

EOT = "<|endoftext|>"
STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"
WIKITEXT = ASSETS_DIR / "wikitext-2" / "valid.txt"
# Scripts the bundled corpora lack, with whitespace that must come back as it was.
NON_ASCII = ["Ça va? «Très bien», dit-elle — naïve café.", "Größe: 3 m²; Straße", "Ελληνικά και русский",
             "日本語のテキスト、中文文本。", "مرحبا بالعالم", "नमस्ते दुनिया", "emoji 👩‍👩‍👧 and e\u0301 combining",
             "line one\r\nline two\r\n", "\ttabbed\n\n  indented  "]


def wikitext_non_ascii() -> list[str]:
    """Real lines with accents, Greek, symbols and typographic dashes and quotes."""
    lines = WIKITEXT.read_text(encoding="utf-8").split("\n")
    return [line for line in lines if any(ord(c) > 127 for c in line)][:60]


def write_corpus(folder: Path, n_chars: int) -> list[str]:
    """Stories (their <|endoftext|> separators kept) as .txt, non-ASCII rows as .jsonl; returns the sources."""
    folder.mkdir(parents=True, exist_ok=True)
    text = STORIES.read_text(encoding="utf-8")[:n_chars]
    (folder / "stories.txt").write_text(text[:text.rindex(EOT) + len(EOT)], encoding="utf-8")
    rows = [*NON_ASCII, *wikitext_non_ascii()]
    (folder / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return [str(folder / "stories.txt"), str(folder / "rows.jsonl")]


def documents(path: Path) -> list[str]:
    return pipelines.split_documents(path.read_text(encoding="utf-8"), EOT)


def expected_stream(tok: Tokenizer, docs: list[str], sep_id: int) -> list[int]:
    return [i for doc in docs for i in tok.encode(doc, add_special_tokens=False).ids + [sep_id]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[list[str], Path]:
    folder = tmp_path_factory.mktemp("bpe")
    sources = write_corpus(folder / "corpus", 300_000)
    return sources, train_tokenizer(sources, 800, out=folder / "tokenizer.json")


def test_bpe_is_reproducible_and_lossless(bpe, tmp_path):
    sources, path = bpe
    again = train_tokenizer(sources, 800, kind="bpe", out=tmp_path / "again.json")
    assert again.read_bytes() == path.read_bytes()
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == 800 and tok.token_to_id(EOT) == 0
    assert [t.content for t in tok.get_added_tokens_decoder().values() if t.special] == [EOT]
    # The separators were cut out of the training text: no merges were spent on their pieces.
    assert not [t for t in tok.get_vocab() if t != EOT and ("endoftext" in t or "<|" in t or "|>" in t)]
    unseen = ["한국어 텍스트", "🦀\u200d\x00 control\x7f", "  two leading spaces", "trailing\n\n\n"]
    for text in [*NON_ASCII, *wikitext_non_ascii(), *unseen, Path(sources[0]).read_text()[:5000]]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_cli_writes_the_same_bytes_in_a_one_thread_process(bpe, tmp_path):
    sources, path = bpe
    out = tmp_path / "out" / "tok.json"
    out.parent.mkdir()
    out.write_text("an older file, replaced")
    # A fresh process: other hash-map seeds; RAYON_NUM_THREADS=1: tokenizers trains on one thread.
    r = run_cli("tokenizer", "train", *sources, "--vocab-size", "800", "-o", str(out), home=tmp_path / "home",
                env={"RAYON_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"trained a bpe tokenizer of 800 tokens in \d+\.\d s: {re.escape(str(out))}\n", r.stdout)
    assert out.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok.json"]  # no temporary file left


def test_bpe_file_as_causal_lm_tokenizer(bpe, rafale_home):
    sources, path = bpe
    tok = Tokenizer.from_file(str(path))
    prepared = prepare_causal_lm(train=sources[0], tokenizer=str(path), max_seq_len=64, doc_separator=EOT)
    assert prepared.meta["tokenizer"]["eos_token"] == EOT and prepared.meta["tokenizer"]["eos_id"] == 0
    docs = documents(Path(sources[0]))
    expected = expected_stream(tok, docs, 0)
    stream = np.concatenate([prepared.train, prepared.val]).ravel().tolist()
    assert len(stream) == len(expected) // 64 * 64 and stream == expected[:len(stream)]
    assert tok.decode(expected, skip_special_tokens=False) == "".join(doc + EOT for doc in docs)


def test_wordpiece_is_reproducible_and_serves_the_encoder_pipelines(tmp_path, rafale_home):
    sources = write_corpus(tmp_path / "corpus", 200_000)
    (tmp_path / "wp").mkdir()
    path = train_tokenizer(sources, 1500, kind="wordpiece", out=tmp_path / "wp")  # a directory
    assert path == tmp_path / "wp" / "tokenizer.json"
    assert train_tokenizer(sources, 1500, kind="wordpiece", out=tmp_path / "b.json").read_bytes() == path.read_bytes()
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == 1500
    specials = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    assert specials == {0: "[PAD]", 1: "[UNK]", 2: "[CLS]", 3: "[SEP]", 4: "[MASK]"}
    pair = tok.encode("Once upon a time", "the end")
    assert pair.tokens[0] == "[CLS]" and pair.tokens.count("[SEP]") == 2 and pair.tokens[-1] == "[SEP]"
    first_sep = pair.tokens.index("[SEP]")
    assert pair.type_ids == [0] * (first_sep + 1) + [1] * (len(pair.ids) - first_sep - 1)
    # Lowercased, accents stripped, punctuation split off; the decoder joins "##" pieces back up.
    assert tok.decode(tok.encode("Ça va? Très BIEN, merci.").ids) == "ca va? tres bien, merci."
    assert tok.encode("한", add_special_tokens=False).tokens == ["[UNK]"]  # never in the corpus

    prepared = prepare_mlm(train=sources[0], tokenizer=str(path), max_seq_len=32, doc_separator=EOT)
    assert {role: tuple(v) for role, v in prepared.meta["special"].items()} == {
        "cls": ("[CLS]", 2), "sep": ("[SEP]", 3), "pad": ("[PAD]", 0), "mask": ("[MASK]", 4), "unk": ("[UNK]", 1)}
    blocks = np.concatenate([prepared.train, prepared.val])
    assert (blocks[:, 0] == 2).all() and (blocks[:, -1] == 3).all()
    body = blocks[:, 1:-1].ravel().tolist()
    assert body == expected_stream(tok, documents(Path(sources[0])), 3)[:len(body)]


def test_unigram_round_trip_on_its_characters(tmp_path, rafale_home):
    sources = write_corpus(tmp_path / "corpus", 40_000)
    path = train_tokenizer(sources, 700, kind="unigram", special=["<|im_start|>"], out=tmp_path / "u.json")
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == 700
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<|im_start|>")] == [0, 1, 2, 3]
    story = Path(sources[0]).read_text()[:3000]
    for text in [*NON_ASCII, *wikitext_non_ascii(), story, " a leading space", "spaces   between"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text  # wikitext holds "<unk>"
    assert tok.encode("한", add_special_tokens=False).ids == [0]  # a character it never saw: <unk>
    prepared = prepare_causal_lm(train=sources[0], tokenizer=str(path), max_seq_len=32, doc_separator=EOT)
    assert prepared.meta["tokenizer"]["eos_token"] == "</s>"
    stream = np.concatenate([prepared.train, prepared.val]).ravel().tolist()
    assert stream == expected_stream(tok, documents(Path(sources[0])), 2)[:len(stream)]


def test_bad_input_is_a_user_error(tmp_path, capsys):
    sources = write_corpus(tmp_path / "corpus", 20_000)
    out = tmp_path / "t.json"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    cases = [(dict(sources=sources, vocab_size=200), r"--vocab-size 200 is too small: it must hold the 256 byte "
                                                     r"tokens and the 1 special token\(s\) <\|endoftext\|> and more; "
                                                     r"use at least 257"),
             (dict(sources=sources, vocab_size=257, special=["<pad>", "<pad>"]), "use at least 258"),
             (dict(sources=sources, vocab_size=300, kind="sentencepiece"),
              "unknown tokenizer kind 'sentencepiece'; use one of bpe, unigram, wordpiece"),
             (dict(sources=[], vocab_size=300), "no sources given"),
             (dict(sources=[str(tmp_path / "nope.txt")], vocab_size=300), "sources: no file or directory"),
             (dict(sources=[sources[0], str(tmp_path / "bad.jsonl")], vocab_size=300),
              r"sources: .*bad\.jsonl line 2 is not JSON"),
             (dict(sources=sources, vocab_size=300, text_field="body"), r"rows\.jsonl line 1 has no 'body' field"),
             (dict(sources=sources, vocab_size=60, kind="wordpiece"), "is smaller than the corpus alphabet"),
             (dict(sources=sources, vocab_size=20, kind="unigram"), "cannot hold the 3 special token"),
             (dict(sources=sources, vocab_size=300, out=tmp_path / "corpus" / "stories.txt" / "t.json"),
              "-o: cannot create the directory")]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            train_tokenizer(**{"out": out, **kwargs})
    assert not out.exists()
    assert cli.main(["tokenizer", "train", sources[0], "--vocab-size", "100", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rafale: error: --vocab-size 100 is too small") and err.count("\n") == 1


def test_every_corpus_format_trains_the_same_file(tmp_path):
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    stories = [s.strip() for s in STORIES.read_text(encoding="utf-8").split(EOT)[:80]]
    rows = [d for pair in zip(stories, NON_ASCII * 9) for d in pair]
    lines = "".join(json.dumps({"id": i, "body": r}, ensure_ascii=False) + "\n" for i, r in enumerate(rows))
    (tmp_path / "c.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
    with pa.output_stream(str(tmp_path / "c.jsonl.zst")) as f:  # zstandard, from the suffix
        f.write(lines.encode("utf-8"))
    table = pa.table({"id": list(range(len(rows))), "body": rows})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=13)
    with pa.ipc.new_file(str(tmp_path / "c.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=17)
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(tmp_path / "saved"))
    files = {name: train_tokenizer([str(tmp_path / name)], 600, text_field="body", out=tmp_path / f"{name}.tok.json")
             .read_bytes() for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet", "c.arrow", "saved")}
    assert len(set(files.values())) == 1
    tok = Tokenizer.from_str(files["saved"].decode())
    assert all(tok.decode(tok.encode(r).ids, skip_special_tokens=False) == r for r in rows)
