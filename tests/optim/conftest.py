"""Every test of lorambo.optim.AdamW runs on both pool update paths: the compiled extension's
one-call step (CPU, float32/float64) and the torch._foreach path (every device, dtype and FSDP2
shard). With LORAMBO_REQUIRE_EXT=1 (CI) a missing extension fails instead of skipping."""

import os

import pytest

import lorambo
from lorambo.ext import loader as ext_loader


@pytest.fixture(autouse=True, params=["compiled", "foreach"])
def pool_step_path(request):
    if request.param == "foreach":
        lorambo.set_backend("torch")  # use_compiled_multi_tensor: never
    elif ext_loader.load() is None:
        if os.environ.get("LORAMBO_REQUIRE_EXT") == "1":
            raise RuntimeError(f"LORAMBO_REQUIRE_EXT=1 but lorambo._C is not available: {ext_loader._state.get('error')}")
        pytest.skip("compiled extension lorambo._C not built")
    yield request.param
    lorambo.set_backend(None)
