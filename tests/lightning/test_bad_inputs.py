"""A probe of bad inputs to the Python API and the CLI: every one a clear error of ours.

Each case asserts the error type, that the message names the argument (the config key, for the
CLI), repeats what was wrong and says what is accepted or how to fix it; that it is one of our
errors (not a bare dependency message); for ``apply_adapter``, that the model is unchanged; for
the CLI, one short message (no traceback) and exit status 2. Damaged *files* are probed
elsewhere (the io tests).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_peft import (
    AdaLoRA,
    AdapterCallback,
    AdapterFSDP2Strategy,
    AdaptiveCheckpointCallback,
    BitFit,
    ExpertImportanceCallback,
    ExpertLoRA,
    FullFineTune,
    LoRA,
    QLoRA,
    apply_adapter,
)
from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.callbacks.adaptive_checkpoint import parse_budget
from lightning_peft.callbacks.expert_importance import AdaLoRACallback
from lightning_peft.validation import InvalidArgumentError, InvalidArgumentTypeError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAN, INF = float("nan"), float("inf")
#: words every message uses to say what is accepted or what to do
HINT = re.compile(
    r"must be|must not|use |expected|write |remove|narrow|nearest|adaptable|give each|did you mean|e\.g\.|instead"
    r"|is not accepted|shorten|exclude it",
    re.IGNORECASE,
)
OURS = (InvalidArgumentError, InvalidArgumentTypeError)

V, T = ValueError, TypeError


def _lazy(module: str, name: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(**kwargs)

    build.__name__ = name
    return build


ImageClassifier = _lazy("lightning_peft.modules.image", "ImageClassifier")
TextClassifier = _lazy("lightning_peft.modules.text", "TextClassifier")
CausalLM = _lazy("lightning_peft.modules.causal_lm", "CausalLM")
PPO = _lazy("lightning_peft.modules.ppo", "PPO")
DigitsDataModule = _lazy("lightning_peft.datamodules.vision", "DigitsDataModule")
BBCNewsDataModule = _lazy("lightning_peft.datamodules.text", "BBCNewsDataModule")
BBCLanguageModelingDataModule = _lazy("lightning_peft.datamodules.text", "BBCLanguageModelingDataModule")
RLDataModule = _lazy("lightning_peft.datamodules.rl", "RLDataModule")


# --------------------------------------------------------------------------------------------
# Constructors: (class, kwargs, error type, argument named in the message)
# --------------------------------------------------------------------------------------------
CONSTRUCTORS: list[tuple[Callable[..., Any], dict[str, Any], type, str]] = [
    # LoRA
    (LoRA, {"dropout": "0.1"}, T, "dropout"),
    (LoRA, {"dropout": NAN}, V, "dropout"),
    (LoRA, {"dropout": -0.1}, V, "dropout"),
    (LoRA, {"alpha": NAN}, V, "alpha"),
    (LoRA, {"alpha": INF}, V, "alpha"),
    (LoRA, {"alpha": -3}, V, "alpha"),
    (LoRA, {"alpha": "16"}, T, "alpha"),
    (LoRA, {"rank": 0}, V, "rank"),
    (LoRA, {"rank": 8.0}, T, "rank"),
    (LoRA, {"rank": True}, T, "rank"),
    (LoRA, {"rank": "8"}, T, "rank"),
    (LoRA, {"use_rslora": "false"}, T, "use_rslora"),
    (LoRA, {"use_rslora": 1}, T, "use_rslora"),
    (LoRA, {"recompute_input": None}, T, "recompute_input"),
    (LoRA, {"init": "orthogonal"}, V, "init"),
    (LoRA, {"target_modules": 5}, T, "target_modules"),
    (LoRA, {"target_modules": []}, V, "target_modules"),
    (LoRA, {"target_modules": ""}, V, "target_modules"),
    (LoRA, {"target_modules": ["re:(["]}, V, "target_modules"),
    (LoRA, {"target_modules": "re:(["}, V, "target_modules"),
    (LoRA, {"target_modules": ["q", 3]}, T, "target_modules"),
    (LoRA, {"target_modules": ["q", " "]}, V, "target_modules"),
    (LoRA, {"exclude_modules": "head"}, T, "exclude_modules"),
    (LoRA, {"exclude_modules": ["re:)"]}, V, "exclude_modules"),
    (LoRA, {"module_path": 3}, T, "module_path"),
    (LoRA, {"module_path": ""}, V, "module_path"),
    (LoRA, {"rank_pattern": {"q": "8"}}, T, "rank_pattern"),
    (LoRA, {"rank_pattern": {"q": 0}}, V, "rank_pattern"),
    (LoRA, {"rank_pattern": [("q", 8)]}, T, "rank_pattern"),
    (LoRA, {"rank_pattern": {"re:[": 8}}, V, "rank_pattern"),
    (LoRA, {"alpha_pattern": {"q": NAN}}, V, "alpha_pattern"),
    # QLoRA (construction needs no bitsandbytes)
    (QLoRA, {"quant_type": "nf5"}, V, "quant_type"),
    (QLoRA, {"compute_dtype": "fp16"}, V, "compute_dtype"),
    (QLoRA, {"quant_storage": "int4"}, V, "quant_storage"),
    (QLoRA, {"double_quant": "yes"}, T, "double_quant"),
    (QLoRA, {"rank": -1}, V, "rank"),
    # AdaLoRA
    (AdaLoRA, {"init_rank": 0}, V, "init_rank"),
    (AdaLoRA, {"target_rank": 16, "init_rank": 8}, V, "target_rank"),
    (AdaLoRA, {"beta1": NAN}, V, "beta1"),
    (AdaLoRA, {"beta2": 1.0}, V, "beta2"),
    (AdaLoRA, {"orth_reg_weight": -1.0}, V, "orth_reg_weight"),
    (AdaLoRA, {"init_warmup": -1}, V, "init_warmup"),
    (AdaLoRA, {"total_steps": 10, "init_warmup": 5, "final_warmup": 5}, V, "total_steps"),
    (AdaLoRA, {"interval": 0.5}, T, "interval"),
    (AdaLoRA, {"dropout": 1.0}, V, "dropout"),
    # ExpertLoRA
    (ExpertLoRA, {"max_rank": 2, "rank": 4}, V, "max_rank"),
    (ExpertLoRA, {"projections": "w1"}, T, "projections"),
    (ExpertLoRA, {"projections": []}, V, "projections"),
    (ExpertLoRA, {"alpha": NAN}, V, "alpha"),
    (ExpertLoRA, {"init": "zeros"}, V, "init"),
    # BitFit / FullFineTune (AdapterSpec's own arguments)
    (BitFit, {"target_modules": 1.5}, T, "target_modules"),
    (BitFit, {"exclude_modules": [None]}, T, "exclude_modules"),
    (FullFineTune, {"target_modules": ["re:*"]}, V, "target_modules"),
    # AdapterCallback
    (AdapterCallback, {"adapter": "lora"}, T, "adapter"),
    (AdapterCallback, {"adapter": []}, T, "adapter"),
    (AdapterCallback, {"adapter": LoRA(), "export_weights": "first"}, V, "export_weights"),
    (AdapterCallback, {"adapter": LoRA(), "trainable_modules": "head"}, T, "trainable_modules"),
    (AdapterCallback, {"adapter": LoRA(), "trainable_modules": ["re:(["]}, V, "trainable_modules"),
    (AdapterCallback, {"adapter": LoRA(), "merge_on_fit_end": "no"}, T, "merge_on_fit_end"),
    (AdapterCallback, {"adapter": LoRA(), "export_dir": ""}, V, "export_dir"),
    (AdapterCallback, {"adapter": LoRA(), "check_gradients": 0}, T, "check_gradients"),
    # AdaptiveCheckpointCallback
    (AdaptiveCheckpointCallback, {"budget": NAN}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": INF}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": "nan"}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": "abc"}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": ""}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": "0%"}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": "nan%"}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": -1}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": 1.5}, V, "budget"),
    (AdaptiveCheckpointCallback, {"budget": True}, T, "budget"),
    (AdaptiveCheckpointCallback, {"budget": [1]}, T, "budget"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "mode": "sometimes"}, V, "mode"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "headroom": NAN}, V, "headroom"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "hysteresis": 1.0}, V, "hysteresis"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "oom_backoff": 1.0}, V, "oom_backoff"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "max_retries": -1}, V, "max_retries"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "relax_after": 2.5}, T, "relax_after"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "shape_bucket": 0}, V, "shape_bucket"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "cost": "energy"}, V, "cost"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "selective": "yes"}, T, "selective"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "memory_source": "gpu"}, T, "memory_source"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "mode": "every_k", "k": 0}, V, "k"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "blocks": ""}, V, "blocks"),
    (AdaptiveCheckpointCallback, {"budget": "1GiB", "log_every_n_steps": -1}, V, "log_every_n_steps"),
    # ExpertImportanceCallback / AdaLoRACallback
    (ExpertImportanceCallback, {"prune_fraction": NAN}, V, "prune_fraction"),
    (ExpertImportanceCallback, {"prune_fraction": 1.5}, V, "prune_fraction"),
    (ExpertImportanceCallback, {"grow_fraction": "0.2"}, T, "grow_fraction"),
    (ExpertImportanceCallback, {"decay": INF}, V, "decay"),
    (ExpertImportanceCallback, {"min_active_fraction": 2.0}, V, "min_active_fraction"),
    (ExpertImportanceCallback, {"interval": 0}, V, "interval"),
    (ExpertImportanceCallback, {"warmup_steps": 10.0}, T, "warmup_steps"),
    (ExpertImportanceCallback, {"scope": "local"}, V, "scope"),
    (ExpertImportanceCallback, {"router_names": "gate"}, T, "router_names"),
    (AdaLoRACallback, {"total_steps": 0}, V, "total_steps"),
    # strategy
    (AdapterFSDP2Strategy, {"tensor_parallel_size": 0}, V, "tensor_parallel_size"),
    (AdapterFSDP2Strategy, {"data_parallel_size": "two"}, T, "data_parallel_size"),
    (AdapterFSDP2Strategy, {"param_dtype": "fp16"}, V, "param_dtype"),
    (AdapterFSDP2Strategy, {"block_paths": "model.layers"}, T, "block_paths"),
    (AdapterFSDP2Strategy, {"reshard_after_forward": "yes"}, T, "reshard_after_forward"),
    # modules (all checked before any model is built)
    (ImageClassifier, {"num_classes": 0}, V, "num_classes"),
    (ImageClassifier, {"lr": NAN}, V, "lr"),
    (ImageClassifier, {"weight_decay": -1.0}, V, "weight_decay"),
    (ImageClassifier, {"warmup_steps": 1.5}, T, "warmup_steps"),
    (ImageClassifier, {"schedule": "cosin"}, V, "schedule"),
    (ImageClassifier, {"label_smoothing": 1.0}, V, "label_smoothing"),
    (ImageClassifier, {"model_kwargs": ["img_size", 16]}, T, "model_kwargs"),
    (TextClassifier, {"pooling": "max"}, V, "pooling"),
    (TextClassifier, {"classifier_dropout": NAN}, V, "classifier_dropout"),
    (TextClassifier, {"encoder_dropout": 1.5}, V, "encoder_dropout"),
    (TextClassifier, {"num_classes": 2.0}, T, "num_classes"),
    (CausalLM, {"lr": 0}, V, "lr"),
    (CausalLM, {"config": "llama"}, T, "config"),
    (PPO, {"gamma": NAN}, V, "gamma"),
    (PPO, {"hidden_sizes": []}, T, "hidden_sizes"),
    (PPO, {"hidden_sizes": [64, 0]}, V, "hidden_sizes"),
    (PPO, {"activation": "gelu"}, V, "activation"),
    (PPO, {"learning_rate": -1.0}, V, "learning_rate"),
    (PPO, {"cpu_threads": 0}, V, "cpu_threads"),
    (PPO, {"max_grad_norm": NAN}, V, "max_grad_norm"),
    (PPO, {"normalize_advantage": "yes"}, T, "normalize_advantage"),
    # datamodules (checked before any data is read)
    (DigitsDataModule, {"batch_size": 0}, V, "batch_size"),
    (DigitsDataModule, {"image_size": 16.0}, T, "image_size"),
    (DigitsDataModule, {"val_fraction": NAN}, V, "val_fraction"),
    (DigitsDataModule, {"val_fraction": 0.5, "test_fraction": 0.5}, V, "val_fraction"),
    (DigitsDataModule, {"classes": [5]}, V, "classes"),
    (DigitsDataModule, {"classes": [5, 5]}, V, "classes"),
    (DigitsDataModule, {"classes": [5, 10]}, V, "classes"),
    (DigitsDataModule, {"classes": "56789"}, T, "classes"),
    (DigitsDataModule, {"num_workers": -1}, V, "num_workers"),
    (DigitsDataModule, {"eval_batch_size": 0}, V, "eval_batch_size"),
    (BBCNewsDataModule, {"max_length": 1}, V, "max_length"),
    (BBCNewsDataModule, {"max_per_class": 0}, V, "max_per_class"),
    (BBCNewsDataModule, {"test_fraction": 1.0}, V, "test_fraction"),
    (BBCLanguageModelingDataModule, {"seq_len": 1}, V, "seq_len"),
    (BBCLanguageModelingDataModule, {"val_fraction": 0.0}, V, "val_fraction"),
    (BBCLanguageModelingDataModule, {"tokenizer_path": 3}, T, "tokenizer_path"),
    (RLDataModule, {"num_envs": 0}, V, "num_envs"),
    (RLDataModule, {"rollout_steps": 2.0}, T, "rollout_steps"),
    (RLDataModule, {"normalize_rewards": "no"}, T, "normalize_rewards"),
]


def _id(case: tuple) -> str:
    cls, kwargs, _, _ = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items() if not isinstance(v, LoRA))


@pytest.mark.parametrize("case", CONSTRUCTORS, ids=[_id(c) for c in CONSTRUCTORS])
def test_constructor_refuses_bad_argument(case):
    cls, kwargs, error, argument = case
    with pytest.raises(error) as info:
        cls(**kwargs)
    err, message = info.value, str(info.value)
    assert isinstance(err, OURS), f"not one of ours: {type(err).__name__}: {message}"
    assert err.argument.split("[")[0] == argument
    assert argument in message and HINT.search(message), message
    shown = [repr(v) for k, v in kwargs.items() if k == argument and not isinstance(v, (list, dict))]
    if shown and not (isinstance(kwargs[argument], float) and math.isnan(kwargs[argument])):
        assert any(s in message for s in shown), message  # repeats the value it refused
    elif shown:
        assert "nan" in message, message


def test_nan_is_refused_wherever_a_float_is_taken():
    """``nan <= 0`` is False: a range check written as a refusal lets NaN through."""
    for build in (
        lambda: LoRA(alpha=NAN),
        lambda: LoRA(dropout=NAN),
        lambda: AdaLoRA(beta1=NAN),
        lambda: ExpertLoRA(alpha=NAN),
        lambda: AdaptiveCheckpointCallback(budget=NAN),
        lambda: AdaptiveCheckpointCallback(budget="1GiB", headroom=NAN),
        lambda: ExpertImportanceCallback(decay=NAN),
    ):
        with pytest.raises(InvalidArgumentError, match="nan"):
            build()


@pytest.mark.parametrize(
    "budget, expected",
    [
        ("0.5", ("fraction", 0.5)),
        (0.5, ("fraction", 0.5)),
        ("40%", ("fraction", 0.4)),
        ("1.0", ("fraction", 1.0)),
        ("2GiB", ("bytes", 2.0 * 2**30)),
        ("1e9", ("bytes", 1e9)),
        (4096, ("bytes", 4096.0)),
        (None, None),
    ],
)
def test_budget_forms_accepted(budget, expected):
    """A fraction written as a string is read like the float; sizes and percentages as before."""
    assert parse_budget(budget) == expected
    if budget is not None:
        assert AdaptiveCheckpointCallback(budget=budget, verbose=False)._budget_value == expected


def test_budget_error_lists_the_accepted_forms():
    with pytest.raises(InvalidArgumentError) as info:
        AdaptiveCheckpointCallback(budget="lots")
    for form in ("int", "'2GiB'", "0.5", "'40%'"):
        assert form in str(info.value)


# --------------------------------------------------------------------------------------------
# apply_adapter: refused before anything changes
# --------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(x))))


APPLY: list[tuple[str, Any, dict[str, Any], type, str]] = [
    ("unknown target", LoRA(target_modules=["fc3"]), {}, V, "fc3"),
    ("excluded target", LoRA(target_modules=["fc1"], exclude_modules=["fc1"]), {}, V, "exclude_modules"),
    ("excluded by regex", LoRA(target_modules=["fc1", "fc2"], exclude_modules=["re:fc."]), {}, V, "exclude_modules"),
    ("regex excluded", LoRA(target_modules="re:fc1", exclude_modules=["fc1"]), {}, V, "exclude_modules"),
    ("regex matches nothing", LoRA(target_modules="re:zzz.*"), {}, V, "zzz"),
    ("unsupported type", LoRA(target_modules=["act"]), {}, V, "act"),
    ("rank too large", LoRA(rank=64, target_modules=["fc1"]), {}, V, "rank"),
    ("rank_pattern too large", LoRA(rank=2, target_modules=["fc1"], rank_pattern={"fc1": 32}), {}, V, "rank"),
    ("module_path missing", LoRA(module_path="encoder"), {}, V, "module_path"),
    ("trainable unknown", LoRA(target_modules=["fc1"]), {"trainable_modules": ["clasifier"]}, V, "clasifier"),
    ("trainable a string", LoRA(target_modules=["fc1"]), {"trainable_modules": "head"}, T, "trainable_modules"),
    ("trainable bad regex", LoRA(target_modules=["fc1"]), {"trainable_modules": ["re:(["]}, V, "trainable_modules"),
    ("adapted and trained", LoRA(target_modules=["fc1"]), {"trainable_modules": ["fc1"]}, V, "trainable_modules"),
    ("claimed twice", [LoRA(target_modules=["fc1"]), LoRA(rank=2, target_modules=["fc1"])], {}, V, "fc1"),
    ("not a spec", "lora", {}, T, "adapter"),
    ("empty spec list", [], {}, T, "adapter"),
    ("no experts", ExpertLoRA(), {}, V, "experts"),
    ("bitfit without bias", BitFit(target_modules=["fc2"]), {}, V, "fc2"),
]


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], list[str]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [n for n, _ in model.named_modules()],
    )


@pytest.mark.parametrize("case", APPLY, ids=[c[0] for c in APPLY])
def test_apply_adapter_refuses_and_leaves_the_model_unchanged(case):
    _, adapter, kwargs, error, named = case
    model = Net()
    state, grads, names = _snapshot(model)
    with pytest.raises(error) as info:
        apply_adapter(model, adapter, **kwargs)
    message = str(info.value)
    assert named in message and HINT.search(message), message
    assert not isinstance(info.value, re.error)
    after_state, after_grads, after_names = _snapshot(model)
    assert after_names == names and not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert after_grads == grads
    assert state.keys() == after_state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)
    assert getattr(model, "_lightning_peft_record", None) is None


def test_excluded_target_says_exclude_modules_removed_it():
    with pytest.raises(ValueError) as info:
        apply_adapter(Net(), LoRA(target_modules=["fc1"], exclude_modules=["fc1"]))
    message = str(info.value)
    assert "matches no module" not in message and "Nearest" not in message
    assert "exclude_modules ['fc1'] removed every match" in message


def test_applying_twice_is_refused_and_leaves_the_first_adapter():
    model = Net()
    apply_adapter(model, LoRA(target_modules=["fc1"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already has adapters; load or remove them"):
        apply_adapter(model, LoRA(target_modules=["fc2"]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert state.keys() == model.state_dict().keys()


# --------------------------------------------------------------------------------------------
# CLI: one short message naming the config key; exit status 2; no traceback
# --------------------------------------------------------------------------------------------
CB = "--trainer.callbacks.init_args."
AD = CB + "adapter.init_args."
CLI: list[tuple[str, list[str], str]] = [
    ("alpha negative", [AD + "alpha=-3"], "trainer.callbacks[1].init_args.adapter.init_args.alpha"),
    ("alpha nan", [AD + "alpha=nan"], "trainer.callbacks[1].init_args.adapter.init_args.alpha"),
    ("rank zero", [AD + "rank=0"], "trainer.callbacks[1].init_args.adapter.init_args.rank"),
    ("rank text", [AD + "rank=abc"], "trainer.callbacks[1].init_args.adapter.init_args.rank"),
    ("rank float", [AD + "rank=8.5"], "trainer.callbacks[1].init_args.adapter.init_args.rank"),
    ("dropout range", [AD + "dropout=1.5"], "trainer.callbacks[1].init_args.adapter.init_args.dropout"),
    ("init literal", [AD + "init=orthogonal"], "trainer.callbacks[1].init_args.adapter.init_args.init"),
    ("bad regex", [AD + 'target_modules=["re:(["]'], "trainer.callbacks[1].init_args.adapter.init_args.target_modules"),
    ("rank_pattern", [AD + "rank_pattern={fc1: 0}"], "trainer.callbacks[1].init_args.adapter.init_args.rank_pattern"),
    ("export_weights", [CB + "export_weights=bestt"], "trainer.callbacks[1].init_args.export_weights"),
    ("trainable empty entry", [CB + 'trainable_modules=[""]'], "trainer.callbacks[1].init_args.trainable_modules"),
    (
        "budget text",
        ["--trainer.callbacks+=lightning_peft.AdaptiveCheckpointCallback", CB + "budget=abc"],
        "trainer.callbacks[2].init_args.budget",
    ),
    (
        "budget negative",
        ["--trainer.callbacks+=lightning_peft.AdaptiveCheckpointCallback", CB + "budget=-1"],
        "trainer.callbacks[2].init_args.budget",
    ),
    (
        "checkpoint mode",
        ["--trainer.callbacks+=lightning_peft.AdaptiveCheckpointCallback", CB + "budget=1GiB", CB + "mode=some"],
        "trainer.callbacks[2].init_args.mode",
    ),
    ("model lr", ["--model.init_args.lr=-1"], "model.init_args.lr"),
    ("model schedule", ["--model.init_args.schedule=cosin"], "model.init_args.schedule"),
    ("model num_classes", ["--model.init_args.num_classes=0"], "model.init_args.num_classes"),
    ("model missing base", ["--model.init_args.base_checkpoint=/nonexistent/base.ckpt"], "model.init_args.base_checkpoint"),
    ("data batch_size", ["--data.init_args.batch_size=0"], "data.init_args.batch_size"),
    ("data fractions", ["--data.init_args.val_fraction=0.9"], "data.init_args.val_fraction"),
    ("data classes", ["--data.init_args.classes=[5, 12]"], "data.init_args.classes"),
    ("trainer max_steps text", ["--trainer.max_steps=abc"], "trainer.max_steps"),
    ("trainer max_steps negative", ["--trainer.max_steps=-5"], "trainer.max_steps"),
]


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-peft"])  # LightningCLI warns about pytest's own argv
    monkeypatch.delenv("LIGHTNING_PEFT_DEBUG", raising=False)


def _cli_error(args: list[str], capsys) -> str:
    from lightning_peft.cli import cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(args, run=False)
    assert info.value.code == 2
    return capsys.readouterr().err


def _assert_short(err: str, key: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) < 15, err
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err, err
    error_line = next(line for line in lines if line.startswith("error: "))
    assert error_line.startswith(f"error: {key}: "), err  # the key first, then what is wrong
    assert HINT.search(error_line), err
    assert "LIGHTNING_PEFT_DEBUG=1" in err


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_value_is_one_short_message_naming_the_key(case, _plain_argv, capsys):
    _, overrides, key = case
    err = _cli_error(["--config", str(CONFIGS / "vit_digits.yaml"), *overrides], capsys)
    _assert_short(err, key)


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("num_classes: 5", "num_clases: 5", "model.init_args.num_clases"),
        ("max_epochs: 20", "max_epoch: 20", "trainer.max_epoch"),
        ("alpha: 16", "alpha: abc", "trainer.callbacks[1].init_args.adapter.init_args.alpha"),
        ("rank: 8", "rank: -8", "trainer.callbacks[1].init_args.adapter.init_args.rank"),
        ("export_dir: adapter", "export_dir: adapter\n        merge_on_fit_end: maybe", "trainer.callbacks[1].init_args.merge_on_fit_end"),
    ],
)
def test_cli_bad_yaml_is_one_short_message_naming_the_key(old, new, key, tmp_path, _plain_argv, capsys):
    text = (CONFIGS / "vit_digits.yaml").read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new, 1))
    err = _cli_error(["--config", str(bad)], capsys)
    _assert_short(err, key)


def test_cli_typo_suggests_the_option(tmp_path, _plain_argv, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "vit_digits.yaml").read_text().replace("num_classes: 5", "num_clases: 5"))
    err = _cli_error(["--config", str(bad)], capsys)
    assert "did you mean 'num_classes'?" in err


def test_cli_debug_env_var_gives_the_original_exception(_plain_argv, monkeypatch, capsys):
    from lightning_peft.cli import cli_main

    monkeypatch.setenv("LIGHTNING_PEFT_DEBUG", "1")
    with pytest.raises(ValueError) as info:  # jsonargparse's wrapper, chained to ours
        cli_main(["--config", str(CONFIGS / "vit_digits.yaml"), AD + "alpha=-3"], run=False)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any(isinstance(x, InvalidArgumentError) and x.argument == "alpha" for x in chain)


def test_console_entry_exits_with_status_2(_plain_argv, capsys):
    from lightning_peft.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIGS / "vit_digits.yaml"), AD + "rank=0"])
    assert info.value.code == 2
    _assert_short(capsys.readouterr().err, "trainer.callbacks[1].init_args.adapter.init_args.rank")
