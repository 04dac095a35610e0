"""Rank changes, merge, unload and saving on pools sharded by FSDP2 (``fully_shard``).

Why this is needed: after ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor
holding one shard of dim 0 per process (rows of ``lora_A`` are rank slots, so a slot can live on
another process), and its optimizer state is sharded the same way. Forward and backward need
nothing from lorambo: FSDP all-gathers the pools before ``LoRAMBoLinear.forward`` and
reduce-scatters their gradients. But a rank change edits rows and columns across shards.

How: :func:`full_pools` all-gathers the pools (and their ``.grad`` and optimizer state) of the
given layers, swaps them in as ordinary tensors, runs lorambo's own rank-change code on them,
and writes each process's shard back in place, into the same DTensor storage FSDP and the
optimizer hold. No re-wrap, no new parameters, optimizer state kept. Every process must make
the same calls in the same order (collectives), and takes the same decisions: online growth
already reduces its statistics over processes and seeds new slots identically (see
:mod:`lorambo.distributed`). The pools are all-gathered only on decision steps.

On a model without DTensor parameters every function here computes what the plain lorambo call
computes, so one training script serves both. Under torch.distributed (DDP replicas) every
process calls the edits and saves, as on a sharded model; an edit that fails on one process is
made on none.

Not supported under FSDP2: anything that runs a forward pass inside a decision (ALoRA rounds,
rank moves scored by held-out ablation): FSDP would all-gather over the swapped pools. Pass
``component_scores`` (e.g. ``AdaLoRAImportance``) for rank moves instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.amp.grad_scaler import GradScaler

from lorambo.adapters.io import save_adapter as _save_adapter
from lorambo.adapters.peft_export import export_peft as _export_peft
from lorambo.distributed import SharedFailure, is_main_process, world_size
from lorambo.dtensor_gather import PreparedGather, prepare_gather, prepare_gathers
from lorambo.nn.edit_snapshot import EditSnapshot
from lorambo.model import lora_layers
from lorambo.model import unload as _unload
from lorambo.model.configure import check_mergeable
from lorambo.model.modules_to_save import modules_to_save
from lorambo.model.partial_edit import add_note, shown_layers
from lorambo.model.unwrap import unwrap_model
from lorambo.nn import LoRAMBoLinear, keep_components_many
from lorambo.nn.merge_overflow import finite_merge
from lorambo.nn.optimizer_argument import (OptimizerArgument, each_optimizer, optimizer_argument, skips_this_step,
                                           wrapper_grad_scaler)
from lorambo.nn.optimizer_tracking import stand_in_for
from lorambo.nn.slots import pool_slots, tag_pool_parameter
from lorambo.sharding import is_sharded, local_region

if TYPE_CHECKING:
    from lorambo.optimizer import LoRAMBoOptimizer

__all__ = ["is_sharded", "reshard", "full_pools", "set_rank", "keep_components", "allocator_step", "merge",
           "unmerge", "unload", "unloaded_state_dict", "save_adapter", "export_peft"]


@torch.no_grad()
def _write_local(dt, full: torch.Tensor) -> None:
    local = dt.to_local()
    local.copy_(full[local_region(dt)].to(local.device, local.dtype))


class _GatheredOptimizer:
    """Stands in for the real optimizer inside :func:`full_pools`: ``state`` maps the swapped-in
    full pools to full copies of their state, ``param_groups`` are the real groups holding them
    (lorambo's slot edits read these and ``optimizer_type``)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.state: dict = {}
        self.param_groups: list = []
        self.optimizer_type = type(optimizer)
        self.name = self.optimizer_type.__name__
        self.stands_in_for = optimizer  # its state is edited through this view, not left behind


@contextmanager
def full_pools(layers: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None = None,
               base_weights: bool = False, extra_modules: Iterable[nn.Module] = (), who: str = "full_pools",
               settings: Mapping[str, Any] | None = None, keep_partial: bool = False):
    """Within the context the pools of ``layers`` (with ``base_weights`` also their base weight
    and bias; with ``extra_modules`` their parameters) are full ordinary Parameters; yields the
    optimizer to pass to lorambo's rank edits (None when ``optimizer`` is None; a tuple of them
    when ``optimizer`` is a list of optimizers). On exit each process writes its shard of every
    value, gradient and optimizer state back in place.

    Every process must enter with the same ``settings`` (``who`` names the caller in errors) and
    the same tensors to gather; one small all-reduce checks both before the first all-gather, so
    a process given other layers or other arguments raises a ValueError on every process instead
    of waiting in a gather the others never join. Every gathered tensor is allocated before that
    all-reduce too (:mod:`lorambo.dtensor_gather`), so running out of memory for them on one
    process raises on every process, nothing changed. An ``Exception`` raised in the context on
    one process is raised on every process (a RuntimeError naming it on the others), by one more
    small all-reduce on exit. Then no process writes back, and each one's layers (rank, slot
    ids, merge state) and what is not sharded (values, gradients, optimizer state: an unsharded
    model under DDP) are put back (:class:`EditSnapshot`): the edit is made on every process or
    on none. ``keep_partial``: write back what the context changed before it stopped (the rank
    decisions of ``allocator_step``, which record and log the rank changes they made).
    """
    failure = SharedFailure(who)
    with failure:  # an argument only this process refuses stops every process before the gathers
        layers = list(layers)
        slots = []  # (module, name, sharded param)
        for layer in layers:
            if not isinstance(layer, LoRAMBoLinear):
                raise TypeError(f"{who}: expected LoRAMBoLinear layers, got a {type(layer).__name__}")
            for module, name in [(layer, "lora_A"), (layer, "lora_B")] + (
                    [(layer.base_layer, n) for n, _ in layer.base_layer.named_parameters(recurse=False)]
                    if base_weights else []):
                slots.append((module, name, module._parameters[name]))
        for module in extra_modules:
            for sub in module.modules():
                slots.extend((sub, n, p) for n, p in sub._parameters.items() if p is not None)
        optimizer = optimizer_argument(optimizer, "lorambo.integrations.fsdp")
        proxies = [(one, _GatheredOptimizer(one)) for one in each_optimizer(optimizer)]
        failure.settings = {**(settings or {}), "gathered": _gather_signature(slots, proxies)}
        snapshot = EditSnapshot(layers, [param for _, _, param in slots], [one for one, _ in proxies]) \
            if world_size() > 1 else None  # a single process's error propagates at once: nothing to undo
        # every gathered tensor's memory, allocated here: out of memory (or a placement refused)
        # on one process is raised on all by the check below, not inside an all-gather the
        # others would wait in until the process group's timeout
        gathers = [_prepare_slot(param, proxies, who) for _, _, param in slots]
    failure.check()
    swapped = []
    try:
        for (module, name, param), gather in zip(slots, gathers):
            if gather is None:
                for one, proxy in proxies:
                    if param in one.state:
                        proxy.state[param] = one.state[param]  # same objects: edits land in place
                continue
            value, grad, states = gather
            full = nn.Parameter(value.run(), requires_grad=param.requires_grad)
            if grad is not None:
                full.grad = grad.run()
            tag = pool_slots(param)
            if tag is not None:
                tag_pool_parameter(full, *tag)
                stand_in_for(full, param)  # an optimizer left out still gets its stale-state warning
            for proxy, state in states:
                proxy.state[full] = {k: v.run() if isinstance(v, PreparedGather) else v for k, v in state.items()}
            module._parameters[name] = full
            swapped.append((module, name, param, full))
        full_of = {id(param): full for _, _, param, full in swapped}
        for one, proxy in proxies:
            proxy.param_groups = [{**group, "params": [full_of.get(id(p), p) for p in group["params"]]}
                                  for group in one.param_groups]
        views = tuple(proxy for _, proxy in proxies)
        with failure:  # held until every process knows (below); the others would go on edited
            yield None if not views else views[0] if not isinstance(optimizer, tuple) else views
        try:
            failure.check()
        except Exception as err:
            if not keep_partial and snapshot is not None:
                for module, name, param, _ in swapped:
                    module._parameters[name] = param
                swapped = []
                snapshot.restore()
                add_note(err, f"{who}: no process kept the edit: every process holds the pools, ranks, merge "
                              "state and optimizer state it held before the call")
            raise
    finally:
        with torch.no_grad():
            for module, name, param, full in swapped:
                module._parameters[name] = param
                _write_local(param, full)
                if full.grad is not None and param.grad is not None:
                    _write_local(param.grad, full.grad)
                for one, proxy in proxies:
                    if full in proxy.state:
                        real = one.state[param]
                        for key, value in proxy.state[full].items():
                            if is_sharded(real.get(key)):
                                _write_local(real[key], value)
                            else:
                                real[key] = value


def _prepare_slot(param, proxies, who: str):
    """The prepared gathers of a sharded parameter: ``(value, grad or None, [(proxy, state)])``,
    each state entry a :class:`PreparedGather` where sharded; None for an unsharded parameter."""
    if not is_sharded(param):
        return None
    value = prepare_gather(param, who)
    grad = prepare_gather(param.grad, who) if param.grad is not None else None
    states = [(proxy, {k: prepare_gather(v, who) if is_sharded(v) else v for k, v in one.state[param].items()})
              for one, proxy in proxies if param in one.state]
    return value, grad, states


def _gather_signature(slots, proxies) -> list:
    """What :func:`full_pools` gathers, in order: every process must gather the same."""
    return [(type(module).__name__, name, tuple(param.shape), str(param.dtype), is_sharded(param),
             param.grad is not None, [sorted(one.state[param]) if param in one.state else None for one, _ in proxies])
            for module, name, param in slots]


def set_rank(layer, rank: int, optimizer: OptimizerArgument | None = None,
             generator: torch.Generator | None = None) -> int:
    """``layer.set_rank`` on a sharded (or plain) layer; returns the old rank."""
    with full_pools([layer], optimizer, who="lorambo.integrations.fsdp.set_rank",
                    settings={"layer": getattr(layer, "name", None), "rank": rank}) as opt:
        return layer.set_rank(rank, optimizer=opt, generator=generator)


def keep_components(plans: Sequence[tuple[nn.Module, Sequence[int]]],
                    optimizer: OptimizerArgument | None = None) -> list[int]:
    """``keep_components_many`` on sharded (or plain) layers; returns the old ranks."""
    plans = [(layer, list(keep)) for layer, keep in plans]
    with full_pools([layer for layer, _ in plans], optimizer, who="lorambo.integrations.fsdp.keep_components",
                    settings={"plans": [(getattr(layer, "name", None), keep) for layer, keep in plans]}) as opt:
        return keep_components_many(plans, opt)


def allocator_step(allocator: LoRAMBoOptimizer, step: int, optimizer: OptimizerArgument | None = None,
                   component_scores: Mapping[str, torch.Tensor] | None = None,
                   grad_scaler: GradScaler | None = None) -> list[dict[str, Any]]:
    """``LoRAMBoOptimizer.step`` for a sharded model: the pools are gathered on decision steps only."""
    if allocator.allocation == "alora":
        raise NotImplementedError("ALoRA runs forward passes inside its decisions; under FSDP2 use "
                                  "online growth (with component_scores for rank moves)")
    if skips_this_step(optimizer):  # accelerate's accumulate: decided on the micro-batch that steps
        return []
    grad_scaler = grad_scaler if grad_scaler is not None else wrapper_grad_scaler(optimizer)
    optimizer = optimizer if optimizer is not None else allocator.default_optimizer
    if not allocator.is_decision_step(step) or allocator.decided_already(step):
        # no decision to take (a repeated call of a step that changed ranks warns there): nothing to gather
        return allocator.step(step, optimizer=optimizer, component_scores=component_scores)
    if allocator.move_threshold is not None and component_scores is None:  # only decisions score moves
        raise NotImplementedError("rank moves scored by held-out ablation run forward passes inside the "
                                  "decision; under FSDP2 pass component_scores (e.g. AdaLoRAImportance)")
    reshard(allocator.model)
    # the decision records and logs the rank changes it made before an error: those are kept
    with full_pools(allocator.layers().values(), optimizer, who="lorambo.integrations.fsdp.allocator_step",
                    settings={"step": step}, keep_partial=True) as opt:
        return allocator.step(step, optimizer=opt, component_scores=component_scores, grad_scaler=grad_scaler)


def merge(model: nn.Module, exact: bool = False) -> None:
    """Merge every adapter into its (sharded) base weight. ``exact=True`` keeps a full copy of
    each base weight on every process; the default subtracts again on :func:`unmerge`. Refused,
    before anything changes, as :func:`lorambo.unload` refuses it (tied or parametrized weights),
    and when a layer is merged already."""
    _refuse_mixed(model, merged=True, caller="merge")
    check_mergeable(model, lora_layers(model), caller="merge")
    reshard(model)
    named = lora_layers(model)
    with full_pools(named.values(), base_weights=True, who="lorambo.integrations.fsdp.merge",
                    settings={"exact": exact}):
        for layer in named.values():  # every layer before the first merge: all or nothing
            layer.check_merge_finite("merge")
        _every_layer_or_none(named, lambda layer: layer.merge(exact=exact), lambda layer: layer.unmerge(), "merge",
                             "unmerged again" + ("" if exact else " (each weight within two roundings of its own)"))


def _refuse_mixed(model: nn.Module, merged: bool, caller: str) -> None:
    """Raise, before anything changes, if a layer already is in the state ``caller`` would bring
    it to (``merged``): the per-layer loop would raise there after changing the layers before it."""
    done = [n for n, layer in lora_layers(model).items() if layer.merged == merged]
    if done:
        raise RuntimeError(f"{caller}: LoRA layers {done[:4]}{' ...' if len(done) > 4 else ''} are "
                           f"{'merged already' if merged else 'not merged'}; nothing was changed")


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every layer; refused, before anything changes, when a layer is not merged."""
    _refuse_mixed(model, merged=False, caller="unmerge")
    reshard(model)
    named = lora_layers(model)
    with full_pools(named.values(), base_weights=True, who="lorambo.integrations.fsdp.unmerge"):
        kept = {id(layer): layer._weight_before_merge is not None for layer in named.values()}  # merge(exact=True)
        _every_layer_or_none(named, lambda layer: layer.unmerge(),
                             lambda layer: layer.merge(exact=kept[id(layer)]), "unmerge", "merged again")


def _every_layer_or_none(layers: dict, edit, undo, caller: str, undone: str) -> None:
    """``edit`` every layer; stopped at one (out of memory in its float64 delta, Ctrl-C), ``undo``
    the layers done, which otherwise left a model half merged that both :func:`merge` and
    :func:`unmerge` refuse. The error's note says what was undone (and what an undo that failed
    too left)."""
    done = []
    try:
        for name, layer in layers.items():
            edit(layer)
            done.append(name)
    except BaseException as err:
        left = list(done)
        try:
            while left:
                undo(layers[left[-1]])
                left.pop()
        except BaseException:  # out of memory again: say which layers stay edited
            pass
        if done:
            add_note(err, f"{caller} stopped at {list(layers)[len(done)]!r}; the layers before it {shown_layers(done)} were "
                          f"{undone}" + (f", except {left} (their undo failed too)" if left else ""))
        raise


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """:func:`lorambo.unload` in place on a sharded model: base modules back (merged when
    ``merge``), still sharded. Refused when a LoRAMBoLinear is itself an FSDP unit (its base
    layer would be left without FSDP's all-gather): use :func:`unloaded_state_dict` then."""
    from torch.distributed.fsdp import FSDPModule

    wrapped = [n for n, m in lora_layers(model).items() if isinstance(m, FSDPModule)]
    if wrapped:
        raise NotImplementedError(f"unload: LoRA layers {wrapped[:3]} are FSDP units themselves (fully_shard "
                                  "was applied to them); apply fully_shard to their parents, or take "
                                  "lorambo.integrations.fsdp.unloaded_state_dict(model) for a plain model")
    reshard(model)
    layers = list(lora_layers(model).values())
    # unload replaces modules, which no snapshot puts back: what it did before an error stays
    with full_pools(layers, base_weights=True, who="lorambo.integrations.fsdp.unload", settings={"merge": merge},
                    keep_partial=True):
        return _unload(model, merge=merge)


@torch.no_grad()
def unloaded_state_dict(model: nn.Module, merge: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of the plain model :func:`lorambo.unload` would give, with
    the adapters merged into the base weights when ``merge``; on every process, the sharded model
    untouched. Load it into a fresh copy of the base model. Refused, like :func:`lorambo.unload`,
    when a merge would go into a weight the model also uses elsewhere (tied weights). Keys are
    the plain model's names, also for a model wrapped by torch.compile or DDP. On a sharded model
    every process must call; running out of memory for the gathered tensors on one process
    raises on every process (as in :func:`full_pools`)."""
    model = unwrap_model(model)
    if merge:
        check_mergeable(model, lora_layers(model), caller="unloaded_state_dict")
    reshard(model)
    raw = model.state_dict()
    # a merged layer's state_dict may hold its weight unmerged: the live weight is taken instead
    live = {f"{name}.base_layer.weight": layer.base_layer.weight.detach()
            for name, layer in lora_layers(model).items() if merge and layer.merged}
    gathered = _gathered({**{("state", k): v for k, v in raw.items()}, **{("live", k): v for k, v in live.items()}},
                         "lorambo.integrations.fsdp.unloaded_state_dict", {"merge": merge})
    state = {k: gathered["state", k] for k in raw}
    out = dict(state)
    for name, layer in lora_layers(model).items():
        for key in (f"{name}.lora_A", f"{name}.lora_B", f"{name}._extra_state"):
            out.pop(key, None)
        weight_key = f"{name}.base_layer.weight"
        if merge and layer.merged:
            weight = gathered["live", weight_key]
            out[weight_key] = weight if is_sharded(live[weight_key]) else weight.clone()
        elif merge:
            r = layer.rank
            a, b = state[f"{name}.lora_A"][:r].double(), state[f"{name}.lora_B"][:, :r].double()
            delta = (b @ a) * layer.scaling  # (out, in), as LoRAMBoLinear.merge computes it
            w = state[weight_key]
            out[weight_key] = finite_merge(layer._label, w, delta if layer.base_kind == "linear" else delta.t(),
                                           "unloaded_state_dict")
        elif not merge and layer.merged:
            raise ValueError(f"unloaded_state_dict(merge=False): layer {name!r} is merged; unmerge first")
        prefix = f"{name}.base_layer."
        for key in [k for k in out if k.startswith(prefix)]:
            out[f"{name}.{key[len(prefix):]}"] = out.pop(key)
    return out


def _gathered(tensors: Mapping[Any, Any], who: str, settings: Mapping[str, Any]) -> dict[Any, Any]:
    """``tensors`` with every DTensor gathered in full (the others as they are). On a sharded
    model each gathered tensor is allocated first, and one small all-reduce checks that every
    process did so and gathers the same: an error there (out of memory) raises on every process
    before any all-gather. Nothing sharded: no collective (DDP processes need not all call)."""
    sharded = {k: v for k, v in tensors.items() if is_sharded(v)}
    if not sharded:
        return dict(tensors)
    gathers = prepare_gathers(sharded, who, {**settings, "gathered": [
        (k, tuple(v.shape), str(v.dtype)) for k, v in sharded.items()]})
    return {k: gathers[k].run() if k in gathers else v for k, v in tensors.items()}


def reshard(model: nn.Module) -> None:
    """Return every FSDP2 module of ``model`` to its sharded parameters (FSDP keeps the root's
    all-gathered after a forward without backward); edits must land in the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _gathered_save(model, write, path, writes: bool | None):
    reshard(model)
    heads = [model.get_submodule(n) for n in modules_to_save(model)]
    # the writing processes' errors (a bad path, a full disk) reach the others through the
    # all-reduce that ends full_pools (it is also the call's barrier), instead of leaving them
    # waiting; nothing was edited, so nothing is put back
    with full_pools(lora_layers(model).values(), extra_modules=heads, who=write.__name__, keep_partial=True):
        return write(model, path) if (is_main_process() if writes is None else writes) else None


def save_adapter(model: nn.Module, path: str | os.PathLike[str], writes: bool | None = None) -> Path | None:
    """:func:`lorambo.save_adapter` of a sharded model; every process must call. ``writes``:
    whether this process writes the file (default: process 0 only)."""
    return _gathered_save(model, _save_adapter, path, writes)


def export_peft(model: nn.Module, path: str | os.PathLike[str], writes: bool | None = None) -> Path | None:
    """:func:`lorambo.export_peft` of a sharded model; every process must call. ``writes``:
    whether this process writes the files (default: process 0 only)."""
    return _gathered_save(model, _export_peft, path, writes)
