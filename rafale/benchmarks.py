"""Benchmarks through lm-evaluation-harness (the optional `rafale[eval]` extra): `RafaleLM`, lm-eval's
`LM` interface over a rafale Decoder and its tokenizer, and `run_tasks`, which runs lm-eval's tasks on
it offline: the ones bundled in rafale/assets/lm_eval_tasks/ by name, or a user's task YAML by path.

RafaleLM follows lm-eval's own HF backend (lm_eval/models/huggingface.py, HFLM) request for request:
the same token boundaries between context and continuation (TemplateLM's), the same left truncation
and rolling windows, the same stop-string trimming, so its numbers are HFLM's on the same model
exported to HF (test/test_lm_eval.py). The one thing it does its own way is batching generation:
the Decoder has no padding mask, so only prompts of the same length share a batch.

This module imports lm_eval at the top; rafale imports it only when a benchmark is asked for.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer

from rafale.errors import UserError
from rafale.generate import decoding_head, generate
from rafale.models.decoder import Decoder
from rafale.paths import ASSETS_DIR

try:
    from lm_eval import simple_evaluate, utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("lm_eval"):
        raise
    raise UserError("benchmarks need lm-evaluation-harness: pip install 'rafale[eval]'") from None

TASKS_DIR = ASSETS_DIR / "lm_eval_tasks"
# HFLM's default when a task sets no max_gen_toks.
MAX_GEN_TOKS = 256
# Resamplings for the standard errors lm-eval cannot compute in closed form (perplexities). Its default,
# 100,000, takes longer than a bundled task's whole run; 1,000 puts the error of the error near 2%.
BOOTSTRAP_ITERS = 1000


class RafaleLM(TemplateLM):
    """A rafale Decoder (in eval mode) and its tokenizer as an lm-eval model. `eos_token_id` ends
    generation and conditions empty contexts and the first rolling window (HFLM's prefix token, its
    bos, is the same one for rafale's exports, which set bos = eos). `batch_size` requests run per
    forward pass, longest first."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, eos_token_id: int, batch_size: int = 8):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._eos_token_id = eos_token_id
        self._device = model.embed_in.weight.device

    @property
    def eot_token_id(self) -> int:
        return self._eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # None: the tokenizer's own post-processing, as HF's tokenizer(...) default.
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) ->
        (log p(continuation | context), whether greedy decoding would produce the continuation)."""
        # Longest first, as HFLM; requests that share all input tokens (multiple-choice answers of
        # one token after the same context) run once and are answered from the same log-probs.
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        head = decoding_head(self.model)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            if (longest := max(len(cont) for _, _, cont in chunk)) > self.max_length:
                raise UserError(f"a continuation of {longest} tokens is longer than the model's {self.max_length} "
                                f"positions; lm-eval scores one in a single pass, so this task needs a longer context")
            # Too long for the model: truncated from the left, keeping the last max_length + 1 tokens;
            # the last one is only a target.
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            x = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long, device=self.device)
            for row, ids in zip(x, inputs):
                row[:len(ids)] = torch.tensor(ids)  # right padding: causal attention never sees it
            hidden = self.model.forward_hidden(x)  # (B, T, C)
            for (request, ctx, cont), ids, h in zip(chunk, inputs, hidden):
                # The head on the continuation's positions only, one row at a time: a (T, V) block, not (B, T, V).
                logits = head(h[len(ids) - len(cont):len(ids)]).float()[None]  # (1, len(cont), V)
                for _, cont_ids, member in collator.get_cache(req_str=request, cxt_toks=ctx, cont_toks=cont,
                                                              logits=logits):
                    target = torch.tensor(cont_ids, device=self.device)
                    member = member[0, -len(cont_ids):]  # (n, V)
                    # log-softmax at the targets only: no second (n, V) block
                    logprob = (member.gather(1, target[:, None]).squeeze(1) - member.logsumexp(dim=-1)).sum()
                    results.append((logprob.item(), bool((member.argmax(dim=-1) == target).all())))
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, predicted in disjoint windows of max_length tokens (each
        with the longest context that fits), the first after the prefix token; HFLM's windows."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations with a KV cache (rafale.generate), cut at the first of the request's
        `until` strings (and eos); at most `max_gen_toks` tokens, the prompt left-truncated to fit."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        # (stop strings, max new tokens, prompt length) -> [(request index, prompt ids)]
        batches: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
            if kwargs["do_sample"]:
                raise UserError(f"task {request.task_name}: asks for sampling ({gen_kwargs}); rafale decodes "
                                f"greedily, so set do_sample: false in its generation_kwargs")
            room = self.max_length - kwargs["max_gen_toks"]
            if room < 1:
                raise UserError(f"task {request.task_name}: max_gen_toks {kwargs['max_gen_toks']} leaves no room "
                                f"for a prompt in the model's {self.max_length} positions; lower it")
            until = tuple(handle_stop_sequences(kwargs["until"], eos=eos_text))
            ids = self.tok_encode(context)[-room:]
            batches[(until, kwargs["max_gen_toks"], len(ids))].append((i, ids))
        out: list[str | None] = [None] * len(requests)
        for (until, max_new, _), members in sorted(batches.items(), key=lambda kv: -kv[0][2]):
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                prompt = torch.tensor([ids for _, ids in batch], device=self.device)
                new = generate(self.model, prompt, max_new, eos_token_id=self.eot_token_id)
                for (i, _), tokens in zip(batch, new.tolist()):
                    if self.eot_token_id in tokens:  # rows that finished early are filled with eos
                        tokens = tokens[:tokens.index(self.eot_token_id)]
                    out[i] = postprocess_generated_text(self.tokenizer.decode(tokens), list(until), None)
        return out


def _check_task_spec(spec: str, known: list[str]) -> str:
    """A bundled task name as is, or a task YAML's resolved path; a UserError for anything else."""
    if spec in known:
        return spec
    path = Path(spec).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        close = difflib.get_close_matches(spec, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"--tasks: unknown task {spec!r}; {hint}bundled tasks: {', '.join(known)}, "
                        f"or give the path of an lm-eval task YAML")
    if not path.is_file():
        raise UserError(f"--tasks: no task file {spec}; give the path of an lm-eval task YAML")
    try:
        cfg = load_yaml(path)  # lm-eval's reader: !function tags imported, includes followed
    except (yaml.YAMLError, ValueError, OSError, ImportError, AttributeError) as err:
        # bad YAML syntax, not a mapping, a missing include, an !function that does not import
        raise UserError(f"--tasks {spec}: not a readable task YAML: "
                        f"{' '.join(str(err).split())}") from None
    if "task" not in cfg and "group" not in cfg:
        raise UserError(f"--tasks {spec}: no 'task:' (or 'group:') name in it; see lm-eval's "
                        f"docs/task_guide.md for the format")
    return str(path.resolve())


class _DropMetadataHint(logging.Filter):
    # lm-eval warns, for every task that loads its data with a `custom_dataset` function (all the
    # bundled ones), that kwargs can be passed with its own CLI's --metadata, which rafale does not have.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _bootstrap_in_process():
    # lm-eval resamples standard errors (perplexities) in a multiprocessing.Pool forked from this process,
    # and fork is unsafe once torch has started its threads: a worker can wait forever on the pool's
    # queue lock, and `rafale eval` with it. Its DISABLE_MULTIPROC switch runs the same resamples, with the
    # same seeds and so the same numbers, in a loop here; 1,000 of them take well under a second.
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_tasks(model: Decoder, tokenizer: Tokenizer, tasks: list[str], limit: int | None = None,
              batch_size: int = 8, *, eos_token_id: int) -> dict:
    """Runs lm-eval's `simple_evaluate` on `tasks` (bundled names or task YAML paths) and returns
    {task: {"samples": n, "metrics": {name: value}}}, names as lm-eval reports them ("acc",
    "acc_stderr", "word_perplexity", ...; "metric,filter" when a task filters its outputs).
    `limit`: at most that many examples per task (the first ones)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 examples per task, got {limit}")
    if not tasks:
        raise UserError("--tasks: name at least one task")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    specs = [_check_task_spec(spec, manager.all_tasks) for spec in tasks]
    lm = RafaleLM(model, tokenizer, eos_token_id, batch_size)
    hint_filter = _DropMetadataHint()
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(hint_filter)
    # lm-eval prints progress ("bootstrapping for stddev: ...") to stdout, where --json's output goes.
    try:
        with contextlib.redirect_stdout(sys.stderr), _bootstrap_in_process():
            out = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=BOOTSTRAP_ITERS)
    finally:
        task_logger.removeFilter(hint_filter)
    samples = out.get("n-samples", {})
    results = {}
    for task, values in out["results"].items():
        metrics = {k.removesuffix(",none"): v for k, v in values.items()
                   if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
        results[task] = {"samples": samples.get(task, {}).get("effective"), "metrics": metrics}
    return results


def run_benchmarks(run_dir: str, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """`rafale eval --run RUN --tasks ...`: the run's latest checkpoint through `run_tasks`.
    {"run", "checkpoint", "step", "tasks": {task: {"samples", "metrics"}}}."""
    from rafale.inference import load_run, run_eos_ids
    from rafale.runs import Run, checkpoint_step

    model, tokenizer, cfg = load_run(run_dir)
    if not isinstance(model, Decoder):
        raise UserError(f"--run {run_dir}: benchmarks need one of rafale's decoders (a model preset or "
                        f"model.init_from), not a model.class network")
    if torch.cuda.is_available():
        model.cuda()
    ckpt = Run(run_dir).require_checkpoint()
    results = run_tasks(model, tokenizer, tasks, limit, batch_size, eos_token_id=run_eos_ids(cfg, tokenizer)[0])
    return {"run": str(Path(run_dir).expanduser()), "checkpoint": str(ckpt), "step": checkpoint_step(ckpt),
            "tasks": results}


def format_benchmarks(result: dict) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']})"]
    for task, r in result["tasks"].items():
        lines.append(f"{task} ({r['samples']} examples)")
        shown = {k: v for k, v in r["metrics"].items() if not k.split(",")[0].endswith("_stderr")}
        width = max((len(k) for k in shown), default=0)
        for name, value in shown.items():
            err = r["metrics"].get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr")
            lines.append(f"  {name:<{width}}  {value:.4f}" + (f"  ± {err:.4f}" if isinstance(err, float) else ""))
    return "\n".join(lines)
