"""`rafale eval`: a run's latest checkpoint on its validation split, with the metrics training logs
(its pipeline's `metrics` / `update_metric`, so the numbers are those of metrics.jsonl's
metrics/eval/*), plus what the pipeline reports besides (a classifier's confusion matrix).

    causal_lm       LanguageCrossEntropy, LanguagePerplexity
    mlm             MaskedAccuracy, LanguageCrossEntropy (the same masks at every evaluation)
    classification  MulticlassAccuracy, MulticlassF1Score (macro), confusion matrix
"""

import re
import sys
from pathlib import Path

import torch

from rafale.errors import UserError
from rafale.runs import Run, read_status


@torch.no_grad()
def evaluate_run(run_dir: str | Path) -> dict:
    """{"run", "checkpoint", "step", "samples", "metrics": {"metrics/eval/<name>": value}, and what the
    pipeline's eval_extras report (classifiers: "confusion_matrix": {"labels", "matrix": rows = true,
    columns = predicted})}."""
    from rafale.build import pipeline_of
    from rafale.data.loaders import pipeline_loader
    from rafale.inference import run_network

    run = Run.open(run_dir)
    cfg = run.config
    ckpt = run.require_checkpoint()
    data = pipeline_of(cfg).prepare()
    trained_on = read_status(run.path).get("data")  # the cache entry training read (runs.train records it)
    if trained_on is not None and trained_on != data.path.name:
        print(f"rafale: note: the run's data changed since training (cache entry {trained_on}, now "
              f"{data.path.name}): evaluating on the files as they are now", file=sys.stderr)
    if data.val is None:
        raise UserError(f"--run {run_dir}: the run has no validation split (data.val is null and "
                        f"data.val_fraction is 0); there is nothing to evaluate on")
    network, pipeline, meta = run_network(run, meta=data.meta)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network.to(device)
    metrics = {name: m.to(device) for name, m in pipeline.metrics(meta).items()}
    extras = pipeline.eval_extras(meta, device)
    loader = pipeline_loader(pipeline, data.val, meta, batch_size=cfg.train.device_microbatch_size, shuffle=False,
                             seed=cfg.run.seed, drop_last=False)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = pipeline.eval_forward(network, batch)
        for metric in metrics.values():
            pipeline.update_metric(batch, outputs, metric)
        for extra in extras:
            extra.update(batch, outputs)
    step = int(re.search(r"-ba(\d+)", ckpt.name).group(1))  # Composer's names: ep{E}-ba{B}-rank0.pt
    result = {"run": str(run.path), "checkpoint": str(ckpt), "step": step, "samples": len(data.val),
              "metrics": {f"metrics/eval/{name}": float(m.compute()) for name, m in metrics.items()}}
    result.update(extra.result() for extra in extras)
    return result


def format_report(result: dict) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']}), {result['samples']:,} eval samples"]
    width = max(len(k) for k in result["metrics"])
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in result["metrics"].items()]
    if "confusion_matrix" in result:
        names, matrix = result["confusion_matrix"]["labels"], result["confusion_matrix"]["matrix"]
        w = max(6, *(len(n) for n in names), *(len(str(c)) for row in matrix for c in row))
        lines.append("confusion matrix (rows: true label, columns: predicted)")
        lines.append(" " * (w + 2) + "".join(f"{n:>{w + 1}}" for n in names))
        lines += [f"  {name:<{w}}" + "".join(f"{c:>{w + 1}}" for c in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)
