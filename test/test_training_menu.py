"""The training menu: schedules against closed forms, weight-decay grouping, optimizers, the
checkpoint-loading modes, activation checkpointing, and combinations rejected before start."""

import math

import pytest
import torch
from composer.core import State, Timestamp
from composer.devices import DeviceCPU

from rafale import build, train
from rafale.config import from_dict
from rafale.errors import UserError
from rafale.optim import Lion
from test.conftest import REPO

TOTAL = 100


def _lr_factors(scheduler, steps=range(0, TOTAL + 1)) -> list[float]:
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="s", device=DeviceCPU(),
                  max_duration=f"{TOTAL}ba")
    out = []
    for t in steps:
        state.timestamp = Timestamp(batch=t)
        out.append(scheduler(state))
    return out


def _schedule(**kw):
    return build.build_scheduler(from_dict({"schedule": kw, "train": {"max_duration": f"{TOTAL}ba"}}))


@pytest.mark.parametrize("shape, curve", [
    ("linear", lambda x: 1 - 0.9 * x),
    ("cosine", lambda x: 1 - 0.9 * (1 - math.cos(math.pi * x)) / 2),
    ("sqrt", lambda x: 1 - 0.9 * math.sqrt(x)),
])
def test_wsd_warms_up_holds_then_decays(shape, curve):
    got = _lr_factors(_schedule(name="wsd", warmup="10ba", decay="0.3dur", decay_shape=shape, min_lr_ratio=0.1))
    for t, f in enumerate(got):
        if t < 10:
            expected = t / 10
        elif t < 70:
            expected = 1.0
        else:
            expected = curve((t - 70) / 30)
        assert f == pytest.approx(expected, abs=1e-12), (t, f, expected)


def test_inverse_sqrt_cosine_linear_constant_closed_forms():
    inv = _lr_factors(_schedule(name="inverse_sqrt", warmup="16ba"))
    assert inv[8] == pytest.approx(0.5) and inv[16] == pytest.approx(1.0)
    assert inv[64] == pytest.approx(math.sqrt(16 / 64)) and inv[100] == pytest.approx(0.4)
    cos = _lr_factors(_schedule(name="cosine", warmup="10ba", min_lr_ratio=0.1))
    assert cos[55] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert cos[100] == pytest.approx(0.1)
    lin = _lr_factors(_schedule(name="linear", warmup="0ba", min_lr_ratio=0.0))
    assert lin[25] == pytest.approx(0.75) and lin[100] == pytest.approx(0.0)
    const = _lr_factors(_schedule(name="constant", warmup="20ba"))
    assert const[10] == pytest.approx(0.5) and const[20] == const[99] == pytest.approx(1.0)


def _tiny_model():
    from test.conftest import causal_lm as build_model

    return build_model("pythia-micro", overrides={"n_layers": 1})


@pytest.mark.parametrize("no_decay, undecayed", [
    ([], set()),
    (["norm", "bias"], {"norm", "bias"}),
    (["norm", "bias", "embedding"], {"norm", "bias", "embedding"}),
])
def test_weight_decay_grouping(no_decay, undecayed):
    model = _tiny_model()
    decayed, skipped = build.param_groups(model, 0.1, no_decay)
    names = {id(p): n for n, p in model.named_parameters()}

    def kind(name):
        if "norm" in name or "ln" in name.split(".")[-2]:
            return "norm"
        if name.endswith("bias"):
            return "bias"
        if "embed_in" in name:
            return "embedding"
        return "matrix"

    assert decayed["weight_decay"] == 0.1 and skipped["weight_decay"] == 0.0
    assert {kind(names[id(p)]) for p in skipped["params"]} == undecayed
    assert "matrix" in {kind(names[id(p)]) for p in decayed["params"]}
    assert len(decayed["params"]) + len(skipped["params"]) == len(list(model.parameters()))


def test_lion_matches_its_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -1.0, 0.0])
    opt.step()
    # m0 = 0: update = sign(0.1 * g); decay first: p * (1 - 0.1 * 0.5)
    assert torch.allclose(p.data, torch.tensor([1.0, -2.0, 3.0]) * 0.95 - 0.1 * torch.tensor([1.0, -1.0, 0.0]))
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.5, -1.0, 0.0]))


@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("decoupled_adamw", "DecoupledAdamW"),
                                       ("sgd", "DecoupledSGDW"), ("lion", "Lion")])
def test_optimizer_choice(name, cls):
    opt = build.build_optimizer(from_dict({"optim": {"name": name}}), _tiny_model())
    assert type(opt).__name__ == cls


def test_invalid_combinations_are_rejected_before_start():
    with pytest.raises(UserError, match="amp_bf16 needs a GPU"):
        train.resolve_precision("amp_bf16")
    with pytest.raises(UserError, match="mixed_precision needs strategy fsdp or hsdp"):
        train.build_parallelism(from_dict({"train": {"parallelism": {"mixed_precision": "PURE"}}}), _tiny_model())
    with pytest.raises(UserError, match="activation_cpu_offload needs strategy fsdp"):
        train.build_parallelism(from_dict({"train": {"parallelism": {"activation_cpu_offload": True}}}), _tiny_model())
    with pytest.raises(UserError, match="hsdp needs GPUs"):  # CPU here; on GPUs the replicas check follows
        train.build_parallelism(from_dict({"train": {"parallelism": {"strategy": "hsdp", "replicas": 2}}}),
                                _tiny_model())
    with pytest.raises(UserError, match="schedule.decay"):
        from_dict({"schedule": {"name": "wsd", "decay": "100ba"}, "train": {"max_duration": "1000000tok"}})
    with pytest.raises(UserError, match="optim.no_decay"):
        from_dict({"optim": {"no_decay": ["norms"]}})
    with pytest.raises(UserError, match="auto .* works only with FSDP1 on GPUs"):
        from_dict({"train": {"device_microbatch_size": "auto"}})


def test_a_run_refused_before_start_leaves_no_run_directory(rafale_home, tmp_path):
    from test.conftest import run_cli
    import yaml

    path = tmp_path / "hsdp.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, max_duration="2ba").to_dict()))
    result = run_cli("train", "-c", str(path), "train.parallelism.strategy=hsdp", home=rafale_home)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rafale: error: train.parallelism.strategy: hsdp needs GPUs (torch's FSDP2 cannot run HSDP on CPU "
        "processes); use fsdp or ddp here"]
    assert not (rafale_home / "runs").exists()


def test_activation_checkpointing_recomputes_blocks_with_identical_gradients():
    torch.manual_seed(0)
    plain = _tiny_model()
    ckpt = _tiny_model()
    ckpt.load_state_dict(plain.state_dict())
    train.build_parallelism(from_dict({"train": {"parallelism": {"activation_checkpointing": True}}}), ckpt)
    assert any(type(m).__name__ == "CheckpointWrapper" for m in ckpt.modules())
    batch = {"input_ids": torch.randint(0, 1000, (2, 16))}
    grads = []
    for model in (plain, ckpt):
        model.loss(model(batch), batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _config(tmp_path, **train_keys):
    text = tmp_path / "t.txt"
    if not text.exists():
        text.write_text((REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:20_000])
    return from_dict({"run": {"name": "menu", "seed": 1}, "model": {"preset": "pythia-micro", "n_layers": 1},
                      "data": {"train": str(text), "max_seq_len": 32, "val_fraction": 0.0},
                      "schedule": {"warmup": "0ba"},
                      "train": {"global_batch_size": 4, "device_microbatch_size": 4, "save_interval": "3ba",
                                **train_keys}})


def test_checkpoint_loading_modes_and_keep_last(rafale_home, tmp_path):
    source = train.train(_config(tmp_path, max_duration="6ba", keep_checkpoints=1))
    ckpts = sorted(p.name for p in (source / "checkpoints").glob("ep*"))
    assert ckpts == ["ep0-ba6-rank0.pt"]  # keep_checkpoints=1 removed ba3
    from rafale.checkpoints import read_model_state
    from rafale.runs import Run

    trained = read_model_state(Run.open(source).require_checkpoint())

    def start(mode):
        cfg = _config(tmp_path, max_duration="4ba", load_from=str(source), load_mode=mode)
        data = build.build_data(cfg)
        model = build.build_model(cfg, data.meta)
        trainer = train.build_trainer(cfg, model, data, rafale_home / f"runs/{mode}")
        return trainer

    for mode in ("weights", "weights_optimizer", "full"):
        trainer = start(mode)
        state = trainer.state
        assert all(torch.equal(v, trained[k]) for k, v in state.model.state_dict().items()), mode
        moments = [s for s in state.optimizers[0].state.values() if "exp_avg" in s]
        assert bool(moments) == (mode != "weights"), mode  # weights only: a fresh optimizer
        assert int(state.timestamp.batch) == (6 if mode == "full" else 0), mode  # full: resumes its time
        trainer.close()


def test_a_diverging_run_stops_with_a_clear_message(rafale_home, tmp_path):
    from test.conftest import run_cli
    import yaml

    cfg = _config(tmp_path, max_duration="6ba")
    d = cfg.to_dict()
    d["optim"]["lr"] = 1e30
    d["train"]["clip_norm"] = None
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(d))
    result = run_cli("train", "-c", str(path), home=rafale_home)
    assert result.returncode == 1, result.stderr
    assert "rafale: diverged: the training loss is nan" in result.stderr
    (run_dir,) = (rafale_home / "runs").iterdir()
    assert '"status": "failed"' in (run_dir / "status.json").read_text()


def test_compiled_training_matches_eager(rafale_home, tmp_path):
    import torch._dynamo

    losses = {}
    for compile in (False, True):
        cfg = _config(tmp_path, max_duration="3ba", compile=compile)
        data = build.build_data(cfg)
        torch.manual_seed(0)
        model = build.build_model(cfg, data.meta)
        history = train._LossHistory()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # reset() keeps the counts of graphs earlier tests compiled
        trainer = train.build_trainer(cfg, model, data, run_dir=None, extra_callbacks=[history])
        trainer.fit()
        trainer.close()
        losses[compile] = history.losses
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compile, graphs  # torch.compile traced the model only when asked
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
