"""What a data pipeline is, and the registry of pipelines by name.

A pipeline is one module (causal_lm.py, mlm.py, classification.py, or a user's file named by import
path in `data.pipeline`) holding one `Pipeline` subclass: everything rafale knows about one kind of
training data and its objective.

    Section        its config section: the data.* keys it reads (a DataSection subclass)
    task           the network it trains: causal_lm (a decoder), mlm or classification (an encoder)
    prepare()      the cache entry for its sources (on cache.py's shared skeleton) and report()
    dataset() / collator()      the torch side of a split
    callbacks()    Composer callbacks its objective needs in training (preference.py's reference pass)
    forward / loss / eval_forward / metrics / update_metric / flops     the objective, which the one
                   ComposerModel (rafale/task_model.py) calls
    loss_tokens()  how many targets of a batch carry loss: a step's loss is the mean over the step's
                   loss-bearing targets whatever the micro-batch split (data/loaders.py, train.py)
    check_network()             refuses, before training, a network the pipeline cannot drive
    progress, eval_extras()     what the progress line and `rafale eval` report
    export_tokens()             the special tokens `rafale export` writes

train, eval, export, generate and the CLI talk to pipelines through this class only, never by name.
Module level imports nothing heavy: config validation reads the Section without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from rafale.errors import UserError
from rafale.schema import results

# Label value that carries no loss: PyTorch's cross_entropy default, which the objectives pass on.
IGNORE_INDEX = -100

BUILTIN = {
    "causal_lm": "rafale.data.causal_lm:CausalLM",
    "mlm": "rafale.data.mlm:MaskedLM",
    "classification": "rafale.data.classification:Classification",
    "chat": "rafale.data.sft:ChatSFT",
    "preference": "rafale.data.preference:Preference",
}


@dataclass
class DataSection:
    """The data keys every pipeline reads."""
    mixes: ClassVar[bool] = False  # whether data.train may be a {path, weight} mixture (data/mixture.py)
    pipeline: str = results("causal_lm")  # a registered name, or an import path to a Pipeline subclass
    # a file, a directory, a list of them, or (pipelines that mix) a list of {path, weight, ...}
    train: Union[str, list[Union[str, dict]]] = results("tinyshakespeare/input.txt")
    # explicit validation sources; else the last val_fraction of the training data
    val: Union[str, list[str], None] = results(None)
    val_fraction: float = results(0.05)
    tokenizer: str = results("gpt-neox-20b")
    max_seq_len: int = results(256)

    def problems(self) -> list[str]:
        """Checks beyond types, as messages naming the key; subclasses add their own."""
        problems = []
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_seq_len <= 0:
            problems.append(f"data.max_seq_len: must be > 0, got {self.max_seq_len}")
        from rafale.data import mixture

        return problems + mixture.problems(self.train, self, self.mixes)


class Pipeline:
    name: ClassVar[str]
    Section: ClassVar[type[DataSection]] = DataSection
    task: ClassVar[str] = "causal_lm"
    generates: ClassVar[bool] = False  # its model continues text (`rafale generate`)
    # The progress line's validation figure: (label, eval metric name).
    progress: ClassVar[tuple[str, str]] = ("val", "LanguageCrossEntropy")
    # The train.* objective keys it reads (objective, beta, gamma) with their defaults; config.py
    # refuses them under a pipeline that does not declare them.
    train_keys: ClassVar[dict] = {}

    def __init__(self, data: DataSection, train=None):
        self.data = data
        self.train = train  # the train section (None: only the data is needed, as in `rafale prepare`)

    # --- data ---
    def prepare(self):
        """The PreparedData (cache.py) of this section's sources: found in the cache or built now."""
        raise NotImplementedError

    def report(self, prepared) -> str:
        """What `rafale prepare` prints after the entry's path: counts of what is in it."""
        s = prepared.meta["stats"]
        line = (f"{s['documents']:,} documents, {s['tokens']:,} tokens, {s['train_blocks']:,} train + "
                f"{s['val_blocks']:,} val blocks of {self.data.max_seq_len} tokens")
        if "mixture" in prepared.meta:
            from rafale.data import mixture

            line += "\n  " + mixture.report(prepared.meta).replace("\n", "\n  ")
        return line

    def model_meta(self) -> dict:
        """What building the network needs from the data (vocab_size, special tokens, labels), for
        generate / eval / export; by default the cache entry's meta."""
        return self.prepare().meta

    def dataset(self, rows):
        from rafale.data.loaders import BlockDataset

        return BlockDataset(rows)

    def collator(self, meta: dict, seed: int):
        """The DataLoader's collate_fn (None: stack the rows); one with a `bind(sampler)` method is bound
        to each loader's sampler (its epoch reseeds random masking)."""
        return None

    def callbacks(self, run_dir) -> list:
        """Composer callbacks the objective needs in training (run_dir None: a DEBUG=1 run)."""
        return []

    # --- the objective (see rafale/task_model.py) ---
    def check_network(self, network) -> None:
        """A UserError when this section's settings need something `network` lacks."""

    def forward(self, network, batch: dict, training: bool):
        raise NotImplementedError

    def loss_tokens(self, batch: dict) -> int | None:
        """The number of targets in `batch` that `loss` averages over; None (the default): one per sample,
        for a loss averaged over the samples. Composer weighs each micro-batch's loss by its share of the
        step's count (accumulate_train_batch_on_tokens, data/loaders.py), so the step's loss is the mean
        over all of them however the batch is split. `loss` must then be that mean (0, not NaN, when the
        count is 0)."""
        return None

    def loss(self, outputs, batch: dict):
        raise NotImplementedError

    def eval_forward(self, network, batch: dict, outputs=None):
        return outputs if outputs is not None else self.forward(network, batch, training=False)

    def metrics(self, meta: dict) -> dict:
        """Eval metrics by name (torchmetrics); there are no train metrics: Composer would run a second
        forward pass per batch to compute them."""
        return {}

    def update_metric(self, batch: dict, outputs, metric) -> None:
        raise NotImplementedError

    def flops(self, network, batch: dict) -> float:
        """Training FLOPs of one batch, for MFU: 6 per parameter per token unless a pipeline knows better."""
        n = sum(p.numel() for p in network.parameters())
        return float(6 * n * batch["input_ids"].numel())

    def sequence_flops(self, cfg, counts: dict, seq: int) -> float:
        """What `flops` gives for a batch of one seq-token sequence, from the network config and its
        parameter counts (rafale/models/shapes.py) instead of the network: `rafale config show` builds
        none. A pipeline that overrides `flops` overrides this too, or config show builds the network."""
        return float(6 * counts["total"] * seq)

    def network_meta(self) -> dict:
        """The part of model_meta() that sizes the network (vocab_size; encoders: special tokens, labels),
        read as cheaply as the pipeline can: `rafale config show` prepares no data. By default model_meta()."""
        return self.model_meta()

    # --- reports ---
    def eval_extras(self, meta: dict, device) -> list:
        """Accumulators `rafale eval` reports besides the metrics: objects with update(batch, outputs)
        and result() -> (name, JSON-able value)."""
        return []

    def export_tokens(self, meta: dict, tokenizer, tokenizer_path) -> dict:
        """{"config": {bos_token_id, eos_token_id}, "tokenizer_config": {role_token: token}} for export."""
        return {"config": {}, "tokenizer_config": {}}


def pipeline_class(spec: str, key: str = "data.pipeline") -> type[Pipeline]:
    """The Pipeline subclass a registered name or an import path names."""
    from rafale import components

    path = BUILTIN.get(spec)
    if path is None:
        if ":" not in spec and "." not in spec:
            raise UserError(f"{key}: unknown pipeline {spec!r}; registered: {', '.join(BUILTIN)}, or give an "
                            f"import path to a Pipeline subclass (package.module:Name or ./file.py:Name)")
        path = components.normalise(spec, key)
    cls = components.load(path, key)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise UserError(f"{key}: {spec} is not a rafale.data.pipeline.Pipeline subclass")
    return cls


def other_pipelines_reading(key: str, current: str) -> list[str]:
    """The registered pipelines (besides `current`) whose section has `key`: for the hint on a data key
    set for another pipeline."""
    import dataclasses

    found = []
    for name in BUILTIN:
        if name != current and key in {f.name for f in dataclasses.fields(pipeline_class(name).Section)}:
            found.append(name)
    return found
