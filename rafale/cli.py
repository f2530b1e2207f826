"""The `rafale` command line: subcommands, `key.path=value` overrides, one-line user errors.

Nothing heavy is imported at module level: `rafale --help`, `rafale runs` and config errors answer
without paying for torch or Composer. Environment switches: DATA=1 (prepare only), DEBUG=1 (overfit
one batch), FORCE=1 (train again although this config already completed), RAFALE_HOME (where
everything is written), RAFALE_TRACEBACK=1 (a failure's traceback instead of its one line).
"""

import argparse
import json
import os
import sys

from rafale.errors import UserError

COMMANDS = ("train", "prepare", "debug", "generate", "eval", "export", "runs", "plot", "config", "tokenizer",
            "cache", "chat")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rafale",
        description="Train small transformers on Composer from one YAML file.",
        epilog="Environment: DATA=1 prepares data only, DEBUG=1 overfits one batch, FORCE=1 retrains a "
               "completed config, RAFALE_HOME relocates caches and runs (default ~/.rafale_cache).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(name: str, help: str):
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", required=True,
                        help="a YAML file or the name of a bundled config (e.g. pythia-tinyshakespeare)")
        sp.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        return sp

    t = with_config("train", "train a model (resumes an interrupted run of the same config)")
    launch = t.add_argument_group("launching several processes (Composer's launcher; see README)")
    launch.add_argument("--nproc", type=int, default=1, help="processes on this node (default 1)")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    launch.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    launch.add_argument("--master-port", type=int, default=None, help="a free TCP port on node 0")
    pr = with_config("prepare", "build the tokenized data cache and exit (same as DATA=1 rafale train)")
    pr.add_argument("--to-mds", metavar="DIR",
                    help="also write the prepared blocks as mosaicml-streaming MDS shards: DIR/train (a mixture: "
                         "one directory per source), DIR/val; train from them with data.streaming.remote=DIR "
                         "(pip install 'rafale[streaming]')")
    with_config("debug", "overfit one batch as a sanity check (same as DEBUG=1 rafale train)")
    g = sub.add_parser("generate", help="continue prompts with a run's latest checkpoint or an HF model",
                       description="continue prompts with a run's latest checkpoint or an HF model directory: "
                                   "greedy by default, sampled with --temperature > 0; a continuation ends at the "
                                   "model's eos token, a --stop string or --max-new-tokens")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory (see `rafale runs`)")
    source.add_argument("--hf", help="an HF model directory (config.json, safetensors, tokenizer.json)")
    source.add_argument("--gguf", metavar="FILE",
                        help="a llama-family GGUF file (or pkg:PACKAGE/FILE): weights dequantized to fp32, "
                             "tokenizer from its metadata")
    prompts = g.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text to continue")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help='one prompt per line (blank lines skipped), or a .jsonl file of {"prompt": "..."} rows')
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="prompts decoded together (default 8); a prompt's random stream does not depend on it")
    g.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a continuation where this text appears in it (the text is cut before it); repeatable. "
                        "Backslash escapes are read as in Python: --stop '\\n' stops at a newline")
    g.add_argument("--json", action="store_true",
                   help='print {"prompt_ids", "output_ids", "text", "finish_reason"} (generated part only; '
                        'finish_reason is length, eos or stop), one JSON line per prompt')
    # Defaults None: rafale.sampling.SamplingConfig holds the real ones (it imports torch, so not here).
    s = g.add_argument_group("sampling (applied in transformers' order: repetition penalty, temperature, "
                             "top-k, top-p, min-p)")
    s.add_argument("--temperature", type=float, metavar="T",
                   help="0 (default) picks the most likely token; > 0 samples")
    s.add_argument("--top-k", type=int, metavar="K", help="sample among the k most likely tokens (default 0: all)")
    s.add_argument("--top-p", type=float, metavar="P",
                   help="sample among the most likely tokens that reach this total probability (default 1: all)")
    s.add_argument("--min-p", type=float, metavar="P",
                   help="drop tokens less likely than this times the top token (default 0: none)")
    s.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="> 1 makes tokens of the prompt and the output so far less likely (default 1: off)")
    s.add_argument("--seed", type=int, metavar="S",
                   help="prompt number i (from 0) samples from its own stream seeded by (seed, i): same seed, "
                        "same text (default 0)")
    ch = sub.add_parser("chat", help="talk with a model in the terminal, through its chat template",
                        description="a multi-turn conversation through the model's chat template, the answer "
                                    "streamed as it is written; /reset, /system TEXT, /exit; Ctrl-C stops an "
                                    "answer, Ctrl-D leaves")
    chat_source = ch.add_mutually_exclusive_group(required=True)
    chat_source.add_argument("--run", help="a run directory (see `rafale runs`)")
    chat_source.add_argument("--hf", help="an HF model directory with a chat template")
    chat_source.add_argument("--gguf", metavar="FILE", help="a llama-family GGUF file (or pkg:PACKAGE/FILE)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    ch.add_argument("--temperature", type=float, metavar="T", help="0 (default) picks the most likely token; > 0 samples")
    ch.add_argument("--top-p", type=float, metavar="P", help="sample among the most likely tokens that reach this "
                                                            "total probability (default 1: all)")
    ch.add_argument("--seed", type=int, metavar="S", help="answer number i samples from a stream seeded by (seed, i)")
    e = sub.add_parser("export", help="write a run's latest checkpoint as an HF transformers model",
                       description="write a run's latest checkpoint as an HF transformers model directory "
                                   "(config.json, safetensors, tokenizer)")
    e.add_argument("--run", required=True, help="a run directory (see `rafale runs`)")
    e.add_argument("--to-hf", required=True, metavar="OUT_DIR", help="a new or empty directory")
    e.add_argument("--max-shard-size", default="5GB",
                   help="split the weights into files of at most this size (default 5GB)")
    e.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run: write its adapter as a PEFT adapter directory instead of the merged model")
    ev = sub.add_parser("eval", help="metrics of a run's latest checkpoint on its validation split, or benchmarks",
                        description="metrics of a run's latest checkpoint on its validation split (the "
                                    "metrics/eval/* of metrics.jsonl), and for classifiers a confusion matrix; "
                                    "with --tasks, lm-evaluation-harness tasks instead (pip install 'rafale[eval]')")
    ev.add_argument("--run", required=True, help="a run directory (see `rafale runs`)")
    ev.add_argument("--tasks", nargs="+", metavar="TASK",
                    help="lm-eval tasks: bundled names (sst2, tinystories_cloze, wikitext2_subset) or task YAML "
                         "paths, space- or comma-separated")
    ev.add_argument("--limit", type=int, metavar="N", help="--tasks: only the first N examples of each task")
    ev.add_argument("--batch-size", type=int, default=8, metavar="N",
                    help="--tasks: requests per forward pass (default 8)")
    ev.add_argument("--json", action="store_true",
                    help='print {"checkpoint", "step", "samples", "metrics": {...}, "confusion_matrix": '
                         '{"labels", "matrix"}} (the last for classifiers); with --tasks {"checkpoint", "step", '
                         '"tasks": {TASK: {"samples", "metrics"}}}')
    rs = sub.add_parser("runs", help="list runs: name, status, steps, last loss, path",
                        description="list runs: name, status, steps, last loss, path (never cut: it comes last)")
    rs.add_argument("name", nargs="?", metavar="NAME", help="only runs whose directory name starts with NAME")
    rs.add_argument("--json", action="store_true",
                    help='print a JSON list of {"name", "status", "steps", "loss", "path"}, oldest first')
    cs = sub.add_parser("config", help="show a config as it will run, and what it costs",
                        description="show a config as it will run, and what it costs")
    cs_sub = cs.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = cs_sub.add_parser("show", help="the resolved config, parameter counts, FLOPs per token, tokens per "
                                          "step and estimated peak training memory",
                             description="the resolved config (overrides applied, defaults filled in), exact "
                                         "parameter counts of its network, training FLOPs per token, tokens per "
                                         "step and an estimate of peak training memory on CPU")
    show.add_argument("-c", "--config", required=True,
                      help="a YAML file or the name of a bundled config (e.g. pythia-tinyshakespeare)")
    show.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    show.add_argument("--json", action="store_true",
                      help='print {"hash", "config", "parameters": {"total", "embedding", "head", "trainable"}, '
                           '"flops_per_token", "tokens_per_step", "memory": {"peak_training_mb", ...}}')
    pl = sub.add_parser("plot", help="training and validation curves of runs as a PNG",
                        description="training loss (as logged and smoothed) and validation curves of one or "
                                    "several runs on one figure, written as a PNG (pip install 'rafale[plot]')")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (see `rafale runs`)")
    pl.add_argument("-o", "--output", default="plot.png", help="the PNG to write (default plot.png)")
    pl.add_argument("--metric", action="append", metavar="NAME",
                    help="a panel for this metrics.jsonl key (or its last part, e.g. LanguagePerplexity) instead "
                         "of the default loss and validation panels; repeatable")
    pl.add_argument("--x", default="steps", metavar="steps|tokens", help="the x axis (default steps)")
    tk = sub.add_parser("tokenizer", help="train a tokenizer.json on your corpus",
                        description="train a tokenizer.json on your corpus")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tt = tk_sub.add_parser("train", help="train a tokenizer.json (usable as data.tokenizer)",
                           description="train a tokenizer.json on corpus files (.txt, .jsonl, .jsonl.gz, "
                                       ".jsonl.zst, .parquet, .arrow, datasets save_to_disk directories, or "
                                       "directories of them); usable as a config's data.tokenizer")
    tt.add_argument("sources", nargs="+", metavar="SOURCES", help="corpus files or directories")
    tt.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, specials included")
    tt.add_argument("--kind", default="bpe",
                    help="bpe: byte-level, GPT-2 style (default); unigram: SentencePiece style; "
                         "wordpiece: BERT-uncased style, for mlm and classification")
    tt.add_argument("--special", nargs="+", action="extend", default=[], metavar="TOKEN",
                    help="special tokens besides the kind's own (bpe <|endoftext|>; unigram <unk> <s> </s>; "
                         "wordpiece [PAD] [UNK] [CLS] [SEP] [MASK])")
    tt.add_argument("--text-field", default="text", help="the column holding the text in row formats (default text)")
    tt.add_argument("-o", "--output", required=True, help="the tokenizer.json to write (replaced if it exists)")
    ca = sub.add_parser("cache", help="list or remove data cache entries",
                        description="list or remove the tokenized data cache entries in $RAFALE_HOME/data")
    ca_sub = ca.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cl = ca_sub.add_parser("ls", help="entries: key, pipeline, sources, tokenizer, size on disk, last use",
                           description="entries, most recently used first: key, pipeline, sources, tokenizer, "
                                       "size on disk (as du counts it), last use")
    cl.add_argument("--json", action="store_true", help="one JSON object per entry, sizes in bytes")
    cr = ca_sub.add_parser("rm", help="remove entries by key prefix or age",
                           description="remove entries by key (or name) prefix, or those last used longer ago "
                                       "than --older-than; an entry being built or in use is refused (exit 2)")
    cr.add_argument("keys", nargs="*", metavar="KEY", help="key or entry-name prefixes (see `rafale cache ls`)")
    cr.add_argument("--older-than", metavar="AGE", help="entries last used more than AGE ago: 90m, 12h, 7d, 2w")
    return p


def _quiet_libraries() -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("composer").setLevel(logging.WARNING)
    # Composer warns about CPU-only runs and data loaders it cannot inspect; none need action here.
    warnings.filterwarnings("ignore", module="composer")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _cmd_config(args, mode: str) -> int:
    from rafale.config import load_config

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    from rafale import train
    from rafale.monitoring import Diverged
    from rafale.signals import ctrl_c_quits, shield

    ctrl_c_quits()
    if mode == "prepare":
        to_mds = getattr(args, "to_mds", None)
        if to_mds is not None:
            from rafale.data import streaming

            if not hasattr(cfg.data, "streaming"):  # the sections that declare data.streaming can stream
                raise UserError(f"--to-mds: writes causal_lm blocks, and data.pipeline is {cfg.data.pipeline}")
            streaming.require()  # before tokenizing anything
        data = train.prepare(cfg)
        if to_mds is not None:
            written = streaming.write_mds(data, to_mds)
            print(f"MDS shards: {', '.join(str(p) for p in written)}")
        return 0
    if mode == "debug":
        try:
            return 0 if train.debug_overfit(cfg) else 1
        except Diverged as e:
            print(f"rafale: diverged: {e}", file=sys.stderr)
            return 1

    shield()  # again: importing Composer replaced it with a SIGTERM handler that exits 143
    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    rank0 = os.environ.get("RANK", "0") == "0"  # the other ranks' output only repeats it
    try:
        run_dir = train.train(cfg, force=_env_flag("FORCE"))
    except Diverged as e:
        print(f"rafale: diverged: {e}", file=sys.stderr)
        return 1
    except train.Preempted as e:
        from rafale.signals import PREEMPTED_EXIT_CODE

        if rank0:
            print(f"rafale: preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if rank0:
        print(f"run complete: {run_dir}")
    return 0


def _launch(args) -> int:
    """Re-runs this same `train` command in nproc processes per node through Composer's launcher,
    which sets RANK / WORLD_SIZE / MASTER_ADDR for torch.distributed. Returns its exit code (a
    rank's non-zero code, e.g. 75 after preemption).

    The launcher runs in this process so that SIGTERM / SIGUSR1 sent to it (by a scheduler that
    signals only the main process, or by one that signals every process of the job) are passed to
    the ranks, which checkpoint and exit 75, instead of killing the launcher and orphaning them."""
    import signal

    argv = ["composer", "-n", str(args.nproc), "--world_size", str(args.nproc * args.nnodes),
            "--node_rank", str(args.node_rank), "--base_rank", str(args.node_rank * args.nproc),
            "--master_addr", args.master_addr]
    if args.master_port is not None:
        argv += ["--master_port", str(args.master_port)]
    argv += ["-m", "rafale", "train", "-c", args.config, *args.overrides]
    from composer.cli import launcher
    from rafale.signals import PREEMPTED_EXIT_CODE, SIGNALS

    previous = {sig: signal.signal(sig, _forward_to_ranks) for sig in SIGNALS}
    saved_argv, sys.argv = sys.argv, argv
    try:
        code = launcher.main()
        # The ranks stop at the same step, but one exits first; the launcher then SIGTERMs the others
        # while they are exiting and reports the lowest rank's code (-15). The checkpoint is complete
        # by then (saving ends in a barrier of all ranks), so the run was preempted, not killed.
        if _forwarded and code == -signal.SIGTERM:
            return PREEMPTED_EXIT_CODE
        return code
    finally:
        sys.argv = saved_argv
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_forwarded = False  # a preemption signal reached the launching process and was passed to the ranks


def _forward_to_ranks(signum, frame) -> None:
    import psutil  # Composer's launcher depends on it

    global _forwarded
    _forwarded = True

    for rank in psutil.Process().children():  # the ranks only: not their own workers
        try:
            os.kill(rank.pid, signum)
        except ProcessLookupError:
            pass


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _read_prompts(path: str) -> list[str]:
    """--prompts-file: one prompt a line, or a "prompt" field a line of a .jsonl file."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--prompts-file {path}: no such file")
    # split("\n"), not splitlines(): that would also cut at form feeds and Unicode line separators.
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(file.read_text(encoding="utf-8").split("\n"), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise UserError(f"--prompts-file {path}: the file holds no prompts; write one prompt a line")
    if file.suffix != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts-file {path} line {n}: not JSON ({e.msg}); write one "
                            f'{{"prompt": "..."}} object a line') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f'--prompts-file {path} line {n}: no "prompt" string field; write one '
                            f'{{"prompt": "..."}} object a line')
        prompts.append(row["prompt"])
    return prompts


def stop_strings(raw: list[str]) -> list[str]:
    """--stop values with their backslash escapes read (a shell passes '\\n' as a backslash and an n, and
    a newline is the stop string most often wanted). Python's own escapes, through the codec that reads
    them; characters beyond latin-1 pass through it as escapes of their own."""
    stops = []
    for text in raw:
        try:
            text = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as e:
            raise UserError(f"--stop {text!r}: {e.reason}; write a backslash as \\\\") from None
        if not text:
            raise UserError("--stop needs a non-empty string")
        stops.append(text)
    return stops


def _cmd_generate(args) -> int:
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    stop = stop_strings(args.stop)
    texts = [args.prompt] if args.prompts_file is None else _read_prompts(args.prompts_file)
    from rafale.sampling import SamplingConfig

    sampling = SamplingConfig(**{k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None})
    _quiet_libraries()
    from rafale.generate import generate_all
    from rafale.inference import hf_eos_ids, load_hf, load_run, run_eos_ids

    only = {}  # an HF model decodes over its whole head, as transformers' generate does
    if args.hf is not None:
        (model, tokenizer), eos = load_hf(args.hf), hf_eos_ids(args.hf)
    elif args.gguf is not None:
        from rafale.inference import load_gguf

        model, tokenizer, eos, _ = load_gguf(args.gguf)
    else:
        model, tokenizer, cfg = load_run(args.run)
        eos = run_eos_ids(cfg, tokenizer)
        only = {"n_tokens": tokenizer.get_vocab_size(with_added_tokens=True)}  # not a padded head's extra rows
    prompt_ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if not all(prompt_ids):
        which = "--prompt" if args.prompts_file is None else f"prompt {prompt_ids.index([]) + 1} of --prompts-file"
        raise UserError(f"{which} is empty after tokenization; give some text")
    results = generate_all(model, prompt_ids, args.max_new_tokens, args.batch_size, eos_token_id=eos,
                           sampling=sampling, stop=stop,
                           decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False), **only)
    for text, ids, c in zip(texts, prompt_ids, results):
        if args.json:
            print(json.dumps({"prompt_ids": ids, "output_ids": c.output_ids, "text": c.text,
                              "finish_reason": c.finish_reason}), flush=True)
        else:
            print(text + c.text, flush=True)
    return 0


def _cmd_chat(args) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from rafale.sampling import SamplingConfig

    sampling = SamplingConfig(**{k: getattr(args, k) for k in ("temperature", "top_p", "seed")
                                 if getattr(args, k) is not None})
    _quiet_libraries()
    from pathlib import Path

    from rafale.chat_repl import repl
    from rafale.data.chat import load_chat_template
    from rafale.inference import hf_eos_ids, load_gguf, load_hf, load_run, run_eos_ids
    from rafale.paths import resolve_tokenizer

    if args.gguf is not None:
        model, tokenizer, eos, folder = load_gguf(args.gguf)
        template = load_chat_template(folder)
    elif args.hf is not None:
        (model, tokenizer), eos = load_hf(args.hf), hf_eos_ids(args.hf)
        template = load_chat_template(Path(args.hf).expanduser())
    else:
        model, tokenizer, cfg = load_run(args.run)
        eos = run_eos_ids(cfg, tokenizer)
        template = load_chat_template(resolve_tokenizer(cfg.data.tokenizer), getattr(cfg.data, "chat_template", None))
    if args.max_new_tokens >= model.cfg.max_seq_len:
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) leaves no room for the conversation in the "
                        f"model's {model.cfg.max_seq_len}-token context; lower it")
    return repl(model, tokenizer, template, eos, args.max_new_tokens, sampling)


def _cmd_export(args) -> int:
    from rafale.export import export_run, parse_size

    max_shard_bytes = parse_size(args.max_shard_size)
    _quiet_libraries()
    print(f"exported: {export_run(args.run, args.to_hf, max_shard_bytes, adapter_only=args.adapter_only)}")
    return 0


def _cmd_eval(args) -> int:
    if args.tasks is None:
        if args.limit is not None:
            raise UserError("--limit applies to --tasks; name the tasks to run, e.g. --tasks sst2")
    else:
        return _cmd_eval_tasks(args)
    _quiet_libraries()
    from rafale.evaluate import evaluate_run, format_report

    result = evaluate_run(args.run)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _cmd_eval_tasks(args) -> int:
    tasks = [t for spec in args.tasks for t in spec.split(",") if t]
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    _quiet_libraries()
    from rafale.benchmarks import format_benchmarks, run_benchmarks  # imports lm_eval

    result = run_benchmarks(args.run, tasks, args.limit, args.batch_size)
    print(json.dumps(result) if args.json else format_benchmarks(result))
    return 0


def _cmd_config_show(args) -> int:
    from rafale.config import load_config

    cfg = load_config(args.config, args.overrides)
    from rafale.config_show import describe, format_description

    d = describe(cfg)
    print(json.dumps(d) if args.json else format_description(d))
    return 0


def _cmd_plot(args) -> int:
    from rafale.plot import plot_runs, save_png

    fig = plot_runs(args.runs, args.metric, args.x)
    print(f"wrote {save_png(fig, args.output)} ({len(args.runs)} run(s), {len(fig.axes)} panel(s))")
    return 0


def _cmd_tokenizer(args) -> int:
    import time
    from pathlib import Path

    from rafale.tokenizer_train import train_tokenizer

    t0 = time.perf_counter()
    out = train_tokenizer(args.sources, args.vocab_size, kind=args.kind, special=args.special,
                          text_field=args.text_field, out=Path(args.output))
    seconds = time.perf_counter() - t0
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(out)).get_vocab_size()
    print(f"trained a {args.kind} tokenizer of {size:,} tokens in {seconds:.1f} s: {out}")
    return 0


def _cmd_cache(args) -> int:
    from rafale.data import entries

    if args.cache_command == "ls":
        found = entries.list_entries()
        if args.json:
            for e in found:
                print(json.dumps(e.as_dict()))
            return 0
        from rich.console import Console
        from rich.table import Table

        from rafale.paths import data_cache_dir

        table = Table(box=None)
        table.add_column("key", no_wrap=True, min_width=max((len(e.name) for e in found), default=3))
        table.add_column("pipeline", no_wrap=True)
        table.add_column("sources", overflow="fold")  # the column that gives way on a narrow terminal
        for column in ("tokenizer", "size", "last use", "state"):
            table.add_column(column, no_wrap=True)
        for e in found:
            names = [os.path.basename(s) for s in e.sources]
            shown = ", ".join(names[:2]) + (f" +{len(names) - 2}" if len(names) > 2 else "")
            tokenizer = os.path.basename(os.path.dirname(e.tokenizer)) if e.tokenizer.endswith("tokenizer.json") \
                else e.tokenizer
            table.add_row(e.name, e.pipeline, shown, tokenizer, _human_bytes(e.size), _ago(e.last_use), e.state)
        # Piped output is not cut at 80 columns: keys and paths are what one copies from it.
        Console(width=None if sys.stdout.isatty() else 200).print(
            table if found else f"no data cache entries in {data_cache_dir()}")
        return 0
    refused = 0
    for e in entries.select(args.keys, args.older_than):
        why = entries.remove(e)
        if why is None:
            print(f"removed {e.name} ({_human_bytes(e.size)})")
        else:
            print(f"rafale: error: {why}", file=sys.stderr)
            refused += 1
    return 2 if refused else 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ago(t: float) -> str:
    import time

    s = max(0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _cmd_runs(args) -> int:
    from rafale.runs import format_runs, list_runs

    rows = list_runs(args.name)
    if args.json:
        print(json.dumps(rows))
    elif rows:
        print(format_runs(rows))
    elif args.name is not None:
        print(f"no run named {args.name}* (`rafale runs` lists them all)")
    else:
        print("no runs yet (train one with `rafale train -c CONFIG`)")
    return 0


ENV_SWITCHES = ("DATA", "DEBUG", "FORCE", "RAFALE_HOME", "RAFALE_TRACEBACK")


def _check_command_line(argv: list[str]) -> None:
    """Mistakes argparse would report confusingly: a misspelt command (it would read as an override)
    and an environment switch written as an argument (it would read as an unknown config key)."""
    import difflib

    if argv and not argv[0].startswith("-") and "=" not in argv[0] and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"commands: {', '.join(COMMANDS)}"
        raise UserError(f"unknown command '{argv[0]}'; {hint}")
    for arg in argv:
        if arg.partition("=")[0] in ENV_SWITCHES and "=" in arg:
            raise UserError(f"{arg} is an environment variable, not a config key: write it before the "
                            f"command, e.g. `{arg} rafale train -c CONFIG`")


def _fail(message: str, code: int) -> int:
    print(f"rafale: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_command_line(argv)
    except UserError as e:
        return _fail(f"error: {e}", 2)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")  # `python rafale/main -c cfg.yaml` means train
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        return _dispatch(args)
    except UserError as e:
        return _fail(f"error: {e}", 2)
    except (KeyboardInterrupt, SystemExit) as e:
        # Composer's own SIGINT handler exits with 130 (128 + SIGINT) wherever the program is.
        if isinstance(e, SystemExit) and e.code != 130:
            raise
        return _fail(f"interrupted; {INTERRUPTED}", 130)
    except Exception as e:
        if _env_flag("RAFALE_TRACEBACK"):
            raise
        from rafale.errors import environment_problem

        if (problem := environment_problem(e)) is not None:  # a full disk, an unwritable home
            return _fail(f"error: {problem}", 2)
        summary = " ".join(f"{type(e).__name__}: {e}".split())
        return _fail(f"internal error: {summary} (RAFALE_TRACEBACK=1 shows where)", 1)


INTERRUPTED = "run the same command to resume"


def _dispatch(args) -> int:
    if args.command == "train" and (args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes):
        raise UserError(f"--nproc and --nnodes must be >= 1 and --node-rank in 0..nnodes-1, got "
                        f"{args.nproc}, {args.nnodes}, {args.node_rank}")
    if args.command in ("train", "prepare", "debug"):
        mode = args.command
        if mode == "train" and _env_flag("DATA"):
            mode = "prepare"
        elif mode == "train" and _env_flag("DEBUG"):
            mode = "debug"
        if mode == "train":
            from rafale.signals import shield

            shield()
        return _cmd_config(args, mode)
    if args.command == "generate":
        return _cmd_generate(args)
    if args.command == "eval":
        return _cmd_eval(args)
    if args.command == "export":
        return _cmd_export(args)
    if args.command == "chat":
        return _cmd_chat(args)
    if args.command == "tokenizer":
        return _cmd_tokenizer(args)
    if args.command == "cache":
        return _cmd_cache(args)
    if args.command == "plot":
        return _cmd_plot(args)
    if args.command == "config":
        return _cmd_config_show(args)
    return _cmd_runs(args)


def entry() -> None:
    sys.exit(main())
