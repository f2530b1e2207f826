"""Loading a trained network for use: back from a run directory's latest checkpoint (generate, eval,
export), or from an HF model directory (generate --hf)."""

from pathlib import Path

import torch
from tokenizers import Tokenizer

from rafale.errors import UserError
from rafale.paths import resolve_tokenizer
from rafale.runs import Run


def run_network(run: Run, meta: dict | None = None, skeleton: bool = False):
    """(network in eval mode, pipeline, meta) of a run: the network its config builds, holding its latest
    checkpoint's weights (memory-mapped). `skeleton`: on the meta device, no weights (names and shapes)."""
    from rafale.build import build_network, pipeline_of
    from rafale.checkpoints import read_model_state

    cfg = run.config
    pipeline = pipeline_of(cfg)
    ckpt = run.require_checkpoint()
    meta = meta if meta is not None else pipeline.model_meta()
    # Generation, eval and export attend with SDPA whatever kernel trained the run (same numbers up to
    # rounding), so a run trained with flash on a GPU is usable on any machine.
    if skeleton:
        with torch.device("meta"):
            return build_network(cfg, meta, attention="sdpa"), pipeline, meta
    network = build_network(cfg, meta, attention="sdpa")
    state = read_model_state(ckpt)
    missing, unexpected = network.load_state_dict({name.removeprefix("model."): t for name, t in state.items()},
                                                  strict=False)
    # A LoRA run's checkpoint holds the adapter only: the frozen base came from model.init_from above.
    frozen = {n for n, p in network.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt.name} does not match the run's config.yaml (missing "
                        f"{', '.join(missing[:4]) or 'nothing'}, unexpected {', '.join(unexpected[:4]) or 'nothing'}); "
                        f"was config.yaml edited?")
    return network.eval(), pipeline, meta


def load_run(run_dir):
    """Returns (network in eval mode, tokenizer, config) of a run whose model generates text."""
    from rafale.build import pipeline_of

    run = Run.open(run_dir)
    if not pipeline_of(run.config).generates:
        raise UserError(f"--run {run_dir}: this is a {run.config.data.pipeline} run: an encoder does not generate "
                        f"text; use `rafale eval` or `rafale export` on it")
    network, _, _ = run_network(run)
    tokenizer = Tokenizer.from_file(str(resolve_tokenizer(run.config.data.tokenizer)))
    return network, tokenizer, run.config


def load_hf(hf_dir: str):
    """Returns (decoder in eval mode, tokenizer) from an HF model directory."""
    from rafale.build import network_for

    path = Path(hf_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"--hf {hf_dir}: not a directory; give an HF model directory (config.json, "
                        f"model.safetensors, tokenizer.json)")
    decoder = network_for("causal_lm", init_from=str(path), where="--hf")
    tokenizer = Tokenizer.from_file(str(resolve_tokenizer(str(path.resolve()), key="--hf")))
    if tokenizer.get_vocab_size() > decoder.cfg.vocab_size:
        raise UserError(f"--hf {hf_dir}: its tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model "
                        f"embeds only {decoder.cfg.vocab_size}; the two do not belong together")
    return decoder.eval(), tokenizer


def load_gguf(spec: str, key: str = "--gguf"):
    """Returns (decoder in eval mode, tokenizer, eos ids, the tokenizer folder extracted from its metadata:
    tokenizer.json, tokenizer_config.json, chat_template.jinja) from a GGUF file (a path or
    `pkg:PACKAGE/FILE`); weights dequantized to fp32."""
    from rafale.build import network_for
    from rafale.paths import gguf_tokenizer_dir, resolve_model_file

    path = resolve_model_file(spec, key)
    if path.suffix != ".gguf":
        raise UserError(f"{key} {spec}: not a .gguf file; give a GGUF model file")
    decoder = network_for("causal_lm", init_from=str(path), where=key)
    folder = gguf_tokenizer_dir(path, key)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    import json

    eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
    return decoder.eval(), tokenizer, [tokenizer.token_to_id(eos)] if eos is not None else [], folder


def run_eos_ids(cfg, tokenizer: Tokenizer) -> list[int]:
    """The token a run's data appended after every document (data.eos_token, or the tokenizer's own):
    the one the model learned to end a text with."""
    from rafale.build import pipeline_of

    return [pipeline_of(cfg).model_meta()["tokenizer"]["eos_id"]]


def hf_eos_ids(hf_dir: str) -> list[int]:
    """An HF model directory's eos token id(s): generation_config.json's when it names them (transformers'
    `generate` reads them there), else config.json's; [] when neither does."""
    import json

    for name in ("generation_config.json", "config.json"):
        path = Path(hf_dir).expanduser() / name
        if path.is_file() and (ids := json.loads(path.read_text()).get("eos_token_id")) is not None:
            return [ids] if isinstance(ids, int) else list(ids)
    return []
