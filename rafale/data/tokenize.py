"""Text to token ids, as the pipelines share it: sources (a file, a list, or a directory walked
sorted), documents (a file, or pieces of one cut at `doc_separator`, stripped, empty ones dropped),
and fast parallel tokenization of each document with a separator id after it, into one stream.

It also finds a tokenizer's end-of-document token and an encoder tokenizer's special tokens by role.
It imports no torch.
"""

import itertools
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from rafale.data import sources
from rafale.errors import UserError
from rafale.paths import resolve_data_path

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[SEP]")

# encode_batch parallelises over its inputs only, so one big document (Tiny Shakespeare is one
# file) would run on a single thread: it is cut into pieces of about this many characters.
# On 2 cores: 0.18 s for Tiny Shakespeare in 4 KB pieces, 0.9 s as one `encode` call; smaller
# pieces gained nothing, 16 KB+ pieces were slower.
PIECE_CHARS = 4096
# Text handed to one encode_batch call: bounds the memory held by Encoding objects (each keeps
# token strings and masks besides the ids), and the wait for a Ctrl-C, which Python handles only
# between two calls (1 MiB: ~0.2 s on 2 cores).
BATCH_CHARS = 1 << 20

# Safe cuts: (a) before a space that follows a non-space, (b) after a newline that has non-spaces on
# both sides. With the GPT-2 and Llama-3 pre-tokenizer regexes (byte-level BPE: GPT-2, NeoX,
# SmolLM2, Llama-3) both are pre-token boundaries AND the pre-token before the cut ends the same
# way whether or not the text after it is there: no pattern extends a word, number or punctuation
# run into a following space, and a lone "\n" between non-spaces is one pre-token either way.
# Cuts anywhere else in whitespace are not safe: "a\n\nb" pre-tokenizes as a,\n,\n,b while a
# piece ending in "a\n\n" gives a,\n\n (GPT-2's `\s+(?!\S)` looks ahead), and Llama-3's
# ` ?[^\s\p{L}\p{N}]+[\r\n]*` glues "." to the newline after it. Python's `\s` covers every
# Unicode White_Space character (plus \x1c-\x1f), so `\S` here is never whitespace to the tokenizer.
SAFE_CUT = re.compile(r"\S(?= )|\S\n(?=\S)")

# Text on which cutting at SAFE_CUT must not change the tokens (checked per tokenizer, see
# `cutting_is_exact`): words, digits, punctuation, quotes and non-ASCII right after a cut.
PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n'Tis so.\n1984 was a year.\n"
         "«Ça va?»\nÉcole\n  indented line\n\nAfter a blank line\n-- dash\n(paren)\nend. \n = Title = \n"
         " \n It 's 12345 km ( 24 in ) .\tTab\n")


def load_tokenizer(tokenizer_json: str | bytes, where: str = "data.tokenizer") -> Tokenizer:
    """A tokenizer.json's text as a Tokenizer; a UserError naming `where` (the key and file) when the
    file is not a tokenizer or gives ids its vocabulary does not count (they would index past the
    model's embedding)."""
    try:
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every malformed file
        raise UserError(f"{where} is not a valid tokenizer.json ({' '.join(str(e).split())[:120]}); point it "
                        f"at a tokenizer.json saved by `tokenizers` or transformers") from None
    size, (token, top) = tok.get_vocab_size(with_added_tokens=True), max(
        tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    if top >= size:
        raise UserError(f"{where}: token {token!r} has id {top}, past the {size:,} tokens of its vocabulary; "
                        f"renumber the vocabulary from 0 without gaps")
    # Some tokenizer.json files carry truncation/padding (bert-base-uncased: 128); here they would
    # silently cut every piece of text, so both are switched off.
    tok.no_truncation()
    tok.no_padding()
    return tok


def list_sources(spec: str | list[str], key: str) -> list[Path]:
    """Config source(s) -> sources in order: a list keeps its order, a directory is walked sorted (a
    `datasets.save_to_disk` directory, named or found inside, is one source)."""
    files = []
    for item in [spec] if isinstance(spec, str) else spec:
        if not isinstance(item, str):
            raise UserError(f"{key}: {item!r} is not a path; a {{path, weight}} source belongs to a mixture, "
                            f"which this pipeline does not read")
        path = resolve_data_path(item, key)
        if path.is_file() or sources.is_dataset_dir(path):
            files.append(path)
            continue
        # Hidden files (.DS_Store, .gitkeep, editor swap files) are never corpus text.
        found = sorted(p for p in _walk(path) if not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise UserError(f"{key}: directory '{item}' ({path}) holds no files; put text files in it "
                            f"or point {key} at files")
        files += found
    if not files:
        raise UserError(f"{key}: no files given; set it to a file, a list of files or a directory")
    return files


def _walk(folder: Path):
    for entry in folder.iterdir():
        if entry.is_dir() and not sources.is_dataset_dir(entry):
            yield from _walk(entry)
        elif entry.is_file() or entry.is_dir():
            yield entry


def resolve_eos(tok: Tokenizer, eos_token: str | None, tokenizer_path: Path, key_prefix: str) -> tuple[str, int]:
    candidates = [eos_token] if eos_token is not None else list(EOS_CANDIDATES)
    for token in candidates:
        if (token_id := tok.token_to_id(token)) is not None:
            return token, token_id
    special = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
    hint = f"its special tokens are {', '.join(special)}" if special else "it has no special tokens"
    if eos_token is not None:
        raise UserError(f"{key_prefix}.eos_token: '{eos_token}' is not a token of {tokenizer_path}; {hint}")
    raise UserError(f"{key_prefix}.eos_token: {tokenizer_path} has none of {', '.join(EOS_CANDIDATES)}; "
                    f"set {key_prefix}.eos_token to the token that ends a document ({hint})")


# Encoder tokenizers' special tokens by role: BERT's WordPiece names first, then RoBERTa's.
SPECIAL_CANDIDATES = {"cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "pad": ("[PAD]", "<pad>"),
                      "mask": ("[MASK]", "<mask>"), "unk": ("[UNK]", "<unk>")}


def special_tokens(tok: Tokenizer, key: str, tokenizer_path: Path,
                   need: tuple[str, ...] = ("cls", "sep", "pad", "mask")) -> dict[str, tuple[str, int]]:
    """role -> (token, id) for the encoder pipelines (mlm, classification); a UserError naming what the
    tokenizer lacks when a role in `need` has none (an optional role without one is left out)."""
    found = {}
    for role, candidates in SPECIAL_CANDIDATES.items():
        hit = next(((t, i) for t in candidates if (i := tok.token_to_id(t)) is not None), None)
        if hit is not None:
            found[role] = hit
    missing = [f"{role} ({' or '.join(SPECIAL_CANDIDATES[role])})" for role in need if role not in found]
    if missing:
        raise UserError(f"{key}: {tokenizer_path} has no {', '.join(missing)} token; this pipeline needs an "
                        f"encoder tokenizer such as the bundled bert-base-uncased or roberta-base")
    return found


def read_text(path: Path, key: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{key}: {path} is not UTF-8 text ({e}); convert it or leave it out") from None


def split_documents(text: str, doc_separator: str | None) -> list[str]:
    parts = text.split(doc_separator) if doc_separator else [text]
    # TinyStories puts its separator on a line of its own: the newlines around it are not content.
    return [doc for part in parts if (doc := part.strip())]


def split_pieces(doc: str, size: int = PIECE_CHARS) -> list[str]:
    """`doc` cut at the first SAFE_CUT point after every `size` characters; "".join(result) == doc."""
    pieces, start = [], 0
    while len(doc) - start > size and (m := SAFE_CUT.search(doc, start + size - 1)):
        pieces.append(doc[start:m.end()])
        start = m.end()
    pieces.append(doc[start:])
    return pieces


def cutting_is_exact(tok: Tokenizer, sample: str) -> bool:
    """Whether tokenizing pieces cut at every SAFE_CUT point gives the tokens of the whole text.

    True for byte-level BPE (GPT-2, NeoX, Llama-3 style) and BERT; false when a tokenizer adds a
    prefix space per input (ByteLevel add_prefix_space, SentencePiece's "▁") or strips its input.
    Checked on PROBE plus a sample of the corpus rather than trusted from the tokenizer's type.
    """
    text = PROBE + sample
    whole = tok.encode(text, add_special_tokens=False).ids
    pieces = tok.encode_batch_fast(split_pieces(text, size=1), add_special_tokens=False)
    return whole == [i for e in pieces for i in e.ids]


def iter_records(path: Path, text_field: str, key: str) -> Iterator[tuple[str, bool]]:
    """(text, last) pairs of one source: each row of a row format (.jsonl, .parquet, .arrow, save_to_disk)
    whole, a text file (.txt, or any other suffix, read as text) as one record in bounded pieces."""
    if sources.is_dataset_dir(path) or sources.suffix_of(path) not in (None, ".txt"):
        for batch in sources.iter_text_batches(path, text_field, key):
            for row in batch:
                yield row, True
        return
    previous = None
    for (piece,) in sources.txt_pieces(path, key):
        if previous is not None:
            yield previous, False
        previous = piece
    yield previous or "", True


class _Stripped:
    """One document's text as it arrives, stripped at both ends like str.strip(), without holding it whole:
    leading whitespace is dropped, trailing whitespace held back until more text follows it."""

    def __init__(self):
        self.started, self.held = False, ""

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body):]
        return out


def iter_documents(paths: list[Path], text_field: str, doc_separator: str | None,
                   key: str) -> Iterator[tuple[str, bool]]:
    """Every document of these sources as (fragment, last) pairs, the text of one document being its
    fragments joined up to the one with last=True. A record (a row, or a text file) is split into
    documents at `doc_separator`; each is stripped and empty ones are dropped (split_documents). Memory
    is bounded by a text file's piece (sources.TXT_PIECE_CHARS), never a whole file."""
    keep = len(doc_separator) - 1 if doc_separator else 0  # a separator may straddle two pieces
    for path in paths:
        pending, doc = "", _Stripped()
        for text, last in iter_records(path, text_field, key):
            parts = (pending + text).split(doc_separator) if doc_separator else [text]
            for part in parts[:-1]:
                out = doc.add(part)
                if doc.started:
                    yield out, True
                doc = _Stripped()
            tail = parts[-1]
            if last:
                out = doc.add(tail)
                if doc.started:
                    yield out, True
                pending, doc = "", _Stripped()
                continue
            cut = max(0, len(tail) - keep)
            pending = tail[cut:]
            if out := doc.add(tail[:cut]):
                yield out, False


def tokenize_files(paths: list[Path], tok: Tokenizer, eos_id: int, doc_separator: str | None,
                   dtype: type, key: str, text_field: str = "text") -> tuple[np.ndarray, int]:
    """Every document's ids followed by `eos_id`, as one array. Returns (stream, n_documents).

    A document arriving in fragments (a large text file) is tokenized as its text joined would be: each
    fragment is cut at SAFE_CUT points and only the part after the last cut waits for the next one (or,
    for a tokenizer that cutting would change, the whole document waits)."""
    arrays, batch, ends, n_chars, n_docs, cut = [], [], [], 0, 0, None
    carry = ""

    def flush():
        # encode_batch_fast skips the character offsets that encode_batch computes and we never use.
        encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
        ids = itertools.chain.from_iterable(e.ids + [eos_id] if end else e.ids
                                            for e, end in zip(encodings, ends))
        arrays.append(np.fromiter(ids, dtype=dtype))
        batch.clear()
        ends.clear()

    for fragment, last in iter_documents(paths, text_field, doc_separator, key):
        if cut is None:
            cut = cutting_is_exact(tok, fragment[:PIECE_CHARS])
        carry += fragment
        if not last and not cut:
            continue
        # A tokenizer that cutting would change still parallelises over documents, not within.
        pieces = split_pieces(carry) if cut else [carry]
        carry = "" if last else pieces.pop()
        batch += pieces
        ends += [False] * (len(pieces) - 1) + [last] if pieces else []
        n_chars += sum(map(len, pieces))
        if last:
            n_docs += 1
        if n_chars >= BATCH_CHARS:
            flush()
            n_chars = 0
    if batch:
        flush()
    return _joined(arrays, dtype), n_docs


def _joined(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    """np.concatenate(arrays), freeing each part once copied: peak memory is the result plus one part,
    not twice the result (which for a 1 GB corpus is the difference between ~0.5 and ~1 GB)."""
    out = np.empty(sum(len(a) for a in arrays), dtype)
    arrays.reverse()
    start = 0
    while arrays:
        part = arrays.pop()
        out[start:start + len(part)] = part
        start += len(part)
    return out


def to_blocks(stream: np.ndarray, max_seq_len: int) -> np.ndarray:
    """(n_blocks, max_seq_len) view of the stream; the tail shorter than a block is dropped."""
    n = len(stream) // max_seq_len
    return stream[:n * max_seq_len].reshape(n, max_seq_len)
