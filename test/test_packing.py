"""data.packing: document and model.attention: packed documents never see each other (perturbing one
leaves the others' logits bit for bit unchanged), a packed batch's loss is its documents' losses run one
by one, the cache stores where documents start without touching concat entries, and the flex and flash
kernels give SDPA's numbers (flash through a pure-torch varlen reference: flash-attn needs a GPU)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rafale.build import build_model, network_for
from rafale.config import from_dict
from rafale.data.causal_lm import CausalLM, PackedBlocks, prepare_causal_lm
from rafale.data.loaders import PackedBlockDataset
from rafale.data.pipeline import IGNORE_INDEX
from rafale.errors import UserError
from rafale.models.attention import FLASH_INSTALL, Plan, attend, cu_seqlens, document_mask, plan
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.paths import ASSETS_DIR
from rafale.task_model import TaskModel
from test.conftest import run_cli

EOT = "<|endoftext|>"
STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"
DOCS = torch.tensor([[0] * 7 + [1] * 8 + [2] * 5, [0] * 3 + [1] * 17])  # (2, 20): 3 + 2 documents

NEOX_STYLE = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1)
LLAMA_STYLE = dict(NEOX_STYLE, norm="rmsnorm", mlp="swiglu", bias=False, rotary_pct=1.0, parallel_residual=False,
                   n_kv_heads=2)


def decoder(style: dict, **kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(**style, **kw)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 300, DOCS.shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("style", [NEOX_STYLE, LLAMA_STYLE], ids=["neox", "llama-gqa"])
def test_perturbing_one_document_leaves_the_others_logits_exactly_unchanged(style):
    model, x = decoder(style), ids()
    y = x.clone()
    y[0, 7:15] = (y[0, 7:15] + 1) % 300  # the middle document of row 0
    with torch.no_grad():
        a, b = model(x, documents=DOCS), model(y, documents=DOCS)
        concat_a, concat_b = model(x), model(y)
        alone = model(x[:1, 15:])
    assert torch.equal(a[0, :7], b[0, :7]) and torch.equal(a[0, 15:], b[0, 15:]) and torch.equal(a[1], b[1])
    assert (a[0, 7:15] - b[0, 7:15]).abs().max() > 1e-2  # the perturbed document itself did change
    assert (concat_a[0, 15:] - concat_b[0, 15:]).abs().max() > 1e-3  # concat packing lets it leak
    # A document in a packed row is that document run alone: positions restart at 0.
    assert (a[0, 15:] - alone[0]).abs().max() < 1e-5


def test_packed_batch_loss_is_the_per_document_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "stories.txt"
    corpus.write_text(STORIES.read_text()[:6000])
    data = prepare_causal_lm(str(corpus), "gpt-neox-20b", 96, val_fraction=0, doc_separator=EOT, packing="document")
    rows = PackedBlockDataset(data.train)
    batch = {k: torch.stack([rows[i][k] for i in range(4)]) for k in ("input_ids", "documents")}
    assert int(batch["documents"].max()) >= 1  # several documents share a row
    lm = TaskModel(network_for("causal_lm", "pythia-micro"), CausalLM(CausalLM.Section(packing="document")), {})
    with torch.no_grad():
        packed = lm.loss(lm.train()(batch), batch)
        # Every document piece of every row on its own, as a sequence of its own: summed losses / targets.
        total, count = 0.0, 0
        for row, docs in zip(batch["input_ids"], batch["documents"]):
            for d in docs.unique():
                piece = row[docs == d][None]
                if piece.shape[1] < 2:
                    continue
                logits = lm.model(piece)
                total += F.cross_entropy(logits[0, :-1], piece[0, 1:], reduction="sum").item()
                count += piece.shape[1] - 1
    assert lm.pipeline.loss_tokens(batch) == count
    assert abs(packed.item() - total / count) < 1e-5


def test_document_starts_are_stored_beside_an_unchanged_concat_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "c.txt"
    corpus.write_text(STORIES.read_text()[:20000])
    concat = prepare_causal_lm(str(corpus), "gpt-neox-20b", 64, val_fraction=0.1, doc_separator=EOT)
    # The entry this corpus has with the code before packing existed (cache format 3; a format bump
    # changes it on purpose): concat keeps its key.
    assert concat.path.name == "causal_lm-cc4fa220ae8f3005"
    doc = prepare_causal_lm(str(corpus), "gpt-neox-20b", 64, val_fraction=0.1, doc_separator=EOT, packing="document")
    assert doc.path != concat.path and not doc.hit
    assert sorted(doc.meta["arrays"]) == ["train", "train_doc_starts", "val", "val_doc_starts"]
    for split in ("train", "val"):
        blocks = getattr(concat, split)
        packed = getattr(doc, split)
        assert isinstance(packed, PackedBlocks) and np.array_equal(packed.blocks, blocks)
        for i in range(len(blocks)):
            tokens, documents = packed[i]
            # A new document begins after every EOS (id 0 in gpt-neox-20b), and nowhere else.
            expected = np.concatenate([[0], np.cumsum(blocks[i][:-1] == 0)])
            assert np.array_equal(tokens, blocks[i]) and np.array_equal(documents, expected)
    # A subset (what DEBUG=1 and the samplers index) keeps each row's documents.
    sub = doc.train[np.array([5, 2])]
    assert np.array_equal(sub[1][1], doc.train[2][1]) and len(sub) == 2


class TorchFlash:
    """flash-attn's two entry points in plain torch (its layouts, causal, grouped-query heads), recording
    what they were called with: the flash dispatch and its cu_seqlens are tested on a CPU against SDPA."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _causal(q, k, v):  # (T, nh, hs), (T, nkv, hs) x 2 -> (T, nh, hs)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True).transpose(0, 1)

    def flash_attn_func(self, q, k, v, causal):
        self.calls.append(("func", None))
        assert causal
        return torch.stack([self._causal(q[b], k[b], v[b]) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, causal):
        self.calls.append(("varlen", cu_q.tolist()))
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        return torch.cat([self._causal(q[s:e], k[s:e], v[s:e]) for s, e in zip(cu_q[:-1], cu_q[1:])])


@pytest.mark.parametrize("style", [NEOX_STYLE, LLAMA_STYLE], ids=["neox", "llama-gqa"])
def test_flex_and_flash_give_sdpa_numbers_with_and_without_documents(style):
    x, sdpa = ids(), decoder(style)
    flash_kernels = TorchFlash()
    flex = decoder(style, attention="flex")
    flash = Decoder(DecoderConfig(**style, attention="flash"), flash_kernels=flash_kernels).eval()
    for other in (flex, flash):
        other.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for documents in (DOCS, None):
            ref = sdpa(x, documents=documents)
            for other in (flex, flash):
                assert (other(x, documents=documents) - ref).abs().max() < 1e-5
    # Rows flattened into one sequence, each document one entry: 7, 8, 5 | 3, 17 tokens.
    assert flash_kernels.calls == [("varlen", [0, 7, 15, 20, 23, 40])] * 2 + [("func", None)] * 2
    assert cu_seqlens(DOCS)[0].tolist() == [0, 7, 15, 20, 23, 40]


def test_sdpa_per_document_calls_equal_the_document_mask():
    """On a CPU, sdpa attends one document at a time; elsewhere it takes the (B, 1, T, T) document mask.
    Same outputs (1e-6) and gradients (1e-5, of magnitudes up to ~10), and a row of one document is the plain causal call, bit for bit."""
    cpu = plan("sdpa", DOCS, DOCS.shape[1], torch.device("cpu"))
    assert cpu.sdpa_mask is None and cpu.sdpa_documents == [[7, 8, 5], [3, 17]]
    masked = Plan("sdpa", sdpa_mask=document_mask(DOCS))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g, requires_grad=True) for _ in range(3))
    outs = [attend(p, q, k, v) for p in (cpu, masked)]
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in outs]
    assert (outs[0] - outs[1]).abs().max() < 1e-6
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(*grads))
    one = torch.zeros(1, 20, dtype=torch.long)
    assert torch.equal(attend(plan("sdpa", one, 20, torch.device("cpu")), q[:1], k[:1], v[:1]),
                       attend(Plan("sdpa"), q[:1], k[:1], v[:1]))


def test_flash_without_a_gpu_exits_2_with_the_install_line(tmp_path):
    (tmp_path / "t.txt").write_text(STORIES.read_text()[:3000])
    r = run_cli("train", "-c", "pythia-tinyshakespeare", f"data.train={tmp_path / 't.txt'}", "model.preset=pythia-micro",
                "model.attention=flash", home=tmp_path / "home")
    assert r.returncode == 2, r.stderr
    assert "model.attention" in r.stderr and FLASH_INSTALL in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "home" / "runs").exists() and not (tmp_path / "home" / "data").exists()


def test_settings_that_cannot_work_are_refused_naming_the_key(tmp_path):
    cfg = from_dict({"data": {"packing": "document"},
                     "model": {"class": "torch.nn:Embedding", "num_embeddings": 10, "embedding_dim": 4}})
    with pytest.raises(UserError, match="data.packing: document needs a network whose forward takes `documents`"):
        build_model(cfg, {"vocab_size": 10})
    with pytest.raises(UserError, match="model.attention: flex is implemented for the decoder families"):
        network_for("mlm", "bert-micro", attention="flex")
    with pytest.raises(UserError, match=r"data.packing: expected one of 'concat', 'document'"):
        from_dict({"data": {"packing": "documents"}})


def test_document_targets_skip_only_the_boundaries():
    batch = {"input_ids": torch.arange(40).view(2, 20), "documents": DOCS}
    targets = CausalLM(CausalLM.Section(packing="document")).loss_tokens(batch)
    # 19 next-token targets per row, minus one per document boundary (2 in row 0, 1 in row 1).
    assert targets == 2 * 19 - 3
    from rafale.data.causal_lm import next_token_targets

    t = next_token_targets(batch)
    assert (t[0, [6, 14, 19]] == IGNORE_INDEX).all() and (t[1, [2, 19]] == IGNORE_INDEX).all()
    assert (t != IGNORE_INDEX).sum() == targets
