"""Ready LightningDataModules on offline data (digits, BBC News, generated state tracking); ``RLDataModule`` from :mod:`lightning_peft.rl`.

Imported lazily so ``import lightning_peft.datamodules`` costs nothing until a class is used.
"""

from lightning_peft.lazy_exports import lazy_exports

_EXPORTS = {
    "DigitsDataModule": "lightning_peft.datamodules.vision",
    "BBCNewsDataModule": "lightning_peft.datamodules.text",
    "BBCLanguageModelingDataModule": "lightning_peft.datamodules.text",
    "load_bbc_news": "lightning_peft.datamodules.text",
    "StateTrackingDataModule": "lightning_peft.datamodules.state_tracking",
    "ContinualDataModule": "lightning_peft.datamodules.continual",
    "RLDataModule": "lightning_peft.rl.rollout",  # lives in lightning_peft.rl (the rl extra)
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
