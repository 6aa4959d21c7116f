"""``BaRACallback``: BaRA's KL term and effective-rank logging in a Lightning run.

``AdapterCallback`` adds it automatically when its adapter contains a ``BaRA`` spec
(``BaRA.training_callbacks``), so the KL to the sparse prior reaches the objective without the
user editing ``training_step``. Add it yourself only when you inject BaRA with
``apply_adapter`` inside a LightningModule.

Why a callback and not an autograd "aux loss" node in the layer's forward: the KL depends only
on the gate parameters, not on the batch, so its gradient is added once per optimizer step in
``on_before_optimizer_step``. Lightning calls that hook after AMP's gradient unscaling and after
all accumulated micro-batches, so the KL is neither shrunk by the fp16 loss scale nor counted
``accumulate_grad_batches`` times, and it runs before gradient clipping. Under DDP the hook runs
after the gradient all-reduce on synchronised parameters, so every rank adds the same KL
gradient and the parameters stay identical (the concrete noise itself may differ per rank: each
process draws from its own RNG stream).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_peft.validation import check_bool


class BaRACallback(Callback):
    """Adds ``kl_weight * KL`` gradients to BaRA's gate logits before every optimizer step and
    logs every step (the logger writes at ``log_every_n_steps``):

    * ``bara/kl``: ``sum over layers KL(Bernoulli(pi) || Bernoulli(prior))`` (unweighted);
    * ``bara/global_rank``, ``bara/joint_rank``: the means over layers of ``sum_k pi_k`` and of
      the joint effective rank ``E_tokens[sum_k pi_k z_local_k]`` over the step's training tokens (see ``lightning_peft.adapters.bara``);
    * with ``log_per_layer``: ``bara/<layer>/global_rank`` and ``bara/<layer>/joint_rank``.

    Values are this process's (rank 0's under DDP for the logger).

    Args:
        log_per_layer: also log each layer's two ranks.
    """

    def __init__(self, log_per_layer: bool = True) -> None:
        check_bool("log_per_layer", log_per_layer)
        self.log_per_layer = log_per_layer
        self.last_kl: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.adapters.bara import bara_layers, reset_rank_stats

        layers = bara_layers(pl_module)
        if not layers:
            raise ValueError("BaRACallback found no BaRA layers: add AdapterCallback(adapter=BaRA(...)) to the Trainer")
        reset_rank_stats(pl_module)
        spec = next(iter(layers.values())).spec
        rank_zero_info(
            f"lightning-peft BaRA: {len(layers)} layers, max_rank {spec.max_rank}, prior {spec.prior}, kl_weight {spec.kl_weight}"
        )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        from lightning_peft.adapters.bara import add_kl_gradients

        self.last_kl = add_kl_gradients(pl_module)
        if trainer.logger is not None:  # logged every step; the logger writes at log_every_n_steps
            pl_module.log_dict(self.metrics(pl_module), on_step=True, on_epoch=False)

    def metrics(self, pl_module: torch.nn.Module) -> dict[str, float]:
        """The logged scalars now; resets the layers' token statistics."""
        from lightning_peft.adapters.bara import effective_ranks, reset_rank_stats

        ranks = effective_ranks(pl_module)
        reset_rank_stats(pl_module)
        out: dict[str, float] = {
            "bara/kl": float(self.last_kl) if self.last_kl is not None else float("nan"),
            "bara/global_rank": sum(r["global_rank"] for r in ranks.values()) / len(ranks),
            "bara/joint_rank": sum(r["joint_rank"] for r in ranks.values()) / len(ranks),
        }
        if self.log_per_layer:
            for name, r in ranks.items():
                out[f"bara/{name}/global_rank"] = r["global_rank"]
                out[f"bara/{name}/joint_rank"] = r["joint_rank"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing to resume: the gates are parameters, the token statistics restart per log
