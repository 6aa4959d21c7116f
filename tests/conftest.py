import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_leaked_lightning_seed():
    """``seed_everything`` (LightningCLI calls it with a random seed) exports PL_GLOBAL_SEED,
    which seeds DistributedSampler in every later subprocess: keep it from leaking between tests."""
    saved = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
