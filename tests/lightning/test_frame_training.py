"""FRAME through Lightning: AdapterCallback adds FRAMECallback, the orders get their own optimizer
group (and the scheduler follows it), orders and loads reach the logger, the balance loss trains
the router with an unchanged training_step, resuming works, merging at the end is refused up
front, and configs/frame_bbc.yaml runs a few steps through the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from adapter_models import HEAD, Classifier, make_loader  # noqa: E402

from lightning_peft import FRAME, AdapterCallback, LoRA, load_adapter  # noqa: E402
from lightning_peft.adapters.frame import frame_layers  # noqa: E402
from lightning_peft.callbacks.frame import FRAMECallback  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _trainer(tmp_path: Path, callbacks: list, max_steps: int = 4, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _callback(**kwargs) -> AdapterCallback:
    spec = FRAME(rank=2, num_experts=4, top_k=2, order_lr=0.05, balance_coef=0.1, target_modules=["fc1", "fc2"])
    return AdapterCallback([spec, LoRA(rank=2, target_modules=["q", "v"])], trainable_modules=HEAD, **kwargs)


class Watch(pl.Callback):
    """The optimizer's groups at the first step and the router's gradient at the first backward."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        if trainer.global_step == 0:
            groups = optimizer.param_groups
            self.groups = [{k: v for k, v in g.items() if k != "params"} | {"ids": {id(p) for p in g["params"]}} for g in groups]
            self.router_grads = [m.router.weight.grad.abs().sum().item() for m in frame_layers(pl_module).values()]


def test_orders_get_their_own_group_and_the_logger_sees_orders_and_loads(tmp_path):
    torch.manual_seed(0)
    module, watch = Classifier(), Watch()
    trainer = _trainer(tmp_path, [_callback(), watch])
    trainer.fit(module, make_loader(n=32, batch_size=8))
    assert sum(isinstance(c, FRAMECallback) for c in trainer.callbacks) == 1
    layers = frame_layers(module)
    orders = {id(m.orders) for m in layers.values()}
    order_groups = [g for g in watch.groups if g["ids"] & orders]
    assert len(order_groups) == 1 and order_groups[0]["ids"] == orders
    assert order_groups[0]["weight_decay"] == 0.0 and order_groups[0]["lr"] == pytest.approx(0.05)
    other = [g for g in watch.groups if not g["ids"] & orders]
    assert other and all(g["weight_decay"] == 0.01 for g in other)
    # StepLR(step_size=3, gamma=0.5) halves the orders' lr too
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs[-1] == pytest.approx(0.05)
    assert trainer.optimizers[0].param_groups[-1]["lr"] == pytest.approx(0.025)
    # B = 0 at the first step: the router's gradient is the balance loss's alone, and nonzero
    assert all(g > 0 for g in watch.router_grads)
    for layer in layers.values():
        assert not torch.allclose(layer.orders, torch.tensor([0.125, 0.375, 0.625, 0.875]))  # the orders moved
        assert ((layer.orders >= 0) & (layer.orders <= 1)).all()
    metrics = trainer.callback_metrics
    name = next(iter(layers))
    for e in range(4):
        assert metrics[f"frame/{name}/order_{e}"] == pytest.approx(float(layers[name].orders[e]), abs=0.2)
        assert 0 <= float(metrics[f"frame/{name}/load_{e}"]) <= 1
    assert sum(float(metrics[f"frame/{name}/load_{e}"]) for e in range(4)) == pytest.approx(1.0)
    assert "frame/balance_loss" in metrics


def test_gradient_accumulation_scales_the_balance_term(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    trainer = _trainer(tmp_path, [_callback()], max_steps=1, accumulate_grad_batches=4)
    trainer.fit(module, make_loader(n=32, batch_size=8))
    assert {m.balance_grad_scale for m in frame_layers(module).values()} == {0.25}


def test_resume_restores_the_order_group(tmp_path):
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = _trainer(tmp_path, [_callback(), ckpt], max_steps=2)
    trainer.fit(Classifier(), make_loader(n=32, batch_size=8))
    torch.manual_seed(0)
    module = Classifier()
    resumed = _trainer(tmp_path, [_callback()], max_steps=4)
    resumed.fit(module, make_loader(n=32, batch_size=8), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.global_step == 4
    groups = resumed.optimizers[0].param_groups
    assert {id(p) for p in groups[-1]["params"]} == {id(m.orders) for m in frame_layers(module).values()}
    assert all(len(resumed.optimizers[0].state[p]) > 0 for p in groups[-1]["params"])  # Adam moments restored and used


def test_merge_on_fit_end_is_refused_before_training(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [_callback(merge_on_fit_end=True)])
    with pytest.raises(ValueError, match="cannot merge FRAME.*merge_on_fit_end=False"):
        trainer.fit(Classifier(), make_loader(n=32, batch_size=8))
    assert trainer.global_step == 0


def test_export_at_fit_end_loads_back(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    trainer = _trainer(tmp_path, [_callback(export_dir=str(tmp_path / "export"))], max_steps=2)
    trainer.fit(module, make_loader(n=32, batch_size=8))
    x = make_loader(n=8, batch_size=8).dataset.tensors[0]
    module.eval()
    torch.manual_seed(0)
    fresh = Classifier()
    load_adapter(fresh, tmp_path / "export")
    fresh.eval()
    assert torch.allclose(fresh(x), module(x), atol=1e-6)


def test_frame_bbc_config_runs_a_few_steps(tmp_path, monkeypatch):
    from lightning_peft.cli import cli_main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "frame_bbc.yaml"), "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1", "--data.init_args.max_per_class=10", "--data.init_args.max_length=32",
            "--data.init_args.batch_size=4"]  # fmt: skip
    cli = cli_main(args)
    assert cli.trainer.global_step == 2
    layers = frame_layers(cli.model)
    assert len(layers) == 12 and all(m.num_experts == 4 for m in layers.values())
    header = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")  # the CSV logger's file
    assert any(k.startswith("frame/") and k.endswith("order_0") for k in header) and "frame/balance_loss" in header
    assert (Path(cli.trainer.log_dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_regroup_follows_a_warmup_lambda_schedule():
    from types import SimpleNamespace

    from lightning_peft.adapters.frame import FRAMELinear

    torch.manual_seed(0)
    layer = FRAME(rank=2, order_lr=0.1).wrap("l", torch.nn.Linear(8, 8).requires_grad_(False))
    assert isinstance(layer, FRAMELinear)
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    FRAMECallback()._regroup(trainer, optimizer, {id(layer.orders): layer})
    # the orders are the only 1-D trainable: their no-decay group stays and takes order_lr
    assert [len(g["params"]) for g in optimizer.param_groups] == [3, 1]
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.1 / 4) and optimizer.param_groups[-1]["weight_decay"] == 0.0
    for step in range(1, 6):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.1 * min(1.0, (step + 1) / 4))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * min(1.0, (step + 1) / 4))
    again = [len(g["params"]) for g in optimizer.param_groups]
    FRAMECallback()._regroup(trainer, optimizer, {id(layer.orders): layer})  # already grouped: unchanged
    assert [len(g["params"]) for g in optimizer.param_groups] == again
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.1)


def test_regroup_moves_orders_out_of_a_mixed_group_and_the_scheduler_follows():
    from types import SimpleNamespace

    torch.manual_seed(0)
    layer = FRAME(rank=2, order_lr=0.1).wrap("l", torch.nn.Linear(8, 8).requires_grad_(False))
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    FRAMECallback()._regroup(trainer, optimizer, {id(layer.orders): layer})
    assert [len(g["params"]) for g in optimizer.param_groups] == [3, 1]
    assert optimizer.param_groups[1]["params"][0] is layer.orders and optimizer.param_groups[1]["weight_decay"] == 0.0
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 0.05])


@pytest.mark.parametrize(("kwargs", "match"), [({"log_orders": 1}, "log_orders"), ({"log_every_n_steps": 0}, "log_every_n_steps")])
def test_callback_refuses_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        FRAMECallback(**kwargs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("top_k=9", "top_k (9) must be <= num_experts (4)"),
        ("order_init=1.5", "order_init"),
        ("order_range=[1.0, 0.0]", "low < high"),
    ],
)
def test_cli_bad_frame_value_is_one_short_message(override, message, monkeypatch, capsys):
    from lightning_peft.cli import cli_main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    monkeypatch.delenv("LIGHTNING_PEFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        cli_main(["--config", str(CONFIGS / "frame_bbc.yaml"), f"--trainer.callbacks.init_args.adapter.init_args.{override}"], run=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert f"error: trainer.callbacks[1].init_args.adapter.init_args.{key}: " in err and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) < 15
