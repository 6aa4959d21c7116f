"""Old import path of :mod:`lightning_peft.memory`, where the checkpointing planner now lives
(``memory.profiles``: cost model and ``Plan``; ``memory.planner``; ``memory.switchable``;
``memory.ops``; ``memory.offload``). This name *is* that package, so existing imports
(``from lightning_peft.checkpointing import plan_blocks``) and monkeypatching reach the same objects."""

import sys

from lightning_peft import memory as _moved

sys.modules[__name__] = _moved
