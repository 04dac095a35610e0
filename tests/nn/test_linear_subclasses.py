"""LoRAMBoLinear computes x W^T + b from its base's weight. A Linear subclass with a forward of its
own (quantized layers, layers that rescale) would silently lose that forward: it is refused when
named and left out of the default targets. Subclasses that keep nn.Linear's forward still wrap."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lorambo
from lorambo import LoRAMBoLinear


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = ScaledLinear(8, 8)
        self.plain = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 2)

    def forward(self, x):
        return self.lm_head(self.plain(self.scaled(x)))


def test_a_subclass_with_its_own_forward_is_refused_and_left_out():
    with pytest.raises(TypeError, match="ScaledLinear subclasses Linear with a forward of its own"):
        LoRAMBoLinear(ScaledLinear(8, 8), rank=2)
    assert lorambo.model.default_targets(Net()) == ["plain"]
    with pytest.raises(TypeError, match=r"'scaled' \(ScaledLinear\).*forward of its own"):
        lorambo.configure_model(Net(), 2, target_modules=["scaled"])
    model = Net()
    x = torch.randn(3, 8)
    want = model(x)
    lorambo.configure_model(model, 2)
    torch.testing.assert_close(model(x), want)  # B = 0, and the scaled layer keeps its forward


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


@pytest.mark.parametrize("kind", ["non_dynamically_quantizable", "parametrized"])
def test_subclasses_that_keep_linear_forward_still_wrap(kind):
    if kind == "parametrized":
        base = nn.Linear(6, 6, dtype=torch.float64)
        parametrize.register_parametrization(base, "weight", _Symmetric())
    else:
        base = nn.modules.linear.NonDynamicallyQuantizableLinear(6, 5, dtype=torch.float64)
    layer = LoRAMBoLinear(base, rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
    want = x @ base.weight.detach().T + base.bias.detach() + layer.scaling * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_a_linear_whose_forward_was_replaced_on_the_instance_is_refused():
    base = nn.Linear(8, 8)
    original = base.forward
    base.forward = lambda x: original(x) * 0.5  # what accelerate's hooks do to offloaded modules
    with pytest.raises(TypeError, match="forward was replaced on the instance"):
        LoRAMBoLinear(base, rank=2)


def test_a_parametrized_base_weight_refuses_merging_before_anything_changes():
    """Its weight is recomputed on every access: a merge written into it was lost (and the merged
    layer then ran without its adapter; measured max |diff| 2.3)."""
    base = nn.Linear(6, 6, dtype=torch.float64)
    parametrize.register_parametrization(base, "weight", _Symmetric())
    model = nn.Sequential(base, nn.Tanh(), nn.Linear(6, 6, dtype=torch.float64))
    lorambo.configure_model(model, 2)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        with pytest.raises(RuntimeError, match="parametrization"):
            lorambo.lora_layers(model)["0"].merge()
        with pytest.raises(RuntimeError, match="parametrization"):
            lorambo.unload(model)
        assert not any(layer.merged for layer in lorambo.lora_layers(model).values())
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        lorambo.unload(model, merge=False)
        assert not lorambo.lora_layers(model)


class _LinearWithExtraState(nn.Linear):
    """nn.Linear's forward with extra state of its own (a tag a framework keeps with the layer)."""

    tag = 0

    def get_extra_state(self):
        return torch.tensor([self.tag])

    def set_extra_state(self, state):
        self.tag = int(state[0])


def test_a_base_with_extra_state_of_its_own_round_trips_beside_the_layers():
    """Both keep an ``_extra_state``: the layer's (rank, settings) at ``_extra_state``, the base's
    at ``base_layer._extra_state``. The plain-key pre-hook must leave the layer's own key alone;
    moved to the base, the load refused the state_dict for holding both names."""
    torch.manual_seed(0)
    base = _LinearWithExtraState(8, 6, dtype=torch.float64)
    base.tag = 7
    src = LoRAMBoLinear(base, rank=3, capacity=4, alpha=6.0)
    with torch.no_grad():
        src.lora_B[:, :3].normal_()
    saved = src.state_dict()
    assert {"_extra_state", "base_layer._extra_state"} <= saved.keys()
    dst = LoRAMBoLinear(_LinearWithExtraState(8, 6, dtype=torch.float64), rank=1, capacity=4)
    dst.load_state_dict(saved)
    assert dst.rank == 3 and dst.scaling == 2.0 and dst.base_layer.tag == 7
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ src.lora_A[:3].T) @ src.lora_B[:, :3].T
    torch.testing.assert_close(dst(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", [nn.Conv1d(3, 4, 2), nn.Conv2d(3, 4, 1), nn.Embedding(10, 4), nn.LayerNorm(4)],
                         ids=lambda m: type(m).__name__)
def test_a_layer_outside_the_linear_family_is_refused_naming_its_class(module):
    pytest.importorskip("transformers.pytorch_utils")  # with Conv1D importable: still not of its family
    with pytest.raises(TypeError, match=rf"{type(module).__name__} is not nn\.Linear or transformers Conv1D"):
        LoRAMBoLinear(module, rank=1)


_WRAP_WITHOUT_TRANSFORMERS = """
import sys
from torch import nn
import lorambo
lorambo.LoRAMBoLinear(nn.Linear(4, 4), rank=1)
lorambo.configure_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 1)
print("transformers" in sys.modules)
"""


def test_wrapping_linear_layers_does_not_import_transformers():
    """Conv1D is looked up only where transformers is already imported: importing it costs seconds."""
    root = Path(__file__).resolve().parents[2]
    paths = [str(root), str(root / "kernels"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _WRAP_WITHOUT_TRANSFORMERS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
