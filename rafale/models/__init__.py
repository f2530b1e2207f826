"""Models: the networks (decoder.py, encoder.py) and the families that know them (gpt_neox.py, llama.py,
bert.py: presets, transformers config and weight names), on one weight loader / saver (weights.py).

This package knows tensors only: it imports nothing from data, runs, the CLI or the trainer, and
raises `ModelError`s that the config layer (rafale/build.py) turns into messages naming config keys.

    FAMILIES          every family, in lookup order
    preset(name)      (family, config fields) of a named shape; preset_config(name) its config
    family_for_hf()   the family that reads an HF config.json
    family_of(cfg)    the family a network config belongs to (for export)
"""

from rafale.models.family import Family, ModelError, close_names

_FAMILY_MODULES = ("gpt_neox", "llama", "bert")


def _families() -> list[Family]:
    import importlib

    return [importlib.import_module(f"rafale.models.{m}").FAMILY for m in _FAMILY_MODULES]


FAMILIES: list[Family] = _families()


def preset_names(task: str | None = None) -> list[str]:
    return [name for f in FAMILIES if task is None or task in f.tasks for name in f.presets]


def preset(name: str) -> tuple[Family, dict]:
    """(family, config fields) of a preset; ModelError (field "preset") naming close names if unknown."""
    for family in FAMILIES:
        if name in family.presets:
            return family, family.presets[name]
    names = preset_names()
    raise ModelError(f"unknown preset {name!r}; {close_names(name, names)}valid presets: {', '.join(names)}",
                     field="preset")


def preset_config(name: str, overrides: dict | None = None):
    """The network config of a preset with `overrides` (config field -> value) applied on top; derived
    fields (d_ff when not given, head_dim, rotary_dim) follow the overridden sizes."""
    family, fields = preset(name)
    return family.make_config({**fields, **(overrides or {})})


def family_for_hf(hf: dict, task: str | None = None) -> tuple[Family, str]:
    """(family, model_type) reading this config.json (among the families that build `task`), or a
    ModelError listing the supported ones."""
    families = [f for f in FAMILIES if task is None or task in f.tasks]
    for family in families:
        model_type = family.hf_architecture(hf)
        if model_type is not None:
            return family, model_type
    archs = hf.get("architectures") or []
    named = hf.get("model_type") or (archs[0] if archs else None)
    what = "a config.json with no model_type or architectures" if named is None else f"architecture {named!r}"
    if archs and named != archs[0]:
        what += f" ({', '.join(archs)})"
    supported = ", ".join(f"{t} ({', '.join(f.hf_classes(t))})" for f in families for t in f.model_types)
    raise ModelError(f"{what} is not supported; supported architectures: {supported}")


def family_of(cfg) -> Family:
    return next(f for f in FAMILIES if f.owns(cfg))
