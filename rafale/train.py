"""The run: the one place that builds composer.Trainer, and the train / prepare / debug flows around it
(run directory, status, resume, signals). The objects it trains come from rafale/build.py.

    build_data -> build_model -> build_optimizer / build_scheduler (build.py) -> build_trainer -> fit
"""

import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist, get_device, reproducibility
from composer.utils.misc import create_interval_scheduler

from rafale import patches, runs
from rafale.build import (as_built, build_data, build_model, build_optimizer, build_scheduler,
                          build_user_callbacks, check_attention, check_components, pipeline_of)
from rafale.config import Config, ModelSection, OptimSection, ScheduleSection, save_config
from rafale.data.cache import PreparedData
from rafale.data.loaders import LossTokenSpec, pipeline_loader
from rafale.errors import UserError
from rafale.monitoring import Diverged, build_callbacks, build_loggers, build_profiler, check_logger_packages
from rafale.preemption import Preemption


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


def check_parallelism(cfg: Config) -> None:
    """Rejects train.parallelism combinations that cannot work with this many processes on this machine."""
    p, world = cfg.train.parallelism, dist.get_world_size()
    if p.strategy == "none" and world > 1:
        raise UserError(f"train.parallelism.strategy is none but {world} processes run; use ddp, fsdp or hsdp")
    if p.strategy not in ("fsdp", "hsdp"):
        fsdp_only = {"activation_cpu_offload": p.activation_cpu_offload,  # True: set away from the default
                     "reshard_after_forward": not p.reshard_after_forward,
                     "mixed_precision": p.mixed_precision != "DEFAULT"}
        misplaced = [key for key, is_set in fsdp_only.items() if is_set]
        if misplaced:
            raise UserError(f"train.parallelism.{misplaced[0]} needs strategy fsdp or hsdp (it is {p.strategy})")
        return
    if p.strategy == "hsdp" and not torch.cuda.is_available():
        # torch 2.7's FSDP2 averages across replica groups with ReduceOp.AVG, which gloo lacks, and
        # asserts a device event after it, which CPU streams do not record.
        raise UserError("train.parallelism.strategy: hsdp needs GPUs (torch's FSDP2 cannot run HSDP on "
                        "CPU processes); use fsdp or ddp here")
    if p.strategy == "hsdp" and (p.replicas < 2 or world % p.replicas):
        raise UserError(f"train.parallelism.replicas: hsdp needs >= 2 replica groups dividing the "
                        f"{world} processes, got {p.replicas}")


def build_parallelism(cfg: Config, model) -> dict | None:
    """Composer's parallelism_config for train.parallelism; DDP needs none (Composer wraps the model
    in DDP whenever several processes run)."""
    check_parallelism(cfg)
    p = cfg.train.parallelism
    if p.strategy not in ("fsdp", "hsdp"):
        if p.activation_checkpointing:  # FSDP applies it itself; without FSDP torch's wrapper does
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(model.model, check_fn=model.activation_checkpointing_fn)
        return None
    replicas = p.replicas if p.strategy == "hsdp" else None
    # Composer takes an FSDP2Config under the "fsdp" key (a dict there would mean FSDP1, which needs CUDA).
    return {"fsdp": _fsdp2_config(replicas)(reshard_after_forward=p.reshard_after_forward,
                                            activation_checkpointing=p.activation_checkpointing,
                                            activation_cpu_offload=p.activation_cpu_offload,
                                            mixed_precision=p.mixed_precision)}


def _fsdp2_config(replicas: int | None):
    """Composer's FSDP2Config, with `replicas` replica groups for HSDP.

    Composer 0.32 builds the device mesh from the config's data_parallel_replicate_degree (always None
    in FSDP2Config) and overwrites any device_mesh passed in, so HSDP silently became FSDP over all
    ranks. Reporting the degree makes Composer build the (replicate, shard) mesh itself."""
    from composer.utils.parallelism import FSDP2Config

    if replicas is None:
        return FSDP2Config

    class HybridShardConfig(FSDP2Config):
        @property
        def data_parallel_replicate_degree(self) -> int:
            return replicas

    return HybridShardConfig


def checkpoint_to_load(cfg: Config) -> dict:
    """Trainer arguments for train.load_from / train.load_mode (the run's own checkpoints, found by
    autoresume, take precedence once it has any)."""
    t = cfg.train
    if t.load_from is None:
        return {}
    path = Path(t.load_from).expanduser()
    if path.is_dir():
        latest = runs.latest_checkpoint(path)
        if latest is None:
            raise UserError(f"train.load_from: {path} holds no checkpoint (no checkpoints/{runs.LATEST})")
        path = latest
    if not path.exists():
        raise UserError(f"train.load_from: no checkpoint at {path}")
    if t.load_mode == "weights":
        return {"load_path": str(path), "load_weights_only": True}
    if t.load_mode == "weights_optimizer":  # keep weights + optimizer moments; time, schedule, data order restart
        return {"load_path": str(path), "load_ignore_keys": [
            "state/timestamp", "state/schedulers", "state/dataset_state", "state/train_metrics",
            "state/eval_metrics", "rng", "state/callbacks", "state/algorithms"]}
    return {"load_path": str(path)}


def check_enough_data(cfg: Config, data: PreparedData) -> None:
    """One full batch per process at least (the loaders drop the last partial one)."""
    n = getattr(data.train, "epoch_size", None) or len(data.train)  # a StreamingDataset's len is per rank
    if n < per_device_batch_size(cfg) * dist.get_world_size():
        raise UserError(f"train.global_batch_size ({cfg.train.global_batch_size}) is larger than the "
                        f"{n} training blocks; lower it or add data")


def build_trainer(cfg: Config, model, data: PreparedData, run_dir: Path | None,
                  extra_callbacks: list[Callback] = ()) -> Trainer:
    """`run_dir=None` is a throwaway run (DEBUG=1): no checkpoints, no metrics file, no resume."""
    t = cfg.train
    batch_size = per_device_batch_size(cfg)
    pipeline = pipeline_of(cfg)
    check_enough_data(cfg, data)
    train_loader = pipeline_loader(pipeline, data.train, data.meta, batch_size=batch_size, shuffle=True,
                                   seed=cfg.run.seed, drop_last=True)
    eval_loader = None
    if data.val is not None and len(data.val) and run_dir is not None:
        eval_loader = pipeline_loader(pipeline, data.val, data.meta, batch_size=batch_size, shuffle=False,
                                      seed=cfg.run.seed, drop_last=False)
    preemption = next((c for c in extra_callbacks if isinstance(c, Preemption)), None)
    eval_interval = create_interval_scheduler(t.eval_interval, checkpoint_events=False,
                                              final_events={Event.FIT_END})  # as Composer makes it from a string
    if preemption is not None:
        eval_interval = preemption.eval_interval(eval_interval)
    parallelism = build_parallelism(cfg, model)
    optimizer = build_optimizer(cfg, model)
    checkpointing = {}
    if run_dir is not None:
        save_interval = create_interval_scheduler(t.save_interval)
        if preemption is not None:
            save_interval = preemption.save_interval(save_interval)
        checkpointing = dict(save_folder=str(run_dir / runs.CHECKPOINTS), save_interval=save_interval,
                             save_latest_filename=runs.LATEST_PATTERN, save_overwrite=False, autoresume=True,
                             save_num_checkpoints_to_keep=t.keep_checkpoints, **checkpoint_to_load(cfg))
    return Trainer(
        model=model,
        train_dataloader=LossTokenSpec(train_loader, pipeline),
        accumulate_train_batch_on_tokens=True,  # the step's loss: a mean over its loss-bearing targets
        eval_dataloader=eval_loader,
        eval_interval=eval_interval if eval_loader is not None else 1,
        eval_subset_num_batches=t.eval_batches if eval_loader is not None and t.eval_batches else -1,
        max_duration=t.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg),
        step_schedulers_every_batch=True,
        algorithms=[GradientClipping("norm", t.clip_norm)] if t.clip_norm else [],
        device_train_microbatch_size=min(t.device_microbatch_size, batch_size),
        precision=resolve_precision(t.precision),
        parallelism_config=parallelism,
        compile_config={} if t.compile else None,
        loggers=build_loggers(cfg, run_dir, progress_metric=pipeline.progress),
        callbacks=[*build_callbacks(cfg), *build_user_callbacks(cfg), *extra_callbacks, FullFinalEval(),
                   *model.pipeline.callbacks(run_dir)],
        profiler=build_profiler(cfg, run_dir),
        progress_bar=False,
        log_to_console=False,
        run_name=run_dir.name if run_dir is not None else "debug",
        seed=cfg.run.seed,
        # A LoRA run's checkpoints leave the frozen base out (task_model.py), so they load non-strictly.
        load_strict_model_weights=not model.frozen,
        **checkpointing,
    )


class FullFinalEval(Callback):
    """train.eval_batches limits the periodic evaluations; the one after the last step reads the whole
    validation split. Composer runs a step's (and FIT_END's) callbacks before its evaluation, and when an
    interval evaluation falls on the last step it is the final one (none follows at FIT_END), so the
    limit is lifted at the last step's end."""

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.get_elapsed_duration() is not None and state.get_elapsed_duration() >= 1:
            self.fit_end(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        for evaluator in state.evaluators:
            evaluator.subset_num_batches = -1


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; the CLI exits 75."""


def _start_distributed() -> None:
    """Initialise torch.distributed now when launched with several processes, so the ranks can agree
    on the run directory before any of them writes to it (Composer's Trainer reuses this group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.initialize_dist(get_device(None))


def check_before_start(cfg: Config) -> None:
    """What the config alone cannot tell (this machine, the process count, the installed packages, the
    checkpoint to load), judged before a run directory is made: a refused run leaves nothing behind."""
    resolve_precision(cfg.train.precision)
    per_device_batch_size(cfg)
    check_parallelism(cfg)
    checkpoint_to_load(cfg)
    check_logger_packages(cfg)
    check_components(cfg)
    if isinstance(cfg.model, ModelSection):
        check_attention(cfg.model.attention, resolve_precision(cfg.train.precision))


def train(cfg: Config, force: bool = False) -> Path:
    """Trains the config's run to completion (resuming it if it was interrupted). Returns the run dir.

    Raises Preempted when a signal asked it to stop early (a checkpoint is saved first)."""
    patches.apply()
    reproducibility.seed_all(cfg.run.seed)
    _start_distributed()
    check_before_start(cfg)
    data = build_data(cfg)
    check_enough_data(cfg, data)
    model = build_model(cfg, data.meta)
    run_dir, why = runs.choose_run_dir(f"{cfg.run.name}-{cfg.hash()}", force)
    dist.barrier()  # every rank has decided before rank 0 marks the run as running
    rank0 = dist.get_global_rank() == 0
    if rank0:
        print(f"{why}: {run_dir}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(as_built(cfg, model.model), run_dir / "config.yaml")
        for line in runs.drop_damaged_latest(run_dir):
            print(f"rafale: {line}", file=sys.stderr, flush=True)
        runs.discard_unfinished_checkpoints(run_dir)
        runs.mark_started(run_dir, cfg.hash())
        runs.write_status(run_dir, data=data.path.name)  # `rafale eval` tells when the data changed since
    dist.barrier()
    preemption = Preemption()
    try:
        trainer = build_trainer(cfg, model, data, run_dir, extra_callbacks=[preemption])
        preemption.install()
        try:
            if not _already_done(trainer.state):
                trainer.fit()
        finally:
            preemption.uninstall()
            trainer.close()
    except BaseException as e:
        if rank0:
            _mark_stopped(run_dir, e)
        raise
    steps = int(trainer.state.timestamp.batch)
    if preemption.stopping and preemption.interrupted:  # Ctrl-C: stopped at a step boundary, checkpointed
        if rank0:
            runs.mark_ended(run_dir, "interrupted", steps=steps)
        raise KeyboardInterrupt
    if preemption.stopping:
        if rank0:
            runs.mark_ended(run_dir, "preempted", steps=steps)
        raise Preempted(f"stopped by a signal at step {steps} with a checkpoint in {run_dir}; "
                        f"run the same command to resume")
    if rank0:
        runs.mark_ended(run_dir, "completed", steps=steps)
    return run_dir


def _already_done(state: State) -> bool:
    """Autoresume loaded the final checkpoint: the run ended before its status could say so (a kill
    after the last save, a damaged status.json). Composer's fit would refuse with a ValueError."""
    done = state.max_duration
    return done is not None and done <= state.timestamp.get(done.unit)


def _mark_stopped(run_dir: Path, e: BaseException) -> None:
    """status.json after training raised: interrupted (Ctrl-C) or failed, and no checkpoint left that
    a full disk or the exception cut short. Never masks `e`: on a full disk the status may not be
    writable, and the run then reads as interrupted (its process is gone)."""
    interrupted = isinstance(e, KeyboardInterrupt) or isinstance(e, SystemExit) and e.code == 130
    try:
        runs.discard_unfinished_checkpoints(run_dir)
        runs.mark_ended(run_dir, "interrupted" if interrupted else "failed",
                        error=None if interrupted else " ".join(f"{type(e).__name__}: {e}".split())[:500])
    except OSError:
        pass


def prepare(cfg: Config) -> PreparedData:
    """DATA=1: build (or find) the data cache and say what is in it."""
    t0 = time.perf_counter()
    pipeline = pipeline_of(cfg)
    data = pipeline.prepare()
    verb = "cache hit" if data.hit else f"built in {time.perf_counter() - t0:.1f}s"
    print(f"{verb}: {data.path}\n  {pipeline.report(data)}")
    return data


class _LossHistory(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.loss))


# DEBUG=1 judges the last loss on the one batch against the first: below this share of it, the model
# fits. A correct model of every bundled config ends at or below 29% with the debug defaults (see
# DebugSection); one that cannot learn (lr 0, a detached head) stays near 100%, and one that learns only
# token frequencies stops near 60-75% (what the unseen batches fall to). 20% called healthy models broken.
DEBUG_FIT_RATIO = 0.35
# ... and a batch it never trained on must not fall below this share of its first loss: what one batch
# teaches a correct model about other text is roughly the token frequencies, which leaves it above ~55%
# (bench/debug_sanity.py), while a model that sees its targets copies them there too.
DEBUG_LEAK_RATIO = 0.4


def _batch_loss(trainer: Trainer, model, batch: dict) -> float:
    """The training objective on `batch`, without a step (eval mode: no dropout)."""
    model.eval()
    with torch.no_grad():
        batch = trainer.state.device.batch_to_device(batch)
        loss = float(model.loss(model(batch), batch))
    model.train()
    return loss


def debug_overfit(cfg: Config, fit_ratio: float = DEBUG_FIT_RATIO) -> bool:
    """DEBUG=1: train on one fixed batch; True if the final loss fell below `fit_ratio` x the first, and a
    batch it never trained on did not fall as far (else the targets can be read off the inputs: labels
    not shifted, a mask that lets a position see its own target)."""
    patches.apply()
    reproducibility.seed_all(cfg.run.seed)
    data = build_data(cfg)
    n = min(cfg.debug.batch, len(data.train))
    # Every batch of this dataset is the same n rows, so the model sees one batch `steps` times.
    one_batch = PreparedData(path=data.path, train=data.train[np.tile(np.arange(n), cfg.debug.steps)],
                             val=None, meta=data.meta, hit=data.hit)
    # A batch it never trains on: validation rows, or the training rows after the fixed batch.
    has_val = data.val is not None and len(data.val) > 0
    source, start = (data.val, 0) if has_val else (data.train, n)
    unseen_rows = source[np.arange(start, min(start + n, len(source)))]
    dbg = copy.deepcopy(cfg)
    if isinstance(dbg.optim, OptimSection):
        dbg.optim.lr, dbg.optim.weight_decay = cfg.debug.lr, 0.0
    else:  # optim.class: the user's optimizer, at debug.lr
        dbg.optim.kwargs.update(lr=cfg.debug.lr)
    dbg.schedule = ScheduleSection(name="constant", warmup="0ba")
    dbg.train.max_duration = f"{cfg.debug.steps}ba"
    dbg.train.global_batch_size = dbg.train.device_microbatch_size = n * dist.get_world_size()
    history = _LossHistory()
    model = build_model(cfg, data.meta)
    trainer = build_trainer(dbg, model, one_batch, run_dir=None, extra_callbacks=[history])
    unseen = None
    if len(unseen_rows):
        pipeline = pipeline_of(cfg)
        loader = pipeline_loader(pipeline, unseen_rows, data.meta, batch_size=n, shuffle=False,
                                 seed=cfg.run.seed, drop_last=False)
        unseen = next(iter(loader))
        unseen_first = _batch_loss(trainer, model, unseen)
    try:
        trainer.fit()
    except Diverged as e:  # its advice names the training keys; here the debug ones are in force
        raise Diverged(str(e).replace("optim.lr", "debug.lr")) from None
    finally:
        trainer.close()
    first, last = history.losses[0], history.losses[-1]
    fitted = last < fit_ratio * first
    print(f"debug: one batch of {n}x{cfg.data.max_seq_len} tokens, {cfg.debug.steps} steps at lr {cfg.debug.lr}: "
          f"loss {first:.4f} -> {last:.4f} ({last / first:.1%} of the first)")
    leaks = False
    if unseen is not None:
        unseen_last = _batch_loss(trainer, model, unseen)
        leaks = unseen_last < DEBUG_LEAK_RATIO * unseen_first
        print(f"debug: a batch it never trained on: loss {unseen_first:.4f} -> {unseen_last:.4f} "
              f"({unseen_last / unseen_first:.1%} of the first)")
    if not fitted:
        print(f"debug: FAILED, the final loss is not below {fit_ratio:.0%} of the first: check the model, "
              f"the labels and the learning rate (debug.lr={cfg.debug.lr}, debug.steps={cfg.debug.steps})")
    elif leaks:
        print(f"debug: FAILED, the loss on a batch it never saw fell below {DEBUG_LEAK_RATIO:.0%} of its first: "
              f"the targets can be read off the inputs; check the labels' shift and the attention mask")
    else:
        print("debug: OK, the model fits one batch and does not read its targets off its inputs")
    return fitted and not leaks
