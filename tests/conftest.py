"""Shared test setup: offline Hugging Face, a fresh seed per test, the backend reset after each."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import lorambo  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state(request):
    # Seed from the test's name: fresh random inputs per test, reproducible per test.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
    lorambo.set_backend(None)
