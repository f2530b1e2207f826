"""LoRA on the decoder (models/lora.py): a LoRA layer computes base(x) + scale * dropout(x) A^T B^T; a fresh
adapter leaves the logits bit-identical and only the adapter trainable; the adapter's state dict
reloads; merging gives plain nn.Linear layers with the same logits; and PEFT, loading the adapter
in its own format onto transformers' model of the same base weights, gives the same logits as rafale
for a Llama-style (fused q/k/v split into q/k/v_proj, grouped-query) and a GPT-NeoX model."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM, LlamaForCausalLM

from rafale.models.decoder import Decoder
from rafale.models import ModelError, family_of
from rafale.models.weights import save_weights, stored_names
from rafale.models.lora import LoraConfig, LoraLinear, apply_lora, lora_state_dict, merge_lora, peft_adapter
from rafale.models import preset_config as get_preset

VOCAB = 384
TOL = 1e-5


def decoder(preset: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(get_preset(preset, {"vocab_size": VOCAB})).eval()


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """A trained-looking adapter: B nonzero (it starts at zero, which would make every check trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda nm: nm[0]):
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def tokens(n: int = 2, t: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kwargs, key", [
    (dict(rank=0), "model.lora.rank"), (dict(alpha=0.0), "model.lora.alpha"),
    (dict(dropout=1.0), "model.lora.dropout"), (dict(dropout=-0.1), "model.lora.dropout"),
    (dict(targets=["qkv", "q_proj"]), "model.lora.targets: 'q_proj'; .*qkv, proj, fc_in, fc_gate, fc_out"),
    (dict(targets=[]), "model.lora.targets: none given"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ModelError, match=key):
        LoraConfig(**kwargs)


def test_a_target_the_model_lacks_is_refused_before_anything_changes():
    model = decoder("pythia-micro")  # GELU MLP: no fc_gate
    with pytest.raises(ModelError, match="model.lora.targets: fc_gate matches no layer of this model; valid "
                                        "targets for it: qkv, proj, fc_in, fc_out, attention, mlp, all"):
        apply_lora(model, LoraConfig(targets=["qkv", "fc_gate"]))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("preset, targets, wrapped", [
    ("gpt-micro", "all", {"qkv", "proj", "fc_in", "fc_gate", "fc_out"}),
    ("gpt-micro", ["attention"], {"qkv", "proj"}),
    ("pythia-micro", ["mlp", "qkv"], {"qkv", "fc_in", "fc_out"}),  # the group skips the absent fc_gate
])
def test_fresh_adapter_keeps_logits_and_names_and_trains_only_itself(preset, targets, wrapped):
    base = decoder(preset)
    model = copy.deepcopy(base)
    trainable, total = apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.2, targets=targets))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert {n.rpartition(".")[2] for n in layers} == wrapped
    assert len(layers) == len(wrapped) * base.cfg.n_layers
    # The base tensors keep their names; the adapter adds <layer>.lora_A / .lora_B beside them.
    adapter_names = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    assert set(model.state_dict()) == set(base.state_dict()) | adapter_names
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names

    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        model.train()  # dropout on A's input changes nothing either while B is zero
        assert torch.equal(model(x), base.train()(x))
    model(x, targets=x).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapter_names)
    assert all(m.lora_B.grad.abs().sum() > 0 for m in layers.values())


def test_layer_output_is_base_plus_scaled_low_rank_update_of_dropped_input():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = LoraLinear(base, rank=3, alpha=5.0, dropout=0.3)
    randomize_b(layer)
    x = torch.randn(2, 7, 24)
    A, B, scale = layer.lora_A.detach(), layer.lora_B.detach(), 5.0 / 3
    for training in (True, False):
        layer.train(training)
        torch.manual_seed(5)
        y = layer(x)
        torch.manual_seed(5)  # the same dropout mask: the layer draws nothing else
        dropped = F.dropout(x, 0.3, training=training)
        want = base(x) + scale * (dropped @ A.T @ B.T)
        assert torch.allclose(y, want, atol=1e-6, rtol=0)
        assert (y - base(x)).abs().max() > 0.1  # the update is not negligible
    assert torch.equal(layer.lora_A, A) and layer.weight is base.weight and layer.bias is base.bias


def test_adapter_state_dict_reloads_and_merge_folds_it_into_plain_linears():
    base = decoder("gpt-micro")
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(rank=4, alpha=6.0))
    randomize_b(model)
    x = tokens()
    with torch.no_grad():
        lora_logits = model(x)
        assert (lora_logits - base(x)).abs().max() > 1e-2

    adapter = lora_state_dict(model)
    assert set(adapter) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora_A", ".lora_B")) for n in adapter)
    fresh = copy.deepcopy(base)
    apply_lora(fresh, LoraConfig(rank=4, alpha=6.0))
    missing, unexpected = fresh.load_state_dict(adapter, strict=False)
    assert not unexpected and set(missing) == set(base.state_dict())  # only the adapter was in it
    with torch.no_grad():
        assert torch.equal(fresh(x), lora_logits)

    qkv = model.blocks[0].attn.qkv
    want_qkv = qkv.weight + qkv.scale * qkv.lora_B @ qkv.lora_A
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert type(model.blocks[0].attn.qkv) is nn.Linear and type(model.blocks[1].mlp.fc_gate) is nn.Linear
    assert set(model.state_dict()) == set(base.state_dict())
    assert torch.allclose(model.blocks[0].attn.qkv.weight, want_qkv, atol=1e-7, rtol=0)
    with torch.no_grad():
        assert (model(x) - lora_logits).abs().max() <= TOL


@pytest.mark.parametrize("preset, hf_class", [("gpt-micro", LlamaForCausalLM), ("pythia-micro", GPTNeoXForCausalLM)])
def test_peft_loads_the_adapter_onto_transformers_model_with_the_same_logits(tmp_path, preset, hf_class):
    model = decoder(preset)
    cfg = model.cfg
    # The base model as `rafale export` writes it (a tied head is left out, transformers re-ties it).
    (tmp_path / "base").mkdir()
    family, state = family_of(cfg), model.state_dict()
    weights = {name: state[name] for name in stored_names(model)}
    save_weights(weights, family, cfg, "causal_lm", tmp_path / "base", max_shard_bytes=10**9)
    (tmp_path / "base" / "config.json").write_text(json.dumps(family.hf_config(cfg, "causal_lm", torch.float32, 0, 0)))

    apply_lora(model, LoraConfig(rank=4, alpha=7.0, dropout=0.1))
    randomize_b(model)
    adapter_config, tensors = peft_adapter(model)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert type(hf) is hf_class
    x = tokens()
    with torch.no_grad():
        base_logits = hf(x).logits
        peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        peft_logits, ours = peft(x).logits, model(x)
    # Every adapter tensor was loaded, into a layer PEFT wrapped (a missed name would stay random / zero).
    loaded = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if ".lora_" in k}
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    assert (ours - base_logits).abs().max() > 1e-2
    assert (peft_logits - ours).abs().max() <= TOL

    if hf_class is LlamaForCausalLM:  # q, k and v get their own rows of B and the same A
        names = [f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_" for p in "qkv"]
        assert all(torch.equal(tensors[n + "A.weight"], model.blocks[0].attn.qkv.lora_A) for n in names)
        nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        assert [tensors[n + "B.weight"].shape[0] for n in names] == [nh * hs, nkv * hs, nkv * hs]
        assert sorted(adapter_config["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    else:  # GPT-NeoX's query_key_value has rafale's per-head [q, k, v] rows: one pair, as is
        assert torch.equal(tensors["base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_B.weight"],
                           model.blocks[0].attn.qkv.lora_B)


def test_counts_on_the_meta_device():
    """Counting needs no memory: smollm2-135m's shape at rank 8 on every linear layer of its blocks."""
    cfg = get_preset("smollm2-135m")
    with torch.device("meta"):
        model = Decoder(cfg)
    base = sum(p.numel() for p in model.parameters())
    trainable, total = apply_lora(model, LoraConfig(rank=8))
    c, kv, ff = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    per_layer = 8 * ((c + c + 2 * kv) + (c + c) + 2 * (c + ff) + (ff + c))  # qkv, proj, fc_in, fc_gate, fc_out
    assert trainable == cfg.n_layers * per_layer and total == base + trainable
