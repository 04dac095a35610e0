"""``modules_to_save``: whole modules (e.g. a fresh classifier head) trained and saved with the
adapter, as in peft.

``configure_model(..., modules_to_save=["classifier"])`` keeps their parameters trainable (every
other non-LoRA parameter is frozen) and records their names on the model; ``save_adapter`` then
stores their state and ``load_adapter`` restores it. An entry matches a module whose dotted name
equals it or ends with ``"." + entry``. peft matches without the dot boundary (its "classifier"
also takes DistilBERT's "pre_classifier"); ``import_peft`` follows peft's rule for the modules
peft saved.

A copy of each module's original state is kept (on the module's device; a head is small) so
that :func:`lorambo.disable_adapter` can run the untouched base model.

A module to save whose parameter the model also uses elsewhere (GPT-2's ``lm_head``, tied to the
input embedding ``wte``) gets its own copy of that parameter, as peft's ``modules_to_save``
trains a copy of the module: the other uses keep the frozen base weight. Training the shared
parameter instead would change them too, and an adapter exchanged with peft (which saves and
loads the head alone) would compute something else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorambo.model.frozen import release_frozen
from lorambo.model.targeting import suffix_match
from lorambo.nn import LoRAMBoLinear
from lorambo.ops.compile_support import outside_inference_mode

__all__ = ["resolve_modules_to_save", "keep_trainable", "modules_to_save", "original_state"]

_NAMES_ATTR = "_lorambo_modules_to_save"        # [dotted name] in model order
_ORIGINAL_ATTR = "_lorambo_modules_to_save_original"  # {name: {key: tensor}} before training


def resolve_modules_to_save(model: nn.Module, entries: Iterable[str] | str | None) -> list[str]:
    """Dotted names of the modules named by ``entries`` (dot-boundary suffix match), validated:
    every entry matches a module, and none is, contains or lies inside a LoRAMBoLinear."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    try:
        entries = list(entries)
    except TypeError:
        raise TypeError(f"modules_to_save must be a module name or a list of them, got {entries!r}") from None
    modules = dict(model.named_modules())
    lora_names = [n for n, m in modules.items() if isinstance(m, LoRAMBoLinear)]
    found: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"modules_to_save entries must be module names, got {entry!r}")
        hits = [n for n in modules if n and suffix_match(n, entry)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}")
        for name in hits:
            if any(name == lo or lo.startswith(name + ".") or name.startswith(lo + ".") for lo in lora_names):
                raise ValueError(f"modules_to_save entry {entry!r} matches module {name!r}, which is or "
                                 "contains a LoRA layer: name the head itself, not a LoRA target")
            if not any(True for _ in modules[name].parameters()):
                raise ValueError(f"modules_to_save entry {entry!r} matches module {name!r}, which has "
                                 "no parameters to train")
            if name not in found:
                found.append(name)
    return found


def check_not_targets(names: list[str], targets: Iterable[str]) -> None:
    """Raise when a module to save is also (or contains, or lies inside) a LoRA target."""
    targets = list(targets)
    for name in names:
        for t in targets:
            if name == t or t.startswith(name + ".") or name.startswith(t + "."):
                raise ValueError(f"module {name!r} is both in modules_to_save and a LoRA target ({t!r})")


def _untie_from_rest(model: nn.Module, name: str) -> None:
    """Give module ``name`` its own copy of every parameter the model also holds outside it, and
    take the copied parameters out of the model's tie mapping (see :func:`_forget_ties`)."""
    users: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(path)
    inside = name + "."
    copied: set[str] = set()
    for sub_name, sub in model.get_submodule(name).named_modules(remove_duplicate=False):
        for key, param in list(sub._parameters.items()):
            if param is not None and any(not u.startswith(inside) for u in users.get(id(param), [])):
                with outside_inference_mode():  # a trainable copy, also when configured in inference mode
                    own = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                sub._parameters[key] = own
                copied.add(".".join(part for part in (name, sub_name, key) if part))
    if copied:
        _forget_ties(model, copied)


def _forget_ties(model: nn.Module, untied: set[str]) -> None:
    """Drop every tie of transformers' models that involves a parameter in ``untied`` (dotted
    names in ``model``). ``tie_weights()``, which ``resize_token_embeddings`` calls too, ties
    ``{target: source}`` pairs again by assignment: left in, the pair would put the frozen
    embedding back in place of the trained copy of a tied head (or the copy into the head).
    transformers 5 reads the pairs from each model's ``_tied_weights_keys`` (set here on the
    instance, shadowing the class's) and caches them in ``all_tied_weights_keys``."""
    for prefix, sub in model.named_modules(remove_duplicate=False):
        local = {n[len(prefix) + 1:] if prefix else n for n in untied if not prefix or n.startswith(prefix + ".")}
        if not local:
            continue

        def kept(pairs):
            return {t: s for t, s in pairs.items() if t not in local and s not in local}

        expand = getattr(sub, "get_expanded_tied_weights_keys", None)
        if callable(expand):
            pairs = expand(all_submodels=False)
            if kept(pairs) != pairs:
                sub._tied_weights_keys = kept(pairs)
        cached = getattr(sub, "all_tied_weights_keys", None)
        if isinstance(cached, dict) and kept(cached) != cached:
            sub.all_tied_weights_keys = kept(cached)


def keep_trainable(model: nn.Module, names: list[str]) -> None:
    """Make the parameters of ``names`` and of every module to save recorded earlier trainable
    (a later ``configure_model`` call must not freeze them), take them off the list of
    parameters that ``unload`` re-enables, and record the names and an original copy. New
    modules to save first get their own copy of any parameter they share with the rest of
    the model (see the module docstring)."""
    recorded = list(getattr(model, _NAMES_ATTR, []))
    new = [n for n in names if n not in recorded]
    for n in new:
        _untie_from_rest(model, n)
    everything = recorded + new
    if not everything:
        return
    params = {id(p): p for n in everything for p in model.get_submodule(n).parameters()}
    for p in params.values():
        p.requires_grad_(True)
    release_frozen(model, params.values())
    original = dict(getattr(model, _ORIGINAL_ATTR, {}))
    with outside_inference_mode():
        for n in new:
            original[n] = {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()}
    object.__setattr__(model, _NAMES_ATTR, everything)  # plain attributes: not state, not submodules
    object.__setattr__(model, _ORIGINAL_ATTR, original)


def modules_to_save(model: nn.Module) -> list[str]:
    """Dotted names of the model's modules_to_save (empty when none were configured)."""
    return list(getattr(model, _NAMES_ATTR, []))


def original_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: state_dict}`` of each module to save as it was when it was configured."""
    return dict(getattr(model, _ORIGINAL_ATTR, {}))


def forget_modules_to_save(model: nn.Module) -> None:
    """Drop the records (used by ``unload``: the model is plain again)."""
    for attr in (_NAMES_ATTR, _ORIGINAL_ATTR):
        model.__dict__.pop(attr, None)  # its own: a torch.compile wrapper's getattr also finds its inner model's
