"""The one place that builds composer.Trainer from a config, and the train / prepare / debug flows.

    build_data -> build_model -> build_optimizer -> build_scheduler -> build_trainer -> fit
"""

import copy
import time
from pathlib import Path

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Callback, State
from composer.loggers import Logger
from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                            LinearWithWarmupScheduler)
from composer.utils import dist, reproducibility

from rafale import runs
from rafale.config import Config, save_config
from rafale.data.cache import PreparedData, prepare_causal_lm
from rafale.data.loaders import build_dataloader
from rafale.errors import UserError
from rafale.loggers import JsonlLogger, RichProgress
from rafale.models.composer import CausalLM, build_model as build_causal_lm


def build_data(cfg: Config) -> PreparedData:
    d = cfg.data
    return prepare_causal_lm(train=d.train, tokenizer=d.tokenizer, max_seq_len=d.max_seq_len, val=d.val,
                             val_fraction=d.val_fraction, doc_separator=d.doc_separator,
                             eos_token=d.eos_token, key_prefix="data")


def build_model(cfg: Config, vocab_size: int) -> CausalLM:
    """The preset, with the config's size overrides, sized for the tokenizer's vocabulary."""
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("n_layers", "n_heads", "d_model", "d_ff", "max_seq_len")
                 if getattr(m, k) is not None}
    model = build_causal_lm(m.preset, vocab_size=vocab_size, overrides=overrides)
    if model.model.cfg.max_seq_len < cfg.data.max_seq_len:
        raise UserError(f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds the model's max_seq_len "
                        f"({model.model.cfg.max_seq_len}); lower it or set model.max_seq_len")
    return model


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Decay matrices only: norms and biases are left undecayed, as in GPT-2/nanoGPT.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def build_scheduler(cfg: Config):
    s = cfg.schedule
    if s.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=s.warmup, alpha_f=s.min_lr_ratio)
    if s.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=s.warmup, alpha_i=1.0, alpha_f=s.min_lr_ratio)
    return ConstantWithWarmupScheduler(t_warmup=s.warmup)


def resolve_precision(requested: str) -> str:
    gpu = torch.cuda.is_available()
    if requested == "auto":
        if not gpu:
            return "fp32"
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    if requested != "fp32" and not gpu:
        # Composer runs amp_* on CPU as plain fp32 without saying so; refuse instead.
        raise UserError(f"train.precision: {requested} needs a GPU and this machine has none; "
                        f"use fp32 or auto")
    return requested


def per_device_batch_size(cfg: Config) -> int:
    world = dist.get_world_size()
    if cfg.train.global_batch_size % world:
        raise UserError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be divisible "
                        f"by the number of processes ({world})")
    return cfg.train.global_batch_size // world


def build_trainer(cfg: Config, model: CausalLM, data: PreparedData, run_dir: Path | None,
                  extra_callbacks: list[Callback] = ()) -> Trainer:
    """`run_dir=None` is a throwaway run (DEBUG=1): no checkpoints, no metrics file, no resume."""
    t = cfg.train
    batch_size = per_device_batch_size(cfg)
    train_loader = build_dataloader(data.train, batch_size=batch_size, shuffle=True,
                                    seed=cfg.run.seed, drop_last=True)
    if len(train_loader) == 0:
        raise UserError(f"train.global_batch_size ({t.global_batch_size}) is larger than the "
                        f"{len(data.train)} training blocks; lower it or add data")
    eval_loader = None
    if data.val is not None and len(data.val) and run_dir is not None:
        eval_loader = build_dataloader(data.val, batch_size=batch_size, shuffle=False,
                                       seed=cfg.run.seed, drop_last=False)
    optimizer = build_optimizer(cfg, model)
    loggers = [RichProgress(t.max_duration)]
    callbacks = [LRMonitor(), SpeedMonitor(window_size=10), *extra_callbacks]
    checkpointing = {}
    if run_dir is not None:
        loggers.append(JsonlLogger(run_dir / runs.METRICS_FILE))
        checkpointing = dict(save_folder=str(run_dir / runs.CHECKPOINTS), save_interval=t.save_interval,
                             save_latest_filename=runs.LATEST, save_overwrite=False, autoresume=True)
    return Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=t.eval_interval if eval_loader is not None else 1,
        max_duration=t.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg),
        step_schedulers_every_batch=True,
        algorithms=[GradientClipping("norm", t.clip_norm)] if t.clip_norm else [],
        device_train_microbatch_size=min(t.device_microbatch_size, batch_size),
        precision=resolve_precision(t.precision),
        loggers=loggers,
        callbacks=callbacks,
        progress_bar=False,
        log_to_console=False,
        run_name=run_dir.name if run_dir is not None else "debug",
        seed=cfg.run.seed,
        **checkpointing,
    )


def train(cfg: Config, force: bool = False) -> Path:
    """Trains the config's run to completion (resuming it if it was interrupted). Returns the run dir."""
    reproducibility.seed_all(cfg.run.seed)
    data = build_data(cfg)
    run_dir, why = runs.choose_run_dir(f"{cfg.run.name}-{cfg.hash()}", force)
    print(f"{why}: {run_dir}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    runs.discard_unfinished_checkpoints(run_dir)
    model = build_model(cfg, data.meta["vocab_size"])
    trainer = build_trainer(cfg, model, data, run_dir)
    runs.mark_started(run_dir, cfg.hash())
    try:
        trainer.fit()
    except KeyboardInterrupt:
        runs.mark_ended(run_dir, "interrupted")
        raise
    except BaseException as e:
        runs.mark_ended(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        trainer.close()
    runs.mark_ended(run_dir, "completed", steps=int(trainer.state.timestamp.batch))
    return run_dir


def prepare(cfg: Config) -> PreparedData:
    """DATA=1: build (or find) the data cache and say what is in it."""
    t0 = time.perf_counter()
    data = build_data(cfg)
    s = data.meta["stats"]
    verb = "cache hit" if data.hit else f"built in {time.perf_counter() - t0:.1f}s"
    print(f"{verb}: {data.path}\n  {s['documents']:,} documents, {s['tokens']:,} tokens, "
          f"{s['train_blocks']:,} train + {s['val_blocks']:,} val blocks of {cfg.data.max_seq_len} tokens")
    return data


class _LossHistory(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.loss))


def debug_overfit(cfg: Config, fit_ratio: float = 0.2) -> bool:
    """DEBUG=1: train on one fixed batch; True if the final loss fell below `fit_ratio` x the first."""
    reproducibility.seed_all(cfg.run.seed)
    data = build_data(cfg)
    n = min(cfg.train.device_microbatch_size, len(data.train))
    # Every batch of this dataset is the same n blocks, so the model sees one batch `steps` times.
    one_batch = PreparedData(path=data.path, train=data.train[:n].repeat(cfg.debug.steps, axis=0)
                             .reshape(cfg.debug.steps * n, -1), val=None, meta=data.meta, hit=data.hit)
    dbg = copy.deepcopy(cfg)
    dbg.optim.lr, dbg.optim.weight_decay = cfg.debug.lr, 0.0
    dbg.schedule.name, dbg.schedule.warmup = "constant", "0ba"
    dbg.train.max_duration = f"{cfg.debug.steps}ba"
    dbg.train.global_batch_size = dbg.train.device_microbatch_size = n * dist.get_world_size()
    history = _LossHistory()
    model = build_model(cfg, data.meta["vocab_size"])
    trainer = build_trainer(dbg, model, one_batch, run_dir=None, extra_callbacks=[history])
    trainer.fit()
    trainer.close()
    first, last = history.losses[0], history.losses[-1]
    fitted = last < fit_ratio * first
    print(f"debug: one batch of {n}x{cfg.data.max_seq_len} tokens, {cfg.debug.steps} steps: "
          f"loss {first:.4f} -> {last:.4f} ({last / first:.1%} of the first)")
    print("debug: OK, the model fits one batch" if fitted else
          f"debug: FAILED, the final loss is not below {fit_ratio:.0%} of the first: check the model, "
          f"the labels and the learning rate (debug.lr={cfg.debug.lr}, debug.steps={cfg.debug.steps})")
    return fitted
