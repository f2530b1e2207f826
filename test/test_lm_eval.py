"""Benchmarks through lm-evaluation-harness (rafale/benchmarks.py): RafaleLM against lm-eval's own HF
backend (HFLM) on the same random GPT-NeoX and Llama weights, exported with save_pretrained and loaded
into rafale with load_hf: per-request log-likelihoods and is_greedy, rolling log-likelihoods and
greedy generations; the bundled tasks end to end offline (same metrics as HFLM through lm-eval); a
user's task YAML; the user errors; that nothing imports lm_eval before a benchmark is asked for; and
`rafale eval --tasks` on a trained run against HFLM on the same run exported with `rafale export`."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from rafale.benchmarks import BOOTSTRAP_ITERS, TASKS_DIR, RafaleLM, run_tasks
from rafale.errors import UserError
from rafale.inference import load_hf
from rafale.paths import TOKENIZERS_DIR
from test.conftest import REPO, run_cli

TOL = 1e-4
MAX_LEN = 64  # positions of the tiny models: the long requests below need truncation or several windows
EOS = 0  # <|endoftext|> in the bundled gpt-neox-20b tokenizer
SIZES = dict(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=MAX_LEN, bos_token_id=EOS, eos_token_id=EOS,
             initializer_range=0.15)  # large enough that argmax is never a near-tie
FAMILIES = {
    "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig(**SIZES, rotary_pct=0.25)),
    "llama": (LlamaForCausalLM, LlamaConfig(**SIZES, num_key_value_heads=2)),
}
LONG = "the old man walked down to the river and sat by the water " * 8  # ~110 tokens > MAX_LEN


def hf_dir(family: str, path):
    """A random transformers model saved as an HF directory, with rafale's bundled tokenizer."""
    cls, cfg = FAMILIES[family]
    torch.manual_seed(0)
    cls(cfg).save_pretrained(path)
    shutil.copy(TOKENIZERS_DIR / "gpt-neox-20b" / "tokenizer.json", path)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "model_max_length": MAX_LEN, "clean_up_tokenization_spaces": False}))
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(HFLM, RafaleLM) on the same weights; different batch sizes, so batching cannot line up by luck."""
    path = hf_dir(request.param, tmp_path_factory.mktemp(request.param))
    model, tokenizer = load_hf(str(path))
    return HFLM(pretrained=str(path), device="cpu", batch_size=2), RafaleLM(model, tokenizer, EOS, batch_size=3)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_hflm(pair):
    ref, ours = pair
    gen = {"until": [], "max_gen_toks": 4, "do_sample": False}
    contexts = ["The cat sat on the", "Once upon a time, there was", LONG]
    # Continuations that are the model's own greedy text, so that is_greedy is true for some of them.
    greedy = ours.generate_until(requests("generate_until", [(c, gen) for c in contexts]))
    args = [(c, g) for c, g in zip(contexts, greedy)] + [
        ("The cat sat on the", " mat"), ("The cat sat on the", " hat"),  # one context, two answers
        ("", "Hello world, how are you?"),  # empty context: the prefix token conditions it
        ("Once upon a time ", "there was a dog"),  # the trailing space moves into the continuation
        (LONG, " and then he went home"), (LONG, LONG[:150]),  # longer than the model: truncated on the left
    ]
    expected = ref.loglikelihood(requests("loglikelihood", args))
    got = ours.loglikelihood(requests("loglikelihood", args))
    for (ll_ref, greedy_ref), (ll, is_greedy), a in zip(expected, got, args):
        assert abs(ll - ll_ref) <= TOL, a
        assert is_greedy == greedy_ref, a
    assert any(g for _, g in got) and not all(g for _, g in got)
    assert len({round(ll, 3) for ll, _ in got}) == len(got)  # distinct requests, distinct answers


def test_loglikelihood_rolling_equals_hflm(pair):
    ref, ours = pair
    texts = ["A short text.", LONG, LONG * 3 + "The end."]  # one window, two, six
    expected = ref.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert max(abs(a - b) for a, b in zip(expected, got)) <= TOL
    assert got[0] > got[1] > got[2]


def test_generate_until_equals_transformers_greedy(pair):
    ref, ours = pair
    free = {"until": [], "max_gen_toks": 12, "do_sample": False}
    prompts = ["The cat sat on the", "A dog ran to the", "Once upon a time, there was", LONG]
    full = ours.generate_until(requests("generate_until", [(p, free) for p in prompts]))
    assert all(len(text) > 10 for text in full)
    # A stop string from inside the first continuation: the text is cut before it.
    stop = full[0][len(full[0]) // 2:][:3]
    args = [(p, free) for p in prompts] + [(prompts[0], {**free, "until": [stop]}),
                                           (prompts[1], {**free, "max_gen_toks": 3})]
    expected = ref.generate_until(requests("generate_until", args))
    got = ours.generate_until(requests("generate_until", args))
    assert got == expected
    assert got[4] == full[0].split(stop)[0] and len(got[4]) < len(full[0])
    assert len(got[5]) < len(got[1])


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return hf_dir("gpt_neox", tmp_path_factory.mktemp("neox-tasks"))


@pytest.fixture(scope="module")
def neox(neox_dir) -> RafaleLM:
    model, tokenizer = load_hf(str(neox_dir))
    return RafaleLM(model, tokenizer, EOS, batch_size=2)


# Each bundled task and the metrics it reports.
BUNDLED = {
    "sst2": {"acc", "acc_stderr"},
    "tinystories_cloze": {"perplexity", "perplexity_stderr", "acc", "acc_stderr"},
    "wikitext2_subset": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}
LIMIT = 2


def test_bundled_tasks_run_offline_and_match_hflm(neox_dir, monkeypatch):
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert manager.all_tasks == sorted(BUNDLED)
    # As `rafale eval` would run them: a fresh process, no network access allowed. It counts its forks:
    # lm-eval bootstraps perplexity_stderr in a forked pool unless told not to, and a fork from a process
    # running torch's threads can hang.
    script = (f"import json, os; forks = []; os.register_at_fork(before=lambda: forks.append(1)); "
              f"from rafale.inference import load_hf; from rafale.benchmarks import run_tasks; "
              f"model, tok = load_hf({str(neox_dir)!r}); "
              f"results = run_tasks(model, tok, {sorted(BUNDLED)!r}, limit={LIMIT}, batch_size=4, "
              f"eos_token_id={EOS}); print(json.dumps(dict(results=results, forks=len(forks))))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(neox_dir / "hf_home")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=neox_dir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["forks"] == 0
    ours = out["results"]
    assert {task: set(r["metrics"]) for task, r in ours.items()} == BUNDLED
    assert all(r["samples"] == LIMIT for r in ours.values())

    # The same tasks through lm-eval's own HF backend on the exported weights, resampling in this process
    # as rafale does (the same seeds as its pool's, so the same standard errors).
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    ref = simple_evaluate(model=HFLM(pretrained=str(neox_dir), device="cpu", batch_size=4), tasks=sorted(BUNDLED),
                          limit=LIMIT, task_manager=manager, log_samples=False,
                          bootstrap_iters=BOOTSTRAP_ITERS)["results"]
    for task, metrics in BUNDLED.items():
        for name in metrics:
            assert ours[task]["metrics"][name] == pytest.approx(ref[task][f"{name},none"], rel=TOL), (task, name)
    assert ours["wikitext2_subset"]["metrics"]["word_perplexity"] > 1000  # random weights: near-uniform


def test_user_task_yaml(neox, tmp_path):
    """A generate_until task of the user's, data and YAML in tmp_path: two answers are the model's own
    greedy text, two are not, so exact_match is 0.5 exactly."""
    ours = neox
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    questions = ["Q: What is the capital of France?\nA:", "Q: Name a colour.\nA:", "Q: Two plus two?\nA:",
                 "Q: Who wrote Hamlet?\nA:"]
    greedy = ours.generate_until(requests("generate_until", [(q, gen) for q in questions]))
    answers = greedy[:2] + ["Paris", "Shakespeare"]
    assert greedy[2] != answers[2] and greedy[3] != answers[3]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers)))
    task = tmp_path / "my_qa.yaml"
    task.write_text(f"""
task: my_qa
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {json.dumps(gen)}
metric_list:
  - metric: exact_match
""")
    result = run_tasks(ours.model, ours.tokenizer, [str(task)], batch_size=2, eos_token_id=EOS)
    assert result == {"my_qa": {"samples": 4, "metrics": {"exact_match": 0.5, "exact_match_stderr": pytest.approx(
        0.5 / 3 ** 0.5)}}}  # the sample standard error of [1, 1, 0, 0]


def test_user_errors(neox, tmp_path):
    ours = neox
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    (tmp_path / "nameless.yaml").write_text("output_type: loglikelihood\n")
    cases = {
        "sst": "unknown task 'sst'; did you mean sst2?",
        "hellaswag": "unknown task 'hellaswag'; bundled tasks: sst2, tinystories_cloze, wikitext2_subset",
        str(tmp_path / "missing.yaml"): "no task file",
        str(tmp_path / "broken.yaml"): "not a readable task YAML",
        str(tmp_path / "nameless.yaml"): "no 'task:' (or 'group:') name",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)) as err:
            run_tasks(ours.model, ours.tokenizer, [spec], eos_token_id=EOS)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--limit must be >= 1"):
        run_tasks(ours.model, ours.tokenizer, ["sst2"], limit=0, eos_token_id=EOS)
    with pytest.raises(UserError, match=r"continuation of \d+ tokens is longer than the model.s 64 positions"):
        ours.loglikelihood(requests("loglikelihood", [("Once", LONG)]))
    sampling = {"until": [], "max_gen_toks": 4, "do_sample": True, "temperature": 0.7}
    with pytest.raises(UserError, match="decodes greedily"):
        ours.generate_until(requests("generate_until", [("Hi", sampling)]))


def test_lm_eval_is_not_imported_by_rafale_or_its_cli():
    code = ("import sys; import rafale, rafale.cli\n"
            "try:\n    rafale.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'lm_eval']")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A pythia-micro run trained for a few steps with `python -m rafale train`."""
    root = tmp_path_factory.mktemp("eval-run")
    (root / "text.txt").write_text((REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:20_000])
    cfg = {"run": {"name": "ev", "seed": 1}, "model": {"preset": "pythia-micro"},
           "data": {"train": str(root / "text.txt"), "max_seq_len": 64, "val_fraction": 0.0},
           "optim": {"lr": 1e-2}, "schedule": {"name": "constant", "warmup": "0ba"},
           "train": {"max_duration": "3ba", "global_batch_size": 4, "device_microbatch_size": 4,
                     "save_interval": "3ba", "eval_interval": "3ba"}}
    (root / "ev.yaml").write_text(yaml.safe_dump(cfg))
    home = root / "home"
    proc = run_cli("train", "-c", str(root / "ev.yaml"), home=home, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (home / "runs").iterdir()
    return run_dir, home


def test_cli_eval_tasks_equal_hflm_on_the_exported_run(trained_run, tmp_path, monkeypatch):
    """`rafale eval --run RUN --tasks` (a bundled name and a task YAML path, comma- and space-separated)
    against lm-eval's HF backend on `rafale export`'s directory of the same run."""
    run_dir, home = trained_run
    # A user's task file: the bundled sst2 under another name, with its loader and data beside it.
    task = tmp_path / "tasks" / "sst2_copy.yaml"
    task.parent.mkdir()
    for name in ("jsonl.py", "sst2_validation.jsonl"):
        shutil.copy(TASKS_DIR / name, task.parent)
    task.write_text((TASKS_DIR / "sst2.yaml").read_text().replace("task: sst2", "task: my_sst2"))
    proc = run_cli("eval", "--run", str(run_dir), "--tasks", "tinystories_cloze,wikitext2_subset", str(task),
                   "--limit", "3", "--json", home=home, cwd=tmp_path, env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(proc.stdout)
    assert ours["step"] == 3 and ours["checkpoint"].endswith("ep0-ba3-rank0.pt")
    assert sorted(ours["tasks"]) == ["my_sst2", "tinystories_cloze", "wikitext2_subset"]
    assert {t: r["samples"] for t, r in ours["tasks"].items()} == {"my_sst2": 3, "tinystories_cloze": 3,
                                                                    "wikitext2_subset": 3}
    assert run_cli("export", "--run", str(run_dir), "--to-hf", str(tmp_path / "hf"), home=home).returncode == 0
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # in this process, as rafale resamples
    ref = simple_evaluate(model=HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4),
                          tasks=["sst2", "tinystories_cloze", "wikitext2_subset"], limit=3, task_manager=manager,
                          log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)["results"]
    ref["my_sst2"] = ref.pop("sst2")
    compared = 0
    for name, result in ours["tasks"].items():
        for metric, value in result["metrics"].items():
            assert value == pytest.approx(ref[name][f"{metric},none"], rel=TOL), (name, metric)
            compared += 1
    assert compared == 9  # acc + stderr, perplexity + acc (+ stderrs), three perplexity measures

    text = run_cli("eval", "--run", str(run_dir), "--tasks", "sst2", "--limit", "2", home=home)
    assert text.returncode == 0, text.stderr[-3000:]
    assert f"(step 3)" in text.stdout and "sst2 (2 examples)" in text.stdout
    assert re.search(r"^  acc  \d\.\d{4}  ± \d\.\d{4}$", text.stdout, re.M), text.stdout


def test_cli_eval_task_errors_are_one_line(trained_run, tmp_path, capsys):
    from rafale.cli import main

    run_dir, home = trained_run
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    cases = {
        ("--tasks", "hellaswag"): "unknown task 'hellaswag'",
        ("--tasks", str(tmp_path / "broken.yaml")): "not a readable task YAML",
        ("--tasks", "sst2", "--limit", "0"): "--limit must be >= 1, got 0",
        ("--limit", "5"): "--limit applies to --tasks",
    }
    for args, message in cases.items():
        assert main(["eval", "--run", str(run_dir), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("rafale: error: "), err
