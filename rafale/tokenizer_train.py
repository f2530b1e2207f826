"""`rafale tokenizer train`: a tokenizer.json trained on the user's corpus with the `tokenizers` trainers,
ready to be a run's `data.tokenizer`.

    bpe        byte-level BPE as GPT-2 (ByteLevel pre-tokenizer and decoder, no prefix space, the 256
               byte tokens always in the vocabulary); special token <|endoftext|>, which the causal
               pipeline takes as its EOS. decode(encode(x)) == x for every string.
    unigram    a Unigram LM (SentencePiece's algorithm) on Metaspace pieces without a prepended "▁"
               (as Gemma), no normalizer; specials <unk> <s> </s> (</s> is the causal EOS).
               decode(encode(x)) == x when every character of x occurred in the training text (others
               become <unk>) and x holds no literal "▁" (it decodes as a space).
    wordpiece  BERT-uncased style: BertNormalizer (lowercase, accents stripped, control characters
               dropped), BertPreTokenizer, "##" continuations, [CLS] a [SEP] (b [SEP]) post-processing;
               specials [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0..4), which the mlm and classification
               pipelines need. Lossy by design: decode gives the normalized words joined by spaces.

Extra `special` tokens come after the kind's own. Special tokens found in the training text are cut
out of it first: encode() matches them before the model sees the text, so merges learned for their
pieces would only waste vocabulary.

Reproducibility (tokenizers 0.21): bpe and wordpiece give the same file bytes for the same input,
whatever the thread count and process. unigram does not: `UnigramTrainer` sums its EM statistics in
a hash map's iteration order and scores the characters it re-adds in a hash set's, both of which change
per process. Trained twice on 300 kB of TinyStories the pieces were the same, but 191 of 1,000 scores
differed (by up to 0.002), and so did the order of 42 pieces.

The file is written atomically (a temporary file renamed over `out`): an existing file is replaced,
never left half-written.
"""

import json
import os
import re
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rafale.data import sources as corpus
from rafale.errors import UserError
from rafale.paths import resolve_data_path

KINDS = ("bpe", "unigram", "wordpiece")
SPECIAL = {"bpe": ("<|endoftext|>",), "unigram": ("<unk>", "<s>", "</s>"),
           "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte
KEY = "sources"


def train_tokenizer(sources: list[str], vocab_size: int, kind: str = "bpe", special: list[str] = (),
                    text_field: str = "text", *, out: Path) -> Path:
    """Trains a `kind` tokenizer of at most `vocab_size` tokens (fewer when the corpus runs out of
    merges) on `sources` (files, save_to_disk directories, or directories of them; see
    rafale.data.sources) and writes it to `out` (a directory gets out/tokenizer.json). Returns the path."""
    if kind not in KINDS:
        raise UserError(f"--kind: unknown tokenizer kind '{kind}'; use one of {', '.join(KINDS)}")
    if not sources:
        raise UserError("no sources given; name corpus files or directories to train on")
    specials = list(dict.fromkeys([*SPECIAL[kind], *special]))  # kind's first, duplicates dropped
    if any(not s for s in specials):
        raise UserError("--special: a special token cannot be empty")
    floor = len(specials) + (BYTE_ALPHABET if kind == "bpe" else 1)
    if vocab_size < floor:
        what = f"the {BYTE_ALPHABET} byte tokens and " if kind == "bpe" else ""
        raise UserError(f"--vocab-size {vocab_size} is too small: it must hold {what}the {len(specials)} special "
                        f"token(s) {' '.join(specials)} and more; use at least {floor}")
    paths = [p for spec in sources for p in corpus.find_sources(resolve_data_path(spec, KEY), KEY)]
    out = _output_path(Path(out).expanduser())

    def texts() -> Iterator[list[str]]:
        return _without_specials(_batches(paths, text_field), specials)

    tok, trainer = _build(kind, vocab_size, specials, texts)
    try:
        tok.train_from_iterator(texts(), trainer)
    except UserError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions
        if "not large enough to contain all chars" not in str(e):
            raise
        raise UserError(f"--vocab-size {vocab_size} cannot hold the {len(specials)} special token(s) and every "
                        f"character of the corpus, which a unigram vocabulary must; raise it") from None
    if kind == "wordpiece":
        tok = _drop_added(tok, specials)
    if tok.get_vocab_size() > vocab_size:  # the trainers keep the whole alphabet whatever the size
        raise UserError(f"--vocab-size {vocab_size} is smaller than the corpus alphabet and the special tokens "
                        f"({tok.get_vocab_size()} tokens before any merge); raise it above that")
    _write_atomically(out, tok.to_str(pretty=True))
    return out


def _batches(paths: list[Path], text_field: str) -> Iterator[list[str]]:
    for path in paths:
        yield from corpus.iter_text_batches(path, text_field, KEY)


def _without_specials(batches: Iterator[list[str]], specials: list[str]) -> Iterator[list[str]]:
    # Longest first, so that a special containing another is cut whole.
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    for batch in batches:
        yield [part for text in batch for part in pattern.split(text)]


def _build(kind: str, vocab_size: int, specials: list[str], texts) -> tuple[Tokenizer, trainers.Trainer]:
    """The untrained tokenizer (normalizer, pre-tokenizer, decoder, post-processor) and its trainer."""
    if kind == "bpe":
        # As tokenizers' own ByteLevelBPETokenizer.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if kind == "unigram":
        # No prepended "▁" (SentencePiece's add_dummy_prefix): with it, a leading space would not
        # survive decode, since the decoder drops the first "▁" of the text.
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        return tok, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                            show_progress=False)
    # wordpiece, as tokenizers' BertWordPieceTokenizer, without its limit_alphabet=1000: the trainer
    # picks the chars to drop by an unstable sort of their counts, so ties would drop different ones.
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials_ids = [(s, specials.index(s)) for s in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=specials_ids)
    continuations = [f"##{c}" for c in _word_inner_chars(tok, texts())]
    return tok, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials + continuations,
                                          show_progress=False)


def _word_inner_chars(tok: Tokenizer, batches: Iterator[list[str]]) -> list[str]:
    """The normalized characters that can stand inside a word, sorted.

    tokenizers' BPE trainer (under WordPieceTrainer) numbers each "##c" token when it first meets it
    while walking a hash map of words, an order that changes per process; equal pair counts are then
    broken by those numbers, so two runs keep different tokens. Handing it every "##c" up front, as
    special tokens (numbered in list order), makes the result reproducible; `_drop_added` then
    turns them back into ordinary vocabulary. The costs: a first pass over the corpus, and a "##c"
    also for a character the corpus only has at the start of words (so that any word spelled in the
    alphabet encodes without [UNK])."""
    raw = set()
    for batch in batches:
        for text in batch:
            raw.update(text)
    # BertNormalizer works character by character (cleanup, CJK spacing, NFD + accent removal, lowercasing).
    chars = {c for r in raw for c in tok.normalizer.normalize_str(r)}
    return sorted(c for c in chars
                  if len(tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(f"a{c}a"))) == 1)


def _drop_added(tok: Tokenizer, keep: list[str]) -> Tokenizer:
    """`tok` with only `keep` as added tokens; the others stay in the model's vocabulary."""
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in keep]
    return Tokenizer.from_str(json.dumps(spec))


def _output_path(out: Path) -> Path:
    """`out`, or out/tokenizer.json for a directory, with its parent made now rather than after training."""
    if out.is_dir():
        out = out / "tokenizer.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"-o: cannot create the directory of {out} ({e.strerror}); choose another path") from None
    return out


def _write_atomically(out: Path, text: str) -> None:
    try:
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"-o: cannot write {out} ({e.strerror}); choose another path") from None
