"""Old import path of :mod:`lightning_peft.rl.ppo` (kept so configs, adapter files and user code that name
``lightning_peft.modules.ppo`` keep resolving). This name *is* that module: private names and monkeypatching
reach the same object."""

import sys

from lightning_peft.rl import ppo as _moved

sys.modules[__name__] = _moved
