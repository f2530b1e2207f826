"""`rafale config show`: parameter counts of every preset's network (causal LM; masked LM and a 3-label
classifier for encoders) against transformers' own model of the same config.json (both built on the
meta device, so the billion-parameter presets cost nothing); FLOPs and tokens per step of the bundled
default by hand; the CLI's output, without importing Composer; one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from rafale.build import network_for
from rafale.config import load_config
from rafale.config_show import describe, parameter_counts
from rafale.models import FAMILIES, preset, preset_names
from rafale.models.configs import LoraConfig
from rafale.models.lora import apply_lora
from rafale.models.shapes import counts, parameter_shapes
from test.conftest import REPO

CASES = [(name, task) for f in FAMILIES for name in f.presets for task in f.tasks]
HF_CLASS = {"causal_lm": transformers.AutoModelForCausalLM, "mlm": transformers.AutoModelForMaskedLM,
            "classification": transformers.AutoModelForSequenceClassification}
LABELS = ["a", "b", "c"]


@pytest.mark.parametrize("preset,task", CASES, ids=[f"{p}-{t}" for p, t in CASES])
def test_counts_equal_transformers_model(preset, task):
    family = next(f for f in FAMILIES if preset in f.presets)
    with torch.device("meta"):
        ours = network_for(task, preset, labels=LABELS if task == "classification" else None)
    hf_json = family.hf_config(ours.cfg, task, torch.float32, labels=LABELS if task == "classification" else None)
    hf_cfg = transformers.AutoConfig.for_model(**hf_json)
    with torch.device("meta"):
        hf = HF_CLASS[task].from_config(hf_cfg)
    counts = parameter_counts(ours, ours.cfg.vocab_size)
    assert counts["total"] == hf.num_parameters() == counts["trainable"]
    hf_embedding = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Embedding))
    assert counts["embedding"] == hf_embedding
    hf_head = hf.get_output_embeddings() if task != "classification" else None
    untied = hf_head is not None and hf_head.weight is not hf.get_input_embeddings().weight
    assert counts["head"] == (hf_head.weight.numel() if untied else 0)


# Overrides that switch every part of the layout: GQA / MHA, untied / tied heads, biases, SwiGLU / GELU,
# both norms, partial rotary; encoders with other widths, depths and position tables.
DECODER_GRID = [{}, {"tie_embeddings": True}, {"tie_embeddings": False}, {"n_kv_heads": 1}, {"bias": True},
                {"bias": False, "qkv_bias": True}, {"mlp": "gelu", "d_ff": 96}, {"mlp": "swiglu"},
                {"norm": "rmsnorm", "parallel_residual": False}, {"norm": "layernorm"}, {"vocab_size": 1000, "n_layers": 3}]
ENCODER_GRID = [{}, {"d_ff": 100, "n_layers": 3}, {"vocab_size": 777, "type_vocab_size": 3}, {"max_seq_len": 64}]
SHAPE_CASES = [(name, task, grid) for f in FAMILIES for name in f.presets if name.endswith(("micro", "tiny", "14m"))
               for task in f.tasks for grid in (DECODER_GRID if task == "causal_lm" else ENCODER_GRID)]


def _named_shapes(network) -> dict:
    return {name: tuple(p.shape) for name, p in network.named_parameters()}


@pytest.mark.parametrize("preset_name,task", CASES, ids=[f"{p}-{t}" for p, t in CASES])
def test_shapes_equal_built_network_every_preset(preset_name, task):
    family, fields = preset(preset_name)
    cfg = family.make_config(fields)
    with torch.device("meta"):
        network = family.build(cfg, task, num_labels=3 if task == "classification" else None)
    assert parameter_shapes(cfg, task, 3) == _named_shapes(network)


@pytest.mark.parametrize("preset_name,task,grid", SHAPE_CASES)
def test_shapes_equal_built_network_overrides(preset_name, task, grid):
    family, fields = preset(preset_name)
    cfg = family.make_config({**fields, **grid})
    for labels in ((2, 5) if task == "classification" else (None,)):
        with torch.device("meta"):
            network = family.build(cfg, task, num_labels=labels)
        shapes = parameter_shapes(cfg, task, labels)
        assert shapes == _named_shapes(network)
        assert counts(shapes) == parameter_counts(network, cfg.vocab_size)


@pytest.mark.parametrize("targets", [["all"], ["attention"], ["mlp"], ["qkv"], ["proj", "fc_out"], ["fc_gate"]])
@pytest.mark.parametrize("preset_name", ["gpt-micro", "pythia-micro"])
def test_lora_shapes_and_trainable_counts(preset_name, targets):
    family, fields = preset(preset_name)
    cfg = family.make_config(fields)
    lora = LoraConfig(rank=4, targets=targets)
    with torch.device("meta"):
        network = family.build(cfg, "causal_lm")
    if targets == ["fc_gate"] and cfg.mlp == "gelu":  # no such layer: both refuse it the same way
        with pytest.raises(Exception) as built:
            apply_lora(network, lora)
        with pytest.raises(Exception) as counted:
            parameter_shapes(cfg, "causal_lm", lora=lora)
        assert str(built.value) == str(counted.value)
        return
    apply_lora(network, lora)
    shapes = parameter_shapes(cfg, "causal_lm", lora=lora)
    assert shapes == _named_shapes(network)
    assert counts(shapes, lora=True) == parameter_counts(network, cfg.vocab_size)


@pytest.mark.parametrize("name", ["pythia-tinyshakespeare", "llama-tinystories", "bert-wikitext-mlm", "bert-sst2"])
def test_show_imports_neither_torch_nor_composer(tmp_path, name):
    code = ("import json, sys; from rafale.cli import main\n"
            f"assert main(['config', 'show', '-c', {name!r}, '--json']) == 0\n"
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'composer')}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "RAFALE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"torch": False, "composer": False}
    assert not (tmp_path / "data").exists()  # no data cache prepared, for encoders either


def test_show_counts_equal_the_built_network():
    """The torch-free figures equal those of the network training builds, for each bundled pipeline kind."""
    from rafale.config_show import _describe_built
    from rafale.build import pipeline_of

    for name in ("pythia-tinyshakespeare", "llama-tinystories", "bert-wikitext-mlm", "bert-sst2", "roberta-imdb"):
        cfg = load_config(name, [])
        assert describe(cfg) == _describe_built(cfg, pipeline_of(cfg)), name


def test_all_presets_are_covered():
    assert {p for p, _ in CASES} == set(preset_names()) and len(CASES) > 20


def test_bundled_default_figures():
    cfg = load_config("pythia-tinyshakespeare", ["train.global_batch_size=32"])
    d = describe(cfg)
    # on CPU: the real thing, with the head the tokenizer gives it (4,096 tokens: 4,096 rows)
    network = network_for("causal_lm", "pythia-tiny", overrides={"max_seq_len": 128, "vocab_size": 4096})
    total = sum(p.numel() for p in network.parameters())
    assert d["parameters"] == {"total": total, "embedding": network.embed_in.weight.numel(),
                               "head": network.embed_out.weight.numel(), "trainable": total}
    assert total == 1_841_920 and network.embed_in.weight.shape == (4096, 128)
    seq, layers, width = 128, 4, 128
    non_embedding = total - 4096 * 128  # the input lookup is no matmul; the head is
    assert d["flops_per_token"] == 6 * non_embedding + 3 * layers * 2 * 2 * width * seq
    assert d["tokens_per_step"] == 32 * 128
    m = d["memory"]
    assert m["peak_training_mb"] == pytest.approx(m["runtime_mb"] + m["state_mb"] + m["activations_mb"] + m["head_mb"]
                                                  + m["retained_mb"])
    assert m["retained_mb"] == m["activations_mb"]  # glibc's heap keeps one activation working set
    assert m["state_mb"] == pytest.approx(total * 16 / 2 ** 20)  # fp32 weights, gradients, two AdamW moments


def test_cli_shows_without_composer(tmp_path):
    code = ("import json, sys; from rafale.cli import main\n"
            "main(['config', 'show', '-c', 'llama-tinystories', 'train.global_batch_size=32', '--json'])\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "RAFALE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    shown, modules = map(json.loads, proc.stdout.splitlines())
    assert not {"composer", "lm_eval", "transformers", "matplotlib"} & set(modules)
    assert shown["config"]["train"]["global_batch_size"] == 32 and shown["config"]["model"]["preset"] == "gpt-tiny"
    assert shown["tokens_per_step"] == 32 * 256 and shown["hash"] == load_config(
        "llama-tinystories", ["train.global_batch_size=32"]).hash()
    assert shown["parameters"]["head"] == 0  # tied embeddings
    assert not (tmp_path / "data").exists()  # showing builds no data cache for a causal LM

    text = subprocess.run([sys.executable, "-m", "rafale", "config", "show", "-c", "pythia-tinyshakespeare"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                            "PYTHONPATH": str(REPO),
                                                                            "RAFALE_HOME": str(tmp_path)})
    assert text.returncode == 0, text.stderr
    assert "preset: pythia-tiny" in text.stdout
    assert "parameters        1,841,920 total, 524,288 embedding, 524,288 head, 1,841,920 trainable" in text.stdout
    assert "tokens per step   4,096 " in text.stdout


def test_bad_input_is_one_line(capsys):
    from rafale.cli import main

    assert main(["config", "show", "-c", "pythia-tinyshakespeare", "model.preset=pythia-tinyy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pythia-tiny" in err and len(err.splitlines()) == 1, err


def _saved_in_blocks(network, ids) -> int:
    """Bytes autograd keeps for backward inside the network's blocks (its parameters excluded): what
    the estimate's activation term counts."""
    params = {p.untyped_storage().data_ptr() for p in network.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    for block in network.blocks:
        block.register_forward_pre_hook(lambda *_: hooks.__enter__())
        block.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    network.train()
    network(ids)
    return sum(saved.values())


@pytest.mark.parametrize("config,overrides", [
    ("pythia-tinyshakespeare", []), ("llama-tinystories", []),  # gelu / swiglu MLPs
    ("smollm2-sft", ["model.lora.dropout=0.05"]), ("smollm2-sft", ["model.lora.dropout=0.0"])])
def test_the_activation_estimate_is_what_autograd_saves(config, overrides):
    """The memory estimate's activations against the bytes autograd saves in a training forward of the
    same network (random weights, 2 x 64 tokens), within 12%: the term that grows with the batch."""
    from rafale.build import model_config, pipeline_of
    from rafale.models.decoder import Decoder

    cfg = load_config(config, ["train.device_microbatch_size=2", "data.max_seq_len=64", *overrides])
    estimate = describe(cfg)["memory"]["activations_mb"] * 2 ** 20
    pipeline = pipeline_of(cfg)
    _, ncfg = model_config(cfg, pipeline.network_meta(), pipeline.task)
    torch.manual_seed(0)
    network = Decoder(ncfg)
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        apply_lora(network, LoraConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                       targets=list(lora.targets)))
    saved = _saved_in_blocks(network, torch.randint(0, 100, (2, 64)))
    assert saved > 1e6 and estimate == pytest.approx(saved, rel=0.12)
