"""Save and load LoRAMBo adapters as safetensors (active slices + per-layer metadata).

The file format and its checks live in :mod:`lorambo.adapters.format`. Loading is validated,
then applied: the file is checked completely (see ``read_adapter_file``), then checked against
the model, and only then is anything in the model changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorambo.adapters import extra_modules
from lorambo.adapters.atomic import atomic_write, check_target
from lorambo.adapters.canonical import save_file_canonical
from lorambo.adapters.finite import check_finite_modules_to_save, check_finite_pools
from lorambo.adapters.format import (FORMAT, LAYER_FIELDS, POOLS, VERSION, AdapterFormatError, build_header,
                                     own_storages, read_adapter_file)
from lorambo.adapters.meta_tensors import refuse_meta_destinations, refuse_meta_sources
from lorambo.adapters.overwrite import configure_for_overwrite, set_rank_for_overwrite
from lorambo.adapters.values_fit import check_fits_dtypes, loaded_entries
from lorambo.model import lora_layers, unload
from lorambo.model.argument import require_module, require_path
from lorambo.model.disable import refuse_inside_disable_adapter
from lorambo.model.modules_to_save import modules_to_save
from lorambo.model.partial_edit import add_note, note_partial_edit
from lorambo.model.targeting import check_named_targets, refuse_peft_modules
from lorambo.model.unwrap import unwrap_model
from lorambo.nn.base_layers import base_kind, features
from lorambo.nn.settings_fit import check_settings_fit

__all__ = ["AdapterFormatError", "FORMAT", "VERSION", "adapter_file", "load_adapter", "save_adapter"]

DEFAULT_FILE = "adapter.safetensors"


def adapter_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it names a .safetensors file (the suffix in any case: ``X.SAFETENSORS``
    is a file too), else ``path/adapter.safetensors``."""
    path = Path(path)
    return path if path.suffix.lower() == ".safetensors" else path / DEFAULT_FILE


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write every LoRAMBoLinear's active slices and settings (and the state of the model's
    ``modules_to_save``) to ``path``, a ``.safetensors`` file or else a folder that gets
    ``adapter.safetensors`` (created if needed); returns the file written.

    The write is atomic (a temporary file, then a rename) and every tensor and the settings get
    a checksum that :func:`load_adapter` verifies. The same adapter gives the same bytes. Layers
    are named as in the plain model, also when ``model`` is wrapped by torch.compile or DDP.
    Which pools are frozen (``requires_grad=False``: a MiCA adapter's ``lora_B``, LoRA-FA's
    ``lora_A``, a layer frozen for a phase) is saved, and :func:`load_adapter` freezes them again;
    a model whose every pool is frozen (for inference) is saved as trainable.

    Raises ``ValueError`` for a model without LoRAMBoLinear layers, one on the meta device, or
    an empty path; ``IsADirectoryError`` / ``NotADirectoryError`` for a folder where the file
    goes or a file where a folder must be (before anything is written); ``RuntimeError`` for
    pools or modules to save that hold NaN/inf (nothing written), or for a call inside
    :func:`lorambo.disable_adapter` on a model with modules_to_save (there they are the frozen
    originals); ``OSError`` for a write the filesystem refused (the previous file intact).
    """
    require_module(model, "save_adapter")
    require_path(path, "save_adapter")
    file = adapter_file(path)
    if file != Path(path) and Path(path).is_file():
        raise NotADirectoryError(f"save_adapter: {path} is a file without the .safetensors suffix; such a path names "
                                 f"a folder, which gets {DEFAULT_FILE}: give a name ending in .safetensors or a folder")
    check_target(file, "save_adapter")
    model = unwrap_model(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRAMBoLinear layer to save")
    check_not_root(layers)
    refuse_inside_disable_adapter(model, "save_adapter")
    refuse_meta_sources(model, layers, modules_to_save(model), "save_adapter")
    tensors, meta = {}, {}
    for layer in layers.values():
        layer.check_inactive_zero("save_adapter")
    # every pool frozen is a model frozen whole (for inference, export), not a training choice:
    # saved trainable, as peft's inference mode converts (lorambo/adapters/peft_import.py)
    inference = not any(getattr(layer, pool).requires_grad for layer in layers.values() for pool in POOLS)
    for name, layer in layers.items():
        r = layer.rank
        tensors[f"{name}.lora_A"] = layer.lora_A[:r].detach().cpu().contiguous()  # (r, in)
        tensors[f"{name}.lora_B"] = layer.lora_B[:, :r].detach().cpu().contiguous()  # (out, r)
        meta[name] = {field: getattr(layer, field) for field in LAYER_FIELDS}
        meta[name]["frozen"] = [] if inference else [pool for pool in POOLS if not getattr(layer, pool).requires_grad]
    check_finite_pools("save_adapter", ((name, pool, tensors[f"{name}.{pool}"]) for name in layers
                                        for pool in ("lora_A", "lora_B")))
    check_finite_modules_to_save("save_adapter", model)
    extra_modules.add_modules_to_save(model, tensors)
    tensors = own_storages(tensors)
    header = build_header(meta, tensors)
    return atomic_write(file, lambda tmp: save_file_canonical(tensors, tmp, header), "save_adapter")


def check_not_root(layers: dict) -> None:
    """Adapter files name each layer by its place in the model; a model that is itself a
    LoRAMBoLinear has none (its name is ''), and a file written for it could not be loaded."""
    if "" in layers:
        raise ValueError("the model is itself a LoRAMBoLinear: adapter files name each layer by its place in a "
                         "model, so save a module that holds it (e.g. nn.Sequential(layer))")


# ----------------------------------------------------------------------------- validation
def _check_against_lora_model(model: nn.Module, meta: dict, file: Path) -> None:
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
        check_settings_fit(f"adapter {file}: layer {name!r}", layer.lora_A.dtype, info["scaling"], info["dropout"],
                           alpha=info["alpha"])


def _check_against_bare_model(model: nn.Module, meta: dict, file: Path) -> None:
    """The file's layers exist in ``model`` as Linear/Conv1D of the saved shapes."""
    try:
        check_named_targets(model, meta.keys())
    except (ValueError, TypeError) as err:
        raise ValueError(f"adapter {file} does not match {type(model).__name__}: {err}") from None
    for name, info in meta.items():
        module = model.get_submodule(name)
        d_in, d_out = features(module, base_kind(module))
        saved, have = (info["out_features"], info["in_features"]), (d_out, d_in)
        if saved != have:
            raise ValueError(f"adapter {file}: layer {name!r} was saved for shape (out, in) = {saved}, "
                             f"the model's is {have}")
        check_settings_fit(f"adapter {file}: layer {name!r}", module.weight.dtype, info["scaling"], info["dropout"],
                           alpha=info["alpha"])


# ------------------------------------------------------------------------------ application
@torch.no_grad()
def _copy_into_layers(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], done: list[str]) -> None:
    """Copy the file into every layer, appending each finished layer's name to ``done``."""
    for name, layer in lora_layers(model).items():
        info = meta[name]
        r = info["rank"]
        if layer.merged:
            layer.unmerge()
        set_rank_for_overwrite(layer, r)
        layer.lora_A[:r].copy_(tensors[f"{name}.lora_A"])
        layer.lora_B[:, :r].copy_(tensors[f"{name}.lora_B"])
        layer.zero_inactive_()  # a set_rank that changed nothing left what the pools held (to_empty's memory)
        layer.scaling, layer.alpha = float(info["scaling"]), float(info["alpha"])
        layer.use_rslora, layer.dropout = bool(info["use_rslora"]), float(info["dropout"])
        if "frozen" in info:  # files written before it was saved keep the model's flags
            for pool in POOLS:
                getattr(layer, pool).requires_grad_(pool not in info["frozen"])
        done.append(name)


def load_adapter(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return it. ``path`` is
    the file, or the folder holding ``adapter.safetensors``; FileNotFoundError when there is none.

    A model without LoRA layers is configured from the file (same names, ranks, capacities, and
    the file's ``modules_to_save``). Otherwise its LoRA layers must match the file's names and
    shapes exactly, with a capacity of at least the saved rank, and take the file's rank,
    scaling, alpha, use_rslora and dropout (their own capacity stays). Each pool requires grad
    as it did when saved (frozen ones stay frozen, the others train; a file written before
    lorambo saved this leaves the model's flags as they are). The file is checked completely
    (header fields, shapes, checksums, finite values) and then against the model before
    anything is written, so a bad file or a mismatched model leaves the model as it was:
    :class:`AdapterFormatError` for a bad file, ``ValueError`` for a model that does not match
    it, or whose dtype cannot hold the file's values (a float32 adapter beyond 65504 into a
    float16 model; values within range are rounded once). A model wrapped by torch.compile or
    DDP is loaded into through the wrapper (the file's names are the plain model's); one wrapped
    by peft is a ``ValueError`` naming its peft modules (convert it with ``lorambo.from_peft``).
    ``RuntimeError`` inside :func:`lorambo.disable_adapter` on a model with modules_to_save:
    the block's exit would drop what was loaded into them.
    """
    require_module(model, "load_adapter")
    require_path(path, "load_adapter")
    wrapper, model = model, unwrap_model(model)
    refuse_peft_modules(model, "load_adapter: ")  # its names would miss peft's, with misleading hints
    refuse_inside_disable_adapter(model, "load_adapter")
    file = adapter_file(path)
    meta, tensors, _ = read_adapter_file(file)
    bare = not lora_layers(model)
    if bare:
        _check_against_bare_model(model, meta, file)
    else:
        _check_against_lora_model(model, meta, file)
    extra = extra_modules.check_modules_to_save(model, tensors, file)
    refuse_meta_destinations(model, meta, extra, f"adapter {file}")
    pools = {name: (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]) for name in meta}
    check_fits_dtypes(f"adapter {file}", loaded_entries(model, pools, extra))
    if bare:
        configure_for_overwrite(model, {n: info["rank"] for n, info in meta.items()},
                                capacity={n: info["capacity"] for n, info in meta.items()},
                                modules_to_save=extra_modules.saved_module_names(tensors) or None)
        _check_against_lora_model(model, meta, file)
    done: list[str] = []
    try:
        _copy_into_layers(model, meta, tensors, done)
        extra_modules.load_modules_to_save(model, extra)
    except BaseException as err:
        if bare:  # checked above, so unexpected: still give the model back as it came
            unload(model, merge=False)
        elif len(done) < len(meta):  # out of memory unmerging a merged layer, Ctrl-C
            note_partial_edit(err, "load_adapter", list(lora_layers(model))[len(done)], done,
                              "hold the file's adapter", "their previous one")
        else:  # the modules to save were given their old state back
            add_note(err, f"load_adapter stopped loading the modules to save {list(extra)}, which keep their "
                          "previous state, after every LoRA layer got the file's adapter. Calling load_adapter "
                          "again finishes it.")
        raise
    return wrapper
