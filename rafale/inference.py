"""Loading a model for generation: a trained one back from a run directory, or an HF model directory."""

from pathlib import Path

from tokenizers import Tokenizer

from rafale.config import Config, from_dict
from rafale.errors import UserError
from rafale.paths import resolve_tokenizer


def load_run_config(run_dir: Path) -> Config:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--run {run_dir}: not a run directory (no config.yaml); `rafale runs` lists them")
    return from_dict(yaml.safe_load(path.read_text()))


def load_run(run_dir: Path):
    """Returns (decoder in eval mode, tokenizer, config) from the run's latest complete checkpoint."""
    from rafale.train import build_model

    from rafale.checkpoints import latest_model_state

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    state = latest_model_state(run_dir)
    tokenizer = Tokenizer.from_file(str(resolve_tokenizer(cfg.data.tokenizer)))
    composer_model = build_model(cfg, tokenizer.get_vocab_size())
    composer_model.load_state_dict(state)
    decoder = composer_model.model.eval()
    return decoder, tokenizer, cfg


def load_hf(hf_dir: str):
    """Returns (decoder in eval mode, tokenizer) from an HF model directory (see models/hf.py)."""
    from rafale.models.decoder import Decoder
    from rafale.models.hf import load_weights, model_config

    path = Path(hf_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"--hf {hf_dir}: not a directory; give an HF model directory (config.json, "
                        f"model.safetensors, tokenizer.json)")
    decoder = Decoder(model_config(None, init_from=str(path), where="--hf"))
    load_weights(decoder, path, where="--hf")
    tokenizer = Tokenizer.from_file(str(resolve_tokenizer(str(path.resolve()), key="--hf")))
    if tokenizer.get_vocab_size() > decoder.cfg.vocab_size:
        raise UserError(f"--hf {hf_dir}: its tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model "
                        f"embeds only {decoder.cfg.vocab_size}; the two do not belong together")
    return decoder.eval(), tokenizer


def run_eos_ids(cfg: Config, tokenizer: Tokenizer) -> list[int]:
    """The token a run's data appended after every document (data.eos_token, or the tokenizer's own):
    the one the model learned to end a text with."""
    from rafale.data.pipelines import resolve_eos

    return [resolve_eos(tokenizer, cfg.data.eos_token, resolve_tokenizer(cfg.data.tokenizer), "data")[1]]


def hf_eos_ids(hf_dir: str) -> list[int]:
    """An HF model directory's eos token id(s): generation_config.json's when it names them (transformers'
    `generate` reads them there), else config.json's; [] when neither does."""
    import json

    for name in ("generation_config.json", "config.json"):
        path = Path(hf_dir).expanduser() / name
        if path.is_file() and (ids := json.loads(path.read_text()).get("eos_token_id")) is not None:
            return [ids] if isinstance(ids, int) else list(ids)
    return []
