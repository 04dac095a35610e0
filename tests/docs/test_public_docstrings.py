"""help() has something to say about every public name: each one in the documented namespaces'
``__all__`` has a docstring, and so has every public method and property of their classes (an
override without its own docstring shows the one it overrides, as help() does)."""

import inspect
import os

import pytest
import torch
from torch import nn

import lorambo
import lorambo.integrations.fsdp
import lorambo.nn
import lorambo.optim
import lorambo.sensitivity
from lorambo.allocation.alora import ALoRAConfig
from lorambo.integrations import LoRAMBoCallback

NAMESPACES = (lorambo, lorambo.sensitivity, lorambo.optim, lorambo.nn, lorambo.integrations.fsdp)
PUBLIC = {f"{ns.__name__}.{name}": getattr(ns, name) for ns in NAMESPACES for name in ns.__all__}
PUBLIC.update({"lorambo.integrations.LoRAMBoCallback": LoRAMBoCallback,
               "lorambo.allocation.alora.ALoRAConfig": ALoRAConfig})


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_has_a_docstring(name):
    assert (inspect.getdoc(PUBLIC[name]) or "").strip()


@pytest.mark.parametrize("name", sorted(n for n, obj in PUBLIC.items() if inspect.isclass(obj)))
def test_every_public_method_and_property_has_a_docstring(name):
    cls = PUBLIC[name]
    undocumented = [attr for attr, value in vars(cls).items() if not attr.startswith("_")
                    and (inspect.isfunction(value) or isinstance(value, property))
                    and not (inspect.getdoc(getattr(cls, attr)) or "").strip()]
    assert not undocumented


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _adapted():
    return lorambo.configure_model(_mlp(), 2, capacity=4)


def _diverged():
    """An adapted model whose pool holds a NaN, as a diverged run leaves it."""
    model = _adapted()
    with torch.no_grad():
        model[0].lora_B[0, 0] = float("nan")
    return model


def _with_env_backend(name):
    os.environ["LORAMBO_BACKEND"] = name
    try:
        lorambo.set_backend(None)
    finally:
        del os.environ["LORAMBO_BACKEND"]
        lorambo.set_backend(None)


def _reset_slot_beyond_capacity():
    layer = _adapted()[0]
    lorambo.reset_slot_state(torch.optim.AdamW([layer.lora_A, layer.lora_B]), layer, [layer.capacity])


# (public name, a common mistake, the exception it raises): help(name) must say that it raises it
MISTAKES = [
    ("configure_model", lambda tmp: lorambo.configure_model(_mlp(), 2, target_modules=["lineer"]), ValueError),
    ("configure_model", lambda tmp: lorambo.configure_model(_mlp(), 2.5), TypeError),
    ("allocate", lambda tmp: lorambo.allocate({"a": (8, 6)}, {"a": 1.0}, budget=5), ValueError),
    ("LoRAMBoLinear", lambda tmp: lorambo.LoRAMBoLinear(nn.ReLU()), TypeError),
    ("LoRAMBoLinear", lambda tmp: lorambo.LoRAMBoLinear(nn.Linear(6, 8), rank=7), ValueError),
    ("LoRAMBoOptimizer", lambda tmp: lorambo.LoRAMBoOptimizer(_mlp(), 500, sensitivity_method="hesian"), ValueError),
    ("save_adapter", lambda tmp: lorambo.save_adapter(_mlp(), tmp / "a.safetensors"), ValueError),
    ("save_adapter", lambda tmp: lorambo.save_adapter(_diverged(), tmp / "a.safetensors"), RuntimeError),
    ("export_peft", lambda tmp: lorambo.export_peft(_diverged(), tmp / "peft"), RuntimeError),
    ("unload", lambda tmp: lorambo.unload(_diverged(), merge=True), RuntimeError),
    ("load_adapter", lambda tmp: lorambo.load_adapter(_mlp(), tmp / "none.safetensors"), FileNotFoundError),
    ("export_peft", lambda tmp: lorambo.export_peft(_mlp(), tmp / "peft"), ValueError),
    ("import_peft", lambda tmp: lorambo.import_peft(_mlp(), tmp), FileNotFoundError),
    ("import_peft", lambda tmp: lorambo.import_peft(_mlp(), ""), ValueError),
    ("from_peft", lambda tmp: lorambo.from_peft(_mlp()), TypeError),
    ("peft_config", lambda tmp: lorambo.peft_config({"0": -1}), ValueError),
    ("peft_config", lambda tmp: lorambo.peft_config({}), TypeError),
    ("set_backend", lambda tmp: lorambo.set_backend("trion"), ValueError),
    ("set_backend", lambda tmp: lorambo.set_backend(3), TypeError),
    ("get_backend", lambda tmp: _with_env_backend("trion"), ValueError),
    ("lora_layers", lambda tmp: lorambo.lora_layers("model"), TypeError),
    ("trainable_parameters", lambda tmp: lorambo.trainable_parameters("model"), TypeError),
    ("print_trainable_parameters", lambda tmp: lorambo.print_trainable_parameters("model"), TypeError),
    ("unload", lambda tmp: lorambo.unload(_adapted(), merge="no"), TypeError),
    ("reset_slot_state", lambda tmp: lorambo.reset_slot_state(None, nn.Linear(6, 8), [0]), TypeError),
    ("reset_slot_state", lambda tmp: _reset_slot_beyond_capacity(), ValueError),
    ("follow_ranks", lambda tmp: lorambo.follow_ranks(_mlp(), _adapted()), ValueError),
    ("read_decisions", lambda tmp: lorambo.read_decisions(tmp / "none.jsonl"), FileNotFoundError),
]


@pytest.mark.parametrize("name,mistake,error", MISTAKES,
                         ids=[f"{name}-{error.__name__}" for name, _, error in MISTAKES])
def test_every_top_level_docstring_names_the_errors_of_common_mistakes(name, mistake, error, tmp_path):
    with pytest.raises(error):
        mistake(tmp_path)
    assert error.__name__ in inspect.getdoc(getattr(lorambo, name)), \
        f"help(lorambo.{name}) does not say that it raises {error.__name__}"


def test_every_top_level_function_and_class_has_a_mistake_listed():
    listed = {name for name, _, _ in MISTAKES}
    callables = {n for n in lorambo.__all__ if callable(getattr(lorambo, n))
                 and not (inspect.isclass(getattr(lorambo, n)) and issubclass(getattr(lorambo, n), BaseException | Warning))}
    assert callables - {"disable_adapter"} <= listed  # disable_adapter's docstring names its RuntimeError
