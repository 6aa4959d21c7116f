"""ExpertLoRA: LoRA on the routed experts of mixture-of-experts blocks, one rank per expert.

For every expert ``e`` of an MoE block and every adapted expert projection ``p`` with frozen
weight ``W_{p,e} [d_out, d_in]`` the adapter learns ``A_{p,e} [r_e, d_in]`` and
``B_{p,e} [d_out, r_e]``; a token routed to ``e`` sees ``W_{p,e} + s B_{p,e} A_{p,e}``, with a
fixed ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``), ``rank`` being the
initial rank. ``s`` does not depend on the current ``r_e``, so growing a rank does not rescale
what an expert has learnt.

Static shapes. Each block stores ``lora_A[p] [E, R, d_in]`` and ``lora_B[p] [E, d_out, R]`` at a
fixed maximum rank ``R = max_rank`` plus a boolean ``rank_mask [E, R]`` buffer; ``r_e`` is the
number of active slots of expert ``e`` (``0``: pruned). The forward multiplies the factors by
the mask, so inactive slots add nothing and get exactly zero gradient. Shapes never change,
so DDP, FSDP2, ``torch.compile`` and the optimizer are unaffected by rank changes
(``lightning_peft.allocation.rank_ops``). The trainable-parameter count reported is the
effective one, ``sum_e r_e * sum_p (d_in_p + d_out_p)``, not the storage.

Two layouts:

* **Fused 3-D experts** (transformers 5.x OLMoE, Qwen2-MoE, Mixtral, ...): ``gate_up_proj
  [E, 2I, H]`` and ``down_proj [E, H, I]`` (or transposed, ``is_transposed``), called as
  ``experts(hidden [N, H], top_k_index [N, K], top_k_weights [N, K])``. ``FusedExpertsLoRA``
  replaces the experts' forward: the ``N*K`` (token, expert) pairs are sorted by expert and every
  projection runs as grouped matmuls over the routed tokens only -- base, ``u = x A_e^T`` and
  ``u B_e^T`` -- in one autograd node (``kernels.experts.ExpertLoRAFunction``) that saves the un-gathered input
  (``N`` rows, not ``N*K``) and ``u``. No per-expert dense ``B_e A_e`` is ever formed (peft's
  ``target_parameters`` builds ``W + s B A`` for all experts every step).
* **Experts as modules** (an ``nn.ModuleList`` of experts built from ``nn.Linear``):
  ``ModuleListExpertsLoRA`` keeps the list (the block still indexes ``experts[i]``) and adds
  each expert's update with a forward hook on its linears, i.e. again only on the tokens the
  block routes to that expert.


Files: ``spec.py`` (``ExpertLoRA``), ``layouts.py`` (layout detection), ``layer.py`` (the
common layer: factors, rank mask, rank changes, merge), ``fused.py`` and ``module_list.py`` (the
two layouts), ``routers.py`` (router discovery for EPnG); the kernels are in
``lightning_peft.adapters.kernels``, the EPnG planner in ``lightning_peft.allocation.epng``.
This package re-exports every name the former single module ``adapters/experts.py`` had, so
``lightning_peft.adapters.experts.ExpertLoRA`` (the class path adapter files record) resolves.
"""

from lightning_peft.adapters.experts.fused import FusedExpertsLoRA
from lightning_peft.adapters.experts.layer import ExpertsLoRALayer, expert_layers
from lightning_peft.adapters.experts.layouts import chosen_paths, expert_linears, fused_layout, linear_shapes
from lightning_peft.adapters.experts.module_list import ModuleListExpertsLoRA
from lightning_peft.adapters.experts.routers import find_router, router_logits
from lightning_peft.adapters.experts.spec import ExpertLoRA
from lightning_peft.adapters.kernels.experts import ExpertLoRAFunction, expert_linear
from lightning_peft.adapters.kernels.grouped import GMM_FAILED, gmm_usable, grouped_mm, grouped_outer, sort_by_expert
from lightning_peft.allocation.epng import plan_prune_grow

_GMM_FAILED = GMM_FAILED  # the former private name (benchmarks/moe_lora.py reads it)

__all__ = [
    "ExpertLoRA",
    "ExpertLoRAFunction",
    "ExpertsLoRALayer",
    "FusedExpertsLoRA",
    "GMM_FAILED",
    "ModuleListExpertsLoRA",
    "chosen_paths",
    "expert_layers",
    "expert_linear",
    "expert_linears",
    "find_router",
    "fused_layout",
    "gmm_usable",
    "grouped_mm",
    "grouped_outer",
    "linear_shapes",
    "plan_prune_grow",
    "router_logits",
    "sort_by_expert",
]

# Files, configs and checkpoints record a spec's class path (``AdapterSpec.to_config``): keep
# writing the public one that files written before this package existed also use, so older
# versions of the package can read new files.
ExpertLoRA.__module__ = __name__
