"""The one ComposerModel: a network (rafale/models/) trained with its pipeline's objective
(rafale/data/pipeline.py).

The network is the only child module, so checkpoints hold `model.<tensor name>`; frozen tensors (a LoRA
run's base, which model.init_from gives again) are left out of the state dict, so a checkpoint holds the
trainable tensors and their optimizer state only.  and Composer's FSDP
wraps it as a whole and its blocks through the network's `fsdp_wrap_fn`. Everything task-specific
(forward, loss, metrics, FLOPs) is the pipeline's; this class only routes Composer's calls to it.
"""

import torch
from composer.models import ComposerModel


class TaskModel(ComposerModel):
    def __init__(self, network: torch.nn.Module, pipeline, meta: dict):
        super().__init__()
        self.model = network
        self.pipeline, self.meta = pipeline, meta  # plain attributes: not modules, not in the state dict
        # Every name of a frozen parameter (tied ones under each name), relative to this module.
        self.frozen = {f"model.{n}" for n, p in network.named_parameters(remove_duplicate=False)
                       if not p.requires_grad}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self.frozen:
            state.pop(prefix + name, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads the trainable tensors; the frozen ones may be absent (they are, in rafale's checkpoints),
        anything else missing or unexpected is an error when `strict`."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in self.frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:8]}, unexpected "
                               f"{result.unexpected_keys[:8]}")
        return result

    def forward(self, batch: dict):
        return self.pipeline.forward(self.model, batch, self.training)

    def loss(self, outputs, batch: dict) -> torch.Tensor:
        return self.pipeline.loss(outputs, batch)

    def eval_forward(self, batch: dict, outputs=None):
        return self.pipeline.eval_forward(self.model, batch, outputs)

    def get_metrics(self, is_train: bool = False) -> dict:
        # No train metrics: Composer would run a second forward pass per batch to compute them.
        return {} if is_train else self.pipeline.metrics(self.meta)

    def update_metric(self, batch: dict, outputs, metric) -> None:
        self.pipeline.update_metric(batch, outputs, metric)

    def flops_per_batch(self, batch: dict) -> float:
        return self.pipeline.flops(self.model, batch)

    def fsdp_wrap_fn(self, module: torch.nn.Module) -> bool:
        # FSDP1 asks the ComposerModel; FSDP2 asks its child (the network's fsdp_wrap_fn). Same answer.
        wrap = getattr(self.model, "fsdp_wrap_fn", None)
        return bool(wrap(module)) if wrap is not None else False

    def activation_checkpointing_fn(self, module: torch.nn.Module) -> bool:
        check = getattr(self.model, "activation_checkpointing_fn", None)
        return bool(check(module)) if check is not None else False
