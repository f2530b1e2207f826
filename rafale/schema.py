"""Typed config sections: how a key is declared, read from YAML data, written back and hashed.

Every key of every section (config.py's, and each pipeline's data section) is declared with one of

    results(default)      changes what training computes: part of the run hash
    bookkeeping(default)  only how often we look, save, report, or how a batch is split: not hashed

and `results(default, added=True)` for a key added after runs were hashed: it stays out of the hash
while it holds its default (which must be the behaviour from before it existed), so adding it does
not change existing runs' hashes and interrupted runs keep resuming. A key declared without either
fails test/test_config.py. A section field whose metadata says `component` also takes the
`{class: import.path, ...kwargs}` form (components.py).

This module imports no torch, so `rafale --help` and config errors are instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import MISSING, field
from typing import Literal, Union

from rafale import components
from rafale.errors import UserError

FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def results(default=MISSING, *, factory=MISSING, added: bool = False, component: bool = False):
    return field(default=default, default_factory=factory,
                 metadata={"results": True, "added": added, "component": component})


def bookkeeping(default=MISSING, *, factory=MISSING):
    return field(default=default, default_factory=factory, metadata={"results": False})


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if tp is components.Component:
        return "a mapping with a 'class' key"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            dict: "a mapping"}.get(tp, str(tp))


def _convert(value, tp, key: str):
    """Returns `value` as type `tp`, or raises ValueError. Ints are accepted where floats are."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        for arg in args:
            try:
                return _convert(value, arg, key)
            except ValueError:
                pass
        raise ValueError
    if origin is Literal:
        if value in args:
            return value
        raise ValueError
    if origin is list:
        if not isinstance(value, list):
            raise ValueError
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is components.Component:
        if isinstance(value, dict) and "class" in value:
            return components.parse(value, key)
        raise ValueError
    if tp is type(None):
        if value is None:
            return None
        raise ValueError
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_RE.match(value):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; users mean a number
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is dict and isinstance(value, dict):
        return value
    raise ValueError


def _optional_section(tp):
    """The section class of an `Optional[Section]` field (a section that may be absent), else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) is Union else ()
    sections = [a for a in args if dataclasses.is_dataclass(a)]
    return sections[0] if len(args) == 2 and type(None) in args and sections else None


def build(cls, data: dict, prefix: str, unknown: list[str], wrong: list[str], sections: dict | None = None):
    """An instance of dataclass `cls` from plain YAML data. Unknown keys (with the closest valid name)
    and wrong types are appended to `unknown` / `wrong` as messages naming the dotted key. `sections`
    gives the class to use for a nested section field whose class is decided elsewhere (data)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            unknown.append(f"{path}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        tp = (sections or {}).get(key, hints[key])
        section = typing.get_args(tp)[0] if fields[key].metadata.get("component") else tp
        if _optional_section(tp) is not None:
            if value is None:
                kwargs[key] = None
                continue
            section = _optional_section(tp)
        if fields[key].metadata.get("component") and isinstance(value, dict) and "class" in value:
            try:
                kwargs[key] = components.parse(value, path)
            except UserError as e:
                wrong.append(str(e))
            continue
        if dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                wrong.append(f"{path}: expected a section (a mapping of keys), got {value!r}")
                continue
            kwargs[key] = build(section, value, f"{path}.", unknown, wrong)
            continue
        try:
            kwargs[key] = _convert(value, tp, path)
        except ValueError:
            wrong.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        except UserError as e:
            wrong.append(str(e))
    return cls(**kwargs)


def to_plain(obj):
    """A section (or Component) as plain YAML data, every key written out."""
    if isinstance(obj, components.Component):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def hash_view(obj):
    """A section as the run hash sees it: bookkeeping keys left out, keys added since hashing began left
    out at their default, components by their identity (a file's source, not its place)."""
    if isinstance(obj, components.Component):
        return obj.identity()
    if dataclasses.is_dataclass(obj):
        view = {}
        for f in dataclasses.fields(obj):
            if not f.init or not f.metadata.get("results"):
                continue
            value = getattr(obj, f.name)
            if f.metadata.get("added") and value == _default(f):
                continue
            view[f.name] = hash_view(value)
        return view
    if isinstance(obj, list):
        return [hash_view(v) for v in obj]
    return obj


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def unclassified(cls, prefix: str = "") -> list[str]:
    """Dotted keys of `cls` (and its nested sections) declared with neither `results` nor `bookkeeping`."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "results" not in f.metadata:
            found.append(f"{prefix}{f.name}")
        tp = hints[f.name]
        section = typing.get_args(tp)[0] if f.metadata.get("component") else _optional_section(tp) or tp
        if dataclasses.is_dataclass(section):
            found += unclassified(section, f"{prefix}{f.name}.")
    return found
