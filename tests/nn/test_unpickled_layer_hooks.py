"""A whole model saved with ``torch.save(model)`` and loaded in a new process (or handed to
``mp.spawn``): no LoRAMBoLinear ``__init__`` runs there, so unpickling a layer installs the
process-wide optimizer hooks a new layer installs. Without them torch.optim.Adafactor would step
a pool below its capacity (off by ~1e-2 after a few steps) instead of being refused, and neither
a rank change that leaves a stepped optimizer behind nor an optimizer of frozen base weights
only would warn."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lorambo import configure_model

ROOT = Path(__file__).resolve().parents[2]

_NEW_PROCESS = """
import json, sys, warnings
import torch
model = torch.load(sys.argv[1], weights_only=False)
out = {}
x = torch.randn(3, 8)
model(x).sum().backward()
adafactor = torch.optim.Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-2)
try:
    adafactor.step()
    out["adafactor"] = "stepped"
except RuntimeError as err:
    out["adafactor"] = str(err)
adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
adam.step()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model[0].set_rank(3)
    torch.optim.SGD(list(model[2].base_layer.parameters()), lr=1e-2).step()  # the frozen base weights only
out["warnings"] = [str(w.message) for w in caught]
print(json.dumps(out))
"""


def test_a_model_loaded_in_a_new_process_keeps_the_optimizer_checks(tmp_path):
    torch.manual_seed(0)
    model = configure_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), 2, capacity=4)
    torch.save(model, tmp_path / "model.pt")
    paths = [str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _NEW_PROCESS, str(tmp_path / "model.pt")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "Adafactor cannot train a LoRAMBoLinear pool below its capacity" in out["adafactor"]
    assert any("'0': rank changed 2 -> 3 without its optimizer" in w for w in out["warnings"])
    assert any("holds 2 of the base weights that lorambo froze" in w for w in out["warnings"])
