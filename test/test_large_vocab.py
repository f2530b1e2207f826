"""A tokenizer of more than 65,536 tokens: its ids are stored as uint32 and come back unchanged (no
wrap-around at 2**16) from the cache file through the DataLoader, in the causal_lm and mlm pipelines."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from rafale.data import cache
from rafale.data.causal_lm import CausalLM, prepare_causal_lm
from rafale.data.loaders import pipeline_loader
from rafale.data.mlm import prepare_mlm

N_WORDS = 70_000
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"]


@pytest.fixture
def big_tokenizer(tmp_path):
    """A word-level tokenizer over w0 .. w69999, built with `tokenizers`; special tokens get the ids after them."""
    vocab = {f"w{i}": i for i in range(N_WORDS)}
    vocab.update({t: N_WORDS + i for i, t in enumerate(SPECIAL)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    path = tmp_path / "big.json"
    tok.save(str(path))
    return path


def text_of(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_ids_above_65535_round_trip_through_the_cache_and_loader(big_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, N_WORDS, 50) for _ in range(8)]
    docs[0][:4] = [65535, 65536, 65537, N_WORDS - 1]  # both sides of the uint16 limit
    corpus = tmp_path / "words.txt"
    corpus.write_text("<|endoftext|>".join(text_of(d) for d in docs))
    eos = N_WORDS + SPECIAL.index("<|endoftext|>")
    assert cache.token_dtype(N_WORDS + len(SPECIAL)) == np.uint32 and cache.token_dtype(65536) == np.uint16

    data = prepare_causal_lm(str(corpus), str(big_tokenizer), 17, val_fraction=0, doc_separator="<|endoftext|>")
    stream = np.concatenate([np.append(d, eos) for d in docs])
    n = len(stream) // 17
    assert data.train.dtype == np.uint32 and data.meta["dtype"] == "uint32"
    on_disk = np.load(data.path / "train.npy")
    assert np.array_equal(on_disk, stream[:n * 17].reshape(n, 17)) and on_disk.max() > 65535
    loader = pipeline_loader(CausalLM(CausalLM.Section()), data.train, data.meta, batch_size=n, shuffle=False,
                             seed=0, drop_last=False)
    batch = next(iter(loader))["input_ids"]
    assert batch.dtype == torch.int64 and torch.equal(batch, torch.from_numpy(stream[:n * 17].astype(np.int64)).view(n, 17))

    mlm = prepare_mlm(str(corpus), str(big_tokenizer), 32, val_fraction=0, doc_separator="<|endoftext|>")
    assert mlm.train.dtype == np.uint32
    kept = np.asarray(mlm.train).ravel()
    assert {65535, 65536, 65537, N_WORDS - 1} <= set(kept.tolist())
