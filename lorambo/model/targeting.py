"""Which modules of a model get adapters (peft semantics for ``target_modules``)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn
from torch.nn.utils import parametrize

from lorambo.model.bypassed import bypassed_linears
from lorambo.model.unwrap import unwrap_model
from lorambo.nn import LoRAMBoLinear
from lorambo.nn.base_layers import is_wrappable, stacked_weights, unwrappable_reason
from lorambo.user_warnings import warn_user

# Classification heads: never adapted by default, nor the layers inside one (RoBERTa's
# classifier.dense / classifier.out_proj, Bart's and T5's classification_head.*): the last of
# those is the output layer, with num_labels outputs.
_CLASSIFICATION_HEADS = {"classifier", "score", "qa_outputs", "classification_head"}
# Names of output heads that are never adapted by default (besides get_output_embeddings()).
_HEAD_NAMES = {"lm_head"} | _CLASSIFICATION_HEADS
# Submodules whose Linear layers are left out by default: a BERT-style pooler feeds only
# pooler_output, which a loss on the hidden states never reaches.
_SKIPPED_PARENTS = {"pooler"} | _CLASSIFICATION_HEADS
ALL_LINEAR = "all-linear"  # peft's keyword, accepted as target_modules; same as None


def _closest(name: str, names: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {near}?" if near else ""


def _wrapper_hint(model: nn.Module, name: str, modules) -> str:
    """Why a plain model's name misses in a torch.compile / DDP wrapper, whose names carry a prefix."""
    inner = unwrap_model(model)
    if inner is model:
        return ""
    prefix = next((n[: -len(name)] for n in modules if n.endswith("." + name)), None)
    if prefix is None:
        return ""
    return (f" (a {type(inner).__name__} wrapped by {type(model).__name__}, where it is {prefix + name!r}): "
            "configure the model before wrapping it, or name its modules as the wrapper does")


def suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def dot_suffixes(name: str) -> list[str]:
    """The parts of ``name`` after each of its dots (``a.b.c``: ``b.c``, ``c``): the targets
    other than ``name`` itself that :func:`suffix_match` matches it to, to look up in a set."""
    return [name[i + 1:] for i, c in enumerate(name) if c == "."]


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoRAMBoLinear) or is_wrappable(module)


def _output_embeddings(model: nn.Module):
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except (NotImplementedError, AttributeError):  # some models have no output embeddings
        return None


def excluded_by_default(model: nn.Module) -> set[str]:
    """The output layer, classification heads and the layers inside them, pooler layers and the
    Linear layers a parent bypasses (see :func:`find_targets`)."""
    head = _output_embeddings(model)
    out = set(bypassed_linears(model))
    for name, module in model.named_modules():
        parts = name.split(".")
        if ((head is not None and module is head) or parts[-1] in _HEAD_NAMES
                or any(p in _SKIPPED_PARENTS for p in parts[:-1])):
            out.add(name)
    return out


def default_targets(model: nn.Module) -> list[str]:
    """What ``target_modules=None`` (or ``"all-linear"``) adapts, in model order."""
    modules = _candidate_modules(model)
    excluded = excluded_by_default(model)
    names = [n for n, m in modules.items() if n and _adaptable(m) and n not in excluded]
    if not names:
        # Linear subclasses with a forward of their own (Falcon's FalconLinear) are not adaptable:
        # say so, rather than that the model has no Linear layers
        refused = next(((n, m) for n, m in modules.items() if n and n not in excluded and isinstance(m, nn.Linear)),
                       None)
        why = f"; its Linear layers cannot be wrapped, e.g. {refused[0]!r}: {unwrappable_reason(refused[1])}" \
            if refused else ""
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D module to adapt "
                         f"besides its output layer, heads and pooler{why}")
    return names


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules that are not inside a LoRAMBoLinear (its base layer is not a target) nor
    inside a parametrization (``fc.parametrizations.weight.0``, the modules that compute a
    parametrized tensor of ``fc``, are no layers of the model: target ``"0"`` means layer ``0``)."""
    found: dict[str, nn.Module] = {}
    inside = None  # "<name>." of the last LoRAMBoLinear or parametrizations container met
    containers = set()  # ids of the parametrizations containers of parametrized modules met
    for name, module in model.named_modules():
        # named_modules walks depth first: a module's submodules come right after it, so only the
        # last skipped one can hold this one (testing every one met was quadratic in the model)
        if inside is not None and name.startswith(inside):
            continue
        found[name] = module
        if isinstance(module, LoRAMBoLinear) or id(module) in containers:
            inside = name + "."
        elif parametrize.is_parametrized(module):
            containers.add(id(module.parametrizations))
    return found


def _require_adaptable(name: str, module: nn.Module, why: str, bypassed: dict[str, str]) -> None:
    if not _adaptable(module):
        raise TypeError(f"module {name!r} ({type(module).__name__}) {why} but cannot be adapted: "
                        f"{unwrappable_reason(module)}")
    if name in bypassed:
        child = name.rsplit(".", 1)[-1]
        raise ValueError(f"module {name!r} {why} but its parent, a {bypassed[name]}, reads {child}.weight directly "
                         "instead of calling it: a LoRA there would never run. Leave it out of target_modules")


def refuse_peft_modules(model: nn.Module, prefix: str = "") -> None:
    """ValueError naming them when ``model`` holds peft's modules (a peft-wrapped model: each
    LoRA layer's base_layer, lora_A and lora_B, the copies of its modules_to_save are Linear
    layers): the default targets would put LoRA on peft's LoRA, and a named target would leave
    peft's adapter adding to lorambo's. ``prefix`` starts the message (the caller's name)."""
    found = [f"{n or '(the model)'}: {type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules()
             if type(m).__module__.split(".")[0] == "peft"]
    if found:
        raise ValueError(f"{prefix}{type(model).__name__} holds peft modules ({'; '.join(found[-2:])}); lorambo "
                         "would adapt peft's own layers. Convert it with lorambo.from_peft(model), or use the "
                         "plain base model (before get_peft_model, or after peft's unload())")


def find_targets(model: nn.Module, target_modules: str | Iterable[str] | None) -> list[str]:
    """Dotted names to adapt, in model order.

    ``None`` or ``"all-linear"``: peft's ``all-linear`` -- every Linear/Conv1D except the output
    layer (``get_output_embeddings()``) and heads named ``lm_head``, ``classifier``, ``score``,
    ``qa_outputs`` or ``classification_head`` -- and, unlike peft, without the layers inside a
    classification head (RoBERTa's ``classifier.out_proj``) or a ``pooler`` (BERT's
    ``pooler.dense`` feeds only ``pooler_output``) and without the layers whose parent reads
    their weight directly, such as ``nn.MultiheadAttention``'s ``out_proj``
    (:func:`lorambo.model.bypassed.bypassed_linears`; naming one is an error).
    A list: suffix match on dotted names (each entry must match something). Another string:
    regex full match on dotted names.

    A model wrapped by peft is refused (:func:`refuse_peft_modules`): convert it with
    ``lorambo.from_peft`` first.
    """
    refuse_peft_modules(model)
    if target_modules is None or target_modules == ALL_LINEAR:
        _warn_stacked_left_out(model)
        return default_targets(model)
    modules, bypassed = _candidate_modules(model), bypassed_linears(model)
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules regex {target_modules!r} is invalid: {err}") from err
        names = [n for n in modules if n and pattern.fullmatch(n)]
        if not names:
            as_suffix = [n for n in modules if n and suffix_match(n, target_modules)]
            hint = (f"; a string is a regex that must match the whole dotted name (peft's rule), so it misses "
                    f"{as_suffix[0]!r}: for the modules whose names end in it pass a list, "
                    f"target_modules=[{target_modules!r}]") if as_suffix else (
                _shared_hint(model, pattern.fullmatch) or _parameter_hint(model, pattern.fullmatch))
            raise ValueError(f"target_modules regex {target_modules!r} matches no module of "
                             f"{type(model).__name__}{hint}")
        for n in names:
            _require_adaptable(n, modules[n], f"matches target_modules {target_modules!r}", bypassed)
        return names
    try:
        targets = list(target_modules)
    except TypeError:
        raise TypeError("target_modules must be None, 'all-linear', a regex string or a list of module names, "
                        f"got {target_modules!r}") from None
    if not targets:
        raise ValueError("target_modules is an empty list")
    bad = [t for t in targets if not isinstance(t, str)]
    if bad:
        raise TypeError(f"target_modules entries must be module names (strings), got {bad[0]!r} in {targets!r}")
    # {suffix: the names that suffix_match it, in model order}: a model of n layers targeted by
    # their n full names (a ranks file's keys) is looked up, not scanned n times
    by_suffix: dict[str, list[str]] = {}
    for n in modules:
        for suffix in dot_suffixes(n):
            by_suffix.setdefault(suffix, []).append(n)
        if n:
            by_suffix.setdefault(n, []).append(n)
    names, named = [], set()
    for target in targets:
        hits = by_suffix.get(target, [])
        if not hits:
            def matches(n: str) -> bool:
                return suffix_match(n, target)

            hint = (_shared_hint(model, matches) or _parameter_hint(model, matches)
                    or _closest(target, _leaf_names(modules)))
            raise ValueError(f"target_modules entry {target!r} matches no module of {type(model).__name__}{hint}")
        for n in hits:
            _require_adaptable(n, modules[n], f"matches target_modules entry {target!r}", bypassed)
        names.extend(h for h in hits if h not in named)
        named.update(hits)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(names, key=order.__getitem__)


def check_named_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Exact dotted names (the keys of a ``{name: rank}`` dict), each an adaptable module, in
    model order: new layers draw their initialisation from torch's generator one after another,
    so the dict's order (a sorted JSON file, say) must not decide which layer gets which rows."""
    modules, bypassed = _candidate_modules(model), bypassed_linears(model)
    out = []
    for name in names:
        if name not in modules:
            hint = _shared_hint(model, name.__eq__) or _wrapper_hint(model, name, modules) or _closest(name, modules)
            raise ValueError(f"module {name!r} not found in {type(model).__name__}{hint}")
        _require_adaptable(name, modules[name], "is named in ranks", bypassed)
        out.append(name)
    position = {n: i for i, n in enumerate(modules)}
    return sorted(out, key=position.__getitem__)


def stacked_weight_modules(model: nn.Module) -> dict[str, str]:
    """``{name: class name}`` of the modules holding stacked 3-D weights (fused MoE experts),
    which no target choice can adapt; the default targets leave them out."""
    return {n: type(m).__name__ for n, m in _candidate_modules(model).items() if stacked_weights(m)}


def _warn_stacked_left_out(model: nn.Module) -> None:
    """Fused MoE experts hold most of such a model's weights: leaving them out of the default
    targets without a word would look like adapting the whole model. The warning points at the
    caller of configure_model / LoRAMBoOptimizer."""
    stacked = stacked_weight_modules(model)
    if stacked:
        shown = ", ".join(f"{n!r} ({c})" for n, c in list(stacked.items())[:2])
        warn_user(f"{len(stacked)} modules of {type(model).__name__} hold stacked 3-D weights (fused MoE "
                  f"experts: {shown}{', ...' if len(stacked) > 2 else ''}), which lorambo cannot adapt; the "
                  "default targets leave them out and adapt the nn.Linear / Conv1D layers only",
                  UserWarning)


def _parameter_hint(model: nn.Module, matches) -> str:
    """Why a target entry that matches no module matched a parameter (e.g. fused experts'
    ``gate_up_proj``): lorambo adapts modules, not parameters (peft's ``target_parameters``)."""
    owners = {}
    for name, _ in model.named_parameters():
        if matches(name):
            owner = name.rpartition(".")[0]
            owners[owner] = model.get_submodule(owner)
    if not owners:
        return ""
    shown = ", ".join(f"{o!r} ({type(m).__name__})" for o, m in list(owners.items())[:3])
    experts = any(stacked_weights(m) for m in owners.values())
    return (f"; it names parameters of {shown}, not modules: lorambo adapts nn.Linear / Conv1D modules, not "
            "parameters (peft's target_parameters)" + ("; fused MoE experts (stacked 3-D weights) cannot be "
                                                       "adapted" if experts else ""))


def _shared_hint(model: nn.Module, matches) -> str:
    """Why a target that matches no listed module matched a second name of a module used at
    several places: ``named_modules()`` lists such a module once, under its first name."""
    uses: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        uses.setdefault(id(module), []).append(name)
    for names in uses.values():
        alias = next((n for n in names[1:] if n and matches(n)), None)
        if alias is not None:
            return (f"; {alias!r} is another name of module {names[0]!r}, which is used {len(names)} "
                    f"times (as {names}); lorambo adapts a module at one place only: give each use its own module")
    return ""


def _leaf_names(modules: dict[str, nn.Module]) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in modules if n}
