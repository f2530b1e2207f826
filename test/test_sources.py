"""Corpus readers: the same documents written by the formats' own writers (json, gzip, pyarrow,
datasets) come back identical and in order from every format; .txt pieces join to the file exactly;
every damaged or mismatched file is a one-line UserError naming the file (and the line)."""

import gzip
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rafale.data import sources
from rafale.data.sources import find_sources, is_source, iter_text_batches
from rafale.errors import UserError
from rafale.paths import ASSETS_DIR

STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"
SHAKESPEARE = ASSETS_DIR / "tinyshakespeare" / "input.txt"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878, 3.1.1: every zstandard frame starts with it
# What JSON, Arrow and the readers must keep as it is: non-ASCII of several scripts, "\r\n", tabs,
# surrounding whitespace, and U+2028 / U+0085, which str.splitlines would take for line breaks.
SAMPLES = ["Ça va? «Très bien», dit-elle — naïve café.", "Größe: 3 m²; Straße", "Ελληνικά και русский",
           "日本語のテキスト、中文文本。", "مرحبا بالعالم", "नमस्ते दुनिया", "emoji 👩‍👩‍👧 and e\u0301 combining",
           "line one\r\nline two\r\n", "\ttabbed\n\n  indented  ", "sep\u2028inside\u0085too"]


def documents() -> list[str]:
    stories = [s.strip() for s in STORIES.read_text(encoding="utf-8").split("<|endoftext|>")[:40]]
    return [d for pair in zip(stories, SAMPLES * 4) for d in pair]


def texts(path: Path, text_field: str = "text", key: str = "k") -> list[str]:
    return [doc for batch in iter_text_batches(path, text_field, key) for doc in batch]


def write_all_formats(folder: Path, docs: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    txt = folder / "txt"
    txt.mkdir()
    for i, doc in enumerate(docs):
        (txt / f"doc{i:03d}.txt").write_bytes(doc.encode("utf-8"))  # bytes: no newline translation
    lines = "".join(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    (folder / "c.jsonl").write_text(lines, encoding="utf-8")
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
    with pa.output_stream(str(folder / "c.jsonl.zst")) as f:  # the codec from the suffix
        f.write(lines.encode("utf-8"))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, folder / "c.parquet", row_group_size=9)  # several row groups
    with pa.ipc.new_file(str(folder / "c.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=11)
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(folder / "saved"))
    # datasets' own cache file: the Arrow IPC stream format
    shutil.copy(next((folder / "saved").glob("*.arrow")), folder / "stream.arrow")
    return {"txt": txt, "jsonl": folder / "c.jsonl", "gz": folder / "c.jsonl.gz", "zst": folder / "c.jsonl.zst",
            "parquet": folder / "c.parquet", "arrow": folder / "c.arrow", "stream": folder / "stream.arrow",
            "saved": folder / "saved"}


def test_every_format_yields_the_same_documents_in_order(tmp_path):
    docs = documents()
    paths = write_all_formats(tmp_path, docs)
    # pyarrow's bundled codec writes and reads it: neither the zstandard package nor a zstd binary is needed
    assert (tmp_path / "c.jsonl.zst").read_bytes()[:4] == ZSTD_MAGIC
    from_txt = [d for p in find_sources(paths.pop("txt"), "k") for d in texts(p)]
    assert from_txt == docs
    for name, path in paths.items():
        batches = list(iter_text_batches(path, "text", "k", batch_rows=7))
        assert [len(b) for b in batches] == [7] * (len(docs) // 7) + [len(docs) % 7], name
        assert [d for b in batches for d in b] == docs, name


def test_txt_pieces_join_to_the_file_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TXT_PIECE_CHARS", 4096)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000].replace("\n", "\r\n", 50) + "é" * 20_000 + "\nend"
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8"))
    batches = list(iter_text_batches(path, "text", "k"))
    pieces = [b[0] for b in batches]
    assert all(len(b) == 1 for b in batches) and len(pieces) > 10
    assert "".join(pieces) == path.read_bytes().decode("utf-8")
    for piece in pieces[:-1]:
        # a line end, or within the 20,000-character line after at most twice the piece size
        assert len(piece) >= 4096 and (piece.endswith("\n") or len(piece) == 2 * 4096)
    assert any(len(p) == 2 * 4096 for p in pieces)
    (tmp_path / "empty.txt").write_text("")
    assert texts(tmp_path / "empty.txt") == []


def test_find_sources_walks_folders_and_takes_saved_datasets_whole(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / ".hidden.csv").write_text("skipped")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.lock").write_text("skipped")
    datasets.Dataset.from_dict({"text": ["s"]}).save_to_disk(str(tmp_path / "b" / "saved"))
    assert find_sources(tmp_path, "k") == [tmp_path / "a.jsonl", tmp_path / "b" / "saved", tmp_path / "b" / "z.txt"]
    assert [d for p in find_sources(tmp_path, "k") for d in texts(p)] == ["a", "s", "z"]
    assert is_source(tmp_path / "b" / "saved") and is_source(tmp_path / "a.jsonl") and not is_source(tmp_path)
    (tmp_path / "README.md").write_text("not a corpus file")
    with pytest.raises(UserError, match=r"k: .*README\.md, found in directory .*, is not a supported corpus file "
                                        r"\(\.txt, \.jsonl, \.jsonl\.gz, \.jsonl\.zst, \.parquet, \.arrow or"):
        find_sources(tmp_path, "k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        find_sources(tmp_path / "empty", "k")


def _table_files(folder: Path) -> dict[str, Path]:
    table = pa.table({"body": ["a", "b"], "n": [1, 2]})
    pq.write_table(table, folder / "t.parquet")
    with pa.ipc.new_file(str(folder / "t.arrow"), table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_dict({"body": ["a", "b"], "n": [1, 2]}).save_to_disk(str(folder / "saved"))
    return {"parquet": folder / "t.parquet", "arrow": folder / "t.arrow", "saved": folder / "saved"}


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "saved"])
def test_columns_are_checked(tmp_path, fmt):
    path = _table_files(tmp_path)[fmt]
    with pytest.raises(UserError, match=rf"k: .*{path.name} has no column 'text' \(its columns: body, n\)"):
        texts(path, key="k")
    with pytest.raises(UserError, match=rf"{path.name} column 'n' holds int64, not strings"):
        texts(path, text_field="n", key="k")
    assert texts(path, text_field="body") == ["a", "b"]


def _jsonl_errors() -> list[tuple[bytes, str]]:
    ok = b'{"text": "fine"}\n'
    return [(ok + b'{"text": "a"\n', r"line 2 is not JSON \(Expecting ',' delimiter"),
            (ok + b"\n" + b'[1, 2]\n', r"line 3 is a JSON list, not an object"),
            (ok + b'{"body": "x", "n": 1}\n', r"line 2 has no 'text' field \(its fields: body, n\)"),
            (ok + ok + b'{"text": 7}\n', r"line 3: 'text' is a JSON int, not a string"),
            (b'{"text": null}\n', r"line 1: 'text' is null, not a string"),
            (ok + b'{"text": "\xff"}\n', r"line 2 is not UTF-8")]


@pytest.mark.parametrize("content,message", _jsonl_errors())
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_errors_name_the_line(tmp_path, content, message, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    with pytest.raises(UserError, match=rf"^data.val: {path} {message}"):
        texts(path, key="data.val")


def test_damaged_files_are_user_errors(tmp_path):
    good = write_all_formats(tmp_path / "good", documents()[:30])
    cases = {"not-gzip.jsonl.gz": (b"plain text, not gzip", "does not decompress"),
             "cut.jsonl.gz": (good["gz"].read_bytes()[:200], "does not decompress"),
             "cut.jsonl.zst": (good["zst"].read_bytes()[:-9], "does not decompress"),
             "gz-as-zst.jsonl.zst": (good["gz"].read_bytes(), "does not decompress"),
             "junk.parquet": (b"PAR1 is not enough", "is not a readable parquet file"),
             "cut.parquet": (good["parquet"].read_bytes()[:-30], "is not a readable parquet file"),
             "empty.arrow": (b"", "is not a readable Arrow IPC file"),
             "cut.arrow": (good["arrow"].read_bytes()[:-100], "is not a readable Arrow IPC file"),
             "cut-stream.arrow": (good["stream"].read_bytes()[:-200], "is not a readable Arrow IPC file"),
             "latin1.txt": ("café".encode("latin-1"), "is not UTF-8 text")}
    # a flipped stretch inside a data page (snappy-compressed), past the footer checks
    damaged = bytearray(good["parquet"].read_bytes())
    damaged[len(damaged) // 3:len(damaged) // 3 + 64] = b"\xff" * 64
    cases["inside.parquet"] = (bytes(damaged), "is not a readable parquet file")
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError, match=rf"^k: {path} {message}"):
            texts(path, key="k")


def test_unsupported_nulls_dataset_dicts_and_missing_paths(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"x\.csv is not a supported corpus file; use one of \.txt, .*\.arrow or a "
                                        r"directory written by datasets' save_to_disk"):
        texts(tmp_path / "x.csv")
    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "n.parquet", row_group_size=2)
    with pytest.raises(UserError, match=r"n\.parquet row 3: 'text' is null"):
        texts(tmp_path / "n.parquet")
    one = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"holds the splits .*train.*; name one split's directory"):
        texts(tmp_path / "dd")
    with pytest.raises(UserError, match="is not a file or a directory written by datasets' save_to_disk"):
        texts(tmp_path / "missing.jsonl")
