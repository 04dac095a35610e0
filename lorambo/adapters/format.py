"""lorambo's adapter file format: the safetensors header, its checks and checksums.

A file holds, for every LoRA layer ``name``, the active slices ``name.lora_A`` [rank, in] and
``name.lora_B`` [out, rank], and three metadata strings besides ``format`` and ``version``:

- ``layers``: JSON ``{name: {rank, capacity, in_features, out_features, scaling, alpha,
  use_rslora, dropout, base_kind, frozen}}``; ``frozen`` lists the pools (``"lora_A"``,
  ``"lora_B"``) that did not require grad when saved, and files written before it was kept
  lack it;
- ``checksums``: JSON ``{tensor key: sha256 of (dtype, shape, bytes)}`` for every tensor, and
  ``"__layers__"``: the sha256 of the ``layers`` string, so a flipped bit anywhere in the
  data or the settings is caught.

:func:`read_adapter_file` checks everything (readable, right format, every field present and
of the right type and range, tensors of the right shape, checksums, finite values) and raises
:class:`AdapterFormatError` naming the file, layer and field; it never touches a model.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lorambo.nn.finite_numbers import is_finite_number, is_int, shown_number

FORMAT = "lorambo-adapter"
VERSION = 2  # 2 added the checksums; version 1 files (no checksums) are still read
READABLE_VERSIONS = ("1", "2")
LAYERS_KEY = "__layers__"


class AdapterFormatError(ValueError):
    """The file is not a valid lorambo adapter: truncated, corrupt (checksum mismatch, bad or
    missing header field, NaN/inf values) or another format. Nothing was loaded."""


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# field -> (check, what a valid value is)
LAYER_FIELDS = {
    "rank": (lambda v: is_int(v) and v >= 0, "an int >= 0"),
    "capacity": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "in_features": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "out_features": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "scaling": (is_finite_number, "a finite number"),
    "alpha": (is_finite_number, "a finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (lambda v: _is_real(v) and 0.0 <= v < 1.0, "a number in [0, 1)"),
    "base_kind": (lambda v: v in ("linear", "conv1d"), "'linear' or 'conv1d'"),
}

POOLS = ("lora_A", "lora_B")


def _is_pool_list(v) -> bool:
    return isinstance(v, list) and all(p in POOLS for p in v) and len(set(v)) == len(v)


# optional field -> (check, what a valid value is); absent from files written before it was kept
OPTIONAL_LAYER_FIELDS = {
    "frozen": (_is_pool_list, f"a list of distinct pool names from {list(POOLS)}"),
}


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (a dtype or shape change alters it too)."""
    h = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def own_storages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each one whose storage an earlier one already uses: safetensors
    refuses tensors that share memory, e.g. tied weights saved under two names (an embedding
    and an output head both in modules_to_save); on CPU ``.cpu()`` does not copy them apart."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_header(layers: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The metadata strings for ``layers`` (name -> settings) and their tensors."""
    layers_json = json.dumps(layers)
    checksums = {key: tensor_digest(t) for key, t in tensors.items()}
    checksums[LAYERS_KEY] = text_digest(layers_json)
    return {"format": FORMAT, "version": str(VERSION), "layers": layers_json,
            "checksums": json.dumps(checksums)}


def _load_json(file: Path, header: dict, key: str) -> dict:
    if key not in header:
        raise AdapterFormatError(f"{file}: header field {key!r} is missing")
    try:
        value = json.loads(header[key])
    except (TypeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{file}: header field {key!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{file}: header field {key!r} must be a JSON object "
                                 f"{{...}}, got {type(value).__name__}")
    return value


def check_layer_settings(file: Path, name, info) -> None:
    if not isinstance(name, str) or not name:
        raise AdapterFormatError(f"{file}: layer name {name!r} must be a non-empty string")
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{file}: layer {name!r}: settings must be a JSON object, "
                                 f"got {type(info).__name__}")
    for field, (ok, expected) in LAYER_FIELDS.items():
        if field not in info:
            raise AdapterFormatError(f"{file}: layer {name!r}: field {field!r} is missing")
        if not ok(info[field]):
            raise AdapterFormatError(f"{file}: layer {name!r}: field {field!r} is "
                                     f"{shown_number(info[field])}, expected {expected}")
    for field, (ok, expected) in OPTIONAL_LAYER_FIELDS.items():
        if field in info and not ok(info[field]):
            raise AdapterFormatError(f"{file}: layer {name!r}: field {field!r} is {info[field]!r:.80}, "
                                     f"expected {expected}")
    if info["rank"] > info["capacity"]:
        raise AdapterFormatError(f"{file}: layer {name!r}: rank {info['rank']} exceeds its "
                                 f"capacity {info['capacity']}")
    limit = min(info["in_features"], info["out_features"])
    if info["capacity"] > limit:
        raise AdapterFormatError(f"{file}: layer {name!r}: capacity {info['capacity']} exceeds "
                                 f"min(in_features, out_features) = {limit}")


def _check_tensors(file: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    for name, info in meta.items():
        r, d_in, d_out = info["rank"], info["in_features"], info["out_features"]
        for key, shape in ((f"{name}.lora_A", (r, d_in)), (f"{name}.lora_B", (d_out, r))):
            t = tensors.get(key)
            if t is None:
                raise AdapterFormatError(f"{file}: tensor {key!r} of layer {name!r} is missing")
            if tuple(t.shape) != shape:
                raise AdapterFormatError(f"{file}: tensor {key!r} has shape {list(t.shape)}, "
                                         f"layer {name!r} needs {list(shape)}")
            if not t.is_floating_point():
                raise AdapterFormatError(f"{file}: tensor {key!r} has dtype {t.dtype}, not a float")
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{file}: tensor {key!r} of layer {name!r} contains NaN "
                                         "or inf")


def _check_checksums(file: Path, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    sums = _load_json(file, header, "checksums")
    if sums.get(LAYERS_KEY) != text_digest(header["layers"]):
        raise AdapterFormatError(f"{file}: checksum mismatch in the layer settings (header field "
                                 "'layers'): the file is corrupt")
    for key, t in tensors.items():
        if key not in sums:
            raise AdapterFormatError(f"{file}: tensor {key!r} has no checksum")
        if sums[key] != tensor_digest(t):
            raise AdapterFormatError(f"{file}: checksum mismatch in tensor {key!r}: the file is "
                                     "corrupt")
    missing = [k for k in sums if k != LAYERS_KEY and k not in tensors]
    if missing:
        raise AdapterFormatError(f"{file}: tensor(s) {missing[:5]} listed in the checksums are "
                                 "missing")


def read_adapter_file(file: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(layer settings, tensors, raw header) of a valid adapter file, else AdapterFormatError."""
    if not file.is_file():
        hint = ""
        if (file.parent / "adapter_config.json").is_file():
            hint = "; that folder holds a peft adapter (adapter_config.json): load it with lorambo.import_peft"
        elif file.parent.is_file():  # the name given lacks the suffix, so it was taken as a folder
            hint = (f"; {file.parent} is a file, and a path without the .safetensors suffix names a folder: "
                    "give the file a name ending in .safetensors")
        raise FileNotFoundError(f"no lorambo adapter at {file}{hint}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as err:
        raise AdapterFormatError(f"{file} is not a readable safetensors file: {err}") from err
    if header.get("format") != FORMAT:
        hint = (f"; it is in a peft adapter folder: load that with lorambo.import_peft(model, {str(file.parent)!r})"
                if (file.parent / "adapter_config.json").is_file() else "")
        raise AdapterFormatError(f"{file} is not a lorambo adapter (format {header.get('format')!r}){hint}")
    version = header.get("version")
    if version not in READABLE_VERSIONS:
        raise AdapterFormatError(f"{file} has adapter format version {version!r}, this lorambo "
                                 f"reads {', '.join(READABLE_VERSIONS)}")
    meta = _load_json(file, header, "layers")
    if not meta:
        raise AdapterFormatError(f"{file}: header field 'layers' lists no layer")
    if version != "1" or "checksums" in header:  # version 1 files had none; never skip present ones
        _check_checksums(file, header, tensors)
    for name, info in meta.items():
        check_layer_settings(file, name, info)
    _check_tensors(file, meta, tensors)
    return meta, tensors, header
