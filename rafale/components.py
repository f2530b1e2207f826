"""Components by import path: the `class` form of a config section or list item.

    optim: {class: torch.optim.SGD, lr: 0.05, momentum: 0.9}
    train: {callbacks: [{class: ./my_callbacks.py:Touch, path: done.txt}]}

A mapping whose `class` key is an import path and whose other keys are the constructor's keyword
arguments (torchtune's `_component_`, llm-foundry's registries by name). Paths take three spellings:
`package.module:Name`, `package.module.Name`, and `path/to/file.py:Name` (a file path, relative to
the working directory; stored absolute, so a run's saved config finds it from anywhere). A file's
source is part of the run hash (an edit changes the run), its location is not.

Nothing here imports the component until it is built: config loading stays free of torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rafale.errors import UserError


@dataclass
class Component:
    path: str  # as normalised by `normalise`
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"class": self.path, **self.kwargs}

    def identity(self) -> dict:
        """What the run hash sees: the kwargs, and the class by name or, for a file, by its source."""
        return {"class": identity(self.path), **self.kwargs}


def is_file_path(path: str) -> bool:
    return ".py:" in path


def normalise(path: str, key: str) -> str:
    """A file path made absolute (and checked to exist); a module path as given."""
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{key}: expected an import path like package.module:Name or ./file.py:Name, got {path!r}")
    path = path.strip()
    if not is_file_path(path):
        return path
    file, _, name = path.rpartition(":")
    resolved = Path(file).expanduser().resolve()
    if not resolved.is_file():
        raise UserError(f"{key}: no file {file} (looked from {Path.cwd()}); fix the path in '{path}'")
    if not name.isidentifier():
        raise UserError(f"{key}: '{path}' must end in :Name, the class or function to use from the file")
    return f"{resolved}:{name}"


def identity(path: str) -> str:
    if not is_file_path(path):
        return path
    file, _, name = path.rpartition(":")
    return f"sha256:{hashlib.sha256(Path(file).read_bytes()).hexdigest()}:{name}"


def parse(value, key: str) -> Component:
    """A config mapping with a `class` key -> Component."""
    if not isinstance(value, dict) or "class" not in value:
        raise UserError(f"{key}: expected a mapping with a 'class' key (an import path) and the constructor's "
                        f"keyword arguments, got {value!r}")
    kwargs = {k: v for k, v in value.items() if k != "class"}
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise UserError(f"{key}: {bad[0]!r} is not a keyword argument name")
    return Component(normalise(value["class"], f"{key}.class"), kwargs)


def load(path: str, key: str):
    """The object an import path names (a class or a function)."""
    if is_file_path(path):
        file, _, name = path.rpartition(":")
        module_name = f"rafale_component_{hashlib.sha1(file.encode()).hexdigest()[:12]}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # before exec: dataclasses and pickling look it up there
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[module_name]
                raise UserError(f"{key}: importing {file} failed: {type(e).__name__}: {e}") from None
    else:
        module_path, sep, name = path.partition(":")
        if not sep:
            module_path, _, name = path.rpartition(".")
        try:
            module = importlib.import_module(module_path)
        except ImportError as e:
            raise UserError(f"{key}: cannot import {module_path!r} ({e}); check the spelling, or install it") from None
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UserError(f"{key}: {path.rpartition(':')[0] or module_path} has no {name!r}; it has: "
                        f"{', '.join(public[:20])}")
    return getattr(module, name)


def check_call(target, key: str, args: tuple = (), kwargs: dict | None = None) -> None:
    """UserError naming `key` when target(*args, **kwargs) does not fit its signature."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: the call itself will say
    try:
        signature.bind(*args, **(kwargs or {}))
    except TypeError as e:
        raise UserError(f"{key}: {getattr(target, '__name__', target)}({_parameters(signature)}) does not take "
                        f"these arguments ({e})") from None


def _parameters(signature: inspect.Signature) -> str:
    """A signature's parameters without annotations: `params, lr=0.001, *, maximize=False`."""
    out, star = [], False
    for p in signature.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                out.append("*")
                star = True
            out.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(out)


def build(component: Component, key: str, *args, **extra):
    """component.class(*args, **extra, **component.kwargs), with a UserError naming `key` when the
    import or the signature does not fit."""
    target = load(component.path, key)
    kwargs = {**extra, **component.kwargs}
    check_call(target, key, args, kwargs)
    return target(*args, **kwargs)


def accepts(target, name: str) -> bool:
    """Whether target's signature has a parameter `name` (or **kwargs)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
