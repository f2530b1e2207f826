"""Components by import path and the seams: a pipeline and a model from files outside rafale/ train,
resume and generate through the CLI; torch.optim.SGD by path reproduces the built-in sgd; a Composer
callback by path runs; bad paths and signatures are one-line errors naming the key; a component's
source is in the run hash; every config key says whether it changes results."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rafale import build, schema, train
from rafale.config import Config, from_dict, load_config
from rafale.data.pipeline import BUILTIN, pipeline_class
from rafale.errors import UserError
from test.conftest import REPO, run_cli

# The bundled configs' run hashes. A change that alters what a bundled config trains changes its
# hash on purpose and updates this table; any other change must leave it alone, or interrupted runs
# stop resuming.
BUNDLED_HASHES = {"pythia-tinyshakespeare": "5a947cc2", "llama-tinystories": "ff1c4e34", "bert-sst2": "1374bdd2",
                  "bert-wikitext-mlm": "a0072737", "roberta-imdb": "f50503eb", "llama-tinystories-mix": "d41e12bd",
                  "smollm2-sft": "5b6eaea3"}

TINY_MODEL = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    """A causal LM that is not one of rafale's families: each position sees the running mean of the
    embeddings up to it."""

    def __init__(self, vocab_size, d=32, max_seq_len=64):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(max_seq_len, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        h = h.cumsum(1) / torch.arange(1, T + 1, device=h.device)[None, :, None]
        return self.head(torch.tanh(self.mix(h)))
'''

SMOOTHED_PIPELINE = '''
from dataclasses import dataclass

from rafale.data.causal_lm import CausalLM, CausalLMData, next_token_targets
from rafale.schema import results


@dataclass
class SmoothedData(CausalLMData):
    label_smoothing: float = results(0.1)


class SmoothedLM(CausalLM):
    """The causal-LM data with a label-smoothed next-token loss."""
    Section = SmoothedData

    def forward(self, network, batch, training):
        return network(batch["input_ids"])

    def loss(self, outputs, batch):
        import torch.nn.functional as F

        targets = next_token_targets(batch)
        return F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               label_smoothing=self.data.label_smoothing)
'''


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "shakespeare.txt"
    path.write_text((REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:30_000])
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def test_every_config_key_declares_whether_it_changes_results():
    assert schema.unclassified(Config) == []
    for name in BUILTIN:
        assert schema.unclassified(pipeline_class(name).Section) == [], name


def test_bundled_config_hashes_are_pinned():
    assert {name: load_config(name).hash() for name in BUNDLED_HASHES} == BUNDLED_HASHES


def test_a_pipeline_and_a_model_from_files_train_resume_and_generate(tmp_path):
    (tmp_path / "tiny_model.py").write_text(TINY_MODEL)
    (tmp_path / "smoothed.py").write_text(SMOOTHED_PIPELINE)
    cfg = {"run": {"name": "plugin", "seed": 5},
           "model": {"class": "./tiny_model.py:TinyLM", "d": 32, "max_seq_len": 64},
           "data": {"pipeline": "./smoothed.py:SmoothedLM", "train": str(_text(tmp_path)), "max_seq_len": 64,
                    "label_smoothing": 0.1, "val_fraction": 0.1},
           "optim": {"lr": 1e-2}, "schedule": {"warmup": "0ba"},
           "train": {"max_duration": "12ba", "global_batch_size": 8, "device_microbatch_size": 8,
                     "eval_interval": "4ba", "save_interval": "2ba"}}
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(cfg))
    ref = run_cli("train", "-c", "plugin.yaml", home=tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    (ref_dir,) = (tmp_path / "ref" / "runs").iterdir()
    ref_losses = _losses(ref_dir)
    assert sorted(ref_losses) == list(range(1, 13)) and ref_losses[12] < ref_losses[1] - 1.0
    saved = yaml.safe_load((ref_dir / "config.yaml").read_text())
    assert saved["model"]["class"] == f"{tmp_path / 'tiny_model.py'}:TinyLM"  # absolute: found from anywhere

    # Stopped by SIGTERM mid-run, then resumed: the losses of the uninterrupted run, bit for bit.
    home = tmp_path / "int"
    env = {"RAFALE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rafale", "train", "-c", "plugin.yaml"], cwd=tmp_path,
                            env={**_base_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(home.glob("runs/*/checkpoints/ep0-ba4-rank0.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    resumed = run_cli("train", "-c", "plugin.yaml", home=home, cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming preempted run" in resumed.stdout, resumed.stderr
    (run_dir,) = (home / "runs").iterdir()
    assert _losses(run_dir) == ref_losses

    # Generation from the run, from another directory: greedy tokens equal argmax over the model's logits.
    gen = run_cli("generate", "--run", str(ref_dir), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--json",
                  home=tmp_path / "ref", cwd=REPO)
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    from rafale.inference import load_run

    network, _, _ = load_run(ref_dir)
    seq = list(out["prompt_ids"])
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(network(torch.tensor([seq]))[0, -1].argmax()))
    expected = seq[len(out["prompt_ids"]):]
    # The continuation stops early only at the tokenizer's end-of-text token (id 0 in GPT-NeoX's).
    assert out["output_ids"] == expected[:len(out["output_ids"])]
    assert out["finish_reason"] == "length" or out["output_ids"][-1] == 0


def _base_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE", "RAFALE_HOME")}


def _tiny_config(tmp_path: Path, optim: dict, **train_keys) -> Config:
    return from_dict({"run": {"name": "c", "seed": 1}, "model": {"preset": "pythia-micro", "n_layers": 1},
                      "data": {"train": str(_text(tmp_path)), "max_seq_len": 32, "val_fraction": 0.0},
                      "optim": optim, "schedule": {"warmup": "0ba"},
                      "train": {"global_batch_size": 4, "device_microbatch_size": 4, "max_duration": "4ba",
                                **train_keys}})


def _train_losses(cfg: Config) -> list[float]:
    data = build.build_data(cfg)
    torch.manual_seed(0)
    model = build.build_model(cfg, data.meta)
    history = train._LossHistory()
    trainer = train.build_trainer(cfg, model, data, run_dir=None, extra_callbacks=[history])
    trainer.fit()
    trainer.close()
    return history.losses


def test_sgd_by_import_path_reproduces_the_builtin_sgd(rafale_home, tmp_path):
    builtin = _train_losses(_tiny_config(tmp_path, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}))
    by_path = _train_losses(_tiny_config(tmp_path, {"class": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}))
    assert len(builtin) == 4 and builtin[-1] < builtin[0]
    assert by_path == pytest.approx(builtin, abs=1e-6, rel=0)


def test_a_composer_callback_from_a_file_runs(tmp_path):
    (tmp_path / "callbacks.py").write_text(
        "from pathlib import Path\nfrom composer.core import Callback\n\n\n"
        "class Touch(Callback):\n    def __init__(self, path):\n        self.path = path\n\n"
        "    def fit_end(self, state, logger):\n        Path(self.path).write_text(str(int(state.timestamp.batch)))\n")
    cfg = _tiny_config(tmp_path, {"lr": 1e-3}, max_duration="2ba").to_dict()
    cfg["train"]["callbacks"] = [{"class": "./callbacks.py:Touch", "path": str(tmp_path / "done.txt")}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli("train", "-c", "c.yaml", home=tmp_path / "home", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "done.txt").read_text() == "2"


def test_component_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cb.py").write_text("class NotACallback:\n    def __init__(self, x=1):\n        pass\n")
    cases = [
        ({"optim": {"class": "torch.optim.Nope", "lr": 0.1}}, "optim.class: torch.optim has no 'Nope'"),
        ({"optim": {"class": "no_such_package.Opt"}}, "optim.class: cannot import 'no_such_package'"),
        ({"optim": {"class": "torch.optim.SGD", "lrr": 0.1}}, "optim.class: SGD(params, lr="),
        ({"schedule": {"class": "./missing.py:Sched"}}, "schedule.class: no file ./missing.py"),
        ({"train": {"callbacks": [{"class": "./cb.py:Other"}]}}, "train.callbacks[0]: "),
        ({"train": {"callbacks": [{"class": "./cb.py:NotACallback", "y": 2}]}}, "train.callbacks[0]: NotACallback"),
        ({"train": {"callbacks": [{"path": "x"}]}}, "train.callbacks: expected a list of a mapping with a 'class' key"),
    ]
    for data, expected in cases:
        with pytest.raises(UserError) as info:
            build.check_components(from_dict(data))
        assert expected in str(info.value), (data, str(info.value))
    with pytest.raises(UserError, match=r"train.callbacks\[0\]: .*cb.py:NotACallback is not a composer.core.Callback"):
        build.build_user_callbacks(from_dict({"train": {"callbacks": [{"class": "./cb.py:NotACallback"}]}}))
    # Through the CLI: one line, exit 2, and no run directory made.
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"optim": {"class": "torch.optim.SGD", "lrr": 0.1}}))
    result = run_cli("train", "-c", "bad.yaml", home=tmp_path / "home", cwd=tmp_path)
    assert result.returncode == 2 and "optim.class: SGD(" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "home" / "runs").exists()


def test_a_file_components_source_is_in_the_run_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cb.py").write_text("X = 1\n")
    data = {"train": {"callbacks": [{"class": "a/cb.py:X", "k": 1}]}}
    first = from_dict(data).hash()
    assert first != from_dict({}).hash()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cb.py").write_text("X = 1\n")  # the same source elsewhere: the same run
    assert from_dict({"train": {"callbacks": [{"class": "b/cb.py:X", "k": 1}]}}).hash() == first
    (tmp_path / "a" / "cb.py").write_text("X = 2\n")  # an edit: another run
    assert from_dict(data).hash() != first
    assert from_dict({"train": {"callbacks": [{"class": "b/cb.py:X", "k": 2}]}}).hash() != first
