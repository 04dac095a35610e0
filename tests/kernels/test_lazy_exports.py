"""lorambo_kernels' public names: each is the object of the module that defines it, imported on
first use, so ``import lorambo_kernels`` works (and imports nothing) without triton."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorambo_kernels

KERNELS = Path(__file__).resolve().parents[2] / "kernels"

# the module of lorambo_kernels that defines each public name (docstring of lorambo_kernels)
DEFINED_IN = {
    "lora_linear_forward": "lora_linear", "lora_linear_backward": "lora_linear", "lora_gemm": "fused_gemm",
    "lora_down": "lora_skinny", "lora_wgrad": "lora_skinny", "dropout_keep_mask": "dropout",
    "SketchGroup": "sketch", "gram_sq_norms": "sketch", "row_dots": "sketch", "gaussian_probe": "sketch",
    "rank_bucket": "config", "RANK_BUCKETS": "config", "SUPPORTED_DTYPES": "config",
}


def test_every_public_name_is_the_object_its_module_defines():
    assert set(lorambo_kernels.__all__) == {"triton_available", *DEFINED_IN}
    for name, module in DEFINED_IN.items():
        assert getattr(lorambo_kernels, name) is getattr(importlib.import_module(f"lorambo_kernels.{module}"), name)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="lorambo_kernels' has no attribute 'lora_gem'"):
        lorambo_kernels.lora_gem  # noqa: B018
    assert not hasattr(lorambo_kernels, "config_rank_bucket")


HIDE_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

if sys.argv[1] == "hidden":
    sys.meta_path.insert(0, NoTriton())
import lorambo_kernels
print(sorted(m for m in ("torch", "triton") if m in sys.modules), lorambo_kernels.triton_available())
"""


@pytest.mark.parametrize("triton, expected", [("hidden", "[] False"), ("installed", "[] True")])
def test_import_needs_no_triton_and_reports_whether_it_is_there(triton, expected):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(KERNELS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", HIDE_TRITON, triton], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
