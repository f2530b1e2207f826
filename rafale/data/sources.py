"""Corpus files as researchers have them, read as text in row batches, never a whole corpus at once.

    .txt                  one document: the file's text, in consecutive pieces (see below)
    .jsonl                one JSON object per line (blank lines skipped); `text_field` holds the document
    .jsonl.gz, .jsonl.zst the same, compressed (gzip / zstandard; pyarrow's own codecs decompress
                          them, so neither the `zstandard` package nor a `zstd` binary is needed)
    .parquet              read one row group at a time, only the `text_field` column
    .arrow                Arrow IPC, file or stream format (datasets' cache files are the latter),
                          memory-mapped
    a directory written by `datasets.Dataset.save_to_disk`, memory-mapped by `datasets.load_from_disk`

`iter_text_batches` yields lists of at most `batch_rows` documents, in file order, exactly as stored
(no stripping, empty documents kept). A .txt file yields its text in pieces of one-element lists:
the concatenation of the pieces is the file's text exactly (no newline translation), every piece
but the last holds at least TXT_PIECE_CHARS characters and ends at a line end, unless a line is
longer than TXT_PIECE_CHARS, whose piece then ends within that line after at most twice as many.

Every problem with a file (not JSON, not UTF-8, a missing column or a non-string value, a damaged
parquet / arrow / compressed file, an unsupported suffix) is a UserError that names the file, and
for .jsonl the line: raised by the call for the path itself, while iterating for what it holds.
This module depends on no data pipeline.
"""

import io
import json
from pathlib import Path
from typing import Iterator

from rafale.errors import UserError

SUPPORTED = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
CODECS = {".jsonl": None, ".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}  # pyarrow's names
# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their directory.
DATASET_MARKERS = ("state.json", "dataset_dict.json")
BATCH_ROWS = 1024
TXT_PIECE_CHARS = 1 << 20
READ_BUFFER = 1 << 20


def suffix_of(path: Path) -> str | None:
    """The SUPPORTED suffix `path` ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in SUPPORTED if name.endswith(s)), None)


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in DATASET_MARKERS)


def is_source(path: Path) -> bool:
    """Whether `path` is something `iter_text_batches` reads: a file with a SUPPORTED suffix or a
    `save_to_disk` directory."""
    return is_dataset_dir(path) or (path.is_file() and suffix_of(path) is not None)


def find_sources(path: Path, key: str) -> list[Path]:
    """`path` itself when it is a source, else the sources below the directory `path`, sorted
    (hidden files and folders skipped, a `save_to_disk` directory taken whole). Any other file
    there is a UserError, so that nothing is silently left out."""
    if is_source(path) or not path.is_dir():
        return [path]
    found, pending = [], [path]
    while pending:
        folder = pending.pop()
        for entry in folder.iterdir():
            if entry.name.startswith("."):  # .DS_Store, .gitattributes, .cache/ of a hub snapshot
                continue
            if entry.is_dir() and not is_dataset_dir(entry):
                pending.append(entry)
            else:
                found.append(entry)
    if not found:
        raise UserError(f"{key}: directory {path} holds no files; put corpus files in it or name the files")
    for entry in found:
        if not entry.is_dir() and suffix_of(entry) is None:
            raise UserError(f"{key}: {entry}, found in directory {path}, is not a supported corpus file "
                            f"({', '.join(SUPPORTED)} or a save_to_disk directory); name the corpus files "
                            f"instead of the directory, or move the others out")
    return sorted(found)


def iter_text_batches(path: Path, text_field: str, key: str, batch_rows: int = BATCH_ROWS) -> Iterator[list[str]]:
    """The documents of one source in lists of at most `batch_rows` (see the module docstring).
    `key` is the config key or option the path came from; messages start with it."""
    if is_dataset_dir(path):
        return _dataset_dir(path, text_field, key, batch_rows)
    if not path.is_file():
        raise UserError(f"{key}: {path} is not a file or a directory written by datasets' save_to_disk")
    suffix = _check_suffix(path, key)
    if suffix == ".txt":
        return txt_pieces(path, key)
    if suffix in CODECS:
        return _jsonl(path, CODECS[suffix], text_field, key, batch_rows)
    return (_parquet if suffix == ".parquet" else _arrow)(path, text_field, key, batch_rows)


def _check_suffix(path: Path, key: str) -> str:
    suffix = suffix_of(path)
    if suffix is None:
        raise UserError(f"{key}: {path} is not a supported corpus file; use one of {', '.join(SUPPORTED)} "
                        f"or a directory written by datasets' save_to_disk")
    return suffix


def txt_pieces(path: Path, key: str) -> Iterator[list[str]]:
    """A text file's pieces (see the module docstring), whatever its suffix."""
    # newline="" keeps "\r\n" as it is, so the pieces join to exactly path.read_bytes().decode().
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while piece := f.read(TXT_PIECE_CHARS):
                if not piece.endswith("\n"):
                    piece += f.readline(TXT_PIECE_CHARS)
                yield [piece]
    except UnicodeDecodeError as e:
        # The decoder's byte position is within its read buffer, not the file: only the reason is kept.
        raise UserError(f"{key}: {path} is not UTF-8 text ({e.reason}); convert it or leave it out") from None


def _jsonl(path: Path, codec: str | None, text_field: str, key: str, batch_rows: int) -> Iterator[list[str]]:
    # Lines are parsed one by one (not by pyarrow.json) so that an error can name its line, and so
    # that rows need not share a schema: only `text_field` matters.
    import pyarrow as pa

    batch = []
    n = 0
    try:
        # BufferedReader splits at b"\n" only (str.splitlines would also cut at U+2028 and other
        # separators inside JSON strings).
        with io.BufferedReader(pa.input_stream(str(path), compression=codec), READ_BUFFER) as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise UserError(f"{key}: {path} line {n} is not UTF-8 ({e.reason} at byte {e.start + 1}); "
                                    f"convert the file") from None
                except json.JSONDecodeError as e:
                    raise UserError(f"{key}: {path} line {n} is not JSON ({e.msg} at character {e.pos + 1}); "
                                    f"each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise UserError(f"{key}: {path} line {n} is a JSON {type(row).__name__}, not an object; "
                                    f"each line must be one JSON object with a '{text_field}' field")
                if text_field not in row:
                    raise UserError(f"{key}: {path} line {n} has no '{text_field}' field (its fields: "
                                    f"{', '.join(row) or 'none'}); set the text field to the one holding the text")
                text = row[text_field]
                if not isinstance(text, str):
                    raise UserError(f"{key}: {path} line {n}: '{text_field}' is {_json_kind(text)}, not a string; "
                                    f"the text field must hold text")
                batch.append(text)
                if len(batch) == batch_rows:
                    yield batch
                    batch = []
    except OSError as e:  # pyarrow's codecs: "incorrect header check", "Truncated compressed stream"
        where = f" after line {n}" if n else ""
        if codec is None:
            raise UserError(f"{key}: {path} cannot be read{where} ({e})") from None
        raise UserError(f"{key}: {path} does not decompress{where} ({e}); the file is damaged or is not "
                        f"what its suffix says") from None
    if batch:
        yield batch


def _json_kind(value) -> str:
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _parquet(path: Path, text_field: str, key: str, batch_rows: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, memory_map=True)
        schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged or non-parquet file
        raise UserError(f"{key}: {path} is not a readable parquet file ({e})") from None
    _check_column(schema, path, text_field, key)
    # iter_batches decodes one row group at a time (and only this column).
    yield from _column_batches(_guard(pf.iter_batches(batch_size=batch_rows, columns=[text_field]), path, "parquet",
                                      key), path, text_field, key, batch_rows)


def _arrow(path: Path, text_field: str, key: str, batch_rows: int) -> Iterator[list[str]]:
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # not the file format: the stream format, which datasets writes
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
    except Exception as e:  # ArrowInvalid, OSError, ...: not Arrow IPC, or damaged
        raise UserError(f"{key}: {path} is not a readable Arrow IPC file ({e})") from None
    with source:
        _check_column(reader.schema, path, text_field, key)
        yield from _column_batches(_guard(batches, path, "Arrow IPC", key), path, text_field, key, batch_rows)


def _dataset_dir(path: Path, text_field: str, key: str, batch_rows: int) -> Iterator[list[str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, json / Arrow errors for a damaged directory
        raise UserError(f"{key}: {path} is not a readable save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{key}: {path} holds the splits {', '.join(ds)} (a DatasetDict); name one split's "
                        f"directory, e.g. {path / next(iter(ds))}")
    _check_column(ds.data.schema, path, text_field, key)
    tables = ds.select_columns([text_field]).with_format("arrow").iter(batch_size=batch_rows)
    yield from _column_batches(_guard(tables, path, "save_to_disk", key), path, text_field, key, batch_rows)


def _check_column(schema, path: Path, text_field: str, key: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise UserError(f"{key}: {path} has no column '{text_field}' (its columns: {', '.join(schema.names)}); "
                        f"set the text field to the one holding the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{key}: {path} column '{text_field}' holds {kind}, not strings; set the text field "
                        f"to the column holding the text")


def _guard(batches, path: Path, what: str, key: str):
    """`batches` with a damaged file's read error (raised while iterating) as a UserError."""
    try:
        yield from batches
    except Exception as e:
        raise UserError(f"{key}: {path} is not a readable {what} file ({e})") from None


def _column_batches(batches, path: Path, text_field: str, key: str, batch_rows: int) -> Iterator[list[str]]:
    """Lists of exactly batch_rows strings (the last one fewer) from record batches / tables of any size."""
    rows = 0
    pending: list[str] = []
    for batch in batches:
        column = batch.column(text_field)
        if column.null_count:
            first = column.is_null().index(True).as_py()
            raise UserError(f"{key}: {path} row {rows + first + 1}: '{text_field}' is null, not a string; "
                            f"drop or fill the empty rows")
        start = 0
        while start < len(column):
            take = batch_rows - len(pending)
            pending += column.slice(start, take).to_pylist()
            start += take
            if len(pending) == batch_rows:
                yield pending
                pending = []
        rows += len(column)
    if pending:
        yield pending
