"""The vocabulary of a decoder trained from scratch follows its tokenizer: the tokenizer's size rounded up
to a multiple of 64, or model.vocab_size; checkpoint imports keep their own size; a run made when the
preset's size was kept still loads at that size; the padding rows are never generated; and a run with a
padded vocabulary trains, generates and exports to transformers with the same logits. Also
train.eval_batches: periodic evaluations on a subset, the last one on the whole split."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rafale.build import build_network, padded_vocab
from rafale.config import from_dict, load_saved_config
from rafale.errors import UserError
from rafale.generate import generate_batch
from rafale.inference import load_run
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.tokenizer_train import train_tokenizer
from test.conftest import REPO, run_cli

TEXT = (REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:40_000]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A 300-token byte-level BPE trained on the text (300 is no multiple of 64), and the text."""
    root = tmp_path_factory.mktemp("vocab")
    (root / "text.txt").write_text(TEXT)
    tok = train_tokenizer([str(root / "text.txt")], 300, out=root / "tokenizer.json")
    return tok, root / "text.txt"


def _config(corpus, **model) -> dict:
    tok, text = corpus
    return {"run": {"name": "vocab", "seed": 1}, "model": {"preset": "pythia-micro", **model},
            "data": {"train": str(text), "tokenizer": str(tok), "max_seq_len": 64, "val_fraction": 0.1},
            "optim": {"lr": 1e-2}, "schedule": {"name": "constant", "warmup": "0ba"},
            "train": {"max_duration": "4ba", "global_batch_size": 4, "device_microbatch_size": 4,
                      "eval_interval": "2ba", "save_interval": "4ba", "eval_batches": 1}}


def _network(cfg, **model):
    config = from_dict(_config(cfg, **model))
    with torch.device("meta"):
        return build_network(config, {"vocab_size": 300})


def test_scratch_decoder_gets_the_tokenizer_size_rounded_up_or_model_vocab_size(corpus):
    assert padded_vocab(300) == 320 and padded_vocab(50277) == 50304 and padded_vocab(49152) == 49152
    assert _network(corpus).cfg.vocab_size == 320
    assert _network(corpus).embed_out.weight.shape == (320, 64)
    assert _network(corpus, vocab_size=300).cfg.vocab_size == 300
    assert _network(corpus, vocab_size=1000).cfg.vocab_size == 1000
    with pytest.raises(UserError, match=r"model.vocab_size \(299\) is smaller than the tokenizer's 300 tokens"):
        _network(corpus, vocab_size=299)


def test_encoders_and_imports_keep_their_size(corpus, tmp_path):
    mlm = from_dict({"model": {"preset": "bert-micro"}, "data": {"pipeline": "mlm", "max_seq_len": 64}})
    with torch.device("meta"):
        assert build_network(mlm, {"vocab_size": 30522, "special": {"pad": ["[PAD]", 0]}}).cfg.vocab_size == 30522
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({
        "model_type": "gpt_neox", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64}))
    from safetensors.torch import save_file

    from rafale.models.gpt_neox import FAMILY
    net = Decoder(FAMILY.config_from_hf(json.loads((hf_dir / "config.json").read_text())))
    save_file({k: v for name, t in net.state_dict().items()
               for k, v in FAMILY.to_hf(net.cfg, "causal_lm", name, t).items()}, str(hf_dir / "model.safetensors"))
    assert _network(corpus, init_from=str(hf_dir)).cfg.vocab_size == 512
    with pytest.raises(UserError, match="model.vocab_size: the sizes of an init_from model come from its config.json"):
        _network(corpus, init_from=str(hf_dir), vocab_size=320)


def test_a_run_saved_before_the_rule_loads_at_its_preset_size(corpus, tmp_path):
    saved = _config(corpus)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))  # no model.vocab_size: an older run's
    old = load_saved_config(tmp_path / "config.yaml")
    with torch.device("meta"):
        assert build_network(old, {"vocab_size": 300}).cfg.vocab_size == 50304
    # And today's config of that run is another run: it never resumes the older checkpoint.
    assert from_dict(saved).hash() != old.hash()


def test_padding_rows_are_never_generated():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()
    with torch.no_grad():
        model.embed_out.weight[:100] = 0.0  # every real token's logit is 0; the padding rows' are not
        model.embed_out.weight[100:] *= 50
    prompt = [[1, 2, 3]]
    free = generate_batch(model, prompt, 16)[0].output_ids
    assert max(free) >= 100  # without the limit the padding rows win
    for sampling in (None, dict(do_sample=True)):
        from rafale.sampling import GREEDY, SamplingConfig

        cfg = GREEDY if sampling is None else SamplingConfig(temperature=1.0, seed=3)
        ids = generate_batch(model, prompt, 16, sampling=cfg, n_tokens=100)[0].output_ids
        assert len(ids) == 16 and max(ids) < 100


def test_padded_run_trains_generates_exports_and_evaluates_the_whole_split_last(corpus, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(corpus)))
    home = tmp_path / "home"
    done = run_cli("train", "-c", str(tmp_path / "run.yaml"), home=home)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (home / "runs").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["vocab_size"] == 320

    # train.eval_batches: the periodic evaluation reads one batch, the last one the whole split.
    lines = [line for line in done.stdout.splitlines() if line.startswith(("eval step", "done step"))]
    assert lines[0].startswith("eval step 2") and "(1 of " in lines[0], done.stdout
    assert lines[-1].startswith("done step 4") and "(full split)" in lines[-1], done.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["metrics/eval/LanguageCrossEntropy"] for r in rows if "metrics/eval/LanguageCrossEntropy" in r]
    full = run_cli("eval", "--run", str(run_dir), "--json", home=home)
    assert full.returncode == 0, full.stderr
    assert json.loads(full.stdout)["metrics"]["metrics/eval/LanguageCrossEntropy"] == pytest.approx(evals[-1], rel=1e-6)

    gen = run_cli("generate", "--run", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--json",
                  home=home)
    assert gen.returncode == 0, gen.stderr
    assert max(json.loads(gen.stdout)["output_ids"]) < 300

    out = tmp_path / "hf"
    exported = run_cli("export", "--run", str(run_dir), "--to-hf", str(out), home=home)
    assert exported.returncode == 0, exported.stderr
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, tokenizer, _ = load_run(run_dir)
    assert hf.config.vocab_size == 320
    x = torch.tensor([tokenizer.encode("ROMEO: what light").ids])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_too_small_vocab_size_is_one_line_exit_2(corpus, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(corpus, vocab_size=200)))
    bad = run_cli("train", "-c", str(tmp_path / "run.yaml"), home=tmp_path / "home")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "model.vocab_size (200)" in bad.stderr, bad.stderr
    assert not (tmp_path / "home" / "runs").exists()


def test_the_bundled_default_validation_split_has_3_105_characters_per_target_token(rafale_home):
    """The README's conversion of the default run's loss per token into loss per character."""
    import numpy as np
    from tokenizers import Tokenizer

    from rafale.build import build_data
    from rafale.config import load_config
    from rafale.paths import resolve_tokenizer

    cfg = load_config("pythia-tinyshakespeare", [])
    val = np.asarray(build_data(cfg).val)
    tok = Tokenizer.from_file(str(resolve_tokenizer(cfg.data.tokenizer)))
    targets = val[:, 1:]  # each block's first token is no target
    chars = sum(len(tok.decode([int(t) for t in row])) for row in targets)
    assert round(chars / targets.size, 3) == 3.105
