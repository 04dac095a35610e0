"""docs/guarantees.md, "Errors and guarantees": a missing optional package is an ``ImportError`` whose message
gives the ``pip install`` command. Run in a fresh interpreter in which peft and transformers
cannot be imported (this process has them loaded)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("peft", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())
    import torch
    import lorambo
    import lorambo.integrations
    from lorambo.experiments.minilm import load_minilm

    def error(call):
        try:
            call()
        except ImportError as e:
            return str(e)
        return None

    print(json.dumps({
        "peft_config": error(lambda: lorambo.peft_config({"fc": 2})),
        "from_peft": error(lambda: lorambo.from_peft(torch.nn.Linear(2, 2))),
        "LoRAMBoCallback": error(lambda: lorambo.integrations.LoRAMBoCallback),
        "load_minilm": error(load_minilm),  # the quickstart's first call
    }))
""")


def test_missing_peft_and_transformers_name_the_pip_command():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "pip install peft" in errors["peft_config"], errors
    assert "pip install peft" in errors["from_peft"], errors
    assert "pip install transformers" in errors["LoRAMBoCallback"], errors
    assert "pip install transformers" in errors["load_minilm"], errors
