"""Loading a trained model back from a run directory, for generation (and later eval / export)."""

from pathlib import Path

import torch
from tokenizers import Tokenizer

from rafale import runs
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

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = runs.latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--run {run_dir}: no checkpoint yet; train longer than train.save_interval "
                        f"({cfg.train.save_interval}) or until the run completes")
    tokenizer = Tokenizer.from_file(str(resolve_tokenizer(cfg.data.tokenizer)))
    composer_model = build_model(cfg, tokenizer.get_vocab_size())
    # Our own checkpoint: Composer pickles its training state, so weights_only=False is needed here.
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    composer_model.load_state_dict(state["state"]["model"])
    decoder = composer_model.model.eval()
    return decoder, tokenizer, cfg
