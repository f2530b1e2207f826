"""`rafale export`: a run directory -> an HF transformers model directory.

    OUT_DIR/config.json              GPTNeoXForCausalLM, LlamaForCausalLM, or Qwen2ForCausalLM (q/k/v biases)
    OUT_DIR/model.safetensors        or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    OUT_DIR/tokenizer.json           the run's tokenizer, as is
    OUT_DIR/tokenizer_config.json    PreTrainedTokenizerFast, bos = eos = the run's document separator

so that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load
it without trust_remote_code (test/test_hf_import_export.py checks the logits and greedy tokens).
The weights are the run's latest checkpoint, memory-mapped, and written shard by shard: no second copy.
"""

import json
import re
import shutil
from pathlib import Path

import torch

from rafale import runs
from rafale.checkpoints import checkpoint_weights
from rafale.errors import UserError
from rafale.inference import load_run_config
from rafale.models.hf import HEAD, family_of, hf_config, save_weights
from rafale.paths import resolve_tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '100KiB' / '123456' -> bytes (decimal units, as transformers counts them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size: expected a size like 5GB, 500MB or 100KiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def export_run(run_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes the run's latest checkpoint to `out_dir` (new or empty) as an HF model directory."""
    from tokenizers import Tokenizer

    from rafale.data.pipelines import resolve_eos
    from rafale.train import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_run_config(run_dir)
    ckpt = runs.latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--run {run_dir}: no checkpoint yet; train longer than train.save_interval "
                        f"({cfg.train.save_interval}) or until the run completes")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Stale shards or an old index next to new ones would load as a mix of two models.
        raise UserError(f"--to-hf {out_dir}: exists and is not an empty directory; pick a new one")
    if cfg.data.pipeline != "causal_lm":  # BERT / RoBERTa: *ForMaskedLM or *ForSequenceClassification
        from rafale.models.hf_encoders import export_encoder

        return export_encoder(cfg, ckpt, out_dir, max_shard_bytes)
    tok_path = resolve_tokenizer(cfg.data.tokenizer)
    tokenizer = Tokenizer.from_file(str(tok_path))
    eos_token, eos_id = resolve_eos(tokenizer, cfg.data.eos_token, tok_path, "data")
    # The run's model on the meta device: its config and tensor names and shapes, no memory.
    with torch.device("meta"):
        skeleton = build_model(cfg, tokenizer.get_vocab_size()).model
    dcfg = skeleton.cfg
    family_of(dcfg)  # a model with no transformers architecture fails here, before anything is written
    # transformers re-ties a tied head from the embedding, so it is not written
    weights, dtype = checkpoint_weights(ckpt, skeleton.state_dict(), skip={HEAD} if dcfg.tie_embeddings else set())

    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(dcfg, weights, out_dir, max_shard_bytes)
    config = hf_config(dcfg, bos_token_id=eos_id, eos_token_id=eos_id, dtype=dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(tok_path, out_dir / "tokenizer.json")
    # rafale's data pipeline puts the eos token between documents and adds no bos, so the separator
    # is both, as in GPT-NeoX's and SmolLM2's own tokenizer configs.
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos_token, "eos_token": eos_token,
                  "model_max_length": dcfg.max_seq_len, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out_dir
