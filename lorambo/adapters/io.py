"""Save and load LoRAMBo adapters as safetensors (active slices + per-layer metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorambo.adapters import extra_modules
from lorambo.adapters.atomic import atomic_write
from lorambo.model import configure_model, lora_layers

FORMAT = "lorambo-adapter"
VERSION = 1
DEFAULT_FILE = "adapter.safetensors"
_LAYER_FIELDS = ("rank", "capacity", "in_features", "out_features", "scaling", "alpha",
                 "use_rslora", "dropout", "base_kind")


class AdapterFormatError(ValueError):
    """The file is not a readable lorambo adapter (truncated, corrupt or another format)."""


def adapter_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it names a .safetensors file, else ``path/adapter.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / DEFAULT_FILE


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write every LoRAMBoLinear's active slices and settings (and the state of the model's
    ``modules_to_save``); returns the file written."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRAMBoLinear layer to save")
    tensors, meta = {}, {}
    for name, layer in layers.items():
        r = layer.rank
        tensors[f"{name}.lora_A"] = layer.lora_A[:r].detach().cpu().contiguous()  # (r, in)
        tensors[f"{name}.lora_B"] = layer.lora_B[:, :r].detach().cpu().contiguous()  # (out, r)
        meta[name] = {field: getattr(layer, field) for field in _LAYER_FIELDS}
    extra_modules.add_modules_to_save(model, tensors)
    header = {"format": FORMAT, "version": str(VERSION), "layers": json.dumps(meta)}
    return atomic_write(adapter_file(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def _read(file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not file.is_file():
        raise FileNotFoundError(f"no lorambo adapter at {file}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{file} is not a readable safetensors file: {err}") from err
    if header.get("format") != FORMAT:
        raise AdapterFormatError(f"{file} is not a lorambo adapter (format {header.get('format')!r})")
    if header.get("version") != str(VERSION):
        raise AdapterFormatError(f"{file} has adapter format version {header.get('version')!r}, "
                                 f"this lorambo reads {VERSION}")
    try:
        meta = json.loads(header["layers"])
    except (KeyError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{file} has unreadable layer metadata: {err}") from err
    for name, info in meta.items():
        r, d_in, d_out = info["rank"], info["in_features"], info["out_features"]
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None or tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise AdapterFormatError(f"{file}: tensors of layer {name!r} missing or not of shape "
                                     f"[{r}, {d_in}] / [{d_out}, {r}]")
    return meta, tensors


def _check_compatible(model: nn.Module, meta: dict, file: Path) -> dict:
    layers = lora_layers(model)
    missing, unexpected = sorted(set(layers) - set(meta)), sorted(set(meta) - set(layers))
    if missing or unexpected:
        raise ValueError(f"adapter {file} does not match {type(model).__name__}: layers in the model "
                         f"but not the file {missing[:5]}, in the file but not the model {unexpected[:5]}")
    for name, layer in layers.items():
        info = meta[name]
        saved, have = (info["out_features"], info["in_features"]), (layer.out_features, layer.in_features)
        if saved != have:
            raise ValueError(f"adapter {file}: layer {name!r} was saved for shape (out, in) = {saved}, "
                             f"the model's is {have}")
        if info["rank"] > layer.capacity:
            raise ValueError(f"adapter {file}: layer {name!r} has rank {info['rank']} above the "
                             f"layer's capacity {layer.capacity}")
    return layers


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return it.

    A model without LoRA layers is configured from the file (same names, ranks, capacities).
    Otherwise its LoRA layers must match the file's names and shapes exactly. Everything is
    checked before anything is written, so a bad file leaves the model as it was.
    """
    file = adapter_file(path)
    meta, tensors = _read(file)
    if not lora_layers(model):
        configure_model(model, {n: info["rank"] for n, info in meta.items()},
                        capacity={n: info["capacity"] for n, info in meta.items()},
                        modules_to_save=extra_modules.saved_module_names(tensors) or None)
    layers = _check_compatible(model, meta, file)
    extra = extra_modules.check_modules_to_save(model, tensors, file)
    for name, layer in layers.items():
        info = meta[name]
        r = info["rank"]
        if layer.merged:
            layer.unmerge()
        layer.set_rank(r)
        layer.lora_A[:r].copy_(tensors[f"{name}.lora_A"])
        layer.lora_B[:, :r].copy_(tensors[f"{name}.lora_B"])
        layer.scaling, layer.alpha = float(info["scaling"]), float(info["alpha"])
        layer.use_rslora, layer.dropout = bool(info["use_rslora"]), float(info["dropout"])
    extra_modules.load_modules_to_save(model, extra)
    return model
