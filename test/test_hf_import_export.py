"""HF checkpoints in and out, through the real CLI: runs trained by `rafale train` are exported with
`rafale export` and loaded by transformers' Auto classes (same logits, same greedy tokens), sharded on
demand; `rafale generate --hf` reads HF directories; broken or foreign checkpoints exit 2 naming the
problem. Import parity over architectures is in test_models_parity.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM)

from rafale.cli import main
from rafale.errors import UserError
from rafale.generate import generate
from rafale.inference import load_run
from rafale.build import network_for
from rafale.models import ModelError, preset_config as get_preset
from rafale.models.decoder import Decoder
from rafale.models.llama import FAMILY as LLAMA
from rafale.models.weights import save_weights
from test.conftest import REPO, run_cli

TOL = 1e-4
N_NEW = 32
STEPS = 8

# One Pythia and one Llama-style run: model, tokenizer, corpus slice, separator.
RUNS = {
    "pythia": ("pythia-micro", "gpt-neox-20b", "tinyshakespeare/input.txt", None),
    "llama": ("gpt-micro", "smollm2", "tinystories/tinystories_train_2MiB.txt", "<|endoftext|>"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Trains both runs for a few steps, concurrently, with `python -m rafale train`."""
    root = tmp_path_factory.mktemp("runs")
    home = root / "home"
    procs = {}
    for name, (preset, tokenizer, corpus, sep) in RUNS.items():
        (root / f"{name}.txt").write_text((REPO / "rafale/assets" / corpus).read_text()[:40_000])
        cfg = {"run": {"name": name, "seed": 1}, "model": {"preset": preset},
               "data": {"train": str(root / f"{name}.txt"), "tokenizer": tokenizer, "max_seq_len": 64,
                        "val_fraction": 0.0, "doc_separator": sep},
               "optim": {"lr": 1e-2}, "schedule": {"name": "constant", "warmup": "0ba"},
               "train": {"max_duration": f"{STEPS}ba", "global_batch_size": 4, "device_microbatch_size": 4,
                         "save_interval": f"{STEPS}ba", "eval_interval": f"{STEPS}ba"}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
        env.update(RAFALE_HOME=str(home / name), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        procs[name] = subprocess.Popen([sys.executable, "-m", "rafale", "train", "-c", str(root / f"{name}.yaml")],
                                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        (out[name],) = (home / name / "runs").iterdir()
    return out


def export(run_dir: Path, out: Path, *extra: str) -> Path:
    assert main(["export", "--run", str(run_dir), "--to-hf", str(out), *extra]) == 0
    return out


def check_transformers_matches_rafale(run_dir: Path, hf_dir: Path, hf_class: str) -> float:
    """transformers' Auto classes load the export: same token ids, logits and greedy tokens as the run."""
    ours, tokenizer, _ = load_run(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert type(hf).__name__ == hf_class
    text = "Once upon a time, the king said to his daughter"
    ids = tokenizer.encode(text).ids
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    assert hf.config.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_NEW,
                          eos_token_id=None, pad_token_id=0)[0, x.shape[1]:]
    assert diff <= TOL
    assert torch.equal(generate(ours, x, N_NEW)[0], ref)
    print(f"{hf_class} export of {run_dir.name}: max |logits - rafale| = {diff:.2e}, {N_NEW} greedy tokens equal")
    return diff


def test_pythia_run_exports_to_gpt_neox(runs, tmp_path):
    out = export(runs["pythia"], tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["torch_dtype"], config["tie_word_embeddings"]) == ("gpt_neox", "float32", False)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    check_transformers_matches_rafale(runs["pythia"], out, "GPTNeoXForCausalLM")


def test_llama_run_exports_and_generates_from_the_hf_dir(runs, tmp_path, capsys):
    out = export(runs["llama"], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == ("llama", 2, True)
    check_transformers_matches_rafale(runs["llama"], out, "LlamaForCausalLM")

    # `generate --hf` on the export prints what `generate --run` prints for the run.
    capsys.readouterr()
    results = []
    for source in (["--run", str(runs["llama"])], ["--hf", str(out)]):
        assert main(["generate", *source, "--prompt", "Lily and Tom", "--max-new-tokens", "12", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and len(results[0]["output_ids"]) == 12

    # ... and the export imports back into rafale as a training starting point.
    ours, _, _ = load_run(runs["llama"])
    again = network_for("causal_lm", "gpt-tiny", init_from=str(out)).eval()  # a directory: the preset is ignored
    x = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_training_starts_from_an_hf_directory(runs, tmp_path):
    """model.init_from + data.tokenizer pointing at an HF directory: the run trains those weights (a
    1e-12 learning rate keeps them, so the run's checkpoint is the import to float precision)."""
    out = export(runs["llama"], tmp_path / "hf")
    cfg = yaml.safe_load((runs["llama"] / "config.yaml").read_text())
    cfg["model"] = {"preset": None, "init_from": str(out)}
    cfg["data"]["tokenizer"] = str(out)
    cfg["optim"]["lr"] = 1e-12
    cfg["train"].update(max_duration="1ba", save_interval="1ba")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli("train", "-c", str(tmp_path / "ft.yaml"), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "home" / "runs").iterdir()
    tuned, _, _ = load_run(run_dir)
    start = network_for("causal_lm", init_from=str(out))
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.state_dict().values(), start.state_dict().values())]
    assert max(diffs) < 1e-6


def test_forced_sharding(runs, tmp_path):
    limit = 200_000
    out = export(runs["llama"], tmp_path / "hf", "--max-shard-size", "200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    for shard in shards:
        tensors = load_file(shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= limit
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for s in shards for t in load_file(s).values())
    check_transformers_matches_rafale(runs["llama"], out, "LlamaForCausalLM")


def test_export_refuses_a_non_empty_directory_and_bad_sizes(runs, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_text("stale")
    assert main(["export", "--run", str(runs["pythia"]), "--to-hf", str(tmp_path / "old")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["export", "--run", str(runs["pythia"]), "--to-hf", str(tmp_path / "new"),
                 "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_qwen2_style_model_exports_as_qwen2(tmp_path):
    """q/k/v biases without other biases is Qwen2's layout: written as Qwen2ForCausalLM, same logits."""
    cfg = get_preset("gpt-micro", {"qkv_bias": True, "tie_embeddings": False, "vocab_size": 300})
    torch.manual_seed(0)
    ours = Decoder(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    save_weights(ours.state_dict(), LLAMA, cfg, "causal_lm", tmp_path, max_shard_bytes=10**9)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA.hf_config(cfg, "causal_lm", torch.float32, 0, 0)))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, Qwen2ForCausalLM)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= TOL
    with pytest.raises(ModelError, match="no transformers architecture.*mlp='swiglu' \\(it has 'gelu'\\)"):
        LLAMA.hf_config(get_preset("gpt-micro", {"mlp": "gelu"}), "causal_lm", torch.float32, 0, 0)


# --- Broken and foreign checkpoints ---


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def cli_error(capsys, hf_dir: Path) -> str:
    """`rafale generate --hf DIR`: exit code 2 and the one-line message."""
    capsys.readouterr()
    assert main(["generate", "--hf", str(hf_dir), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rafale: error: ") and err.count("\n") == 1, err
    return err


def test_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "has no config.json" in cli_error(capsys, tmp_path)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    # Through a real process: one line on stderr, exit code 2.
    result = run_cli("generate", "--hf", str(tmp_path), "--prompt", "hi", home=tmp_path / "home")
    assert result.returncode == 2, result.stderr
    assert "architecture 'bert' (BertForMaskedLM) is not supported" in result.stderr
    assert "gpt_neox (GPTNeoXForCausalLM), llama (LlamaForCausalLM)" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_unsupported_setting_is_named(llama_dir, capsys):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu", "mlp_bias": True}))
    err = cli_error(capsys, llama_dir)
    assert "hidden_act='gelu' (rafale implements 'silu')" in err and "mlp_bias=True" in err


def test_truncated_safetensors(llama_dir, capsys):
    data = (llama_dir / "model.safetensors").read_bytes()
    (llama_dir / "model.safetensors").write_bytes(data[:len(data) // 2])
    err = cli_error(capsys, llama_dir)
    assert "model.safetensors is not a readable safetensors file, likely truncated or corrupt" in err


def test_wrong_shape_missing_and_unexpected_tensors_are_each_named(llama_dir, capsys):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(60, 32)
        del t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # a known buffer: ignored
        t["model.layers.1.adapter.weight"] = torch.zeros(2)
    edit_tensors(llama_dir, edit)
    err = cli_error(capsys, llama_dir)
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in err
    assert "unexpected tensors: model.layers.1.adapter.weight;" in err
    assert "wrong shapes: model.layers.0.mlp.up_proj.weight is (60, 32), expected (64, 32)" in err
    assert "inv_freq" not in err


def test_pickled_checkpoint_is_refused_without_loading_it(llama_dir, capsys):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    err = cli_error(capsys, llama_dir)
    assert "pytorch_model.bin is pickled: convert it" in err
    with pytest.raises(UserError, match=r"model.init_from: .*\.bin is not a \.safetensors file"):
        network_for("causal_lm", "gpt-micro", init_from=str(llama_dir / "pytorch_model.bin"))


def test_init_from_errors_name_the_config_key(llama_dir, tmp_path):
    with pytest.raises(UserError, match="model.init_from: .* does not exist"):
        network_for("causal_lm", "gpt-micro", init_from=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="model.n_layers: the sizes of an init_from model come from its config.json"):
        network_for("causal_lm", overrides={"n_layers": 3}, init_from=str(llama_dir))
    with pytest.raises(UserError, match=r"model.max_seq_len \(128\) exceeds the 64 positions"):
        network_for("causal_lm", overrides={"max_seq_len": 128}, init_from=str(llama_dir))
    assert network_for("causal_lm", overrides={"max_seq_len": 32}, init_from=str(llama_dir)).cfg.max_seq_len == 32
    with pytest.raises(UserError, match="the tokenizer has 50277 tokens but model"):
        network_for("causal_lm", vocab_size=50277, init_from=str(llama_dir))


def test_a_tied_model_saved_with_only_its_head_loads_for_generation(tmp_path):
    """safetensors' save_model keeps one name of a shared tensor (for SmolLM2: lm_head.weight only).
    `rafale generate --hf` reads such a directory: its greedy tokens are those of the model saved.
    (transformers 4.53.3 leaves this model's weights on the meta device, so the model in memory is the
    reference.)"""
    from safetensors.torch import save_model

    cfg = LlamaConfig(vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    cfg.save_pretrained(tmp_path)
    save_model(hf, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    stored = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" not in stored
    (tmp_path / "tokenizer.json").write_bytes((REPO / "rafale/assets/tokenizers/gpt-neox-20b/tokenizer.json").read_bytes())
    result = run_cli("generate", "--hf", str(tmp_path), "--prompt", "Hello there", "--max-new-tokens", "6",
                     "--json", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([out["prompt_ids"]]), max_new_tokens=6, do_sample=False)
    assert out["output_ids"] == expected[0, len(out["prompt_ids"]):].tolist()
