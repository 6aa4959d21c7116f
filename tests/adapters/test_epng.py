"""EPnG (ExpertImportanceCallback): prune/grow planning, function-preserving orthogonal growth,
optimizer-state surgery, Lightning integration, resume, loud failures, and DDP agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_peft import AdapterCallback, ExpertImportanceCallback, ExpertLoRA, LoRA, apply_adapter
from lightning_peft.adapters.experts import expert_layers
from lightning_peft.allocation.epng import plan_prune_grow
from lightning_peft.allocation.rank_ops import effective_parameters, orthogonal_rows, slot_generator

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import transformers  # noqa: F401, E402  (a test dependency: fail loudly if missing)
from epng_ddp import TINY_OLMOE, loader, make_module  # noqa: E402


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def test_plan_prunes_lowest_grows_highest_and_never_exceeds_budget():
    importance = [torch.tensor([0.40, 0.05, 0.30, 0.25]), torch.tensor([0.02, 0.50, 0.28, 0.20])]
    ranks = [[4, 4, 4, 4], [4, 4, 4, 4]]
    costs, limits = [10, 10], [8, 8]
    budget = 8 * 4 * 10
    new = plan_prune_grow(importance, ranks, costs, limits, budget, 0.25, 0.25, [1, 1])
    assert new[0][1] == 0 and new[1][0] == 0  # the two least important experts
    assert new[1][1] == 8 and new[0][0] == 8  # the two most important absorbed the freed ranks
    assert sum(r * 10 for layer in new for r in layer) <= budget


@pytest.mark.parametrize("seed", range(40))
def test_plan_budget_invariant_random(seed):
    g = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 5, (), generator=g))
    experts = [int(torch.randint(2, 9, (), generator=g)) for _ in range(layers)]
    costs = [int(torch.randint(5, 50, (), generator=g)) for _ in range(layers)]
    limits = [int(torch.randint(2, 12, (), generator=g)) for _ in range(layers)]
    ranks = [[int(torch.randint(0, lim + 1, (), generator=g)) for _ in range(e)] for e, lim in zip(experts, limits)]
    budget = sum(r * c for layer, c in zip(ranks, costs) for r in layer) + int(torch.randint(0, 30, (), generator=g))
    imp = [torch.rand(e, generator=g) for e in experts]
    frac = float(torch.rand((), generator=g)) * 0.9
    floors = [int(torch.randint(0, e + 1, (), generator=g)) for e in experts]
    new = plan_prune_grow(imp, ranks, costs, limits, budget, frac, frac, floors)
    assert sum(r * c for layer, c in zip(new, costs) for r in layer) <= budget
    for old_l, new_l, lim, floor in zip(ranks, new, limits, floors):
        assert all(0 <= r <= max(lim, o) for r, o in zip(new_l, old_l))
        assert all(n == 0 or n >= o for n, o in zip(new_l, old_l))  # only prune-to-0 or grow
        pruned_here = sum(1 for o, n in zip(old_l, new_l) if o > 0 and n == 0)
        if pruned_here:
            assert sum(1 for n in new_l if n > 0) >= floor


def test_orthogonal_rows_are_orthogonal_and_deterministic():
    existing = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = orthogonal_rows(existing, 4, slot_generator(0, 3, 1))
    b = orthogonal_rows(existing, 4, slot_generator(0, 3, 1))
    assert torch.equal(a, b)
    assert (a @ existing.t()).abs().max() < 1e-10
    gram = a @ a.t()
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-10
    assert torch.allclose(a.norm(dim=1), existing.norm(dim=1).mean().expand(4))


# --------------------------------------------------------------------------------------------
# Growth and pruning on a real model
# --------------------------------------------------------------------------------------------
def _trained_olmoe():
    module = make_module()
    apply_adapter(module, [ExpertLoRA(rank=2, max_rank=5), LoRA(rank=2, target_modules=["q_proj"])])
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = next(iter(loader()))
    for _ in range(3):  # non-zero B and Adam moments everywhere
        opt.zero_grad()
        module(batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
    return module, opt, batch


def test_growth_preserves_outputs_rows_orthogonal_and_fresh_moments():
    module, opt, batch = _trained_olmoe()
    module.eval()
    with torch.no_grad():
        before = module(batch["input_ids"]).logits
    layer = expert_layers(module)["model.model.layers.0.mlp.experts"]
    budget_before = effective_parameters(layer)
    old_a = {p: layer.lora_A[p][1, :2].detach().clone() for p in layer.shapes}
    new_slots = layer.grow_expert(1, 3, slot_generator(0, 1), [opt])
    assert new_slots == [2, 3, 4] and layer.ranks[1] == 5
    with torch.no_grad():
        after = module(batch["input_ids"]).logits
    # function preserved at the moment of growth (tolerance scaled to the logits' magnitude)
    assert (after - before).abs().max() < 1e-5 * max(1.0, float(before.abs().max()))
    for p in layer.shapes:
        a = layer.lora_A[p][1].detach()
        assert torch.equal(a[:2], old_a[p])
        scale = max(1.0, float(a.norm(dim=1).max()) ** 2)  # dot products scale with the rows' norms
        assert (a[2:5] @ a[:2].t()).abs().max() < 1e-5 * scale  # grown rows orthogonal to the existing ones
        gram = a[2:5] @ a[2:5].t()
        assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-5 * scale  # and to each other
        assert layer.lora_B[p][1][:, 2:5].abs().max() == 0
        for key in ("exp_avg", "exp_avg_sq"):
            for param in (layer.lora_A[p], layer.lora_B[p]):
                state = opt.state[param][key]
                sl = state[1, 2:5] if param is layer.lora_A[p] else state[1][:, 2:5]
                assert sl.abs().max() == 0
    assert effective_parameters(layer) == budget_before + 3 * layer.slot_cost()


def test_pruning_zeroes_factors_and_optimizer_state_and_output_ignores_expert():
    module, opt, batch = _trained_olmoe()
    layer = expert_layers(module)["model.model.layers.1.mlp.experts"]
    assert opt.state[layer.lora_B["down_proj"]]["exp_avg"][0].abs().max() > 0
    layer.prune_expert(0, [opt])
    assert layer.ranks[0] == 0
    for p in layer.shapes:
        for param in (layer.lora_A[p], layer.lora_B[p]):
            assert param[0].abs().max() == 0
            assert opt.state[param]["exp_avg"][0].abs().max() == 0 and opt.state[param]["exp_avg_sq"][0].abs().max() == 0
    before = layer.lora_B["down_proj"][0].detach().clone()
    opt.zero_grad()
    module(batch["input_ids"], labels=batch["labels"]).loss.backward()
    opt.step()
    assert torch.equal(layer.lora_B["down_proj"][0], before)  # a pruned expert stays pruned


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------
class BudgetProbe(Callback):
    """Records, before every forward, the effective expert parameters and the ranks."""

    def __init__(self) -> None:
        self.trainable: list[int] = []
        self.ranks: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        layers = expert_layers(pl_module).values()
        self.trainable.append(sum(effective_parameters(l) for l in layers))
        self.ranks.append([l.ranks for l in layers])


def _trainer(tmp_path, callbacks, max_steps=8, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def _epng(**kwargs) -> ExpertImportanceCallback:
    defaults = dict(prune_fraction=0.25, grow_fraction=0.25, warmup_steps=2, interval=2)
    defaults.update(kwargs)
    return ExpertImportanceCallback(**defaults)


def _adapter() -> AdapterCallback:
    return AdapterCallback([ExpertLoRA(rank=2, max_rank=4), LoRA(rank=2, target_modules=["q_proj"])])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fit_prunes_and_grows_within_budget_with_lr_scheduler(tmp_path, scope):
    module = make_module(schedule="linear", warmup=2)
    epng, probe = _epng(scope=scope, output_dir=str(tmp_path / "epng")), BudgetProbe()
    trainer = _trainer(tmp_path, [_adapter(), epng, probe])
    trainer.fit(module, train_dataloaders=loader())
    cycles = [h for h in epng.history if h["step"] > 0]
    assert [h["step"] for h in cycles] == [2, 4, 6]
    assert any(h["pruned"] for h in cycles) and any(h["grown"] for h in cycles)
    assert max(probe.trainable) <= epng.initial_budget
    assert probe.ranks[0] != probe.ranks[-1]
    if scope == "layer":
        for i, layer in enumerate(expert_layers(module).values()):
            assert effective_parameters(layer) <= epng.layer_budgets[i]
    assert all(torch.isfinite(t).all() and t.sum() > 0 for t in epng.importance)
    assert abs(float(sum(t.sum() for t in epng.importance)) - len(epng.importance)) < 1e-6  # EMA of probabilities
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 8  # the LR schedule kept stepping through rank changes
    assert (tmp_path / "epng" / "epng_heatmap.png").stat().st_size > 1000
    state = json.loads((tmp_path / "epng" / "epng_state.json").read_text())
    assert state["ranks"] == [l.ranks for l in expert_layers(module).values()]


def test_resume_restores_importance_and_ranks_exactly(tmp_path):
    # A: 8 steps uninterrupted. B: 4 steps with an end-of-epoch checkpoint, then C resumes it.
    def run(root, max_steps, ckpt_path=None, checkpoint=False):
        pl.seed_everything(0)
        module = make_module()
        epng = _epng(heatmap=False)
        callbacks = [_adapter(), epng]
        kwargs = {}
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1, every_n_train_steps=4))
            kwargs["enable_checkpointing"] = True
        trainer = _trainer(root, callbacks, max_steps=max_steps, **kwargs)
        restored = {}

        class Peek(Callback):
            def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
                restored["importance"] = [t.clone() for t in epng.importance]
                restored["ranks"] = [l.ranks for l in expert_layers(pl_module).values()]
                restored["steps"] = epng.steps

        trainer.callbacks.append(Peek())
        trainer.fit(module, train_dataloaders=loader(n=16), ckpt_path=ckpt_path)  # 4 batches per epoch
        return module, epng, restored

    full_module, full, _ = run(tmp_path / "a", 8)
    half_module, half, _ = run(tmp_path / "b", 4, checkpoint=True)
    ckpt = tmp_path / "b" / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt.is_file()
    resumed_module, resumed, restored = run(tmp_path / "c", 8, ckpt_path=str(ckpt))
    # restored exactly what the interrupted run had at its checkpoint
    assert restored["steps"] == half.steps == 4
    assert restored["ranks"] == [l.ranks for l in expert_layers(half_module).values()]
    for a, b in zip(restored["importance"], half.importance):
        assert torch.equal(a, b)
    # and continues exactly like the uninterrupted run
    assert resumed.history == full.history
    for a, b in zip(resumed.importance, full.importance):
        assert torch.allclose(a, b, atol=1e-12)
    full_state = {n: p for n, p in full_module.named_parameters() if p.requires_grad}
    for n, p in resumed_module.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, full_state[n], atol=1e-6), n


def test_fails_loudly_without_router_statistics(tmp_path):
    module = make_module()
    # a module called "router" exists next to every experts module but is never called in forward
    for layer in module.model.model.layers:
        layer.mlp.router = nn.Linear(32, 4)
    trainer = _trainer(tmp_path, [_adapter(), _epng(router_names=["router"])], max_steps=2)
    with pytest.raises(RuntimeError, match="no router statistics"):
        trainer.fit(module, train_dataloaders=loader())


def test_fails_loudly_on_wrong_setup(tmp_path):
    with pytest.raises(ValueError, match="found no ExpertLoRA layers"):
        _trainer(tmp_path, [AdapterCallback(LoRA(target_modules=["q_proj"])), _epng()], max_steps=1).fit(
            make_module(), train_dataloaders=loader()
        )
    with pytest.raises(ValueError, match="max_rank"):
        _trainer(tmp_path, [AdapterCallback(ExpertLoRA(rank=2)), _epng()], max_steps=1).fit(make_module(), train_dataloaders=loader())
    with pytest.raises(ValueError, match="no router found"):
        _trainer(tmp_path, [_adapter(), _epng(router_names=["nope"])], max_steps=1).fit(make_module(), train_dataloaders=loader())
    with pytest.raises(ValueError, match="prune_fraction"):
        ExpertImportanceCallback(prune_fraction=1.5)


def test_works_with_router_logits_output_and_gradient_accumulation(tmp_path):
    config = dict(TINY_OLMOE, output_router_logits=True, router_aux_loss_coef=0.01)
    from lightning_peft.modules.causal_lm import CausalLM

    torch.manual_seed(0)
    module = CausalLM(config=config, lr=1e-2)
    epng = _epng()
    trainer = _trainer(tmp_path, [_adapter(), epng], max_steps=4, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=loader())
    assert epng.steps == 4 and [h["step"] for h in epng.history] == [0, 2]


def _run_two_processes(tmp_path: Path, strategy: str) -> tuple[dict, dict]:
    out = tmp_path / strategy
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "epng_ddp.py"), str(out), strategy],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]


@pytest.mark.slow
def test_ddp_and_fsdp2_processes_take_identical_decisions(tmp_path):
    """Each process routes different batches; the all-reduced importance makes every process take
    the same prune/grow decisions (DDP: plain strategy="ddp"; FSDP2: expert factors sharded over
    the expert dimension, growth written into the owning shard)."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        r0, r1 = _run_two_processes(tmp_path, strategy)
        assert r0["world_size"] == 2 and r0["budget_ok"]
        assert any(h["pruned"] or h["grown"] for h in r0["history"])
        for key in ("history", "importance", "ranks", "digest"):
            assert r0[key] == r1[key], (strategy, key)
        runs[strategy] = r0
    assert runs["fsdp2"]["sharded"] and not runs["ddp"]["sharded"]
    # same data, same decisions, same weights: sharding changes nothing
    assert runs["fsdp2"]["history"] == runs["ddp"]["history"]
    assert runs["fsdp2"]["digest"] == runs["ddp"]["digest"]


def test_config_runs_a_few_steps(tmp_path):
    from lightning_peft.cli import cli_main

    config = Path(__file__).parents[2] / "configs" / "moe_epng.yaml"
    cli = cli_main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=3",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.max_articles=60",
        ]
    )
    epng = next(c for c in cli.trainer.callbacks if isinstance(c, ExpertImportanceCallback))
    assert epng.steps == 3 and epng.initial_budget > 0
    assert len(expert_layers(cli.model)) == 4
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "epng_heatmap.png").is_file()
    exported = json.loads((log_dir / "adapter" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and len(exported["target_parameters"]) == 8
