"""lorambo_kernels without triton: a kernel name is an ImportError giving the pip command, as a
missing optional package is everywhere in lorambo (docs/guarantees.md), not a bare
"No module named 'triton'" from inside the module that defines it."""

import json
import os
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"

SCRIPT = """
import importlib.abc, json, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
import lorambo_kernels

out = {}
for name in sys.argv[1:]:
    try:
        getattr(lorambo_kernels, name)
        out[name] = None
    except Exception as error:
        out[name] = [type(error).__name__, str(error)]
print(json.dumps(out))
"""

KERNEL_NAMES = ["lora_linear_forward", "lora_gemm", "lora_down", "dropout_keep_mask", "SketchGroup"]


def test_a_kernel_name_without_triton_is_an_import_error_with_the_pip_command():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(KERNELS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *KERNEL_NAMES, "rank_bucket"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors.pop("rank_bucket") is None  # the configuration needs no triton
    for name, (kind, message) in errors.items():
        assert kind == "ImportError", (name, kind, message)
        assert message == (f"lorambo_kernels.{name} needs triton, which is not installed: "
                           "pip install 'triton>=3.6'"), message
