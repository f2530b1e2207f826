"""The `rafale` command line: subcommands, `key.path=value` overrides, one-line user errors.

Nothing heavy is imported at module level: `rafale --help`, `rafale runs` and config errors answer
without paying for torch or Composer. Environment switches: DATA=1 (prepare only), DEBUG=1 (overfit
one batch), FORCE=1 (train again although this config already completed), RAFALE_HOME (where
everything is written).
"""

import argparse
import json
import os
import sys

from rafale.errors import UserError

COMMANDS = ("train", "prepare", "debug", "generate", "runs")


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

    with_config("train", "train a model (resumes an interrupted run of the same config)")
    with_config("prepare", "build the tokenized data cache and exit (same as DATA=1 rafale train)")
    with_config("debug", "overfit one batch as a sanity check (same as DEBUG=1 rafale train)")
    g = sub.add_parser("generate", help="greedy generation from a run's latest checkpoint",
                       description="greedy generation from a run's latest checkpoint")
    g.add_argument("--run", required=True, help="a run directory (see `rafale runs`)")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--json", action="store_true",
                   help='print {"prompt_ids": [...], "output_ids": [...], "text": "..."} (generated part only)')
    sub.add_parser("runs", help="list runs: name, status, steps, last loss, path",
                   description="list runs: name, status, steps, last loss, path")
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

    if mode == "prepare":
        train.prepare(cfg)
        return 0
    if mode == "debug":
        return 0 if train.debug_overfit(cfg) else 1
    run_dir = train.train(cfg, force=_env_flag("FORCE"))
    print(f"run complete: {run_dir}")
    return 0


def _cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _quiet_libraries()
    import torch

    from rafale.generate import generate
    from rafale.inference import load_run

    model, tokenizer, _ = load_run(args.run)
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not prompt_ids:
        raise UserError("--prompt is empty after tokenization; give some text")
    out = generate(model, torch.tensor([prompt_ids]), max_new_tokens=args.max_new_tokens)
    output_ids = out[0].tolist()
    text = tokenizer.decode(output_ids, skip_special_tokens=False)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "output_ids": output_ids, "text": text}))
    else:
        print(args.prompt + text)
    return 0


def _cmd_runs() -> int:
    from rich.console import Console
    from rich.table import Table

    from rafale.runs import list_runs

    rows = list_runs()
    table = Table("name", "status", "steps", "last loss", "path", box=None)
    for r in rows:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        table.add_row(r["name"], r["status"], str(r["steps"] if r["steps"] is not None else "-"), loss, r["path"])
    Console().print(table if rows else "no runs yet (train one with `rafale train -c CONFIG`)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")  # `python rafale/main -c cfg.yaml` means train
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        if args.command in ("train", "prepare", "debug"):
            mode = args.command
            if mode == "train" and _env_flag("DATA"):
                mode = "prepare"
            elif mode == "train" and _env_flag("DEBUG"):
                mode = "debug"
            return _cmd_config(args, mode)
        if args.command == "generate":
            return _cmd_generate(args)
        return _cmd_runs()
    except UserError as e:
        print(f"rafale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rafale: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
