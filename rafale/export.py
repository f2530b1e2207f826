"""`rafale export`: a run directory -> an HF transformers model directory.

    OUT_DIR/config.json              the family's class for the run's task: GPTNeoXForCausalLM,
                                     LlamaForCausalLM, Qwen2ForCausalLM, Bert/RobertaForMaskedLM or
                                     Bert/RobertaForSequenceClassification (with id2label)
    OUT_DIR/model.safetensors        or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    OUT_DIR/tokenizer.json           the run's tokenizer, as is
    OUT_DIR/tokenizer_config.json    PreTrainedTokenizerFast and the special tokens the pipeline names

so that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load
it without trust_remote_code (test/test_hf_import_export.py checks the logits and greedy tokens).
The weights are the run's latest checkpoint, memory-mapped, and written shard by shard: no second copy.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from rafale.checkpoints import checkpoint_weights
from rafale.errors import UserError
from rafale.paths import resolve_tokenizer
from rafale.runs import Run

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '100KiB' / '123456' -> bytes (decimal units, as transformers counts them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size: expected a size like 5GB, 500MB or 100KiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def export_run(run_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               adapter_only: bool = False) -> Path:
    """Writes the run's latest checkpoint to `out_dir` (new or empty) as an HF model directory. A LoRA run
    is written merged (the adapter folded into the base weights), or with `adapter_only` as a PEFT
    adapter directory (adapter_config.json + adapter_model.safetensors) for its init_from model."""
    from rafale.inference import run_network
    from rafale.models import FAMILIES
    from rafale.models.weights import stored_names

    run, out_dir = Run.open(run_dir), Path(out_dir)
    ckpt = run.require_checkpoint()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Stale shards or an old index next to new ones would load as a mix of two models.
        raise UserError(f"--to-hf {out_dir}: exists and is not an empty directory; pick a new one")
    lora = getattr(run.config.model, "lora", None) is not None
    if adapter_only and not lora:
        raise UserError(f"--adapter-only: run {run.name} trained no LoRA adapter (model.lora is not set); "
                        f"export it without --adapter-only")
    if lora:
        return _export_lora(run, out_dir, max_shard_bytes, adapter_only)
    # The run's network on the meta device: its config and tensor names and shapes, no memory.
    skeleton, pipeline, meta = run_network(run, skeleton=True)
    net_cfg = getattr(skeleton, "cfg", None)
    if net_cfg is None or not any(f.owns(net_cfg) for f in FAMILIES):
        raise UserError(f"--run {run_dir}: its model ({run.config.to_dict()['model'].get('class', '?')}) is not "
                        f"one of rafale's families; export writes presets and imported HF models only")
    state = skeleton.state_dict()
    # transformers re-ties tied tensors (a tied head, BERT's MLM output matrix) from the one written
    weights, dtype = checkpoint_weights(ckpt, {name: state[name] for name in stored_names(skeleton)})
    return _write_hf(run, run_dir, out_dir, max_shard_bytes, net_cfg, pipeline, meta, weights, dtype)


def _export_lora(run: Run, out_dir: Path, max_shard_bytes: int, adapter_only: bool) -> Path:
    """The base (from model.init_from) with the run's adapter: merged into an HF model directory, or the
    adapter alone in PEFT's format."""
    import torch
    from safetensors.torch import save_file

    from rafale.inference import run_network
    from rafale.models.lora import merge_lora, peft_adapter
    from rafale.models.weights import stored_names

    network, pipeline, meta = run_network(run)
    if adapter_only:
        config, tensors = peft_adapter(network)
        config["base_model_name_or_path"] = run.config.model.init_from
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return out_dir
    merge_lora(network)
    state = network.state_dict()
    weights = {name: state[name] for name in stored_names(network)}
    return _write_hf(run, run.path, out_dir, max_shard_bytes, network.cfg, pipeline, meta, weights,
                     next(iter(weights.values())).dtype if weights else torch.float32)


def _write_hf(run: Run, run_dir, out_dir: Path, max_shard_bytes: int, net_cfg, pipeline, meta: dict,
              weights: dict, dtype) -> Path:
    from tokenizers import Tokenizer

    from rafale.models import ModelError, family_of
    from rafale.models.weights import save_weights

    family, task = family_of(net_cfg), pipeline.task
    tok_path = resolve_tokenizer(run.config.data.tokenizer)
    tokens = pipeline.export_tokens(meta, Tokenizer.from_file(str(tok_path)), tok_path)
    try:  # a model with no transformers architecture fails here, before anything is written
        config = family.hf_config(net_cfg, task, dtype, labels=meta.get("labels") if task == "classification"
                                  else None, **tokens["config"])
    except ModelError as e:
        raise UserError(f"--run {run_dir}: {e}") from None
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens["tokenizer_config"],
                  "model_max_length": net_cfg.max_seq_len, "clean_up_tokenization_spaces": False}
    # Written into a hidden sibling and renamed into place: a failure (a full disk) leaves no partial
    # shards under OUT_DIR, and the same command can simply be run again.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_weights(weights, family, net_cfg, task, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        mode = 0o666 & ~_umask()  # what a plain file gets (0644): safetensors writes its files 0600
        for file in tmp.iterdir():
            file.chmod(mode)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp made it 0700
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory otherwise
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
