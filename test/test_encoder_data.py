"""The encoder datapipes: MLM blocks against the tokenizer's own encoding, the MLM collator's masking
statistics and seeding, classification tables (jsonl / csv / tsv / parquet, pairs, truncation, labels),
the padding collator, and the shared cache's hit / miss rules for both pipelines."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rafale.data.classification import prepare_classification
from rafale.data.classification import Classification, PaddingCollator
from rafale.data.mlm import MLMCollator
from rafale.data.loaders import BlockDataset, build_dataloader
from rafale.data.mlm import prepare_mlm
from rafale.errors import UserError
from rafale.paths import ASSETS_DIR, resolve_tokenizer

WIKI = ASSETS_DIR / "wikitext-2" / "valid.txt"
SST2 = ASSETS_DIR / "sst2" / "glue_validation.tsv"
IMDB = ASSETS_DIR / "imdb" / "test.jsonl"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tokenizer(name: str) -> Tokenizer:
    tok = Tokenizer.from_file(str(resolve_tokenizer(name)))
    tok.no_truncation()
    tok.no_padding()
    return tok


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- MLM pipeline ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls, sep", [("bert-base-uncased", 101, 102), ("roberta-base", 0, 2)])
def test_mlm_blocks_frame_the_sep_joined_documents(home, tmp_path, name, cls, sep):
    text = WIKI.read_text()[:40_000]
    src = write(tmp_path / "w.txt", text)
    data = prepare_mlm(str(src), name, 64, val_fraction=0.1, doc_separator="\n = ")
    tok = tokenizer(name)
    docs = [d.strip() for d in text.split("\n = ") if d.strip()]
    stream = [i for d in docs for i in tok.encode(d, add_special_tokens=False).ids + [sep]]
    blocks = np.concatenate([data.train, data.val])
    assert blocks.shape[1] == 64 and (blocks[:, 0] == cls).all() and (blocks[:, -1] == sep).all()
    n = len(stream) // 62
    assert blocks[:, 1:-1].ravel().tolist() == stream[:n * 62]
    assert len(data.val) == round(n * 0.1) and data.meta["stats"]["documents"] == len(docs)
    assert data.meta["special"]["mask"][1] == tok.token_to_id("[MASK]" if cls == 101 else "<mask>")
    # Cache: a repeat hits; the masking probability is the collator's and never part of the key.
    assert prepare_mlm(str(src), name, 64, val_fraction=0.1, doc_separator="\n = ").hit
    assert not prepare_mlm(str(src), name, 32, val_fraction=0.1, doc_separator="\n = ").hit
    assert data.path.name.startswith("mlm-")


def test_mlm_pipeline_errors_name_the_key(home, tmp_path):
    src = str(write(tmp_path / "s.txt", "only a few words"))  # 4 tokens + [SEP]
    with pytest.raises(UserError, match=r"^data\.train: the text is 5 tokens, less than one block of "
                                        r"data\.max_seq_len=64 \(\[CLS\] \+ 62 \+ \[SEP\]\)"):
        prepare_mlm(src, "bert-base-uncased", 64)
    with pytest.raises(UserError, match=r"^data\.max_seq_len: must be at least 3"):
        prepare_mlm(src, "bert-base-uncased", 2)
    with pytest.raises(UserError, match=r"^data\.tokenizer: .*has no cls \(\[CLS\] or <s>\), .*mask"):
        prepare_mlm(src, "gpt-neox-20b", 4)


# --- MLM collator ---------------------------------------------------------------------------------

def mlm_batch(collator: MLMCollator, blocks: np.ndarray):
    return collator([{"input_ids": torch.from_numpy(b.astype(np.int64))} for b in blocks])


def test_mlm_masking_statistics():
    """15% of the non-special tokens get a label; of those 80% become [MASK], 10% a random token, 10%
    stay; special tokens are never picked; every other label is -100."""
    rng = np.random.default_rng(0)
    special = [0, 100, 101, 102, 103]
    blocks = rng.integers(999, 30522, (400, 128))
    blocks[:, 0], blocks[:, -1] = 101, 102
    blocks[::7, 60] = 100  # [UNK] inside the text
    blocks[::5, 100:] = 0  # and some padding
    collator = MLMCollator(mask_id=103, vocab_size=30522, special_ids=special, probability=0.15, seed=1)
    batch = mlm_batch(collator, blocks)
    ids, inputs, labels = torch.from_numpy(blocks), batch["input_ids"], batch["labels"]
    picked = labels != -100
    is_special = torch.isin(ids, torch.tensor(special))
    assert not (picked & is_special).any()
    assert torch.equal(labels[picked], ids[picked])  # labels are the original tokens
    assert torch.equal(inputs[~picked], ids[~picked])  # nothing else changes
    rate = picked.sum().item() / (~is_special).sum().item()
    masked = (inputs[picked] == 103).float().mean().item()
    replaced = ((inputs[picked] != 103) & (inputs[picked] != ids[picked])).float().mean().item()
    kept = (inputs[picked] == ids[picked]).float().mean().item()
    print(f"picked {rate:.4f}, of which [MASK] {masked:.4f}, random {replaced:.4f}, kept {kept:.4f}")
    # 46k candidate tokens: 3 standard deviations is under 0.005 for the rate, 0.01 for the split.
    assert abs(rate - 0.15) < 0.005
    assert abs(masked - 0.8) < 0.015 and abs(replaced - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    random_tokens = inputs[picked][(inputs[picked] != 103) & (inputs[picked] != ids[picked])]
    assert random_tokens.unique().numel() > 500  # drawn across the vocabulary
    assert mlm_batch(MLMCollator(103, 30522, special, 0.3, seed=1), blocks)["labels"].ne(-100).float().mean() > 0.25


def test_mlm_masks_are_new_each_epoch_fixed_for_eval_and_independent_of_batching(home, tmp_path):
    blocks = np.random.default_rng(0).integers(999, 30522, (16, 32)).astype(np.uint16)
    collator = MLMCollator(103, 30522, [0, 100, 101, 102, 103], 0.15, seed=7)

    def epoch_labels(shuffle: bool, epoch: int, batch_size: int = 4):
        loader = build_dataloader(BlockDataset(blocks), batch_size, shuffle=shuffle, seed=7, drop_last=False, collator=collator)
        loader.sampler.set_epoch(epoch)
        order = list(loader.sampler)
        rows = torch.cat([batch["labels"] for batch in loader])
        return {int(i): row for i, row in zip(order, rows)}

    e0, e1 = epoch_labels(True, 0), epoch_labels(True, 1)
    assert all(torch.equal(e0[i], epoch_labels(True, 0, batch_size=3)[i]) for i in range(16))  # batching
    assert sum(torch.equal(e0[i], e1[i]) for i in range(16)) == 0  # a new epoch, new masks
    v0, v5 = epoch_labels(False, 0), epoch_labels(False, 5)  # Composer reseeds eval samplers
    assert all(torch.equal(v0[i], v5[i]) for i in range(16))


# --- classification pipeline -----------------------------------------------------------------------

def test_classification_reads_tsv_and_truncates(home):
    data = prepare_classification(str(SST2), "bert-base-uncased", 16, text_field="sentence", val_fraction=0.25)
    tok = tokenizer("bert-base-uncased")
    rows = [line.split("\t") for line in SST2.read_text().splitlines()[1:]]
    n_val = round(len(rows) * 0.25)
    assert (len(data.train), len(data.val)) == (len(rows) - n_val, n_val)
    assert data.meta["labels"] == ["0", "1"] and sum(data.meta["label_counts"]["val"]) == n_val
    for i in (0, 5, len(data.train) - 1):
        want = tok.encode(rows[i][0]).ids
        want = want if len(want) <= 16 else want[:15] + [102]
        assert data.train[i]["input_ids"].tolist() == want and data.train[i]["label"] == int(rows[i][1])
    assert data.val[0]["label"] == int(rows[len(rows) - n_val][1])
    assert data.meta["stats"]["truncated"] == sum(len(tok.encode(r[0]).ids) > 16 for r in rows) > 0
    assert "token_type_ids" not in data.train[0]


def test_classification_pairs_string_labels_and_formats(home, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"question {i}", "a": f"answer number {i}", "y": ["yes", "no", "maybe"][i % 3]} for i in range(30)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n")
    write(tmp_path / "t.csv", "q,a,y\n" + "".join(f'"{r["q"]}, really","{r["a"]}",{r["y"]}\n' for r in rows[10:20]))
    pq.write_table(pa.Table.from_pylist(rows[20:]), tmp_path / "t.parquet")
    files = [str(tmp_path / f) for f in ("t.jsonl", "t.csv", "t.parquet")]
    data = prepare_classification(files, "bert-base-uncased", 8, text_field="q", text_pair_field="a",
                                  label_field="y", val_fraction=0.1)
    assert data.meta["labels"] == ["maybe", "no", "yes"]  # names, sorted
    assert [data.train[i]["label"] for i in range(3)] == [2, 1, 0]
    tok = tokenizer("bert-base-uncased")
    tok.enable_truncation(8)
    enc = tok.encode("question 11, really", "answer number 11")  # 4 + 3 tokens: truncated
    assert data.train[11]["input_ids"].tolist() == enc.ids and len(enc.ids) == 8
    assert data.train[11]["token_type_ids"].tolist() == enc.type_ids and 1 in enc.type_ids
    # RoBERTa's pair framing: <s> a </s></s> b </s>.
    rob = prepare_classification(files, "roberta-base", 64, text_field="q", text_pair_field="a", label_field="y")
    assert rob.train[0]["input_ids"].tolist() == tokenizer("roberta-base").encode("question 0", "answer number 0").ids
    # A subset by index (DEBUG=1 repeats one batch this way).
    sub = data.train[np.array([4, 4, 0])]
    assert len(sub) == 3 and sub[1]["input_ids"].tolist() == data.train[4]["input_ids"].tolist()


def test_classification_cache_and_errors(home, tmp_path):
    src = str(write(tmp_path / "imdb.jsonl", "\n".join(IMDB.read_text().split("\n")[:200]) + "\n"))
    first = prepare_classification(src, "roberta-base", 32, val_fraction=0.1)
    assert first.path.name.startswith("classification-") and not first.hit
    assert prepare_classification(src, "roberta-base", 32, val_fraction=0.1).hit
    for change in (dict(max_seq_len=48), dict(label_field="rating"), dict(val_fraction=0.2),
                   dict(tokenizer="bert-base-uncased")):
        args = dict(train=src, tokenizer="roberta-base", max_seq_len=32, val_fraction=0.1) | change
        assert not prepare_classification(**args).hit, change
    assert prepare_classification(src, "roberta-base", 32, label_field="rating").meta["labels"] == \
        [str(i) for i in range(11)]  # integer labels are class ids: 0..10
    with pytest.raises(UserError, match=r"^data\.train: .*imdb\.jsonl row 1 has no 'sentence' \(set by "
                                        r"data\.text_field\); its fields: text, label, rating, aclimdb_file"):
        prepare_classification(src, "roberta-base", 32, text_field="sentence")
    write(tmp_path / "v.jsonl", json.dumps({"text": "x", "label": "odd"}) + "\n")
    write(tmp_path / "t.jsonl", "".join(json.dumps({"text": "x", "label": y}) + "\n" for y in ("a", "b")))
    with pytest.raises(UserError, match=r"^data\.val: label\(s\) 'odd' never occur in data\.train"):
        prepare_classification(str(tmp_path / "t.jsonl"), "roberta-base", 32, val=str(tmp_path / "v.jsonl"))
    with pytest.raises(UserError, match=r"is not one of \.jsonl, \.csv, \.tsv, \.parquet"):
        prepare_classification(str(WIKI), "roberta-base", 32)
    with pytest.raises(UserError, match=r"^data\.label_field: the data has a single label"):
        prepare_classification(str(tmp_path / "v.jsonl"), "roberta-base", 32, val_fraction=0)


def test_padding_collator(home):
    data = prepare_classification(str(SST2), "bert-base-uncased", 64, text_field="sentence", val_fraction=0)
    collator = Classification(Classification.Section()).collator(data.meta, seed=0)
    assert isinstance(collator, PaddingCollator)
    loader = build_dataloader(data.train, 8, shuffle=False, seed=0, drop_last=False, collator=collator)
    batch = next(iter(loader))
    lengths = [len(data.train[i]["input_ids"]) for i in range(8)]
    assert batch["input_ids"].shape == (8, max(lengths)) and "token_type_ids" not in batch
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["labels"].tolist() == [data.train[i]["label"] for i in range(8)]
