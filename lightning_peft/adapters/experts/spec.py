"""``ExpertLoRA``: the spec (configuration, checks before anything changes, ``wrap``)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from lightning_peft.adapters.base import AdapterSpec, check_positive
from lightning_peft.adapters.experts.fused import FusedExpertsLoRA
from lightning_peft.adapters.experts.layouts import chosen_paths, expert_linears, fused_layout, linear_shapes
from lightning_peft.adapters.experts.module_list import ModuleListExpertsLoRA
from lightning_peft.validation import InvalidArgumentError, check_bool, check_choice, check_str_list


class ExpertLoRA(AdapterSpec):
    """LoRA on every routed expert of MoE blocks, with a rank per expert.

    Combine with ``LoRA`` on attention in one call: ``apply_adapter(model, [ExpertLoRA(...),
    LoRA(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])])``. Ranks change during
    training with ``ExpertImportanceCallback`` (EPnG prune-and-grow) or ``layer.set_ranks``.

    Args:
        rank: initial rank ``r0`` of every expert.
        alpha: scaling numerator; the update is scaled by the fixed ``alpha / rank``.
        max_rank: storage rank ``R >= rank``: the largest rank an expert can grow to. Default
            ``rank`` (no growth); EPnG needs headroom, e.g. ``2 * rank``. Compute and optimizer
            state scale with ``R``; the trainable count reported is the effective one.
        target_modules: the experts containers (default ``["experts"]``: every module whose
            name ends in ``experts``). Fused 3-D experts modules and ``nn.ModuleList``\\ s of
            experts built from ``nn.Linear`` are supported.
        exclude_modules: names never adapted.
        module_path: only inject below this submodule.
        projections: which expert matrices to adapt: fused names (``"gate_up_proj"``,
            ``"up_proj"``, ``"down_proj"``) or linear names inside an expert (``"w1"``,
            ``"gate_proj"``...). Default: all of them.
        use_rslora: scale by ``alpha / sqrt(rank)``.
        init: ``"kaiming"`` or ``"gaussian"`` for ``A``; ``B`` starts at zero.
        recompute_input: recompute projection inputs in backward from their producer's saved
            tensors instead of saving them.
    """

    kind = "expert_lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        max_rank: int | None = None,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
        projections: list[str] | None = None,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        recompute_input: bool = True,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("rank", rank, int)
        check_positive("alpha", alpha, float)
        if max_rank is not None:
            check_positive("max_rank", max_rank, int)
            if max_rank < rank:
                raise InvalidArgumentError(
                    "max_rank", f"max_rank={max_rank} is below rank={rank}; use max_rank >= rank (e.g. 2 * rank for EPnG)"
                )
        check_choice("init", init, ("kaiming", "gaussian"))
        if projections is not None and isinstance(projections, (list, tuple)) and len(projections) == 0:
            raise InvalidArgumentError(
                "projections", "projections must not be an empty list: name at least one expert matrix, or use None for all of them"
            )
        check_str_list("projections", projections, allow_none=True)
        check_bool("use_rslora", use_rslora)
        check_bool("recompute_input", recompute_input)
        self.rank, self.alpha, self.max_rank = rank, float(alpha), max_rank
        self.projections = None if projections is None else list(projections)
        self.use_rslora, self.init, self.recompute_input = use_rslora, init, recompute_input

    def default_targets(self) -> list[str]:
        return ["experts"]

    def supports(self, module: nn.Module) -> bool:
        return fused_layout(module) is not None or expert_linears(module) is not None

    def check(self, name: str, module: nn.Module) -> None:
        layout = fused_layout(module)
        if layout is not None:
            if layout["expert_parallel"]:
                raise ValueError(f"{name!r} runs with expert parallelism, which ExpertLoRA does not support")
            available = list(layout["shapes"])
            chosen = [s for p, s in layout["shapes"].items() if self.projections is None or p in self.projections]
        else:
            linears = expert_linears(module)
            if linears is None:
                raise TypeError(
                    f"ExpertLoRA cannot adapt {name!r} ({type(module).__name__}): expected a fused experts module "
                    "(3-D gate_up_proj/up_proj and down_proj, num_experts) or an nn.ModuleList of identical experts "
                    "built from nn.Linear"
                )
            available = list(linears) + [p for p in linears.values() if p]
            chosen = list(linear_shapes(module[0], chosen_paths(linears, self.projections)).values())
        unknown = [p for p in self.projections or [] if p not in available]
        if unknown:
            raise ValueError(f"projections {unknown} are not expert matrices of {name!r}; available: {available}")
        if not chosen:
            raise ValueError(f"none of projections={self.projections} is adapted in {name!r}; available: {available}")
        limit = min(min(d_out, d_in) for d_out, d_in in chosen)
        max_rank = self.max_rank or self.rank
        if max_rank > limit:
            raise ValueError(
                f"max_rank {max_rank} (rank {self.rank}) is larger than the expert matrices of {name!r} allow "
                f"(min(d_in, d_out) = {limit}); use max_rank <= {limit}"
            )

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        layer = FusedExpertsLoRA if fused_layout(module) is not None else ModuleListExpertsLoRA
        max_rank = self.max_rank or self.rank
        return layer(
            module,
            projections=self.projections,
            rank=self.rank,
            alpha=self.alpha,
            max_rank=max_rank,  # type: ignore[arg-type]
            use_rslora=self.use_rslora,
            init=self.init,
            recompute_input=self.recompute_input,
            spec=self,
        )
