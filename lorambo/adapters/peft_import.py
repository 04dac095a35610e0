"""peft LoRA adapters into LoRAMBoLinear pools: a saved folder (:func:`import_peft`) or a model
already wrapped by peft (:func:`from_peft`).

Each adapted module gets a pool with room to grow (``default_capacity``: the next power of two
>= 2 * rank, at least 8, capped at min(in, out)) unless ``capacity`` is given. The layer's
scaling is peft's (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) and stays fixed when the
rank changes later, so growth keeps the function. A layer whose peft rank exceeds min(in, out)
gets rank min(in, out) with the same product ``B A`` (:func:`_within_min_dim`).
``rank_pattern`` / ``alpha_pattern`` are resolved with peft's own matching rule
(:mod:`lorambo.model.patterns`); ranks come from the tensor shapes and must agree with the
config. A MiCA adapter (``init_lora_weights="mica"``) gets frozen lora_B pools, as peft trains
its A alone. ``modules_to_save`` are loaded and stay trainable; embedding layers saved whole
(peft's ``save_embedding_layers``) are loaded into the base model, as peft loads them.

What peft can express but a LoRAMBoLinear cannot is refused before the model is touched, with
an error naming it: DoRA, LoRA biases (``bias`` other than "none", ``lora_bias``), targets that
are not Linear/Conv1D (embeddings, convolutions, ``target_parameters``), trainable tokens,
layer replication, and other peft method variants. A saved folder whose initialisation makes
peft rewrite the base weights on loading (PiSSA, OLoRA, CorDA, LoftQ, ...) is refused too; a
peft model already loaded (:func:`from_peft`) carries those weights and converts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorambo.adapters.finite import check_finite_values
from lorambo.adapters.io import AdapterFormatError
from lorambo.adapters.meta_tensors import refuse_meta_destinations
from lorambo.adapters.module_states import load_module_states
from lorambo.adapters.overwrite import configure_for_overwrite
from lorambo.adapters.peft_embeddings import check_embedding_states, embedding_entries, split_embedding_states
from lorambo.adapters.values_fit import check_fits_dtypes, destination_dtype, saved_state_entries
from lorambo.model import lora_layers, unload
from lorambo.model.argument import require_module, require_path
from lorambo.model.modules_to_save import resolve_modules_to_save
from lorambo.model.patterns import pattern_lookup
from lorambo.model.targeting import refuse_peft_modules
from lorambo.model.unwrap import unwrap_model
from lorambo.nn import default_capacity
from lorambo.nn.base_layers import base_kind, features, unwrappable_reason
from lorambo.nn.finite_numbers import is_finite_number, is_int, shown_number
from lorambo.nn.settings_fit import check_settings_fit
from lorambo.optional import requires
from lorambo.user_warnings import warn_user

__all__ = ["import_peft", "from_peft", "check_peft_config"]

_PREFIX = "base_model.model."
_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# what lorambo can represent, for the messages refusing the rest
_PLAIN_LORA = "imports plain LoRA only (lora_A and lora_B weights on Linear/Conv1D layers)"
# a tensor name's part -> the peft feature it belongs to
_TENSOR_FEATURES = {"lora_magnitude_vector": "DoRA (its magnitude vector)",
                    "lora_embedding_A": "LoRA on an embedding", "lora_embedding_B": "LoRA on an embedding"}

# config field -> the value that means "not used"; anything else is a feature lorambo lacks
_OFF = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "target_parameters": (None, [], ()),
    "trainable_token_indices": (None, {}, []),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None,),
    "megatron_config": (None,),
    "kasa_config": (None,),        # truncates the base weight, and a diagonal between A and B
    "monteclora_config": (None,),  # variational sampling around A and B in training
    "velora_config": (None,),      # its own backward for A, with a stored embedding
}


# initialisations after which the saved A and B apply to the unchanged base weights; the others
# (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ...) make peft rewrite the base weights when it loads the
# adapter (W - s B0 A0, or a quantised W), so a saved folder holds only half of the model's change
# (peft reads "gaussian" and "mica" in any case, "eva" and "orthogonal" as written)
_BASE_KEEPING_INITS = (True, False, None, "eva", "orthogonal")
_BASE_KEEPING_ANY_CASE = ("gaussian", "mica")


def _check_base_kept(config: Mapping, where: str) -> None:
    init = config.get("init_lora_weights", True)
    if not (any(init is kept or (isinstance(kept, str) and init == kept) for kept in _BASE_KEEPING_INITS)
            or isinstance(init, str) and init.lower() in _BASE_KEEPING_ANY_CASE):
        raise ValueError(
            f"{where}: init_lora_weights={init!r}: peft re-runs this initialisation when it loads the adapter, "
            "and it rewrites the base weights, so the saved A and B do not apply to the plain base model. Either "
            "save the adapter with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            "(a standard LoRA adapter) and import that, or load it with peft.PeftModel.from_pretrained and "
            "convert with lorambo.from_peft, which keeps the rewritten base weights")


def _trains_a_only(config: Mapping) -> bool:
    """peft's MiCA (``init_lora_weights="mica"``) freezes lora_B and trains lora_A alone. peft
    picks the variant that freezes it by this exact value ("MiCA" gets MiCA's initialisation
    but a trainable lora_B)."""
    return config.get("init_lora_weights") == "mica"


def _is_off(value, off) -> bool:
    """``value`` means "not used": one of ``off``, or any empty collection (peft turns the
    ``target_parameters`` of a MoE model's config into ``set()``, which equals no list)."""
    return value in off or (isinstance(value, (list, tuple, set, frozenset, dict)) and not value)


def check_peft_config(config: Mapping, where: str) -> None:
    """Raise ValueError naming every peft feature in ``config`` that lorambo cannot represent."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA; lorambo imports "
                         "plain LoRA adapters only")
    bad = [f"{k}={config[k]!r}" for k, off in _OFF.items() if k in config and not _is_off(config[k], off)]
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r}")
    if bad:
        raise ValueError(f"{where}: unsupported peft LoRA feature(s) {', '.join(bad)}; lorambo "
                         f"{_PLAIN_LORA}, with none of these")


# what import_peft reads from adapter_config.json: field -> (check, what a valid value is); the
# layers are built from these values directly, so a bad one (a NaN alpha, a dropout of 2) would
# reach the forward pass
_VALUES = {
    "r": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "lora_alpha": (is_finite_number, "a finite number"),
    "lora_dropout": (lambda v: v is None or (is_finite_number(v) and 0.0 <= v < 1.0), "a number in [0, 1)"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
}


def _check_values(config: Mapping, where: str) -> None:
    """Raise AdapterFormatError naming the first field of adapter_config.json whose value
    import_peft cannot use (wrong type, out of range, not finite)."""
    for key, (ok, expected) in _VALUES.items():
        if key in config and not ok(config[key]):
            raise AdapterFormatError(f"{where}: {key} is {shown_number(config[key])}, expected {expected}")
    for key, (ok, expected) in (("rank_pattern", _VALUES["r"]), ("alpha_pattern", _VALUES["lora_alpha"])):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping):
            raise AdapterFormatError(f"{where}: {key} is {pattern!r}, expected a {{pattern: value}} object")
        for name, value in pattern.items():
            try:
                re.compile(name)
            except (re.error, TypeError) as err:
                raise AdapterFormatError(f"{where}: {key} key {name!r} is not a valid pattern: {err}") from None
            if not ok(value):
                raise AdapterFormatError(f"{where}: {key}[{name!r}] is {shown_number(value)}, expected {expected}")


def _within_min_dim(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with at most min(in, out) rows / columns and the same product ``B A``.

    peft accepts any rank, but a pool holds at most min(in, out) slots (a rank beyond it adds
    nothing: ``B A`` has rank <= min(in, out)). A wider pair, as peft's ``all-linear`` gives a
    classifier with 2 labels or Qwen2-MoE's 1-output ``shared_expert_gate``, is stored as the
    product on the smaller side and the identity on the other, so the function is unchanged and
    every slot keeps a gradient (the identity side is never zero). Both are returned in float64:
    the product is exact there (a float16 pair's product can exceed 65504 although no factor
    does), and it is rounded once, into the pool's dtype, when :func:`_install` copies it in,
    after checking that the pool's dtype can hold it."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] <= min(b.shape[0], a.shape[1]):
        return a, b  # shapes are checked against the module later, with an error naming it
    d_out, d_in = b.shape[0], a.shape[1]
    product = b.double() @ a.double()  # (out, in)
    if d_out <= d_in:
        return product, torch.eye(d_out, dtype=torch.float64, device=b.device)
    return torch.eye(d_in, dtype=torch.float64, device=a.device), product


class _LayerSpec:
    """One adapted layer: ``a``/``b`` as the pools will hold them (:func:`_within_min_dim`),
    ``peft_a``/``peft_b`` as peft held them, ``product`` the pool (``"lora_A"``/``"lora_B"``)
    that holds peft's ``B A`` when the rank was reduced (else None), ``frozen`` the pools peft's
    model does not train (``requires_grad=False``; empty for a saved adapter)."""

    __slots__ = ("a", "b", "peft_a", "peft_b", "product", "alpha", "scaling", "use_rslora", "dropout", "frozen")

    def __init__(self, a, b, alpha, scaling, use_rslora, dropout, frozen=frozenset()):
        self.peft_a, self.peft_b, self.frozen = a, b, frozenset(frozen)
        a, b = _within_min_dim(a, b)  # the scaling stays peft's, from the rank it was trained at
        self.product = None if a is self.peft_a else ("lora_A" if b.shape[0] == b.shape[1] else "lora_B")
        self.a, self.b, self.alpha, self.scaling = a, b, float(alpha), float(scaling)
        self.use_rslora, self.dropout = bool(use_rslora), float(dropout)

    def described(self, name: str, pool: str) -> str:
        """How an error names ``pool`` of layer ``name``."""
        if pool != self.product:
            return f"layer {name!r}: {pool}"
        return (f"layer {name!r}: {pool} (peft's product lora_B @ lora_A, its rank {self.peft_a.shape[0]} stored "
                f"at rank {self.a.shape[0]} = min(in, out))")


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_target(model: nn.Module, name: str, spec: _LayerSpec, where: str) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: adapted module {name!r} is not in {type(model).__name__}") from None
    kind = base_kind(module)
    if kind is None:
        raise ValueError(f"{where}: adapted module {name!r} cannot be adapted by lorambo: "
                         f"{unwrappable_reason(module)}")
    d_in, d_out = features(module, kind)
    r = spec.a.shape[0]
    if tuple(spec.a.shape) != (r, d_in) or tuple(spec.b.shape) != (d_out, r):
        raise ValueError(f"{where}: LoRA weights of {name!r} have shapes A {tuple(spec.a.shape)}, "
                         f"B {tuple(spec.b.shape)}; the module needs A [r, {d_in}], B [{d_out}, r]")
    if r < 1:
        raise ValueError(f"{where}: module {name!r} has rank 0 in the adapter")
    check_settings_fit(f"{where}: module {name!r}", module.weight.dtype, spec.scaling, spec.dropout, alpha=spec.alpha)


def _capacities(model, specs, capacity, where: str) -> dict[str, int]:
    if isinstance(capacity, Mapping):
        unknown = sorted(set(capacity) - set(specs))
        if unknown:  # a misspelt name would silently get the default capacity
            raise ValueError(f"{where}: capacity names {unknown[:5]}, which the adapter does not adapt "
                             f"(it adapts e.g. {list(specs)[:3]})")
    caps = {}
    for name, spec in specs.items():
        r = spec.a.shape[0]
        if capacity is None:
            d_in, d_out = spec.a.shape[1], spec.b.shape[0]
            caps[name] = default_capacity(r, d_in, d_out)
        elif isinstance(capacity, Mapping):
            caps[name] = capacity.get(name, default_capacity(r, spec.a.shape[1], spec.b.shape[0]))
        else:
            caps[name] = capacity
        if is_int(caps[name]) and caps[name] < r:  # a layer's own check would not say which call or option
            raise ValueError(f"{where}: capacity={caps[name]!r} for {name!r} is below its rank {r} in the adapter")
    return caps


def _warn_if_rounded(model: nn.Module, specs: dict[str, _LayerSpec], caller: str, where: str) -> None:
    """Warn when half-precision pools (the base weight's dtype) cannot hold peft's A and B
    exactly: peft keeps a float16 / bfloat16 model's adapter in float32
    (``autocast_adapter_dtype``), so rounding it changes the outputs and the training that
    follows. Into any other dtype peft's own load casts the same way."""
    rounded = {}
    for name, spec in specs.items():
        for pool, value in (("lora_A", spec.peft_a), ("lora_B", spec.peft_b)):
            dtype = destination_dtype(model, name, pool)
            if (dtype in (torch.float16, torch.bfloat16) and value.dtype != dtype
                    and not torch.equal(value.to(dtype).to(value.dtype), value)):
                rounded.setdefault(name, (value.dtype, dtype))
                break
    if rounded:
        kinds = " / ".join(sorted({str(a).replace("torch.", "") for a, _ in rounded.values()}))
        pools = " / ".join(sorted({str(b) for _, b in rounded.values()}))
        warn_user(f"{caller}: {where}: {len(rounded)} of {len(specs)} layers (e.g. {list(rounded)[:3]}) hold {kinds} "
                  f"LoRA weights, which their pools (the base weight's dtype, {pools}) round: peft keeps a "
                  "half-precision model's adapter in float32. The outputs differ from peft's by that rounding, "
                  f"and training updates the pools in {pools}. To keep the weights exactly, convert the model "
                  "first (model.float())", UserWarning)


@torch.no_grad()
def _install(model: nn.Module, specs: dict[str, _LayerSpec], capacity, saved_states: dict,
             save_names: list[str], where: str, caller: str, embedding_states: dict | None = None,
             frozen_b: bool = False) -> nn.Module:
    """Validate everything, then configure and copy the weights in. ``embedding_states``:
    ``{module name: state}`` of embedding layers the adapter holds whole
    (:mod:`lorambo.adapters.peft_embeddings`), loaded into the base model as peft loads them.
    ``frozen_b``: the lora_B pools are frozen (peft's MiCA trains A only)."""
    embedding_states = embedding_states or {}
    if not specs:
        raise ValueError(f"{where}: the adapter has no LoRA weights")
    if lora_layers(model):
        raise ValueError(f"{where}: {type(model).__name__} already has LoRAMBoLinear layers; import "
                         "into the plain base model")
    for name, spec in specs.items():
        _check_target(model, name, spec, where)
    for name, state in saved_states.items():
        try:
            have = model.get_submodule(name).state_dict()
        except AttributeError:
            raise ValueError(f"{where}: module to save {name!r} is not in {type(model).__name__}") from None
        wrong = {k for k in state if k not in have or tuple(have[k].shape) != tuple(state[k].shape)}
        if wrong or set(have) != set(state):
            raise ValueError(f"{where}: saved state of module {name!r} does not fit the model's "
                             f"(keys or shapes differ: {sorted(wrong or set(have) ^ set(state))})")
    check_embedding_states(model, embedding_states, where)
    refuse_meta_destinations(model, specs, saved_states, where, embedding_states)
    saved_entries = list(saved_state_entries(model, saved_states)) + embedding_entries(model, embedding_states)
    check_finite_values(where, [(f"layer {name!r}: {pool}", value) for name, spec in specs.items()
                                for pool, value in (("lora_A", spec.peft_a), ("lora_B", spec.peft_b))]
                        + [(what, value) for what, value, _ in saved_entries])
    pools = [(spec.described(name, pool), value, destination_dtype(model, name, pool))
             for name, spec in specs.items() for pool, value in (("lora_A", spec.a), ("lora_B", spec.b))]
    check_fits_dtypes(where, pools + saved_entries)
    _warn_if_rounded(model, specs, caller, where)
    ranks = {n: s.a.shape[0] for n, s in specs.items()}
    configure_for_overwrite(model, ranks, capacity=_capacities(model, specs, capacity, where),
                            modules_to_save=save_names or None)
    try:  # out of memory converting a layer's weights, Ctrl-C, a user's load hook: the plain model back
        for name, layer in lora_layers(model).items():
            spec = specs[name]
            r = ranks[name]
            layer.lora_A[:r].copy_(spec.a.to(layer.lora_A.dtype))
            layer.lora_B[:, :r].copy_(spec.b.to(layer.lora_B.dtype))
            layer.alpha, layer.scaling = spec.alpha, spec.scaling
            layer.use_rslora, layer.dropout = spec.use_rslora, spec.dropout
            for pool in spec.frozen | ({"lora_B"} if frozen_b else set()):
                getattr(layer, pool).requires_grad_(False)
        # a LoRA target's own module is its LoRAMBoLinear's base layer now
        load_module_states(model, {**{f"{n}.base_layer" if n in specs else n: state
                                      for n, state in embedding_states.items()}, **saved_states})
    except BaseException:
        unload(model, merge=False)
        raise
    return model


# ------------------------------------------------------------------------------- from a folder
def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for fname in _WEIGHTS:
        file = folder / fname
        if not file.is_file():
            continue
        try:
            if fname.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file
            raise AdapterFormatError(f"{file} is not a readable peft adapter: {err}") from err
    raise FileNotFoundError(f"no {' or '.join(_WEIGHTS)} in {folder}")


def _tensor_feature(key: str, part: str) -> str:
    """The peft feature an adapter tensor outside plain LoRA belongs to, as far as its name tells."""
    if part in ("lora_A", "lora_B") and key.endswith(f"{part}.bias"):
        return "a LoRA bias (lora_bias=True)"
    return _TENSOR_FEATURES.get(part, f"a peft feature ({part!r})")


def _split_tensors(tensors: dict[str, torch.Tensor], where: str):
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            raise AdapterFormatError(f"{where}: tensor {key!r} does not start with {_PREFIX!r}")
        key = key[len(_PREFIX):]
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if key.endswith(tail):
                lora.setdefault(key[: -len(tail)], {})[part] = value
                break
        else:
            bits = key.split(".")
            unsupported = [b for b in bits if b.startswith(("lora_", "vera_", "hada_", "ia3_"))]
            if unsupported:
                raise ValueError(f"{where}: tensor {key!r} belongs to {_tensor_feature(key, unsupported[0])}, "
                                 f"which lorambo does not support; it {_PLAIN_LORA}")
            other[key] = value
    for name, pair in lora.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{where}: module {name!r} has only {sorted(pair)}")
    return lora, other


def _group_saved(model: nn.Module, other: dict[str, torch.Tensor], entries, tie: bool, where: str):
    """``{module name: state}`` for the modules_to_save tensors (keys ``<module>.<state key>``).

    The modules are the ones peft wrapped: every module whose name ends with an entry, with no
    dot boundary (peft's ``key.endswith(entry)``), so "classifier" also takes DistilBERT's
    "pre_classifier", which peft then trained and saved. Entries that match no module are
    skipped, as peft does (its task types add e.g. "score"). With ``tie`` (peft's
    ``ensure_weight_tying``) peft also saves the modules whose parameters are those modules'
    (an output head tied to the embedding), and ties them to the trained copy on loading: they
    are modules to save here too, each with its own copy of the saved values."""
    entries = [e for e in dict.fromkeys(entries or []) if isinstance(e, str) and e]
    names = [n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in entries)]
    if tie:
        shared = {id(p) for n in names for p in model.get_submodule(n).parameters()}
        names += [n for n, m in model.named_modules(remove_duplicate=False) if n and n not in names
                  and any(id(p) in shared for p in m.parameters(recurse=False))]
    states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, value in other.items():
        owner = next((n for n in sorted(names, key=len, reverse=True) if key.startswith(n + ".")), None)
        if owner is None:
            raise ValueError(f"{where}: tensor {key!r} is neither LoRA nor part of a module in "
                             f"modules_to_save {entries!r}")
        states[owner][key[len(owner) + 1:]] = value
    saved = [n for n in names if states[n]]
    resolve_modules_to_save(model, saved)  # checks them: trainable, no LoRA target inside
    return saved, {n: states[n] for n in saved}


def import_peft(model: nn.Module, path: str | os.PathLike[str], capacity: int | Mapping[str, int] | None = None
                ) -> nn.Module:
    """Load the peft LoRA adapter folder ``path`` (``save_pretrained`` output) into ``model``
    (the plain base model) as LoRAMBoLinear layers, in place; returns the model.

    ``capacity``: pool size per layer (int, or ``{name: capacity}``; default: room to double).
    A model wrapped by torch.compile or DDP is adapted through the wrapper. The pools take the
    base weight's dtype: weights they cannot hold exactly (a float32 adapter into a bfloat16
    model) are rounded, with a ``UserWarning`` naming the layers.

    Everything is checked before the model changes. Raises ``FileNotFoundError`` for a folder
    without ``adapter_config.json`` or adapter weights, :class:`AdapterFormatError` for an
    unreadable or malformed one, ``ValueError`` for an empty path, a peft feature lorambo cannot
    express (DoRA, a LoRA bias, embedding targets, ...), an adapted module the model lacks or
    whose shapes differ, a ``capacity`` name the adapter does not adapt, or a model that has
    LoRAMBoLinear layers already.
    """
    require_module(model, "import_peft")
    wrapper, model = model, unwrap_model(model)
    refuse_peft_modules(model, "import_peft: ")  # peft's layers are no base layers to adapt
    folder = require_path(path, "import_peft")
    config_file = folder / _CONFIG
    if not config_file.is_file():
        if folder.is_file() and (folder.parent / _CONFIG).is_file():  # a file of the peft folder
            hint = f"; {folder.name} is a file of the peft adapter folder {folder.parent}: pass that folder"
        elif (folder / "adapter.safetensors").is_file() or folder.suffix == ".safetensors":
            hint = "; that is a lorambo adapter: load it with lorambo.load_adapter"
        elif folder.is_dir() and (named := sorted(d.name for d in folder.iterdir() if (d / _CONFIG).is_file())):
            # peft's save_pretrained puts every adapter but "default" in a folder of its name
            hint = f"; it holds peft adapters in the folders {named}: pass one of those"
        else:
            hint = ""
        raise FileNotFoundError(f"no {_CONFIG} in {folder}{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{config_file} is not valid JSON: {err}") from err
    where = f"peft adapter {folder}"
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_file} must hold a JSON object {{...}}, got {type(config).__name__}")
    check_peft_config(config, where)
    _check_values(config, where)
    _check_base_kept(config, where)
    lora, other = _split_tensors(_read_weights(folder), where)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0) or 0.0)
    rank_of, alpha_of = pattern_lookup(rank_pattern, r_default), pattern_lookup(alpha_pattern, alpha_default)
    specs = {}
    for name, pair in lora.items():
        r = pair["lora_A"].shape[0]
        expected = rank_of(name)
        if r != expected:
            raise AdapterFormatError(f"{where}: module {name!r} has rank {r} in the weights but "
                                     f"{expected} in the config (r / rank_pattern)")
        alpha = float(alpha_of(name))
        specs[name] = _LayerSpec(pair["lora_A"], pair["lora_B"], alpha, _scaling(alpha, r, use_rslora),
                                 use_rslora, dropout)
    embeddings, other = split_embedding_states(model, other, specs, config.get("modules_to_save") or [])
    save_names, saved = _group_saved(model, other, config.get("modules_to_save"),
                                     bool(config.get("ensure_weight_tying")), where)
    _install(model, specs, capacity, saved, save_names, where, "import_peft", embeddings, _trains_a_only(config))
    return wrapper


# ----------------------------------------------------------------------- from a peft model
def from_peft(peft_model: nn.Module, adapter_name: str | None = None,
              capacity: int | Mapping[str, int] | None = None) -> nn.Module:
    """Convert a model wrapped by peft (``get_peft_model`` / ``PeftModel``) into the plain base
    model with LoRAMBoLinear layers holding the same adapter; returns that base model. A
    transformers model given its adapter by transformers' peft integration (``add_adapter``,
    ``load_adapter``, ``from_pretrained`` of an adapter folder) converts too: it is its own base
    model, and afterwards holds no peft adapter (as after its ``delete_adapter``), so its
    ``save_pretrained`` writes the whole model again, not a peft adapter.

    The peft wrapper is consumed: its LoRA layers are replaced in place. ``adapter_name``
    defaults to the active adapter (an error when several are active, since peft adds them up);
    other adapters are dropped. ``capacity`` and the pools' dtype: as in :func:`import_peft`.

    Raises ``TypeError`` for a model that holds no peft adapter, ``ValueError`` for several
    active adapters, an unknown ``adapter_name``, disabled or merged adapters, or a peft feature
    lorambo cannot express (nothing is changed then), ``ImportError`` without peft.
    """
    with requires("peft", "from_peft"):
        import peft.tuners.lora  # noqa: F401  (what _peft_layers reads)
        import peft.utils.other  # noqa: F401

    configs = getattr(peft_model, "peft_config", None)
    integrated = not hasattr(peft_model, "get_base_model") and getattr(peft_model, "_hf_peft_config_loaded", False)
    if not isinstance(configs, Mapping) or not (hasattr(peft_model, "get_base_model") or integrated):
        raise TypeError(f"from_peft expects a peft model (PeftModel, or a transformers model given an adapter by "
                        f"add_adapter / load_adapter), got {type(peft_model).__name__}")
    adapter_name = _adapter_to_convert(peft_model, configs, adapter_name)
    config = configs[adapter_name]
    where = f"peft adapter {adapter_name!r}"
    check_peft_config(config.to_dict(), where)
    model = peft_model if integrated else peft_model.get_base_model()
    specs, wrapped, heads, plain = _peft_layers(model, adapter_name, config, where)
    for name, spec in specs.items():
        kind = base_kind(wrapped[name])
        if kind is None:
            raise ValueError(f"{where}: module {name!r} cannot be adapted by lorambo: "
                             f"{unwrappable_reason(wrapped[name])}")
    for name, cap in _capacities(model, specs, capacity, where).items():  # checked before peft is taken apart
        d_in, d_out = specs[name].a.shape[1], specs[name].b.shape[0]
        if not is_int(cap) or not specs[name].a.shape[0] <= cap <= min(d_in, d_out):
            raise ValueError(f"{where}: capacity {cap!r} of {name!r} must be an int in [rank "
                             f"{specs[name].a.shape[0]}, min(in, out) = {min(d_in, d_out)}]")
    # peft's wrappers out, plain modules back in; then the common import path
    # the original module goes back in, so that configure_model records its state as the
    # original (disable_adapter runs it); _install then loads the trained state into it
    originals = {n: original for n, (_, original) in heads.items()}
    swaps = {**wrapped, **originals, **plain}
    peft_modules = {name: model.get_submodule(name) for name in swaps}
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    for name, module in swaps.items():
        _set_child(model, name, module)
    saved = {n: {k: v.detach().clone() for k, v in trained.state_dict().items()} for n, (trained, _) in heads.items()}
    for p in model.parameters():
        p.requires_grad_(True)  # peft froze the base; configure_model freezes it again and records it
    try:
        converted = _install(model, specs, capacity, saved, list(heads), where, "from_peft",
                             frozen_b=_trains_a_only(config.to_dict()))
    except BaseException:  # _install changed nothing: give the peft model its adapter back
        for name, module in peft_modules.items():
            _set_child(model, name, module)
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise
    if integrated:  # what transformers' delete_adapter does once no adapter is left: with the
        # flag set, its save_pretrained would write a peft adapter of the layers now gone
        model.__dict__.pop("peft_config", None)
        model._hf_peft_config_loaded = False
    return converted


def _adapter_to_convert(peft_model: nn.Module, configs: Mapping, adapter_name: str | None) -> str:
    """``adapter_name``, or the model's one active adapter (its first one when none is active)."""
    if adapter_name is None:
        active = getattr(peft_model, "active_adapters", None)
        active = list((active() if callable(active) else active) or [])  # transformers': a method
        if len(active) > 1:  # peft adds them all up; a LoRAMBoLinear holds one adapter
            raise ValueError(f"from_peft: the peft model has several active adapters {active}, whose sum it "
                             "computes; lorambo converts one: pass adapter_name=")
        adapter_name = active[0] if active else next(iter(configs))
    if adapter_name not in configs:
        raise ValueError(f"from_peft: no adapter {adapter_name!r} (have {sorted(configs)})")
    return adapter_name


def _peft_layers(model: nn.Module, adapter_name: str, config, where: str):
    """``(specs, wrapped, heads, plain)`` read from peft's layers in ``model``: the adapter's
    ``_LayerSpec`` and base layer by LoRA layer name, ``(trained copy, original)`` by module to
    save, and the plain module by name for the peft wrappers that hold other adapters only."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    specs, wrapped, heads, plain = {}, {}, {}, {}  # plain: peft wrappers of other adapters only
    for name, module in model.named_modules():
        if isinstance(module, (ModulesToSaveWrapper, LoraLayer)) and getattr(module, "disable_adapters", False):
            # the model computes without its adapter; converted, it would compute with it
            raise ValueError(f"{where}: module {name!r} has its adapters disabled (transformers' "
                             "disable_adapters(), peft's disable_adapter_layers() or a disable_adapter() block), "
                             "so the model computes without them and lorambo's layers would not: enable them "
                             "(enable_adapters() / enable_adapter_layers()) before converting")
        if isinstance(module, ModulesToSaveWrapper):  # (trained copy, original module)
            original = module.original_module
            if adapter_name in module.modules_to_save:
                heads[name] = (module.modules_to_save[adapter_name], original)
            else:
                plain[name] = original
            continue
        if not isinstance(module, LoraLayer):
            continue
        if module.merged:
            raise ValueError(f"{where}: module {name!r} has merged adapters {module.merged_adapters}; "
                             "unmerge them before converting")
        if not any(adapter_name in getattr(module, attr, {}) for attr in module.adapter_layer_names):
            plain[name] = module.get_base_layer()  # left wrapped, it would still add the other adapter
            continue
        if not isinstance(module, LoraLinear) or not isinstance(module.lora_A[adapter_name], nn.Linear):
            raise ValueError(f"{where}: module {name!r} is a peft {type(module).__name__}; lorambo "
                             "converts LoRA on Linear/Conv1D layers only")
        uses = [feature for feature, used in (("DoRA", module.use_dora.get(adapter_name, False)),
                                              ("a LoRA bias", module.lora_B[adapter_name].bias is not None)) if used]
        if uses:
            raise ValueError(f"{where}: module {name!r} uses {' and '.join(uses)}; lorambo {_PLAIN_LORA}")
        drop = module.lora_dropout[adapter_name]
        weights = {pool: getattr(module, pool)[adapter_name].weight for pool in ("lora_A", "lora_B")}
        # frozen in peft (LoRA-FA's lora_A, a layer frozen for a phase): frozen in lorambo too
        specs[name] = _LayerSpec(weights["lora_A"].detach().clone(), weights["lora_B"].detach().clone(),
                                 module.lora_alpha[adapter_name], module.scaling[adapter_name],
                                 config.use_rslora, drop.p if isinstance(drop, nn.Dropout) else 0.0,
                                 frozen={pool for pool, w in weights.items() if not w.requires_grad})
        wrapped[name] = module.get_base_layer()
    if all(len(spec.frozen) == 2 for spec in specs.values()):
        # every pool frozen: loaded for inference (peft's inference mode) or frozen whole, not a
        # training choice; imported trainable, as import_peft gives it
        for spec in specs.values():
            spec.frozen = frozenset()
    return specs, wrapped, heads, plain


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
