"""Rank allocation during training: EPnG for MoE experts, and AdaLoRA's schedule.

``ExpertImportanceCallback`` (EPnG, "Expert Prune-and-Grow")
    Hooks every MoE router next to an ``ExpertLoRA`` layer and keeps, per layer ``l`` and expert
    ``e``, an exponential moving average of the router's softmax probability::

        I[l, e] <- decay * I[l, e] + (1 - decay) * mean_{tokens of the step} softmax(logits)[e]

    (full softmax, not only the top-k; the token sums are all-reduced across processes first, so
    every process holds the same ``I`` and takes the same decisions). After ``warmup_steps``,
    every ``interval`` optimizer steps it prunes the lowest-importance ``prune_fraction`` of the
    active experts (rank 0: factors and optimizer moments zeroed) and grows the top
    ``grow_fraction`` by rank increments whose new ``A`` rows are orthogonal to the existing ones
    and whose new ``B`` columns are zero -- outputs are unchanged at the moment of growth -- never
    exceeding the initial parameter budget ``sum_e r_e (d_in + d_out)``.

``AdaLoRACallback``
    Drives ``AdaLoRA`` layers every step (importance EMAs, orthogonality regulariser, budget
    schedule). ``AdapterCallback`` adds it automatically when its adapter contains an
    ``AdaLoRA`` spec, so AdaLoRA ranks always change; add it yourself only when you inject
    adapters without ``AdapterCallback``.

Both keep their state in checkpoints (``state_dict``) and restore it exactly on resume. Rank
changes happen at the start of a training batch, before any forward, so a checkpoint written
at the end of step ``t`` and the uninterrupted run take the same decisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_peft.adapters.experts.layer import ExpertsLoRALayer, expert_layers
from lightning_peft.adapters.experts.routers import find_router, router_logits
from lightning_peft.allocation.epng import plan_prune_grow
from lightning_peft.allocation.rank_ops import check_budget, effective_parameters, slot_generator
from lightning_peft.validation import check_bool, check_choice, check_float, check_int, check_str, check_str_list


def _fraction(name: str, value: float) -> None:
    check_float(name, value, 0.0, 1.0, high_open=True)


class ExpertImportanceCallback(Callback):
    """EPnG: importance-driven prune-and-grow of per-expert LoRA ranks (see module docstring).

    Needs ``ExpertLoRA`` layers in the model (``AdapterCallback(adapter=[ExpertLoRA(rank=8,
    max_rank=16), ...])``); ``max_rank > rank`` leaves room to grow.

    Args:
        prune_fraction: share of the active experts pruned per cycle (lowest importance).
        grow_fraction: share of the active experts grown per cycle (highest importance).
        warmup_steps: optimizer steps before the first cycle (routing is unstable early).
        interval: optimizer steps between cycles.
        decay: EMA factor ``lambda`` of the importance statistic.
        scope: rank experts across all layers (``"global"``; capacity can move between layers)
            or within each layer (``"layer"``; each layer keeps its own budget).
        min_active_fraction: never prune a layer below this share of its experts.
        router_names: names of the router next to each ``experts`` module (default
            ``["gate", "router"]``).
        seed: seed of the orthogonal growth rows (same on every process).
        log_per_expert: also log every expert's importance and rank as scalars.
        output_dir: where the heatmap PNG and the JSON history go at the end of ``fit``
            (default: the trainer's log dir); ``None`` and no log dir: the working directory.
        heatmap: write ``epng_heatmap.png`` (needs matplotlib).
    """

    def __init__(
        self,
        prune_fraction: float = 0.2,
        grow_fraction: float = 0.2,
        warmup_steps: int = 50,
        interval: int = 50,
        decay: float = 0.9,
        scope: Literal["global", "layer"] = "global",
        min_active_fraction: float = 0.25,
        router_names: list[str] | None = None,
        seed: int = 0,
        log_per_expert: bool = False,
        output_dir: str | None = None,
        heatmap: bool = True,
    ) -> None:
        _fraction("prune_fraction", prune_fraction)
        _fraction("grow_fraction", grow_fraction)
        _fraction("decay", decay)
        check_float("min_active_fraction", min_active_fraction, 0.0, 1.0)
        check_int("warmup_steps", warmup_steps, low=0)
        check_int("interval", interval, low=1)
        check_choice("scope", scope, ("global", "layer"))
        check_str_list("router_names", router_names, allow_none=True)
        check_int("seed", seed)
        check_bool("log_per_expert", log_per_expert)
        check_str("output_dir", output_dir, allow_none=True)
        check_bool("heatmap", heatmap)
        self.prune_fraction, self.grow_fraction = float(prune_fraction), float(grow_fraction)
        self.warmup_steps, self.interval, self.decay, self.scope = warmup_steps, interval, float(decay), scope
        self.min_active_fraction = float(min_active_fraction)
        self.router_names = list(router_names or ["gate", "router"])
        self.seed, self.log_per_expert, self.output_dir, self.heatmap = seed, log_per_expert, output_dir, heatmap
        # state (checkpointed)
        self.layer_names: list[str] = []
        self.importance: list[torch.Tensor] = []  # per layer [E] float64, CPU
        self.initial_budget = 0
        self.layer_budgets: list[int] = []
        self.steps = 0  # optimizer steps with statistics
        self.last_decision_step = -1
        self.history: list[dict[str, Any]] = []
        # runtime
        self._layers: list[ExpertsLoRALayer] = []
        self._routers: list[str] = []
        self._handles: list[Any] = []
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._collecting = False
        self._loaded: dict[str, Any] | None = None
        self.heatmap_path: Path | None = None

    # --- setup -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here (not in setup) every layer is injected and model, optimizer and callback state are restored
        layers = expert_layers(pl_module)
        if not layers:
            raise ValueError(
                "ExpertImportanceCallback found no ExpertLoRA layers: add AdapterCallback(adapter=[ExpertLoRA(...), ...]) "
                "to the Trainer (EPnG ranks the LoRA of MoE experts)."
            )
        self._layers = list(layers.values())
        names = list(layers)
        if self.grow_fraction > 0 and all(l.rank_limit() <= l.rank for l in self._layers):
            raise ValueError(
                f"ExpertLoRA layers store rank {self._layers[0].max_rank} = their initial rank, so no expert can grow: set "
                "ExpertLoRA(max_rank=2 * rank) (or grow_fraction=0)."
            )
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        frozen = [n for n, l in layers.items() for p in l.adapter_parameters() if not p.requires_grad or id(p) not in in_optimizer]
        if frozen:
            raise ValueError(
                f"expert adapters of {sorted(set(frozen))[:4]} do not train (frozen or not in the optimizer): build the "
                "optimizer from the parameters that require grad, after AdapterCallback injected the adapters"
            )
        device = self._layers[0].rank_mask.device
        self._sums = torch.zeros(len(names), max(l.num_experts for l in self._layers), dtype=torch.float64, device=device)
        self._counts = torch.zeros(len(names), dtype=torch.float64, device=device)
        self._install_hooks(pl_module, names)
        if self._loaded is not None:
            self._restore(names)
        elif not self.layer_names:
            self.layer_names = names
            self.importance = [torch.zeros(l.num_experts, dtype=torch.float64) for l in self._layers]
            self.layer_budgets = [effective_parameters(l) for l in self._layers]
            self.initial_budget = sum(self.layer_budgets)
            ranks = [l.ranks for l in self._layers]
            self.history = [{"step": 0, "pruned": [], "grown": [], "trainable": self.initial_budget, "ranks": ranks}]
        elif self.layer_names != names:
            raise ValueError(f"the model's ExpertLoRA layers changed between fits: {self.layer_names[:3]}... vs {names[:3]}...")
        rank_zero_info(
            f"lightning-peft EPnG: {len(names)} MoE layers, {sum(l.num_experts for l in self._layers)} experts, budget "
            f"{self.initial_budget:,} trainable expert parameters; routers {self._routers[:2]}{' ...' if len(self._routers) > 2 else ''}"
        )

    def _install_hooks(self, pl_module: pl.LightningModule, names: list[str]) -> None:
        self._remove_hooks()
        self._routers = []
        for index, (name, layer) in enumerate(zip(names, self._layers)):
            router_name, router = find_router(pl_module, name, self.router_names)
            self._routers.append(router_name)
            self._handles.append(router.register_forward_hook(self._make_hook(index, layer.num_experts, router_name)))

    def _make_hook(self, index: int, num_experts: int, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            # only training forwards, and not the recomputation of activation checkpointing in backward
            if not self._collecting or torch._C._current_graph_task_id() != -1:
                return
            with torch.no_grad():
                probs = torch.softmax(router_logits(output, num_experts, name).float(), dim=-1)
                self._sums[index, :num_experts] += probs.sum(0).to(self._sums.device, torch.float64)  # type: ignore[index]
                self._counts[index] += probs.shape[0]  # type: ignore[index]

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- statistics ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if (
            step > 0
            and step >= self.warmup_steps
            and (step - self.warmup_steps) % self.interval == 0
            and step != self.last_decision_step
            and self.steps > 0
        ):
            self._cycle(trainer, pl_module, step)
        self._collecting = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._collecting = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._sums is None or self._counts is None:
            return
        sums = trainer.strategy.reduce(self._sums, reduce_op="sum")
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum")
        missing = [self._routers[i] for i in range(len(self._layers)) if counts[i] == 0]
        if missing:
            raise RuntimeError(
                f"ExpertImportanceCallback: no router statistics from {missing[:4]}{' ...' if len(missing) > 4 else ''} in "
                f"step {trainer.global_step}: the forward hooks on the routers never fired. Is this an MoE model whose "
                "router is called by the block in forward? Pass router_names=[...] naming the router modules."
            )
        means = (sums / counts.unsqueeze(1)).cpu()
        for i, layer in enumerate(self._layers):
            mean = means[i, : layer.num_experts]
            self.importance[i] = mean.clone() if self.steps == 0 else self.decay * self.importance[i] + (1 - self.decay) * mean
        self.steps += 1
        self._sums.zero_()
        self._counts.zero_()
        self._log(pl_module)

    def _log(self, pl_module: pl.LightningModule) -> None:
        if pl_module._trainer is None or pl_module._trainer.logger is None:
            return  # nothing would record the metrics: skip building them every step
        ranks = [l.ranks for l in self._layers]
        trainable = sum(effective_parameters(l) for l in self._layers)
        metrics = {
            "epng/active_experts": float(sum(r > 0 for layer in ranks for r in layer)),
            "epng/trainable": float(trainable),
            "epng/budget_used": trainable / max(1, self.initial_budget),
        }
        for i, layer in enumerate(ranks):
            metrics[f"epng/rank_sum/layer{i}"] = float(sum(layer))
            if self.log_per_expert:
                for e, r in enumerate(layer):
                    metrics[f"epng/rank/layer{i}/expert{e}"] = float(r)
                    metrics[f"epng/importance/layer{i}/expert{e}"] = float(self.importance[i][e])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    # --- decisions ----------------------------------------------------------------------------
    def plan(self) -> list[list[int]]:
        """The ranks the next cycle would set, from the current importance."""
        ranks = [l.ranks for l in self._layers]
        costs = [l.slot_cost() for l in self._layers]
        limits = [l.rank_limit() for l in self._layers]
        floors = [int(torch.tensor(self.min_active_fraction * l.num_experts).ceil()) for l in self._layers]
        args = (self.prune_fraction, self.grow_fraction)
        if self.scope == "global":
            return plan_prune_grow(self.importance, ranks, costs, limits, self.initial_budget, *args, floors)
        return [
            plan_prune_grow([self.importance[i]], [ranks[i]], [costs[i]], [limits[i]], self.layer_budgets[i], *args, [floors[i]])[0]
            for i in range(len(self._layers))
        ]

    def _cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        new_ranks = self.plan()
        optimizers = list(trainer.optimizers)
        pruned, grown = [], []
        for i, (layer, target) in enumerate(zip(self._layers, new_ranks)):
            for e, (old, new) in enumerate(zip(layer.ranks, target)):
                if new < old:
                    if new != 0:
                        raise AssertionError("EPnG only prunes experts to rank 0")
                    layer.prune_expert(e, optimizers)
                    pruned.append([i, e])
        for i, (layer, target) in enumerate(zip(self._layers, new_ranks)):
            for e, (old, new) in enumerate(zip(layer.ranks, target)):
                if new > old:
                    layer.grow_expert(e, new - old, slot_generator(self.seed, step, i, e), optimizers)
                    grown.append([i, e, new - old])
        used = check_budget(self._layers, self.initial_budget)
        self.last_decision_step = step
        self.history.append({"step": step, "pruned": pruned, "grown": grown, "trainable": used, "ranks": [l.ranks for l in self._layers]})
        rank_zero_info(
            f"lightning-peft EPnG step {step}: pruned {len(pruned)} experts, grew {len(grown)}; "
            f"{used:,} / {self.initial_budget:,} trainable expert parameters"
        )

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "importance": [t.tolist() for t in self.importance],
            "ranks": [l.ranks for l in self._layers],
            "initial_budget": self.initial_budget,
            "layer_budgets": list(self.layer_budgets),
            "steps": self.steps,
            "last_decision_step": self.last_decision_step,
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self._layers:  # already training (e.g. loaded by hand after on_train_start)
            self._restore(self.layer_names)

    def _restore(self, names: list[str]) -> None:
        state, self._loaded = self._loaded, None
        assert state is not None
        if state["layer_names"] != names:
            raise ValueError(
                f"EPnG checkpoint state is for ExpertLoRA layers {state['layer_names'][:3]}..., the model has {names[:3]}...: "
                "resume with the adapter configuration it was trained with"
            )
        current = [l.ranks for l in self._layers]
        if state["ranks"] != current:
            raise ValueError(
                "the expert ranks in the checkpoint's EPnG state differ from the model's rank masks: the checkpoint lacks "
                "the adapters' rank_mask buffers (save it with AdapterCallback) or belongs to another run"
            )
        self.layer_names = list(state["layer_names"])
        self.importance = [torch.tensor(v, dtype=torch.float64) for v in state["importance"]]
        self.initial_budget, self.layer_budgets = int(state["initial_budget"]), list(state["layer_budgets"])
        self.steps, self.last_decision_step = int(state["steps"]), int(state["last_decision_step"])
        self.history = list(state["history"])

    # --- end of fit -----------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collecting = False
        self._remove_hooks()
        # trainer.log_dir is a collective under DDP: every process asks, only rank 0 writes
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir or ".")
        if not trainer.is_global_zero or not self.layer_names:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "epng_state.json").write_text(json.dumps(self.state_dict(), indent=1))
        if self.heatmap:
            self.heatmap_path = write_heatmap(self.importance, [l.ranks for l in self._layers], self.history, out / "epng_heatmap.png")
            rank_zero_info(f"lightning-peft EPnG: heatmap written to {self.heatmap_path}")


def write_heatmap(importance: list[torch.Tensor], ranks: list[list[int]], history: list[dict[str, Any]], path: Path) -> Path:
    """Three panels: final importance ``[layer, expert]``, final ranks, and the rank sum per layer
    at the start and after every prune/grow cycle (``history``)."""
    from matplotlib.figure import Figure  # lazily: optional, and no pyplot state

    width = max(len(r) for r in ranks)
    imp = torch.full((len(ranks), width), float("nan"), dtype=torch.float64)
    rk = torch.full((len(ranks), width), float("nan"), dtype=torch.float64)
    for i, (values, r) in enumerate(zip(importance, ranks)):
        imp[i, : len(values)] = values
        rk[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    fig = Figure(figsize=(max(8.0, 0.35 * width * 2 + 4), 3.2 + 0.25 * len(ranks)))
    axes = fig.subplots(1, 3)
    for ax, data, title in ((axes[0], imp, "router importance (EMA)"), (axes[1], rk, "LoRA rank per expert")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(title)
        ax.set_yticks(range(len(ranks)))
        if width <= 16:
            ax.set_xticks(range(width))
        fig.colorbar(im, ax=ax)
    if len(ranks) * width <= 256:  # small enough to print every rank
        top = max(max(r) for r in ranks)
        for i, r in enumerate(ranks):
            for e, value in enumerate(r):
                axes[1].text(e, i, str(value), ha="center", va="center", color="white" if value <= top / 2 else "black", fontsize=7)
    steps = [h["step"] for h in history]
    for i in range(len(ranks)):
        axes[2].plot(steps, [sum(h["ranks"][i]) for h in history], marker="o", label=f"layer {i}")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("sum of expert ranks")
    axes[2].set_title("capacity per layer")
    if len(ranks) <= 8:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# AdaLoRA
# --------------------------------------------------------------------------------------------
class AdaLoRACallback(Callback):
    """Runs AdaLoRA's per-step update (importance EMAs from the gradients, the orthogonality
    regulariser, the cubic budget schedule) on every ``AdaLoRA`` layer of the model.

    ``AdapterCallback`` adds it automatically for ``AdaLoRA`` adapters; add it yourself only
    when you inject adapters with ``apply_adapter`` inside a LightningModule.

    Args:
        total_steps: length of the schedule in optimizer steps (default: the spec's
            ``total_steps``, else ``trainer.estimated_stepping_batches``).
    """

    def __init__(self, total_steps: int | None = None) -> None:
        check_int("total_steps", total_steps, low=1, allow_none=True)
        self.total_steps = total_steps
        self.allocator: Any = None
        self._loaded: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.adapters.adalora import AdaLoRAAllocator, adalora_layers

        if not adalora_layers(pl_module):
            raise ValueError("AdaLoRACallback found no AdaLoRA layers: add AdapterCallback(adapter=AdaLoRA(...)) to the Trainer")
        total = self.total_steps
        if total is None:
            estimated = trainer.estimated_stepping_batches
            total = int(estimated) if estimated is not None and estimated != float("inf") else None
        self.allocator = AdaLoRAAllocator(pl_module, total_steps=total)
        if self._loaded is not None:
            self.allocator.load_state_dict(self._loaded)
            self._loaded = None
        rank_zero_info(f"lightning-peft AdaLoRA: {self.allocator.describe()}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.allocator is not None:
            self.allocator.allocate(trainer.global_step, trainer.optimizers)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.allocator is None:
            return
        reg = self.allocator.accumulate()
        if pl_module._trainer is not None and pl_module._trainer.logger is not None:
            pl_module.log_dict(
                {
                    "adalora/budget": float(self.allocator.active_slots()),
                    "adalora/orth_reg": float(reg),
                    "adalora/trainable": float(self.allocator.trainable()),
                },
                on_step=True,
                on_epoch=False,
            )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.allocator is None else self.allocator.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.allocator is not None:
            self.allocator.load_state_dict(state_dict)
        else:
            self._loaded = state_dict
