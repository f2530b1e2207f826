"""Sampling and stop strings: each logits processor against transformers' class on 1,000 random rows, the
whole chain against the list transformers' `generate` builds, sampled tokens against transformers'
`generate(do_sample=True)`; per-prompt random streams (batch size and neighbours do not matter, two
processes agree); stop strings spanning tokens; finish reasons; one-line errors for bad flags."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from rafale import sampling
from rafale.cli import main, stop_strings
from rafale.errors import UserError
from rafale.generate import generate_all, generate_batch
from rafale.inference import load_hf
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.family import rename
from rafale.models.gpt_neox import CONFIG as GPT_NEOX_CONFIG, NAMES as GPT_NEOX
from rafale.paths import resolve_tokenizer
from rafale.sampling import SamplingConfig, row_seed
from test.conftest import REPO

ROWS, VOCAB = 1000, 300
N_NEW = 24


def random_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (ROWS, 30), scores (ROWS, VOCAB)): logits of several scales, a quarter of the rows
    rounded to 0.5 so that ties (top-k's k-th value, equal sorted scores) are exercised too."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(ROWS, VOCAB, generator=g) * torch.rand(ROWS, 1, generator=g) * 8
    scores[::4] = (scores[::4] * 2).round() / 2
    return torch.randint(0, VOCAB, (ROWS, 30), generator=g), scores


def seen_of(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ROWS, VOCAB, dtype=torch.bool).scatter(1, input_ids, True)


def same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # -inf where transformers has -inf (assert_close compares non-finite values for equality).
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


CASES = {  # rafale.sampling's function -> transformers' processor, several settings
    "repetition_penalty": (RepetitionPenaltyLogitsProcessor, [0.5, 1.3, 2.0]),
    "temperature": (TemperatureLogitsWarper, [0.3, 0.7, 1.5]),
    "top_k": (TopKLogitsWarper, [1, 5, 50, VOCAB + 10]),
    "top_p": (TopPLogitsWarper, [0.05, 0.5, 0.9, 0.99]),
    "min_p": (MinPLogitsWarper, [0.01, 0.1, 0.5, 1.0]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_processor_equals_transformers(name):
    cls, settings = CASES[name]
    for i, value in enumerate(settings):
        input_ids, scores = random_rows(i)
        ref = cls(value)(input_ids, scores.clone())
        if name == "repetition_penalty":
            ours = sampling.repetition_penalty(scores, seen_of(input_ids), value)
        else:
            ours = getattr(sampling, name)(scores, value)
        same(ours, ref)
        assert not torch.equal(ours, scores) or (name, value) == ("top_k", VOCAB + 10)  # it did something
        assert torch.isfinite(ours).any(dim=1).all()  # every row keeps a token


@pytest.fixture(scope="module")
def tiny_hf():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64)).eval()


CHAINS = [dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
          dict(temperature=1.0, top_k=0, top_p=0.8), dict(temperature=2.0, min_p=0.2, repetition_penalty=0.8),
          dict(temperature=0.5, top_k=3), dict(temperature=0.0, repetition_penalty=1.5)]


@pytest.mark.parametrize("settings", CHAINS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_processor_chain_equals_the_list_transformers_generate_builds(tiny_hf, settings):
    """`process` against `GenerationMixin._get_logits_processor` for the same settings: the same
    processors, in the same order (a different order gives different scores on these rows)."""
    hf_settings = dict(settings, top_k=settings.get("top_k", 0))  # transformers' top_k defaults to 50
    greedy = settings["temperature"] == 0
    if greedy:
        hf_settings.pop("temperature")
    processors = tiny_hf._get_logits_processor(GenerationConfig(do_sample=not greedy, **hf_settings),
                                               input_ids_seq_length=30)
    input_ids, scores = random_rows(7)
    same(sampling.process(scores, SamplingConfig(**settings), seen_of(input_ids)), processors(input_ids, scores))


def make_pair(vocab_size: int) -> tuple[GPTNeoXForCausalLM, Decoder]:
    """(HF GPT-NeoX, rafale Decoder) with the same random weights."""
    cfg = DecoderConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, init_std=0.15)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{hf: getattr(cfg, ours) for ours, hf in GPT_NEOX_CONFIG.items()},
                                          eos_token_id=0, bos_token_id=0)).eval()
    ours = Decoder(cfg).eval()
    ours.load_state_dict(rename(hf.state_dict(), GPT_NEOX))
    return hf, ours


@pytest.fixture(scope="module")
def small_pair():
    return make_pair(1000)


@pytest.fixture(scope="module")
def pair():
    """A pair with the bundled GPT-NeoX tokenizer's vocabulary, for the tests that need text."""
    return make_pair(50304)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(resolve_tokenizer("gpt-neox-20b")))


PROMPTS = ["The king said", "Once upon a time there was a little girl who lived in a village near the forest.",
           "To be", "A", "In the beginning the universe was created. This has made a lot of people very angry"]


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.2),
                                      dict(temperature=1.3)], ids=["all", "temperature"])
def test_sampled_tokens_equal_transformers_generate_seeded_with_the_row_seed(small_pair, settings):
    """One prompt: transformers' generate(do_sample=True) draws from the global generator, ours from the
    row's own; seeded alike, the two sample the same tokens (same processors, order and draws)."""
    hf, ours = small_pair
    ids = random_prompts([18])[0]
    cfg = SamplingConfig(seed=5, **settings)
    out = generate_batch(ours, [ids], N_NEW, sampling=cfg)[0].output_ids
    torch.manual_seed(row_seed(5, 0))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=True, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0,
                          **dict(settings, top_k=settings.get("top_k", 0)))[0, len(ids):].tolist()
    assert out == ref
    assert out != generate_batch(ours, [ids], N_NEW)[0].output_ids  # sampled, not greedy


def random_prompts(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(len(lengths))
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]


def sample_all(model, prompts, batch_size, seed=3):
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=seed)
    return [c.output_ids for c in generate_all(model, prompts, N_NEW, batch_size, sampling=cfg)]


def test_a_rows_samples_depend_only_on_the_seed_and_its_own_prompt(small_pair):
    _, ours = small_pair
    prompts = random_prompts([3, 18, 1, 9, 18])  # most rows left-padded in a batch of all five
    base = sample_all(ours, prompts, batch_size=len(prompts))
    assert sample_all(ours, prompts, batch_size=1) == base
    assert sample_all(ours, prompts, batch_size=2) == base
    other_first = [*random_prompts([40]), *prompts[1:]]  # a longer neighbour: every other row padded more
    changed = sample_all(ours, other_first, batch_size=len(prompts))
    assert changed[0] != base[0] and changed[1:] == base[1:]
    assert all(a != b for a, b in zip(sample_all(ours, prompts, len(prompts), seed=4), base))
    # Two rows with the same prompt at different indices draw from different streams.
    twice = sample_all(ours, [prompts[0], prompts[0]], batch_size=2)
    assert twice[0] == base[0] and twice[1] != twice[0]


@pytest.fixture(scope="module")
def hf_dir(pair, tmp_path_factory):
    """The pair's HF model saved with the bundled GPT-NeoX tokenizer: what `rafale generate --hf` reads."""
    hf, _ = pair
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    (path / "tokenizer.json").write_bytes(resolve_tokenizer("gpt-neox-20b").read_bytes())
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rafale", "generate", *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_same_seed_same_text_in_two_processes(hf_dir, tmp_path, capsys):
    """Two processes, one decoding the prompts 3 at a time and one 1 at a time, print the same sampled
    rows: the library's in this process; plain output prints the same texts after their prompts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    flags = ["--hf", str(hf_dir), "--prompts-file", str(prompts), "--max-new-tokens", "16",
             "--temperature", "0.9", "--top-k", "100", "--seed", "11", "--json"]
    runs = [cli(*flags, "--batch-size", b) for b in ("3", "1")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    rows = [[json.loads(line) for line in r.stdout.splitlines()] for r in runs]
    assert rows[0] == rows[1]
    assert len(rows[0]) == len(PROMPTS) and {r["finish_reason"] for r in rows[0]} <= {"length", "eos"}
    # ... and they are what the library gives in this process.
    model, tokenizer = load_hf(str(hf_dir))
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    cfg = SamplingConfig(temperature=0.9, top_k=100, seed=11)
    expected = list(generate_all(model, ids, 16, 3, eos_token_id=0, sampling=cfg,
                                 decode=lambda t: tokenizer.decode(t, skip_special_tokens=False)))
    assert [r["output_ids"] for r in rows[0]] == [c.output_ids for c in expected]
    assert [r["text"] for r in rows[0]] == [c.text for c in expected]
    assert [r["prompt_ids"] for r in rows[0]] == ids
    # Plain output: each prompt followed by its continuation.
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(PROMPTS) + "\n\n")
    capsys.readouterr()
    assert main(["generate", *[f if f != str(prompts) else str(text) for f in flags[:-1]]]) == 0
    assert capsys.readouterr().out == "".join(p + r["text"] + "\n" for p, r in zip(PROMPTS, rows[0]))


def boundary_stop(tokenizer, ids: list[int]) -> tuple[str, int]:
    """A 4-character string made of the end of one generated token and the start of the next, and the
    number of tokens after which the continuation first contains it."""
    texts = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    for j in range(3, len(ids) - 1):
        left, right = texts[j][len(texts[j - 1]):], texts[j + 1][len(texts[j]):]
        if (texts[j].startswith(texts[j - 1]) and texts[j + 1].startswith(texts[j]) and len(left) >= 2
                and len(right) >= 2 and (left + right).isascii()):
            stop = left[-2:] + right[:2]
            first = next(k for k, t in enumerate(texts) if stop in t)
            if first == j + 1:  # nowhere earlier
                return stop, first
    raise AssertionError(f"no usable token boundary in {texts[-1]!r}")


def test_stop_strings_span_tokens_and_cut_the_text(pair, tokenizer):
    _, ours = pair
    prompts = [tokenizer.encode(p).ids for p in PROMPTS[:3]]
    free = generate_batch(ours, prompts, N_NEW, decode=tokenizer.decode)
    stop, k = boundary_stop(tokenizer, free[1].output_ids)
    assert stop not in tokenizer.decode(free[1].output_ids[k - 1:k])  # no single token holds it
    out = generate_batch(ours, prompts, N_NEW, stop=[stop, "never appears \u2603"], decode=tokenizer.decode)
    assert out[1].finish_reason == "stop"
    assert out[1].output_ids == free[1].output_ids[:k]
    assert out[1].text == free[1].text[:free[1].text.index(stop)]
    for b in (0, 2):  # rows without the stop string are not affected
        assert out[b].output_ids == free[b].output_ids
        assert out[b].finish_reason == ("stop" if stop in free[b].text else "length")
    # The earliest of several stop strings cuts; text in the prompt does not count.
    earlier = free[1].text[2:5]
    out = generate_batch(ours, [prompts[1]], N_NEW, stop=[stop, earlier], decode=tokenizer.decode)[0]
    assert out.finish_reason == "stop" and out.text == free[1].text[:free[1].text.index(earlier)]
    in_prompt = PROMPTS[1][5:12]
    assert in_prompt not in free[1].text
    out = generate_batch(ours, [prompts[1]], N_NEW, stop=[in_prompt], decode=tokenizer.decode)[0]
    assert out.finish_reason == "length" and out.output_ids == free[1].output_ids


def test_finish_reasons_in_one_batch(pair, tokenizer):
    _, ours = pair
    prompts = [tokenizer.encode(p).ids for p in PROMPTS[:3]]
    free = generate_batch(ours, prompts, N_NEW, decode=tokenizer.decode)
    eos = free[0].output_ids[4]
    stop, k = boundary_stop(tokenizer, free[1].output_ids)
    assert eos not in free[1].output_ids[:k] + free[2].output_ids and stop not in free[2].text
    out = generate_batch(ours, prompts, N_NEW, eos_token_id=eos, stop=[stop], decode=tokenizer.decode)
    assert [c.finish_reason for c in out] == ["eos", "stop", "length"]
    end = free[0].output_ids.index(eos) + 1
    assert out[0].output_ids == free[0].output_ids[:end]  # eos included in the ids, not in the text
    assert out[0].text == tokenizer.decode(free[0].output_ids[:end - 1])
    assert out[2].output_ids == free[2].output_ids and out[2].text == free[2].text
    # Greedy rows sample nothing: a batch whose rows all finish stops early.
    short = generate_batch(ours, prompts[:1], N_NEW, eos_token_id=eos)[0]
    assert short.finish_reason == "eos" and len(short.output_ids) == end


def test_stop_strings_read_backslash_escapes(hf_dir, capsys):
    """`--stop '\\n'` is a newline, as `$'\\n'` would be: Python's escapes are read, other text kept."""
    assert stop_strings(["\\n", "END\\t", "a\\\\n", "\u00e9\\n", "\u2603", "\\u2603\\x41"]) == \
        ["\n", "END\t", "a\\n", "\u00e9\n", "\u2603", "\u2603A"]
    flags = ["generate", "--hf", str(hf_dir), "--prompt", PROMPTS[1], "--max-new-tokens", "24", "--json"]
    assert main(flags) == 0
    free = json.loads(capsys.readouterr().out)
    cut = free["text"][4:6]  # two characters of the continuation, passed as \U escapes
    assert main([*flags, "--stop", "".join(f"\\U{ord(c):08x}" for c in cut)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop" and out["text"] == free["text"][:free["text"].index(cut)]


@pytest.mark.parametrize("flags, message", [
    (["--stop", "ends in \\"], "--stop 'ends in \\\\': \\ at end of string; write a backslash as \\\\"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "-3", "--temperature", "1"], "--top-k must be >= 0"),
    (["--min-p", "2", "--temperature", "1"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--top-k", "5"], "--top-k only acts when sampling; add --temperature"),
    (["--stop", ""], "--stop needs a non-empty string"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_flags_are_one_line_errors(flags, message, hf_dir, capsys):
    assert main(["generate", "--hf", str(hf_dir), "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rafale: error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("content, suffix, message", [
    ("", ".txt", "the file holds no prompts"),
    ("\n  \n", ".jsonl", "the file holds no prompts"),
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', ".jsonl", 'line 2: no "prompt" string field'),
    ('{"prompt": "ok"}\nnot json\n', ".jsonl", "line 2: not JSON"),
])
def test_bad_prompts_files_are_one_line_errors(content, suffix, message, hf_dir, tmp_path, capsys):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    assert main(["generate", "--hf", str(hf_dir), "--prompts-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_sampling_config_rules():
    assert not SamplingConfig().do_sample and SamplingConfig(temperature=0.1).do_sample
    with pytest.raises(UserError, match="--top-p, --min-p only act when sampling"):
        SamplingConfig(min_p=0.1, top_p=0.5)
    assert row_seed(0, 1) != row_seed(1, 0) and row_seed(3, 2) == row_seed(3, 2) < 2 ** 32
