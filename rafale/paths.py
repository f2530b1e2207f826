"""Where rafale reads bundled assets and where it writes (data cache, runs).

Everything rafale writes lives under $RAFALE_HOME (default ~/.rafale_cache):
    $RAFALE_HOME/data/<pipeline>-<key>/   tokenized, chunked datasets (see data/cache.py)
    $RAFALE_HOME/runs/<name>-<hash>/      one directory per run (see runs.py)
"""

import os
from pathlib import Path

from rafale.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIGS_DIR = PACKAGE_DIR / "configs"
TOKENIZERS_DIR = ASSETS_DIR / "tokenizers"


def rafale_home() -> Path:
    home = os.environ.get("RAFALE_HOME")
    if home is not None and not home.strip():  # Path("") is the working directory
        raise UserError("RAFALE_HOME is empty; unset it (for ~/.rafale_cache) or set it to a directory")
    return Path(home if home is not None else Path.home() / ".rafale_cache").expanduser()


def data_cache_dir() -> Path:
    return rafale_home() / "data"


def runs_dir() -> Path:
    return rafale_home() / "runs"


def resolve_data_path(spec: str, key: str) -> Path:
    """A data path as written in a config: absolute, relative to the working directory, or
    relative to the bundled assets (`tinyshakespeare/input.txt`)."""
    for candidate in (Path(spec).expanduser(), ASSETS_DIR / spec):
        if candidate.exists():
            return candidate.resolve()
    raise UserError(f"{key}: no file or directory '{spec}' (looked in the working directory and "
                    f"in the bundled assets {ASSETS_DIR}); fix the path")


def resolve_tokenizer(spec: str, key: str = "data.tokenizer") -> Path:
    """A tokenizer as written in a config: a bundled name (`gpt-neox-20b`), a tokenizer.json
    path, or a directory holding tokenizer.json. Returns the tokenizer.json path."""
    bundled = sorted(p.name for p in TOKENIZERS_DIR.iterdir() if p.is_dir())
    if spec in bundled:
        return TOKENIZERS_DIR / spec / "tokenizer.json"
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return path.resolve()
    raise UserError(f"{key}: '{spec}' is neither a bundled tokenizer ({', '.join(bundled)}) "
                    f"nor a tokenizer.json file or a directory holding one")
