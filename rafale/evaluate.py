"""`rafale eval`: a run's latest checkpoint on its validation split, with the metrics training logs
(the model's own `get_metrics` / `update_metric`, so the numbers are those of metrics.jsonl's
metrics/eval/*), and for classifiers a confusion matrix over the label names.

    causal_lm       LanguageCrossEntropy, LanguagePerplexity
    mlm             MaskedAccuracy, LanguageCrossEntropy (the same masks at every evaluation)
    classification  MulticlassAccuracy, MulticlassF1Score (macro), confusion matrix
"""

import re
from pathlib import Path

import torch

from rafale import runs
from rafale.checkpoints import read_model_state
from rafale.errors import UserError
from rafale.inference import load_run_config


@torch.no_grad()
def evaluate_run(run_dir: str | Path) -> dict:
    """{"run", "checkpoint", "step", "samples", "metrics": {"metrics/eval/<name>": value},
    and for classifiers "confusion_matrix": {"labels": [...], "matrix": rows = true, columns = predicted}}."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    from rafale.data.collators import for_pipeline
    from rafale.data.loaders import build_dataloader
    from rafale.train import build_data, build_model

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = runs.latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--run {run_dir}: no checkpoint yet; train longer than train.save_interval "
                        f"({cfg.train.save_interval}) or until the run completes")
    data = build_data(cfg)
    if data.val is None:
        raise UserError(f"--run {run_dir}: the run has no validation split (data.val is null and "
                        f"data.val_fraction is 0); there is nothing to evaluate on")
    model = build_model(cfg, data.meta["vocab_size"], data.meta)
    model.load_state_dict(read_model_state(ckpt))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    metrics = {name: m.to(device) for name, m in model.get_metrics(is_train=False).items()}
    labels = data.meta.get("labels")
    confusion = MulticlassConfusionMatrix(num_classes=len(labels)).to(device) if labels else None
    collator = for_pipeline(cfg.data.pipeline, data.meta, cfg.data.mlm_probability, cfg.run.seed)
    loader = build_dataloader(data.val, batch_size=cfg.train.device_microbatch_size, shuffle=False,
                              seed=cfg.run.seed, drop_last=False, collator=collator)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
        if confusion is not None:
            confusion.update(outputs, batch["labels"])
    step = int(re.search(r"-ba(\d+)", ckpt.name).group(1))  # Composer's names: ep{E}-ba{B}-rank0.pt
    result = {"run": str(run_dir), "checkpoint": str(ckpt), "step": step,
              "samples": len(data.val),
              "metrics": {f"metrics/eval/{name}": float(m.compute()) for name, m in metrics.items()}}
    if confusion is not None:
        result["confusion_matrix"] = {"labels": labels, "matrix": confusion.compute().tolist()}
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
