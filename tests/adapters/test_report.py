"""Say what the checkpoint really holds: tied weights and suffix matches in the report, and one
warning about saved hyperparameters that pickle whole modules into adapter-only checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from adapter_models import TinyTransformer, lora_callback, make_loader  # noqa: E402

from lightning_peft import LoRA, apply_adapter  # noqa: E402
from lightning_peft.hyperparameters import LARGE_BYTES, format_bytes, heavy_hyperparameters  # noqa: E402


# ------------------------------------------------------------------------------------------
# the report: tied weights, full names of suffix matches
# ------------------------------------------------------------------------------------------
def tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    return BertForMaskedLM(config)  # built from a config: nothing downloaded


def test_a_head_tied_to_the_embedding_is_reported_and_trains_both() -> None:
    model = tiny_bert()
    report = apply_adapter(model, LoRA(rank=2, alpha=4, target_modules=["query", "value"]), trainable_modules=["decoder"])
    embedding = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is embedding and embedding.requires_grad  # what the report must say

    [row] = [r for r in report.rows if r[1] == "trained"]
    assert row[0] == "cls.predictions.decoder"  # the full name, not the entry
    assert "tied with bert.embeddings.word_embeddings.weight" in row[2]
    assert report.tied["cls.predictions.decoder.weight"] == ["bert.embeddings.word_embeddings.weight"]
    assert report.trainable_matches == {"decoder": ["cls.predictions.decoder"]}
    text = str(report)
    assert "note: cls.predictions.decoder.weight is tied to bert.embeddings.word_embeddings.weight" in text
    assert "also trains bert.embeddings.word_embeddings" in text
    assert 'note: trainable_modules "decoder" -> ["cls.predictions.decoder"]' in text


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = TinyTransformer(), TinyTransformer()


def test_suffix_entries_are_reported_as_the_full_names_they_matched() -> None:
    torch.manual_seed(0)
    model = TwoTowers()
    report = apply_adapter(model, LoRA(rank=2, alpha=4, target_modules=["q"]), trainable_modules=["head", "left.norm"])
    assert report.trainable_matches == {"head": ["left.head", "right.head"], "left.norm": ["left.norm"]}
    assert [r[0] for r in report.rows if r[1] == "trained"] == ["left.head", "right.head", "left.norm"]
    notes = [line for line in str(report).splitlines() if line.startswith("note:")]
    assert notes == ['note: trainable_modules "head" -> ["left.head", "right.head"]']  # an exact name needs no note
    assert not report.tied


def test_untied_head_has_no_tie_note() -> None:
    torch.manual_seed(0)
    report = apply_adapter(TinyTransformer(), LoRA(rank=2, alpha=4, target_modules=["q"]), trainable_modules=["head"])
    assert report.notes == [] and report.tied == {}
    assert [r[2] for r in report.rows if r[1] == "trained"] == ["all parameters"]


# ------------------------------------------------------------------------------------------
# saved hyperparameters that pickle whole objects
# ------------------------------------------------------------------------------------------
def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@dataclasses.dataclass
class Settings:
    backbone: nn.Module
    name: str = "x"


def test_heavy_hyperparameters_walks_containers_without_pickling() -> None:
    net = nn.Linear(8, 8)
    hparams = {
        "net": net,
        "lr": 1e-3,
        "weights": torch.ones(4),  # 16 bytes: an ordinary hyperparameter
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
        "nested": {"blocks": [nn.LayerNorm(8), (Settings(nn.Linear(8, 2)),)]},
        "table": torch.zeros(LARGE_BYTES // 4),  # 1 MiB of float32
    }
    found = {h.name: h for h in heavy_hyperparameters(hparams)}
    assert sorted(found) == ["nested", "net", "table"]
    assert found["net"].nbytes == state_bytes(net) and found["net"].modules == ["Linear"]
    assert found["nested"].nbytes == state_bytes(nn.LayerNorm(8)) + state_bytes(nn.Linear(8, 2)) + 1  # + name "x"
    assert found["table"].modules == [] and found["table"].nbytes == LARGE_BYTES
    assert found["net"].describe() == f"'net' (Linear module, {format_bytes(state_bytes(net))})"
    assert heavy_hyperparameters({"tied": [net, net]})[0].nbytes == state_bytes(net)  # one object counted once
    assert heavy_hyperparameters(None) == []


class HydraStyleModule(pl.LightningModule):
    """A LightningModule that receives its network as an argument and saves every argument."""

    def __init__(self, net: nn.Module, lr: float = 1e-2, ignore_net: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"] if ignore_net else None)
        self.model = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def fit_two_epochs(tmp_path: Path, module: pl.LightningModule) -> list[str]:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        # the default export_weights="best": the export reads the best checkpoint without unpickling the net
        callbacks=[lora_callback(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, make_loader(n=16, batch_size=8))
    return [str(w.message) for w in caught if "saved hyperparameters" in str(w.message)]


def test_a_module_in_hyperparameters_is_named_once_with_its_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyTransformer()
    base = state_bytes(net)
    with pytest.warns(UserWarning, match="Attribute 'net' is an instance of `nn.Module`"):
        module = HydraStyleModule(net)  # Lightning's own hint, at construction
    messages = fit_two_epochs(tmp_path, module)
    assert len(messages) == 1  # a save at each epoch end (plus last.ckpt), one warning
    [message] = messages
    size = state_bytes(net)  # the frozen base plus the adapter now inside it
    assert size > base
    size = format_bytes(size)
    assert f"'net' (TinyTransformer module, {size})" in message
    assert "save_hyperparameters(ignore=['net'])" in message
    # and it is true: the checkpoint holds the whole network besides its adapter-only state dict
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert isinstance(checkpoint["hyper_parameters"]["net"], nn.Module)


def test_no_warning_when_the_module_is_ignored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert fit_two_epochs(tmp_path, HydraStyleModule(TinyTransformer(), ignore_net=True)) == []
