"""Old import path of :mod:`lightning_peft.allocation.rank_ops`. This name *is* that module, so
existing imports and monkeypatching reach the same objects."""

import sys

from lightning_peft.allocation import rank_ops as _moved

sys.modules[__name__] = _moved
