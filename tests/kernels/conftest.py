"""Kernel tests run under the Triton interpreter on CPU (TRITON_INTERPRET=1) and on the GPU when
there is one (tests marked ``gpu`` only run there).

Triton reads TRITON_INTERPRET when a function is *decorated*, and triton.language's own helpers
(tl.cdiv, tl.rand, ...) are decorated when triton is first imported. So on CPU the variable
must be set before anything imports triton: peft, transformers and torch._dynamo all do at
import time. tests/conftest.py sets it before any test module is collected; this file sets it
too (enough when these tests run on their own) and, if triton was already imported in compiled
mode, fails each kernel test with that explanation instead of an obscure interpreter error.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# tools/aot_sm90.py (a development tool, not installed) is imported as ``aot_sm90`` by the AOT tests.
_TOOLS = str(Path(__file__).resolve().parents[2] / "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

CUDA = torch.cuda.is_available()
_NOT_INTERPRETED = None
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    _tl = sys.modules.get("triton.language")
    if _tl is not None and type(_tl.cdiv).__name__ != "InterpretedFunction":
        _NOT_INTERPRETED = (
            "triton was imported (by peft/transformers/torch._dynamo or a test module) before "
            "TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU in this process; set "
            "os.environ.setdefault('TRITON_INTERPRET', '1') in tests/conftest.py when "
            "torch.cuda.is_available() is False, before anything imports triton")

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _interpreter_ready():
    if _NOT_INTERPRETED is not None:
        pytest.fail(_NOT_INTERPRETED)


@pytest.fixture
def device():
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def _triton_backend(env_backend, monkeypatch):
    env_backend("triton")
    # LORAMBO_TMA=auto picks the pointer path under the interpreter; test_kernel_tma forces TMA.
    monkeypatch.delenv("LORAMBO_TMA", raising=False)
