"""The run configuration: the typed sections, YAML loading, `key.path=value` overrides, validation, hash.

A config is one YAML file with the sections below; the `data` section is the one its pipeline declares
(rafale/data/pipeline.py and each pipeline module). Every key is typed and declared as changing results
or not (schema.py); unknown keys, wrong types and bad values raise `UserError` naming the full dotted key
(all unknown keys at once, each with the closest valid name). `model`, `optim` and `schedule` also take
the component form `{class: import.path, ...keyword arguments}`, and `train.callbacks` a list of them
(components.py). This module imports no torch, so `rafale --help` and config errors are instant.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from rafale import components, schema
from rafale.components import Component
from rafale.data.pipeline import BUILTIN, DataSection, other_pipelines_reading, pipeline_class
from rafale.errors import UserError
from rafale.paths import CONFIGS_DIR
from rafale.schema import bookkeeping, results

# Composer time strings: 200ba, 1ep, 2000000tok, 512sp, 0.02dur (fractions only for dur).
TIME_RE = re.compile(r"^(\d+(ep|ba|tok|sp)|\d*\.?\d+dur)$")

# Data keys every data section carried before each pipeline declared its own, with the values they
# then always had where their pipeline did not read them. The run hash keeps them at those values, so
# hashes of runs made before are unchanged; a run directory's saved config may still list them.
LEGACY_DATA_KEYS = {"doc_separator": None, "eos_token": None, "mlm_probability": 0.15, "text_field": "text",
                    "text_pair_field": None, "label_field": "label"}


@dataclass
class RunSection:
    name: str = bookkeeping("run")  # already in the run directory's name
    seed: int = results(17)


@dataclass
class LoraSection:
    """LoRA adapters on the blocks' linear layers (rafale/models/lora.py); the base is frozen."""
    rank: int = results(8)
    alpha: float = results(16.0)  # the update is scaled by alpha / rank
    dropout: float = results(0.0)  # on the adapter's input
    # qkv, proj, fc_in, fc_gate, fc_out, or the groups attention, mlp, all
    targets: list[str] = results(factory=lambda: ["all"])


@dataclass
class ModelSection:
    preset: Optional[str] = results("pythia-tiny")
    # An HF model directory (config.json + safetensors) or a .safetensors file to start from. With a
    # directory the architecture comes from its config.json and `preset` is ignored.
    init_from: Optional[str] = results(None)
    # Optional size overrides on top of the preset (None = the preset's value).
    n_layers: Optional[int] = results(None)
    n_heads: Optional[int] = results(None)
    d_model: Optional[int] = results(None)
    d_ff: Optional[int] = results(None)
    max_seq_len: Optional[int] = results(None)
    # Rows of the embedding and the head. None: a decoder trained from scratch gets the tokenizer's size
    # rounded up to a multiple of 64 (build.py); an encoder or an init_from model keeps its own.
    vocab_size: Optional[int] = results(None, added=True)
    # Set on the config.yaml of a run made when a decoder always kept its preset's vocabulary (it lacks
    # vocab_size): that run's checkpoint has the preset's size. Not a key.
    preset_vocab: bool = field(default=False, init=False, repr=False, compare=False)
    # The decoder's attention kernel (rafale/models/attention.py): the same numbers up to rounding.
    attention: Literal["sdpa", "flex", "flash"] = results("sdpa", added=True)
    # Train LoRA adapters on the frozen init_from model instead of every weight (null: full fine-tuning).
    lora: Optional[LoraSection] = results(None, added=True)


@dataclass
class OptimSection:
    name: Literal["adamw", "decoupled_adamw", "sgd", "lion"] = results("adamw")
    lr: float = results(6.0e-4)
    weight_decay: float = results(0.1)
    betas: list[float] = results(factory=lambda: [0.9, 0.95])  # adamw, decoupled_adamw, lion
    eps: float = results(1.0e-8)
    momentum: float = results(0.9)  # sgd
    # Parameter kinds that get no weight decay: any of norm, bias, embedding.
    no_decay: list[str] = results(factory=lambda: ["norm", "bias"])


@dataclass
class ScheduleSection:
    name: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd"] = results("cosine")
    warmup: str = results("0.02dur")
    min_lr_ratio: float = results(0.1)  # final lr / peak lr for cosine, linear and wsd
    decay: str = results("0.2dur")  # wsd: length of the final decay phase
    decay_shape: Literal["linear", "cosine", "sqrt"] = results("linear")  # wsd: shape of that decay


@dataclass
class ParallelismSection:
    strategy: Literal["none", "ddp", "fsdp", "hsdp"] = results("none")
    reshard_after_forward: bool = results(True)  # fsdp/hsdp: full-shard (true) or grad-op style (false)
    replicas: int = results(1)  # hsdp: replica groups; each shards over world_size / replicas processes
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = results("DEFAULT")  # fsdp/hsdp policy (Composer FSDP2)
    activation_checkpointing: bool = results(False)  # recompute each block's activations in backward
    activation_cpu_offload: bool = results(False)  # fsdp/hsdp: keep saved activations on the CPU


@dataclass
class TrainSection:
    max_duration: str = results("1ep")
    global_batch_size: int = results(32)
    device_microbatch_size: int = bookkeeping(8)  # same loss and gradients, split differently
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = results("auto")
    clip_norm: Optional[float] = results(1.0)  # None disables clipping
    eval_interval: str = bookkeeping("100ba")
    # Batches of the validation split each periodic evaluation reads (Composer's eval_subset_num_batches;
    # null: all of them). The evaluation at the end of training always reads the whole split.
    eval_batches: Optional[int] = bookkeeping(None)
    save_interval: str = bookkeeping("200ba")
    keep_checkpoints: int = bookkeeping(-1)  # keep only the newest K checkpoints; -1 keeps all
    compile: bool = results(False)  # torch.compile the model (Composer compile_config)
    parallelism: ParallelismSection = results(factory=ParallelismSection)
    # Start from another run's checkpoint (a file or a run directory): `full` resumes its whole
    # state, `weights` takes the weights only (fresh optimizer and schedule: continued pretraining),
    # `weights_optimizer` takes weights and optimizer state with this config's schedule (cooldown).
    load_from: Optional[str] = results(None)
    load_mode: Literal["full", "weights", "weights_optimizer"] = results("weights")
    # Composer callbacks by import path: [{class: composer.callbacks.EarlyStopper, ...kwargs}]
    callbacks: list[Component] = results(factory=list, added=True)
    # The preference pipeline's objective (data/preference.py): dpo or simpo, its reward scale beta and
    # SimPO's target margin gamma (in reward units). Null elsewhere; a preference run fills in
    # dpo / 0.1 / 0.5, so the config a run writes says what it trained with.
    objective: Optional[Literal["dpo", "simpo"]] = results(None, added=True)
    beta: Optional[float] = results(None, added=True)
    gamma: Optional[float] = results(None, added=True)


LOGGERS = ("console", "file", "tensorboard", "wandb", "mlflow")


@dataclass
class MonitorSection:
    """What a run reports and watches. None of it changes the numbers, so none of it is in the hash."""
    # Composer loggers on top of metrics.jsonl (always written): console (plain metric lines every
    # console_interval, for batch-job logs), file (a text log per launch in the run dir), tensorboard
    # (run_dir/tensorboard), wandb (offline in run_dir/wandb unless WANDB_MODE says otherwise), mlflow
    # (a local store in run_dir/mlruns). None needs a network.
    loggers: list[str] = bookkeeping(factory=list)
    console_interval: str = bookkeeping("10ba")
    progress: bool = bookkeeping(True)  # the live progress bar (plain lines when there is no terminal)
    grad_norm_interval: int = bookkeeping(10)  # steps between gradient-norm logs (l2_norm/grad/global); 0: off
    memory: bool = bookkeeping(False)  # log memory each step: CUDA allocator stats on GPU, process peak RSS on CPU
    profile_steps: int = bookkeeping(0)  # > 0: torch.profiler traces of this many steps (after 2 warm-up steps) in run_dir/profile
    # Stop the run when the loss exceeds loss_spike_factor x the median of the previous
    # loss_spike_window steps for loss_spike_patience steps in a row (null: never). A NaN or
    # infinite loss always stops it.
    loss_spike_factor: Optional[float] = bookkeeping(None)
    loss_spike_window: int = bookkeeping(50)
    loss_spike_patience: int = bookkeeping(3)


@dataclass
class DebugSection:
    # Measured on every bundled config (bench/debug_sanity.py, 2026-12-02): llama-tinystories is the slowest
    # to fit, 29% of its first loss after 60 steps at lr 1e-3 on 2 rows and still falling (at 3e-3 it stalls
    # near 42%, and 4 rows or more only cost time); the others are lower. 60 steps of 2 rows took 36 s
    # of one core there, about 20 s on 2 idle cores with the imports.
    steps: int = bookkeeping(60)  # optimizer steps on the one fixed batch
    lr: float = bookkeeping(1.0e-3)  # constant; 0 shows what a model that cannot learn looks like
    batch: int = bookkeeping(2)  # rows in that batch


def _default_data() -> DataSection:
    return pipeline_class("causal_lm").Section()


@dataclass
class Config:
    run: RunSection = results(factory=RunSection)
    model: Union[ModelSection, Component] = results(factory=ModelSection, component=True)
    data: DataSection = results(factory=_default_data)
    optim: Union[OptimSection, Component] = results(factory=OptimSection, component=True)
    schedule: Union[ScheduleSection, Component] = results(factory=ScheduleSection, component=True)
    train: TrainSection = results(factory=TrainSection)
    monitor: MonitorSection = bookkeeping(factory=MonitorSection)
    debug: DebugSection = bookkeeping(factory=DebugSection)

    def to_dict(self) -> dict:
        return schema.to_plain(self)

    def hash(self) -> str:
        """A short hash of the keys that change results (schema.py): names the run directory."""
        view = schema.hash_view(self)
        if self.data.pipeline not in BUILTIN:  # a pipeline from a file: by its source
            view["data"]["pipeline"] = components.identity(self.data.pipeline)
        view["data"] = {**LEGACY_DATA_KEYS, **view["data"]}
        if vocab_follows_tokenizer(self):
            # Such a decoder once kept its preset's vocabulary (50,304 rows whatever the tokenizer): a
            # different model, so a different run, never resumed from a checkpoint of the other size.
            view["model"]["vocab"] = "tokenizer"
        blob = json.dumps(view, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


def vocab_follows_tokenizer(cfg: Config) -> bool:
    """Whether the config trains a decoder preset from scratch, whose vocabulary the tokenizer sizes."""
    return (isinstance(cfg.model, ModelSection) and cfg.model.init_from is None and not cfg.model.preset_vocab
            and pipeline_class(cfg.data.pipeline).task == "causal_lm")


def _is_time(value: str) -> bool:
    return bool(TIME_RE.match(value))


def _validate_values(cfg: Config) -> None:
    """Checks that go beyond types: ranges and Composer time strings."""
    problems = []
    times = {"train.max_duration": cfg.train.max_duration, "train.eval_interval": cfg.train.eval_interval,
             "train.save_interval": cfg.train.save_interval}
    if isinstance(cfg.schedule, ScheduleSection):
        times.update({"schedule.warmup": cfg.schedule.warmup, "schedule.decay": cfg.schedule.decay})
    for key, value in times.items():
        if not _is_time(value):
            problems.append(f"{key}: expected a Composer time string like 200ba, 1ep, 2000000tok "
                            f"or 0.02dur, got '{value}'")
    positive = {"train.global_batch_size": cfg.train.global_batch_size,
                "train.device_microbatch_size": cfg.train.device_microbatch_size,
                "debug.steps": cfg.debug.steps, "debug.batch": cfg.debug.batch}
    if isinstance(cfg.optim, OptimSection):
        positive["optim.lr"] = cfg.optim.lr
    if cfg.train.eval_batches is not None:
        positive["train.eval_batches"] = cfg.train.eval_batches
    if isinstance(cfg.model, ModelSection) and cfg.model.vocab_size is not None:
        positive["model.vocab_size"] = cfg.model.vocab_size
    problems += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    if cfg.debug.lr < 0:
        problems.append(f"debug.lr: must be >= 0, got {cfg.debug.lr}")
    if isinstance(cfg.optim, OptimSection):
        if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
            problems.append(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
        bad_kinds = sorted(set(cfg.optim.no_decay) - {"norm", "bias", "embedding"})
        if bad_kinds:
            problems.append(f"optim.no_decay: unknown kinds {bad_kinds}; choose from norm, bias, embedding")
    if cfg.train.clip_norm is not None and cfg.train.clip_norm <= 0:
        problems.append(f"train.clip_norm: must be > 0 (or null to disable), got {cfg.train.clip_norm}")
    if isinstance(cfg.schedule, ScheduleSection):
        if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
            problems.append(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
        if not problems and not cfg.schedule.decay.endswith("dur"):
            unit = lambda t: re.sub(r"[\d.]", "", t).replace("ep", "ba")  # epochs are counted in batches
            if unit(cfg.schedule.decay) != unit(cfg.train.max_duration):
                problems.append(f"schedule.decay: '{cfg.schedule.decay}' must be in the unit of "
                                f"train.max_duration ('{cfg.train.max_duration}'), or a fraction like 0.2dur")
    if cfg.train.parallelism.replicas < 1:
        problems.append(f"train.parallelism.replicas: must be >= 1, got {cfg.train.parallelism.replicas}")
    if cfg.train.keep_checkpoints == 0 or cfg.train.keep_checkpoints < -1:
        problems.append(f"train.keep_checkpoints: must be -1 (keep all) or >= 1, got {cfg.train.keep_checkpoints}")
    if cfg.train.global_batch_size % cfg.train.device_microbatch_size:
        problems.append(f"train.device_microbatch_size: {cfg.train.device_microbatch_size} must divide "
                        f"train.global_batch_size ({cfg.train.global_batch_size})")
    problems += cfg.data.problems()
    problems += _lora_problems(cfg.model)
    problems += _monitor_problems(cfg.monitor)
    problems += _objective_keys(cfg)
    if problems:
        raise UserError("; ".join(problems))


def _objective_keys(cfg: Config) -> list[str]:
    """train.objective / beta / gamma belong to the pipelines that declare them (Pipeline.train_keys,
    with their defaults, filled in here); set under another pipeline, they are refused."""
    declared = pipeline_class(cfg.data.pipeline).train_keys
    problems = []
    for key in ("objective", "beta", "gamma"):
        value = getattr(cfg.train, key)
        if key in declared:
            setattr(cfg.train, key, declared[key] if value is None else value)
        elif value is not None:
            problems.append(f"train.{key}: only the preference pipeline reads it, and data.pipeline is "
                            f"{cfg.data.pipeline}; remove it")
    if cfg.train.beta is not None and cfg.train.beta <= 0:
        problems.append(f"train.beta: must be > 0, got {cfg.train.beta}")
    return problems


def _lora_problems(m) -> list[str]:
    lora = getattr(m, "lora", None)
    if lora is None:
        return []
    problems = []
    if lora.rank < 1:
        problems.append(f"model.lora.rank: must be >= 1, got {lora.rank}")
    if lora.alpha <= 0:
        problems.append(f"model.lora.alpha: must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if m.init_from is None:
        problems.append("model.lora: needs model.init_from, the trained model whose frozen weights the "
                        "adapter learns on (checkpoints hold the adapter only)")
    return problems


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


def _data_section(data: dict, unknown: list[str], wrong: list[str]) -> DataSection | None:
    """The data section as its pipeline declares it. Keys another registered pipeline reads get a hint
    saying so; the keys every data section carried before (LEGACY_DATA_KEYS) are accepted at their old
    values, so the config.yaml of an earlier run still loads."""
    if not isinstance(data, dict):
        wrong.append(f"data: expected a section (a mapping of keys), got {data!r}")
        return None
    spec = data.get("pipeline", "causal_lm")
    if not isinstance(spec, str):
        wrong.append(f"data.pipeline: expected a registered name or an import path, got {spec!r}")
        return None
    cls = pipeline_class(spec)
    fields = {f for f in cls.Section.__dataclass_fields__}
    own = {}
    for key, value in data.items():
        if key in fields or key not in LEGACY_DATA_KEYS:
            own[key] = value
        elif value != LEGACY_DATA_KEYS[key]:
            readers = other_pipelines_reading(key, spec)
            unknown.append(f"data.{key}: only the {' and '.join(readers)} pipeline{'s' if len(readers) > 1 else ''} "
                           f"read{'' if len(readers) > 1 else 's'} it, and data.pipeline is {spec}; remove it")
    if spec not in BUILTIN:
        own["pipeline"] = components.normalise(spec, "data.pipeline")
    section = schema.build(cls.Section, own, "data.", unknown, wrong)
    section.pipeline_class = cls
    return section


def from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise UserError(f"config: expected a mapping of sections (run, model, data, ...), got {data!r}")
    train = data.get("train")
    if isinstance(train, dict) and train.get("device_microbatch_size") == "auto":
        raise UserError("train.device_microbatch_size: auto (Composer's OOM-driven search) works only with "
                        "FSDP1 on GPUs, and rafale runs FSDP2; give a number of sequences")
    unknown, wrong = [], []
    data_section = _data_section(data["data"], unknown, wrong) if "data" in data else _default_data()
    cfg = schema.build(Config, {k: v for k, v in data.items() if k != "data"}, "", unknown, wrong)
    problems = []
    if unknown:
        problems.append("unknown config key" + ("s" if len(unknown) > 1 else "") + ": " + ", ".join(unknown))
    problems += wrong
    if problems:
        raise UserError("; ".join(problems))
    cfg.data = data_section
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
    import difflib

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if (CONFIGS_DIR / f"{spec}.yaml").is_file():
        return CONFIGS_DIR / f"{spec}.yaml"
    names = bundled_configs()
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f"; bundled configs: {', '.join(names)}"
    raise UserError(f"config '{spec}' is neither a YAML file nor a bundled config{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last value silently, so a forgotten earlier `lr:` would win or lose unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}; keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(spec: str, overrides: list[str] = ()) -> Config:
    path = resolve_config_path(spec)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the file") from None
    if data is None:  # an empty file would silently train the bundled default
        raise UserError(f"{path}: the config is empty; write its sections (the README's config reference lists "
                        f"them) or use a bundled config such as pythia-tinyshakespeare")
    return from_dict(apply_overrides(data, list(overrides)))


def load_saved_config(path: Path) -> Config:
    """A run directory's config.yaml. One written before model.vocab_size existed describes a model with
    its preset's vocabulary (train.py now writes the size it built)."""
    data = yaml.safe_load(Path(path).read_text())
    cfg = from_dict(data)
    model = data.get("model")
    if isinstance(cfg.model, ModelSection) and isinstance(model, dict) and "vocab_size" not in model:
        cfg.model.preset_vocab = True
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
