"""A program saved by torch.export / torch.jit.trace on the ``ext`` backend runs in a new process
that only imports lorambo, as serving does: nothing there resolves a backend, so the extension
was never loaded and the saved ``lorambo_ext`` op failed on the missing ``torch.ops.lorambo``."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.ext import loader as ext_loader

LOAD = """
import sys, torch
import lorambo
folder = sys.argv[1]
x = torch.load(folder + "/x.pt")
exported = torch.export.load(folder + "/model.pt2").module()
traced = torch.jit.load(folder + "/model.jit")
torch.save({"export": exported(x), "trace": traced(x)}, folder + "/out.pt")
"""


@pytest.mark.slow  # a fresh interpreter imports torch and lorambo (seconds)
@pytest.mark.skipif(ext_loader.load() is None, reason="extension not built")
def test_saved_ext_programs_run_in_a_process_that_only_imports_lorambo(tmp_path):
    lorambo.set_backend("ext")
    model = nn.Sequential(LoRAMBoLinear(nn.Linear(12, 10), rank=3, capacity=4, alpha=6.0), nn.Tanh(),
                          LoRAMBoLinear(Conv1D(6, 10), rank=4, capacity=4, alpha=2.0)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B[:, :layer.rank].normal_()
    example = torch.randn(2, 3, 12)
    torch.export.save(torch.export.export(model, (example,)), tmp_path / "model.pt2")
    torch.jit.save(torch.jit.trace(model, (example,)), tmp_path / "model.jit")
    x = torch.randn(2, 3, 12)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], check=True, capture_output=True, text=True)
    out = torch.load(tmp_path / "out.pt")
    h = x.double()  # float64 reference: x W^T + b + s (x A_r^T) B_r^T per layer
    for layer in (model[0], model[2]):
        r = layer.rank
        a, b = layer.lora_A[:r].detach().double(), layer.lora_B[:, :r].detach().double()
        h = h @ layer.weight.detach().double().t() + layer.bias.detach().double() + layer.scaling * (h @ a.t()) @ b.t()
        if layer is model[0]:
            h = torch.tanh(h)
    for name in ("export", "trace"):
        torch.testing.assert_close(out[name].double(), h, rtol=1e-5, atol=1e-5, msg=name)
