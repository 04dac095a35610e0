"""Shared test setup: offline Hugging Face, a fresh seed per test, the backend reset after each."""

import os
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run on CPU tensors through the interpreter. It must be on before anything
# (peft, transformers, torch._dynamo) imports triton, or triton's helpers get built for a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lorambo  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so a CI failure replays as it was seen.
# HYPOTHESIS_PROFILE=explore draws fresh ones (and keeps failures in .hypothesis/) to search wider.
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


def pytest_configure(config):
    # CI builds the extension and sets LORAMBO_REQUIRE_EXT=1: a missing or broken build then stops
    # the run here, whichever tests were selected, instead of skipping each test that needs it.
    if os.environ.get("LORAMBO_REQUIRE_EXT") == "1":
        from lorambo.ext import loader

        if loader.load() is None:
            raise pytest.UsageError(f"LORAMBO_REQUIRE_EXT=1 but lorambo._C is not available: "
                                    f"{loader._state.get('error')}")


@pytest.fixture(autouse=True)
def _fresh_state(request):
    # Seed from the test's name: fresh random inputs per test, reproducible per test and across
    # runs (crc32 is stable; Python's str hash is salted per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    # The backend is read from $LORAMBO_BACKEND once and cached; set_backend(None) re-reads it, so
    # each test starts from the environment and a test's set_backend / setenv does not leak.
    lorambo.set_backend(None)
    yield
    lorambo.set_backend(None)


@pytest.fixture(params=["torch", "auto"])
def backend(request):
    """Run the test on the PyTorch path and on what ``auto`` picks (the extension on CPU if built)."""
    lorambo.set_backend(request.param)
    yield request.param
    lorambo.set_backend(None)


@pytest.fixture
def env_backend(monkeypatch):
    """``env_backend(name)``: set $LORAMBO_BACKEND for this test and re-resolve it (the variable
    is otherwise read once per process); the environment and backend are restored afterwards."""
    def use(name: str) -> None:
        monkeypatch.setenv("LORAMBO_BACKEND", name)
        lorambo.set_backend(None)

    yield use
    monkeypatch.undo()
    lorambo.set_backend(None)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny matrices on a busy 2-core box can stall ~20 ms per product with
    two OpenMP threads (measured 24 ms vs 5 us for a 10x12 @ 12x4 product)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group (rank 0 of 1), destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def accelerator():
    """accelerate's process-wide state (a CPU Accelerator), which AcceleratedOptimizer's step and
    zero_grad read; reset after the test. Skips where accelerate is not installed."""
    accelerate = pytest.importorskip("accelerate")
    # no import statement: tests/test_gpu_check.py holds this file to what the GPU image has (no accelerate)
    state = pytest.importorskip("accelerate.state")

    accelerate.Accelerator(cpu=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_venv(tmp_path):
    """(venv, python) of a new venv whose dependencies come from the test venv through a .pth
    path line. A path line does not run the test venv's own .pth files, so its editable lorambo
    stays invisible: lorambo must come from whatever the test installs. Run its python with
    ``-I``, so that a PYTHONPATH naming a checkout cannot hide the installed package either."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, py
