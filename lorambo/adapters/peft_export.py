"""Export LoRAMBo adapters in peft's LoRA format (``PeftModel.from_pretrained`` loads it).

peft has one rank and alpha per config; per-layer values go into ``rank_pattern`` /
``alpha_pattern``. peft's scaling is ``lora_alpha / r``, so each layer's alpha is written as
``scaling * rank``, which reproduces lorambo's fixed scaling whatever rank it has now.
Rank-0 layers are left out of ``target_modules``. An adapter whose lora_B pools are all frozen
is written as peft's MiCA (``init_lora_weights="mica"``), the LoRA variant that trains A alone.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lorambo.adapters.atomic import atomic_write_many, check_target, text_writer
from lorambo.adapters.finite import check_finite_modules_to_save, check_finite_pools
from lorambo.adapters.format import own_storages
from lorambo.adapters.io import check_not_root
from lorambo.adapters.meta_tensors import refuse_meta_sources
from lorambo.adapters.peft_task import TASK_HEADS, peft_task_type
from lorambo.model import lora_layers
from lorambo.model.argument import require_module, require_path
from lorambo.model.disable import refuse_inside_disable_adapter
from lorambo.model.modules_to_save import modules_to_save
from lorambo.model.targeting import dot_suffixes
from lorambo.model.unwrap import unwrap_model
from lorambo.user_warnings import warn_user

_PREFIX = "base_model.model."


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Full names as a list (peft suffix-matches them) unless some other module's name ends
    with one of them; then an exact regex, since peft full-matches a string pattern."""
    targets = set(names)
    others = [n for n, _ in model.named_modules() if n not in targets]
    # o ends with "." + a target: a set lookup per dot of o, not an endswith per target (n^2 for
    # a model of n adapters)
    if any(suffix in targets for o in others for suffix in dot_suffixes(o)):
        return "(" + "|".join(re.escape(n) for n in names) + ")"
    return names


def _collision(saved, targets: list[str]) -> tuple[str, str, str] | None:
    """``(entry, holder, target)``: a modules_to_save entry that peft's plain ``endswith`` match
    (no dot boundary), made after its LoRA layers are in, would also take a LoRA target or a
    module holding one; None when there is none."""
    for target in targets:
        parts = target.split(".")
        for holder in (".".join(parts[:i]) for i in range(len(parts), 0, -1)):
            entry = next((e for e in saved if holder.endswith(e)), None)
            if entry is not None:
                return entry, holder, target
    return None


def _check_peft_can_load(saved: list[str], targets: list[str]) -> None:
    """An entry that also matches a LoRA target or a module holding one (DistilBERT's
    "classifier" and its target "pre_classifier") makes ``PeftModel.from_pretrained`` fail. No
    entry can name the one module alone there."""
    hit = _collision(saved, targets)
    if hit is not None:
        entry, holder, target = hit
        what = "the LoRA target" if holder == target else f"{holder!r}, which holds the LoRA target"
        raise ValueError(f"export_peft: peft matches modules_to_save by the end of the name, so the module "
                         f"to save {entry!r} would also take {what} {target!r}, and peft cannot load "
                         f"that adapter. Leave {target!r} out of the targets, or save {holder!r} whole "
                         "(modules_to_save) instead of adapting it")


def _task_and_heads(model: nn.Module, targets: list[str], saved: list[str]) -> tuple[str | None, list[str]]:
    """The peft task_type to write, and the heads its task class adds to modules_to_save that are
    not saved yet: peft's PeftModelFor<Task> wraps every module ending in those names and then
    needs their weights in the adapter file. A task whose heads would also take a LoRA target
    (DistilBERT's "classifier" and "pre_classifier") is not written: the folder then loads with
    PeftModel.from_pretrained, as without a task."""
    task = peft_task_type(model)
    entries = TASK_HEADS.get(task, ())
    if _collision(entries, targets) is not None:
        return None, []
    heads = [n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in entries)]
    return task, [n for n in heads if n not in saved]


def _few(values: dict) -> str:
    shown = ", ".join(f"{n}: {v}" for n, v in list(values.items())[:4])
    return shown + (f", ... {len(values)} layers" if len(values) > 4 else "")


def peft_adapter_config(model: nn.Module) -> dict:
    """The adapter_config.json content for the model's current adapters (what
    :func:`export_peft` writes). Not :func:`lorambo.peft_config`, which builds a
    ``peft.LoraConfig`` to train with."""
    model = unwrap_model(model)
    check_not_root(lora_layers(model))
    layers = {n: l for n, l in lora_layers(model).items() if l.rank > 0}
    if not layers:
        raise ValueError(f"export_peft: {type(model).__name__} has no LoRAMBoLinear with rank > 0 to export")
    names = list(layers)
    # peft matches pattern keys as suffixes in insertion order: longest names first keeps
    # "x.a" from being claimed by the key "a".
    by_length = sorted(names, key=len, reverse=True)
    rank_pattern = {n: layers[n].rank for n in by_length}
    alpha_pattern = {n: layers[n].scaling * layers[n].rank for n in by_length}
    r_default = Counter(rank_pattern.values()).most_common(1)[0][0]
    alpha_default = next(alpha_pattern[n] for n in names if rank_pattern[n] == r_default)
    saved = modules_to_save(model)
    _check_peft_can_load(saved, names)
    task, heads = _task_and_heads(model, names, saved)
    saved = saved + heads
    dropouts = {n: layers[n].dropout for n in names}
    if len(set(dropouts.values())) > 1:  # peft's config has one lora_dropout for every layer
        warn_user(f"export_peft: the layers' LoRA dropouts differ ({_few(dropouts)}); peft has one "
                  f"lora_dropout for all layers, written as the largest, {max(dropouts.values())}. "
                  "Outputs are unaffected; training the adapter in peft drops out at that rate "
                  "everywhere", UserWarning)
    frozen_b = {n: not layers[n].lora_B.requires_grad for n in names}
    # every pool frozen is a model frozen whole for inference or export, not MiCA (which trains A):
    # written trainable, as peft's inference mode converts (lorambo/adapters/peft_import.py)
    mica = all(frozen_b.values()) and any(layers[n].lora_A.requires_grad for n in names)
    if len(set(frozen_b.values())) > 1:  # peft freezes lora_B in every layer (MiCA) or in none
        warn_user(f"export_peft: some layers' lora_B pools are frozen and others not ({_few(frozen_b)}); "
                  "peft freezes lora_B in every layer (MiCA) or in none, so the adapter is written with "
                  "every lora_B trainable. Outputs are unaffected; training it in peft trains every B",
                  UserWarning)
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": r_default,
        "lora_alpha": alpha_default,
        "target_modules": _target_modules(model, names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": max(dropouts.values()),
        "fan_in_fan_out": any(l.base_kind == "conv1d" for l in layers.values()),
        "bias": "none",
        "use_rslora": False,
        # peft's MiCA variant is plain LoRA with lora_B frozen; peft draws the initial values on
        # loading and then loads these over them
        "init_lora_weights": "mica" if mica else True,
        "modules_to_save": saved or None,
        "inference_mode": True,
    }


def export_peft(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into folder ``path``
    (with the model's modules_to_save, stored as peft stores them).

    The two files are replaced together: on any error both keep their previous content. Layers
    are named as in the plain model, also when ``model`` is wrapped by torch.compile or DDP.
    ``ValueError`` for a model without a LoRAMBoLinear of rank > 0 or an empty path;
    ``NotADirectoryError`` when ``path`` is a file; ``RuntimeError`` for pools that hold NaN/inf
    (nothing written) or a call inside :func:`lorambo.disable_adapter` on a model with
    modules_to_save; ``OSError`` for a write the filesystem refused."""
    require_module(model, "export_peft")
    model = unwrap_model(model)
    folder = require_path(path, "export_peft")
    files = (folder / "adapter_model.safetensors", folder / "adapter_config.json")
    for file in files:
        check_target(file, "export_peft")
    config = peft_adapter_config(model)
    refuse_inside_disable_adapter(model, "export_peft")
    refuse_meta_sources(model, lora_layers(model), modules_to_save(model), "export_peft")
    tensors = {}
    for layer in lora_layers(model).values():
        layer.check_inactive_zero("export_peft")
    for name, layer in lora_layers(model).items():
        r = layer.rank
        if r == 0:
            continue
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A[:r].detach().cpu().contiguous()  # (r, in)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B[:, :r].detach().cpu().contiguous()  # (out, r)
    check_finite_pools("export_peft", ((name, pool, tensors[f"{_PREFIX}{name}.{pool}.weight"])
                                       for name, layer in lora_layers(model).items() if layer.rank
                                       for pool in ("lora_A", "lora_B")))
    check_finite_modules_to_save("export_peft", model)
    for name in config["modules_to_save"] or ():  # peft keys: base_model.model.<module>.<state key>
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    tensors = own_storages(tensors)
    # both files or neither: peft fails on new weights beside an old config (size mismatch)
    atomic_write_many({
        files[0]: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        files[1]: text_writer(json.dumps(config, indent=2) + "\n"),
    }, "export_peft")
    return folder
