"""Config schema, overrides, hashing, and the CLI's one-line errors (exit 2, no traceback)."""

import pytest
import yaml

from rafale.config import Config, apply_overrides, from_dict, load_config, parse_override
from rafale.errors import UserError
from test.conftest import run_cli


def _error(data: dict) -> str:
    with pytest.raises(UserError) as info:
        from_dict(data)
    return str(info.value)


def test_bundled_default_loads_and_overrides_apply():
    cfg = load_config("pythia-tinyshakespeare", ["optim.lr=3e-4", "train.max_duration=500ba",
                                                 "data.train=[a.txt, b.txt]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_duration == "500ba"
    assert cfg.data.train == ["a.txt", "b.txt"]
    assert cfg.model.preset == "pythia-tiny"


def test_unknown_keys_are_all_reported_with_closest_names():
    msg = _error({"optim": {"lrr": 1e-3, "weight_decy": 0.1}, "trian": {"max_duration": "1ep"}})
    assert "optim.lrr (did you mean optim.lr?)" in msg
    assert "optim.weight_decy (did you mean optim.weight_decay?)" in msg
    assert "trian (did you mean train?)" in msg


@pytest.mark.parametrize("data, expected", [
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
    ({"train": {"global_batch_size": 8.5}}, "train.global_batch_size: expected an integer"),
    ({"train": {"precision": "fp8"}}, "train.precision: expected one of"),
    ({"train": {"max_duration": "10 steps"}}, "train.max_duration: expected a Composer time string"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction: must be in [0, 1)"),
    ({"train": {"global_batch_size": 10, "device_microbatch_size": 4}}, "must divide"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"model": "pythia"}, "model: expected a section"),
])
def test_wrong_types_and_values_name_the_key(data, expected):
    assert expected in _error(data)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 3e-4}\n")
    assert load_config(str(path)).optim.lr == pytest.approx(3e-4)


def test_override_syntax():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    for bad in ("optim.lr", "=3", "optim..lr=1", "optim.lr=[1"):
        with pytest.raises(UserError, match="bad override"):
            parse_override(bad)
    with pytest.raises(UserError, match="is not a section"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])


def test_hash_ignores_bookkeeping_but_not_results():
    base = Config()
    same = from_dict({"train": {"eval_interval": "7ba", "save_interval": "9ba", "device_microbatch_size": 4},
                      "run": {"name": "other"}})
    assert same.hash() == base.hash()
    for changed in ({"optim": {"lr": 1e-4}}, {"data": {"max_seq_len": 128}}, {"run": {"seed": 1}},
                    {"train": {"global_batch_size": 64}}, {"model": {"n_layers": 2}}):
        assert from_dict(changed).hash() != base.hash(), changed


def test_cli_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optim": {"lrr": 1e-3}, "train": {"max_duration": 5}}))
    cases = [
        (["train", "-c", str(bad)], "optim.lrr (did you mean optim.lr?)"),
        (["train", "-c", str(bad)], "train.max_duration: expected a string"),
        (["train", "-c", "pythia-tinyshakespear"], "did you mean pythia-tinyshakespeare?"),
        (["train", "-c", "pythia-tinyshakespeare", "optim.lr"], "bad override 'optim.lr'"),
        (["prepare", "-c", "pythia-tinyshakespeare", "data.train=nowhere.txt"], "data.train: no file"),
        (["generate", "--run", str(tmp_path), "--prompt", "hi"], "not a run directory"),
    ]
    for args, expected in cases:
        result = run_cli(*args, home=tmp_path / "home")
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_objective_keys_belong_to_the_preference_pipeline():
    with pytest.raises(UserError, match="train.objective: only the preference pipeline reads it, and "
                                        "data.pipeline is causal_lm; remove it"):
        from_dict({"train": {"objective": "simpo"}})
    plain = from_dict({})
    assert (plain.train.objective, plain.train.beta, plain.train.gamma) == (None, None, None)
    pref = from_dict({"data": {"pipeline": "preference", "train": "pairs.jsonl"}})
    assert (pref.train.objective, pref.train.beta, pref.train.gamma) == ("dpo", 0.1, 0.5)
    simpo = from_dict({"data": {"pipeline": "preference", "train": "pairs.jsonl"},
                       "train": {"objective": "simpo", "beta": 2.0}})
    assert (simpo.train.objective, simpo.train.beta, simpo.train.gamma) == ("simpo", 2.0, 0.5)
    with pytest.raises(UserError, match="train.beta: must be > 0"):
        from_dict({"data": {"pipeline": "preference", "train": "pairs.jsonl"}, "train": {"beta": 0}})
