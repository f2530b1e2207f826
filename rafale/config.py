"""The run configuration: a typed schema, YAML loading, `key.path=value` overrides, validation, hash.

A config is one YAML file with the sections below. Every key is typed; unknown keys, wrong types
and bad values raise `UserError` naming the full dotted key (all unknown keys at once, each with the
closest valid name). This module imports no torch, so `rafale --help` and config errors are instant.
"""

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from rafale.errors import UserError
from rafale.paths import CONFIGS_DIR

# Composer time strings: 200ba, 1ep, 2000000tok, 512sp, 0.02dur (fractions only for dur).
TIME_RE = re.compile(r"^(\d+(ep|ba|tok|sp)|\d*\.?\d+dur)$")
FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass
class RunSection:
    name: str = "run"
    seed: int = 17


@dataclass
class ModelSection:
    preset: Optional[str] = "pythia-tiny"
    # An HF model directory (config.json + safetensors) or a .safetensors file to start from. With a
    # directory the architecture comes from its config.json and `preset` is ignored.
    init_from: Optional[str] = None
    # Optional size overrides on top of the preset (None = the preset's value).
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    d_model: Optional[int] = None
    d_ff: Optional[int] = None
    max_seq_len: Optional[int] = None


@dataclass
class DataSection:
    pipeline: Literal["causal_lm", "mlm", "classification"] = "causal_lm"
    train: Union[str, list[str]] = "tinyshakespeare/input.txt"
    val: Union[str, list[str], None] = None  # explicit val files; else val_fraction of the train blocks
    val_fraction: float = 0.05
    tokenizer: str = "gpt-neox-20b"
    max_seq_len: int = 256
    doc_separator: Optional[str] = None  # split files into documents at this string
    eos_token: Optional[str] = None  # appended after each document; default: the tokenizer's own
    mlm_probability: float = 0.15  # mlm: share of tokens masked per block (80% [MASK], 10% random, 10% kept)
    text_field: str = "text"  # classification: the column holding the text
    text_pair_field: Optional[str] = None  # classification: a second text column (sentence pairs)
    label_field: str = "label"  # classification: the column holding the label


# The data keys that only some pipelines read: set for another pipeline, they would do nothing.
PIPELINE_KEYS = {"doc_separator": ("causal_lm", "mlm"), "eos_token": ("causal_lm",), "mlm_probability": ("mlm",),
                 "text_field": ("classification",), "text_pair_field": ("classification",),
                 "label_field": ("classification",)}


def _data_problems(d: DataSection) -> list[str]:
    default = DataSection()
    problems = [f"data.{key}: only the {' and '.join(pipelines)} pipeline{'s' if len(pipelines) > 1 else ''} "
                f"read{'' if len(pipelines) > 1 else 's'} it, and data.pipeline is {d.pipeline}; remove it"
                for key, pipelines in PIPELINE_KEYS.items()
                if d.pipeline not in pipelines and getattr(d, key) != getattr(default, key)]
    if not 0.0 < d.mlm_probability < 1.0:
        problems.append(f"data.mlm_probability: must be in (0, 1), got {d.mlm_probability}")
    if d.text_pair_field is not None and d.text_pair_field == d.text_field:
        problems.append(f"data.text_pair_field: must name another column than data.text_field "
                        f"('{d.text_field}')")
    return problems


@dataclass
class OptimSection:
    name: Literal["adamw", "decoupled_adamw", "sgd", "lion"] = "adamw"
    lr: float = 6.0e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw, decoupled_adamw, lion
    eps: float = 1.0e-8
    momentum: float = 0.9  # sgd
    # Parameter kinds that get no weight decay: any of norm, bias, embedding.
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias"])


@dataclass
class ScheduleSection:
    name: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd"] = "cosine"
    warmup: str = "0.02dur"
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine, linear and wsd
    decay: str = "0.2dur"  # wsd: length of the final decay phase
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # wsd: shape of that decay


@dataclass
class ParallelismSection:
    strategy: Literal["none", "ddp", "fsdp", "hsdp"] = "none"
    reshard_after_forward: bool = True  # fsdp/hsdp: full-shard (true) or grad-op style (false)
    replicas: int = 1  # hsdp: replica groups; each shards over world_size / replicas processes
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"  # fsdp/hsdp policy (Composer FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    activation_cpu_offload: bool = False  # fsdp/hsdp: keep saved activations on the CPU


@dataclass
class TrainSection:
    max_duration: str = "1ep"
    global_batch_size: int = 32
    device_microbatch_size: int = 8
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"
    clip_norm: Optional[float] = 1.0  # None disables clipping
    eval_interval: str = "100ba"
    save_interval: str = "200ba"
    keep_checkpoints: int = -1  # keep only the newest K checkpoints; -1 keeps all
    compile: bool = False  # torch.compile the model (Composer compile_config)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    # Start from another run's checkpoint (a file or a run directory): `full` resumes its whole
    # state, `weights` takes the weights only (fresh optimizer and schedule: continued pretraining),
    # `weights_optimizer` takes weights and optimizer state with this config's schedule (cooldown).
    load_from: Optional[str] = None
    load_mode: Literal["full", "weights", "weights_optimizer"] = "weights"


LOGGERS = ("console", "file", "tensorboard", "wandb", "mlflow")


@dataclass
class MonitorSection:
    """What a run reports and watches. None of it changes the numbers, so none of it is in the hash."""
    # Composer loggers on top of metrics.jsonl (always written): console (plain metric lines every
    # console_interval, for batch-job logs), file (a text log per launch in the run dir), tensorboard
    # (run_dir/tensorboard), wandb (offline in run_dir/wandb unless WANDB_MODE says otherwise), mlflow
    # (a local store in run_dir/mlruns). None needs a network.
    loggers: list[str] = field(default_factory=list)
    console_interval: str = "10ba"
    progress: bool = True  # the live progress bar (plain lines when there is no terminal)
    grad_norm_interval: int = 10  # steps between gradient-norm logs (l2_norm/grad/global); 0: off
    memory: bool = False  # log memory each step: CUDA allocator stats on GPU, process peak RSS on CPU
    profile_steps: int = 0  # > 0: torch.profiler traces of this many steps (after 2 warm-up steps) in run_dir/profile
    # Stop the run when the loss exceeds loss_spike_factor x the median of the previous
    # loss_spike_window steps for loss_spike_patience steps in a row (null: never). A NaN or
    # infinite loss always stops it.
    loss_spike_factor: Optional[float] = None
    loss_spike_window: int = 50
    loss_spike_patience: int = 3


@dataclass
class DebugSection:
    steps: int = 60  # optimizer steps on the one fixed batch
    lr: float = 1.0e-3


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """A short hash of the fields that change results: names the run directory.

        Left out: the run name (already in the directory name) and keys that only change how
        often we look at or save the run, what it reports, or how a batch is split into micro-batches.
        """
        d = self.to_dict()
        d["run"].pop("name")
        d.pop("debug")
        d.pop("monitor")
        for key in ("eval_interval", "save_interval", "device_microbatch_size", "keep_checkpoints"):
            d["train"].pop(key)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


def _is_time(value: str) -> bool:
    return bool(TIME_RE.match(value))


def _validate_values(cfg: Config) -> None:
    """Checks that go beyond types: ranges and Composer time strings."""
    problems = []
    for key in ("train.max_duration", "train.eval_interval", "train.save_interval", "schedule.warmup",
                "schedule.decay"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not _is_time(value):
            problems.append(f"{key}: expected a Composer time string like 200ba, 1ep, 2000000tok "
                            f"or 0.02dur, got '{value}'")
    positive = {"train.global_batch_size": cfg.train.global_batch_size,
                "train.device_microbatch_size": cfg.train.device_microbatch_size,
                "data.max_seq_len": cfg.data.max_seq_len, "optim.lr": cfg.optim.lr,
                "debug.steps": cfg.debug.steps, "debug.lr": cfg.debug.lr}
    problems += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        problems.append(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.train.clip_norm is not None and cfg.train.clip_norm <= 0:
        problems.append(f"train.clip_norm: must be > 0 (or null to disable), got {cfg.train.clip_norm}")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        problems.append(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if not problems and not cfg.schedule.decay.endswith("dur"):
        unit = lambda t: re.sub(r"[\d.]", "", t).replace("ep", "ba")  # epochs are counted in batches
        if unit(cfg.schedule.decay) != unit(cfg.train.max_duration):
            problems.append(f"schedule.decay: '{cfg.schedule.decay}' must be in the unit of train.max_duration "
                            f"('{cfg.train.max_duration}'), or a fraction like 0.2dur")
    bad_kinds = sorted(set(cfg.optim.no_decay) - {"norm", "bias", "embedding"})
    if bad_kinds:
        problems.append(f"optim.no_decay: unknown kinds {bad_kinds}; choose from norm, bias, embedding")
    if cfg.train.parallelism.replicas < 1:
        problems.append(f"train.parallelism.replicas: must be >= 1, got {cfg.train.parallelism.replicas}")
    if cfg.train.keep_checkpoints == 0 or cfg.train.keep_checkpoints < -1:
        problems.append(f"train.keep_checkpoints: must be -1 (keep all) or >= 1, got {cfg.train.keep_checkpoints}")
    if cfg.train.global_batch_size % cfg.train.device_microbatch_size:
        problems.append(f"train.device_microbatch_size: {cfg.train.device_microbatch_size} must divide "
                        f"train.global_batch_size ({cfg.train.global_batch_size})")
    problems += _data_problems(cfg.data)
    problems += _monitor_problems(cfg.monitor)
    if problems:
        raise UserError("; ".join(problems))


def _monitor_problems(m: MonitorSection) -> list[str]:
    problems = []
    unknown = [name for name in m.loggers if name not in LOGGERS]
    if unknown:
        problems.append(f"monitor.loggers: unknown {unknown}; choose from {', '.join(LOGGERS)}")
    if len(set(m.loggers)) != len(m.loggers):
        problems.append(f"monitor.loggers: {m.loggers} names a logger twice")
    if not re.match(r"^[1-9]\d*(ba|ep)$", m.console_interval):
        problems.append(f"monitor.console_interval: expected steps or epochs like 10ba or 1ep, got "
                        f"'{m.console_interval}'")
    for key in ("grad_norm_interval", "profile_steps"):
        if getattr(m, key) < 0:
            problems.append(f"monitor.{key}: must be >= 0, got {getattr(m, key)}")
    if m.loss_spike_factor is not None and m.loss_spike_factor <= 1:
        problems.append(f"monitor.loss_spike_factor: must be > 1 (or null to disable), got {m.loss_spike_factor}")
    if m.loss_spike_window < 2:
        problems.append(f"monitor.loss_spike_window: must be >= 2, got {m.loss_spike_window}")
    if m.loss_spike_patience < 1:
        problems.append(f"monitor.loss_spike_patience: must be >= 1, got {m.loss_spike_patience}")
    return problems


# ---- typed conversion of plain YAML data into the dataclasses ----

def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


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
        return [_convert(v, args[0], key) for v in value]
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
    raise ValueError


def _build(cls, data: dict, prefix: str, unknown: list[str], wrong: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            unknown.append(f"{path}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        tp = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                wrong.append(f"{path}: expected a section (a mapping of keys), got {value!r}")
                continue
            kwargs[key] = _build(tp, value, f"{path}.", unknown, wrong)
            continue
        try:
            kwargs[key] = _convert(value, tp, path)
        except ValueError:
            wrong.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise UserError(f"config: expected a mapping of sections (run, model, data, ...), got {data!r}")
    train = data.get("train")
    if isinstance(train, dict) and train.get("device_microbatch_size") == "auto":
        raise UserError("train.device_microbatch_size: auto (Composer's OOM-driven search) works only with "
                        "FSDP1 on GPUs, and rafale runs FSDP2; give a number of sequences")
    unknown, wrong = [], []
    cfg = _build(Config, data, "", unknown, wrong)
    problems = []
    if unknown:
        problems.append("unknown config key" + ("s" if len(unknown) > 1 else "") + ": " + ", ".join(unknown))
    problems += wrong
    if problems:
        raise UserError("; ".join(problems))
    _validate_values(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003). Values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise UserError(f"bad override '{text}': expected key.path=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"bad override '{text}': the value is not valid YAML") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"bad override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config_path(spec: str) -> Path:
    """`-c` takes a YAML path or the name of a bundled config."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if (CONFIGS_DIR / f"{spec}.yaml").is_file():
        return CONFIGS_DIR / f"{spec}.yaml"
    names = bundled_configs()
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f"; bundled configs: {', '.join(names)}"
    raise UserError(f"config '{spec}' is neither a YAML file nor a bundled config{hint}")


def load_config(spec: str, overrides: list[str] = ()) -> Config:
    path = resolve_config_path(spec)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the file") from None
    return from_dict(apply_overrides(data, list(overrides)))


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
