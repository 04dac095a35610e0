"""Swap LoRAMBoLinear into a model, list its adapters, and take them out again."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from lorambo.model.argument import require_module
from lorambo.model.fast_paths import sync_fast_paths
from lorambo.model.frozen import forget_frozen, record_frozen
from lorambo.model.frozen_heads import warn_frozen_heads
from lorambo.model.modules_to_save import (check_not_targets, forget_modules_to_save, keep_trainable,
                                           modules_to_save as recorded_modules_to_save, resolve_modules_to_save)
from lorambo.model.partial_edit import note_partial_edit
from lorambo.model.patterns import check_alpha_pattern, pattern_lookup
from lorambo.model.resize_guard import sync_resize_guards
from lorambo.model.targeting import check_named_targets, find_targets, refuse_peft_modules
from lorambo.model.unwrap import unwrap_model
from lorambo.nn import LoRAMBoLinear
from lorambo.nn.finite_numbers import shown_number
from lorambo.nn.frozen_bases import forget_noted, note_unloaded
from lorambo.nn.optimizer_argument import OptimizerArgument, optimizer_argument
from lorambo.nn.optimizer_state import check_slot_state_editable
from lorambo.nn.shared_memory import memory_key, share_memory
from lorambo.user_warnings import warn_user, warns_when_done


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _per_layer(value, name: str, what: str):
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(f"{what} has no entry for module {name!r}")
        return value[name]
    return value


@warns_when_done  # a warning raised as an error must not leave the model half-adapted
def configure_model(model: nn.Module, ranks: int | Mapping[str, int], target_modules: str | Iterable[str] | None = None,
                    capacity: int | Mapping[str, int] | None = None, alpha: float | None = None,
                    dropout: float | None = None, use_rslora: bool | None = None,
                    modules_to_save: str | Iterable[str] | None = None,
                    alpha_pattern: Mapping[str, float] | None = None, optimizer: OptimizerArgument | None = None,
                    generator: torch.Generator | None = None) -> nn.Module:
    """Adapt ``model`` in place and return it.

    ``ranks`` is one int for every target, or ``{module_name: rank}`` naming the targets exactly
    (then ``target_modules`` must be None). ``target_modules`` None means peft's ``all-linear``
    on a model without adapters, and the existing adapters on an adapted one (an int rank then
    re-ranks them all; pass ``"all-linear"`` to adapt every other Linear too). Targets that
    already are LoRAMBoLinear change rank in place (the rank must fit their capacity, and a
    merged layer must be unmerged first); their capacity, alpha, dropout and use_rslora stay as
    built, so a different value given for one of them is a ValueError (None, the default, leaves
    them alone; new layers then get dropout 0 and plain alpha / rank scaling). Every parameter
    that is not LoRA is frozen; :func:`unload` restores it.

    ``optimizer``: the torch optimizer already training existing adapters; their rank changes
    then edit its state as ``set_rank(rank, optimizer=...)`` does (without it, a shrunk slot
    keeps its moments, drifts off zero under Adam, and hands them to a slot grown there later).

    ``generator``: the new rows of A of the existing adapters that grow are drawn from it, in
    target order (``set_rank(rank, generator=...)``): seeded, they are the same on every process
    whatever torch's global generator holds (DDP), and that generator is left alone. None: they
    come from torch's global generator. New layers are initialised as ``LoRAMBoLinear`` does.

    ``modules_to_save`` (peft semantics: names or name suffixes) stay trainable and are stored by
    ``save_adapter``. ``alpha_pattern`` sets alpha per layer like peft's (``{pattern: alpha}``,
    first matching key wins, ``alpha`` elsewhere); the scaling is fixed at construction.

    All or nothing: every target is checked and every new layer built before the model is
    touched, so any error leaves the model exactly as it was.

    Raises ``ValueError`` for a ``target_modules`` entry, rank or capacity key that matches no
    module, a rank or capacity that does not fit a layer, or a setting that differs from an
    existing adapter's; ``TypeError`` for ranks or settings of the wrong type or a target that
    is not ``nn.Linear`` / ``Conv1D``; ``RuntimeError`` for a rank change of a merged layer.
    Each names the module and the value.
    """
    require_module(model, "configure_model")
    optimizer = optimizer_argument(optimizer, "configure_model")
    _check_settings_types(dropout, use_rslora)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"configure_model: generator must be a torch.Generator or None, got {generator!r:.60}")
    _check_no_lazy_parameters(model)
    refuse_peft_modules(model, "configure_model: ")
    saved = resolve_modules_to_save(model, modules_to_save)
    names = _resolve_targets(model, ranks, target_modules)
    check_not_targets(list(dict.fromkeys(recorded_modules_to_save(model) + saved)), names)  # earlier calls' too
    check_alpha_pattern(alpha_pattern, names)
    _check_capacity_names(capacity, names)
    plan = _plan(model, names, ranks, capacity, alpha, dropout, use_rslora, alpha_pattern, optimizer)
    _apply(model, plan, optimizer, generator)
    keep_trainable(model, saved)
    if plan.new_layers:  # the call that adapts the model; a re-rank has been warned about already
        warn_frozen_heads(model)
    for name, shared in weight_sharers(model, plan.new_layers).items():
        plan.new_layers[name].note_tied_weight(_holders(model, shared))
        if shared:
            warn_user(f"configure_model: the base weight of {name!r} is tied to {shared}; its adapter trains "
                      "fine, but merging it would change those too (unload(merge=True) refuses it)")
    return model


def _check_capacity_names(capacity, names: list[str]) -> None:
    """A ``{name: capacity}`` key that is no target would be ignored, and a misspelt one leave
    its layer at another capacity without a word (allocate and import_peft refuse it too)."""
    if isinstance(capacity, Mapping):
        unknown = sorted(set(capacity) - set(names))
        if unknown:
            raise ValueError(f"configure_model: capacity names {unknown[:5]}, which are not among the targets "
                             f"(e.g. {names[:5]}); give capacities for the targets only")


def _check_settings_types(dropout, use_rslora) -> None:
    """Checked here as well as by each new layer: an existing adapter only compares them."""
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)):
        raise TypeError(f"configure_model: dropout must be a number in [0, 1) or None, got {dropout!r}")
    if use_rslora is not None and not isinstance(use_rslora, bool):  # "false" is truthy
        raise TypeError(f"configure_model: use_rslora must be True, False or None, got {use_rslora!r}")


def _check_no_lazy_parameters(model: nn.Module) -> None:
    """Every non-LoRA parameter is frozen, and an uninitialised one (a LazyModule before its first
    forward) cannot be: torch refuses ``requires_grad_`` on it, which stopped the edit midway."""
    lazy = [n for n, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise ValueError(f"configure_model: {type(model).__name__} has uninitialized lazy parameters {lazy[:4]} "
                         "(a LazyModule before its first forward), which cannot be frozen; run one forward "
                         "with a dummy batch first")


@dataclass
class _Plan:
    """What configure_model will change; building it changes nothing in the model."""

    new_layers: dict[str, LoRAMBoLinear] = field(default_factory=dict)
    rank_changes: dict[str, tuple[LoRAMBoLinear, int]] = field(default_factory=dict)
    freeze: list[nn.Parameter] = field(default_factory=list)


def _resolve_targets(model: nn.Module, ranks, target_modules) -> list[str]:
    if isinstance(ranks, Mapping):
        if target_modules is not None:
            raise ValueError("pass either ranks as a {name: rank} dict or target_modules, not both")
        if not ranks:
            raise ValueError("ranks is an empty dict: nothing to adapt")
        names = check_named_targets(model, ranks.keys())
    elif isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        # no targets named on an adapted model: its adapters (re-ranked), as LoRAMBoOptimizer's
        # default; peft's all-linear there would add adapters no optimizer built before holds
        existing = list(lora_layers(model)) if target_modules is None else []
        names = existing or find_targets(model, target_modules)
    else:
        raise TypeError(f"ranks must be an int or a {{name: rank}} dict, got {ranks!r}")
    _check_not_shared(model, names)
    return names


def _check_not_shared(model: nn.Module, names: list[str]) -> None:
    """A module reachable under two names would be wrapped under one and stay plain (and
    frozen) under the other: refuse it rather than adapt half of its uses."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    for name in names:
        uses = paths.get(id(model.get_submodule(name)), [name])
        if len(uses) > 1:
            raise ValueError(f"module {name!r} is used {len(uses)} times in {type(model).__name__} "
                             f"(as {uses}); lorambo adapts a module at one place only: give each "
                             "use its own module, or leave it out of the targets")


def _plan(model, names, ranks, capacity, alpha, dropout, use_rslora, alpha_pattern, optimizer=None) -> _Plan:
    plan = _Plan(freeze=[p for n, p in model.named_parameters()
                         if p.requires_grad and not n.endswith((".lora_A", ".lora_B"))])
    module = None
    alpha_of = pattern_lookup(alpha_pattern, alpha)
    try:
        for name in names:
            rank = _per_layer(ranks, name, "ranks")
            module = model.get_submodule(name)
            if isinstance(module, LoRAMBoLinear):
                _check_settings_kept(module, name, capacity=_per_layer_or_none(capacity, name),
                                     alpha=alpha_of(name), dropout=dropout,
                                     use_rslora=use_rslora)
                rank = module.validate_rank(rank)
                if module.merged and rank != module.rank:
                    raise RuntimeError(f"LoRAMBoLinear {name!r} is merged: unmerge() it before "
                                       f"changing its rank from {module.rank} to {rank}")
                if rank != module.rank:
                    check_slot_state_editable(optimizer, module)
                plan.rank_changes[name] = (module, rank)
                continue
            plan.new_layers[name] = LoRAMBoLinear(
                module, rank=rank, capacity=_per_layer(capacity, name, "capacity"),
                alpha=alpha_of(name),
                dropout=0.0 if dropout is None else dropout,
                use_rslora=bool(use_rslora), name=name)
    except BaseException:  # Ctrl-C or out of memory while building layer k too
        _thaw(plan)
        if module is not None and not isinstance(module, LoRAMBoLinear):  # the one being built
            forget_noted(module.parameters())  # noted even when its base was frozen before the call
        raise
    return plan


def _thaw(plan: _Plan) -> None:
    """Undo what building the plan's new layers did to the model: the base weights their
    constructors froze are trainable again, and neither those nor the new layers' bases stay on
    record as frozen bases of an adapter."""
    for param in plan.freeze:
        param.requires_grad_(True)
    forget_noted([*plan.freeze, *(p for layer in plan.new_layers.values() for p in layer.base_layer.parameters())])


def _per_layer_or_none(value, name: str):
    return value.get(name) if isinstance(value, Mapping) else value


def _check_settings_kept(module: LoRAMBoLinear, name: str, **requested) -> None:
    """An existing adapter keeps the settings it was built with: a different one asked for would
    otherwise be ignored without a word."""
    for what, new in requested.items():
        if new is None:
            continue
        current = getattr(module, what)
        # numbers compared as they are: float() of an int beyond the float range (10**400) overflows
        if (bool(new) != current) if what == "use_rslora" else (new != current):
            raise ValueError(f"configure_model: {name!r} is already a LoRAMBoLinear with {what}={current!r}, "
                             f"and {what}={shown_number(new)} was requested; an existing adapter keeps its {what}: "
                             f"leave {what} out (None) to change its rank only, or unload(model, merge=False) "
                             "and configure the model again")


def _apply(model: nn.Module, plan: _Plan, optimizer=None, generator=None) -> None:
    """Carry out a checked plan: the rank changes of existing adapters first, the one part that
    can still stop part-way (out of memory editing a layer's optimizer state, Ctrl-C): then no
    new layer is placed and the error's note names the layers re-ranked. Placing the new layers
    cannot fail."""
    changed: list[str] = []
    for name, (module, rank) in plan.rank_changes.items():
        if rank == module.rank:
            continue
        try:
            module.set_rank(rank, optimizer=optimizer, generator=generator)
        except BaseException as err:
            _thaw(plan)
            note_partial_edit(err, "configure_model", name, changed, "have their new ranks",
                              "their old ones, and no new adapter was placed")
            raise
        changed.append(name)
    for name, layer in plan.new_layers.items():
        _set_submodule(model, name, layer)
    record_frozen(model, plan.freeze)
    sync_fast_paths(model)
    sync_resize_guards(model)


def lora_layers(model: nn.Module) -> dict[str, LoRAMBoLinear]:
    """``{dotted_name: LoRAMBoLinear}`` in model order (empty for a model without adapters);
    ``TypeError`` when ``model`` is not an ``nn.Module``."""
    require_module(model, "lora_layers")
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAMBoLinear)}


def weight_sharers(model: nn.Module, layers: Mapping[str, LoRAMBoLinear]) -> dict[str, list[str]]:
    """For each of ``layers`` (name: layer of ``model``), the other names under which the model
    holds its base weight (tied weights, e.g. an output head tied to the input embedding):
    merging changes them all: the same Parameter, or another one over the same memory
    (``lorambo.nn.shared_memory``)."""
    by_memory: dict[tuple, list] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_memory.setdefault(memory_key(p), []).append((n, p))
    out = {}
    for name, layer in layers.items():
        if parametrize.is_parametrized(layer.base_layer, "weight"):
            # a computed weight: merging it is refused anyway, and reading it would run the
            # parametrization (a spectral_norm power iteration in training mode)
            out[name] = []
            continue
        weight = layer.base_layer.weight
        out[name] = [n for n, p in by_memory.get(memory_key(weight), ())
                     if share_memory(p, weight) and not n.startswith(f"{name}.base_layer.")]
    return out


def _holders(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, attribute)`` of the dotted parameter names ``names`` of ``model``."""
    out = []
    for name in names:
        path, _, attr = name.rpartition(".")
        out.append((name, model.get_submodule(path), attr))
    return out


def check_mergeable(model: nn.Module, layers: Mapping[str, LoRAMBoLinear], caller: str = "unload") -> None:
    """Raise before anything changes if merging an unmerged one of ``layers`` would be lost (a
    parametrized weight) or would change other weights too (tied weights); ``caller`` names the
    function in the error."""
    call, instead = (caller, "keep it unmerged") if caller == "merge" else (f"{caller}(merge=True)",
                                                                           f"{caller}(merge=False)")
    for name, shared in weight_sharers(model, layers).items():
        if shared and not layers[name].merged:
            raise ValueError(f"{call}: the base weight of {name!r} is tied to {shared}: merging its adapter would "
                             "change them too. Untie it first (give the layer a weight of its own) or "
                             f"{instead}; nothing was changed")
    for layer in layers.values():
        if not layer.merged:
            layer.check_mergeable()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain base modules back (with the adapters merged into their weights when
    ``merge``), restore the trainability configure_model took away, and return the model.
    A merge into a weight the model also uses elsewhere (tied weights) is refused up front
    (``ValueError``), and so is a merge that would put NaN/inf into a weight (``RuntimeError``);
    ``merge`` other than True or False is a ``TypeError``. A model wrapped by torch.compile or DDP is unloaded inside its
    wrapper, which is returned."""
    require_module(model, "unload")
    if not isinstance(merge, bool):  # "no" or "false" from a config file is truthy: it would merge
        raise TypeError(f"unload: merge must be True or False, got {merge!r}")
    plain = unwrap_model(model)
    if merge:
        check_mergeable(plain, lora_layers(plain))
        for layer in lora_layers(plain).values():  # every layer before the first merge: all or nothing
            if not layer.merged:
                layer.check_merge_finite("unload(merge=True)")
    for layer in lora_layers(plain).values():  # each merge or unmerge below writes into the base weight
        if layer.merged != merge:
            layer.check_base_writable(f"unload(merge={merge})")
    done = []
    for name, layer in lora_layers(plain).items():
        try:  # out of memory in one layer's merge, or Ctrl-C: say which layers are plain already
            if merge and not layer.merged:
                layer.merge(exact=False)
            elif not merge and layer.merged:
                layer.unmerge()
        except BaseException as err:
            note_partial_edit(err, f"unload(merge={merge})", name, done,
                              "are plain modules again" + (" with their adapters merged" if merge else ""),
                              "still LoRAMBoLinear layers")
            raise
        _set_submodule(plain, name, layer.base_layer)
        note_unloaded(layer)  # its base is no adapter's frozen base; an optimizer of its pools trains nothing
        done.append(name)
    sync_fast_paths(plain)
    sync_resize_guards(plain)
    # the records sit on the model configure_model was given: the plain one or its wrapper
    for holder in dict.fromkeys((plain, model)):
        for param in forget_frozen(holder):
            param.requires_grad_(True)
        forget_modules_to_save(holder)
    return model
