"""Old import path of :mod:`lightning_peft.rl.rollout` (kept so configs, adapter files and user code that name
``lightning_peft.datamodules.rl`` keep resolving). This name *is* that module: private names and monkeypatching
reach the same object."""

import sys

from lightning_peft.rl import rollout as _moved

sys.modules[__name__] = _moved
