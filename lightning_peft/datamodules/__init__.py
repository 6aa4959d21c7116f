"""Ready LightningDataModules on offline data (digits, BBC News); ``RLDataModule`` from :mod:`lightning_peft.rl`.

Imported lazily so ``import lightning_peft.datamodules`` costs nothing until a class is used.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DigitsDataModule": "lightning_peft.datamodules.vision",
    "BBCNewsDataModule": "lightning_peft.datamodules.text",
    "BBCLanguageModelingDataModule": "lightning_peft.datamodules.text",
    "load_bbc_news": "lightning_peft.datamodules.text",
    "RLDataModule": "lightning_peft.rl.rollout",  # lives in lightning_peft.rl (the rl extra)
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_peft.datamodules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
