"""LoRAMBoLinear: a frozen Linear/Conv1D plus a LoRA adapter held in a padded rank pool.

The pool has ``capacity`` slots: ``lora_A`` [capacity, in], ``lora_B`` [out, capacity]. Slots
``< rank`` are active; the others are exactly zero, receive zero gradient and cost nothing in
the forward/backward (the op slices the active part). Rank changes edit the pools in place:
no new storage, the same Parameter objects, so optimizers, DDP buckets and FSDP shards stay valid.

The scaling ``s`` is fixed when the layer is built (``alpha / rank``, or ``alpha / sqrt(rank)``
with rsLoRA) and never follows later rank changes: that is what makes growth
function-preserving (new slots start with B = 0, so they add exactly nothing). The rules every
rank change follows (gradients and optimizer state move with their slots) are listed in
docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from lorambo.nn import base_layers
from lorambo.nn.finite_numbers import is_finite_number, shown_number
from lorambo.nn.fresh_momentum import install_fresh_momentum
from lorambo.nn.frozen_bases import note_frozen, note_pool_replaced
from lorambo.nn.frozen_growth import warn_if_frozen_growth
from lorambo.nn.inactive_slots import zero_inactive_after_steps
from lorambo.nn.merging import AdapterMerge
from lorambo.nn.optimizer_argument import OptimizerArgument, optimizer_argument
from lorambo.nn.optimizer_state import (check_slot_state_editable, gathered_slot_state, prepared_slot_reset,
                                        warn_if_shared_step)
from lorambo.nn.optimizer_tracking import LOAD_IT, REBUILD_IT, track_optimizers, warn_if_state_left_behind
from lorambo.nn.plain_keys import plain_keys_to_base_layer
from lorambo.nn.replaced_pools import replaced_pools_reason
from lorambo.nn.settings_fit import check_settings_fit
from lorambo.nn.slot_lineage import (SLOT_IDS_KEY, adopt_ids, drop_ids, keep_ids, move_counter_past, restart_ids,
                                     slot_ids, start_ids)
from lorambo.nn.slots import POOL_SLOT_DIMS, PoolSlots, local_slots, tag_pool_parameter, used_slots
# Whole models pickled (torch.save(model)) before the hooks had a module of their own name them
# here, as lorambo.nn.lora_linear._<hook>: these names keep such files loading.
from lorambo.nn.state_dict_hooks import check_extra_state_first as _check_extra_state_first
from lorambo.nn.state_dict_hooks import cover_slots_past_rank as _cover_slots_past_rank
from lorambo.nn.state_dict_hooks import save_slot_ids as _save_slot_ids
from lorambo.nn.state_dict_hooks import unmerge_before_load as _unmerge_before_load
from lorambo.nn.state_dict_hooks import unmerged_base_weight as _unmerged_base_weight
from lorambo.nn.unsupported_optimizers import refuse_unsupported_optimizers
from lorambo.ops import lora_linear
from lorambo.ops.compile_support import (autocast_available, outside_inference_mode, rank_tensor, run_eagerly,
                                         traced_rank)
from lorambo.sharding import is_sharded, local_tensor
from lorambo.user_warnings import warns_when_done

def check_growth_factor(growth_factor, who: str) -> None:
    """ValueError naming ``who`` unless ``growth_factor`` is a finite real number >= 1 (inf
    would overflow the power-of-two rounding of :func:`default_capacity`)."""
    if not (is_finite_number(growth_factor) and growth_factor >= 1.0):
        raise ValueError(f"{who}: growth_factor={shown_number(growth_factor)} must be a finite number >= 1")


def default_capacity(rank: int, in_features: int, out_features: int, growth_factor: float = 2.0) -> int:
    """Pool size with room to grow: ``growth_factor * max(rank, 1)`` rounded up to a power of two,
    at least 8, capped at min(in, out). The default doubles the rank.

    This is the one capacity rule: planners that also cap by a budget (``lorambo.allocation.capacity``)
    apply it first, then their own limits."""
    check_growth_factor(growth_factor, "default_capacity")
    wanted = math.ceil(growth_factor * max(rank, 1))
    room = max(8, 1 << (wanted - 1).bit_length())
    return max(1, min(room, in_features, out_features))


def _autocast_operand(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as autocast hands it to ``F.linear``: float64 stays float64 (autocast never
    lowers it, so a float64 ``nn.Linear`` computes in float64 under autocast), other floating
    tensors become ``dtype``."""
    return tensor if tensor.dtype == torch.float64 else tensor.to(dtype)


class LoRAMBoLinear(AdapterMerge, nn.Module):
    """Drop-in replacement for a frozen ``nn.Linear`` / transformers ``Conv1D`` with LoRA.

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: active rank, 0 <= rank <= capacity.
        capacity: number of slots in the pool (default :func:`default_capacity`), <= min(in, out).
        alpha: LoRA alpha (default: ``rank``, i.e. scaling 1).
        dropout: dropout probability on the LoRA branch input, in [0, 1).
        use_rslora: scaling ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        scaling: set the scaling directly (overrides alpha / use_rslora), e.g. when loading.
        name: the module's dotted name, used in error messages.

    Raises ``TypeError`` for a ``base`` that is not ``nn.Linear`` / ``Conv1D`` (or a subclass
    with a forward of its own) and for settings of the wrong type, ``ValueError`` for a rank,
    capacity, alpha, scaling or dropout out of range, naming the layer and the value.
    """

    # True inside lorambo.disable_adapter: the forward is the base layer's (set on the instance
    # there; a flag, not a replaced forward, so that hooks that wrap forward, e.g. accelerate's,
    # keep working)
    adapter_disabled = False
    # (dotted name, module, attribute) of the other places configure_model found holding this
    # layer's base weight (tied weights): merge() refuses while one of them still holds it
    _tied_holders = ()
    _tied_weights_keys = None  # {"base_layer.weight": ...} while tied, see note_tied_weight
    _base_type = None  # the base layer's class when wrapped: forward re-checks a base of another class

    # The public attributes, declared for type checkers: __init__ sets most of them after a
    # numbers.Real check that a float does not pass in typeshed, so a checker would take the rest
    # of __init__ as unreachable and report "Cannot determine type" at every read.
    name: str
    base_kind: str
    base_layer: nn.Module
    in_features: int
    out_features: int
    capacity: int
    dropout: float
    use_rslora: bool
    alpha: float
    scaling: float
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    merged: bool

    def __init__(self, base: nn.Module, rank: int = 8, capacity: int | None = None,
                 alpha: float | None = None, dropout: float = 0.0, use_rslora: bool = False,
                 scaling: float | None = None, name: str = ""):
        super().__init__()
        self.name = name
        kind = base_layers.base_kind(base)
        if kind is None:
            raise TypeError(f"{self._label}: can only wrap nn.Linear or transformers Conv1D: "
                            f"{base_layers.unwrappable_reason(base)}")
        # An integer or complex base could never run (forward checks the same), so refuse it here,
        # before its parameters are frozen and where the mistake is made.
        weight_dtype, weight_device = base_layers.weight_dtype_device(base)  # no parametrization run
        if not weight_dtype.is_floating_point:
            raise TypeError(f"{self._label}: the base weight has dtype {weight_dtype}; LoRAMBoLinear computes "
                            "in a real floating dtype (float32, float64, bfloat16 or float16)")
        self.base_kind = kind
        self.base_layer = base
        self._base_type = type(base)
        # a drop-in keeps the replaced layer's mode: wrapping a model in eval mode (from_pretrained
        # returns one) must not switch its LoRA dropout on
        self.training = base.training
        self.in_features, self.out_features = base_layers.features(base, kind)
        if min(self.in_features, self.out_features) == 0:  # e.g. structured pruning removed every channel
            raise ValueError(f"{self._label}: the base layer has in_features={self.in_features}, out_features="
                             f"{self.out_features}: a layer without inputs or outputs has no room for a LoRA "
                             "adapter; leave it out of the targets")
        rank = self._check_int("rank", rank)
        if capacity is None:
            capacity = default_capacity(rank, self.in_features, self.out_features)
        capacity = self._check_int("capacity", capacity)
        limit = min(self.in_features, self.out_features)
        if not 1 <= capacity <= limit:
            raise ValueError(f"{self._label}: capacity {capacity} must be in [1, min(in, out) = {limit}]")
        self.capacity = capacity
        self._check_rank_value(rank)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"{self._label}: dropout must be a number in [0, 1), got {dropout!r}")
        if not (is_finite_number(dropout) and 0.0 <= dropout < 1.0):
            raise ValueError(f"{self._label}: dropout {shown_number(dropout)} must be in [0, 1)")
        self.dropout = float(dropout)
        if not isinstance(use_rslora, bool):  # "false" from a config file is truthy: it would switch rsLoRA on
            raise TypeError(f"{self._label}: use_rslora must be True or False, got {use_rslora!r}")
        self.use_rslora = use_rslora
        self.alpha = self._check_finite("alpha", alpha) if alpha is not None else float(max(rank, 1))
        if scaling is None:
            ref = max(rank, 1)
            scaling = self.alpha / (math.sqrt(ref) if self.use_rslora else ref)
        self.scaling = self._check_finite("scaling", scaling)
        if self.scaling == 0.0:  # B A would be multiplied by 0 in the forward and in every gradient
            raise ValueError(f"{self._label}: scaling is 0 (alpha={self.alpha!r}), so the adapter would add nothing "
                             "and its pools would never get a gradient; give a nonzero alpha (default: the rank)")
        check_settings_fit(self._label, weight_dtype, self.scaling, self.dropout, alpha=self.alpha)
        for param in base.parameters():
            param.requires_grad_(False)
        note_frozen(base.parameters(), self._label)  # an optimizer that steps only these trains nothing: warn then
        with outside_inference_mode():  # rank changes, merges and loads edit the pools in place
            self.lora_A = nn.Parameter(torch.zeros(capacity, self.in_features, dtype=weight_dtype,
                                                   device=weight_device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, capacity, dtype=weight_dtype,
                                                   device=weight_device))
        self._rank = 0
        self._rank_tensor = rank_tensor(0)  # the rank as torch.compile reads it (traced_rank)
        self._slots = PoolSlots(0)
        self._slot_edits = 0
        self._slot_ids = [-1] * capacity  # lorambo/nn/slot_lineage.py
        self._tag_pools()
        self.merged = False
        self._weight_before_merge: torch.Tensor | None = None
        self.set_rank(rank)
        track_optimizers()  # so that a rank change can tell when its optimizer= is missing
        install_fresh_momentum()  # an SGD resumed from a state_dict starts its waiting new slots
        refuse_unsupported_optimizers()
        zero_inactive_after_steps()
        self.register_state_dict_post_hook(_unmerged_base_weight)
        self.register_state_dict_post_hook(_save_slot_ids)
        self.register_load_state_dict_pre_hook(plain_keys_to_base_layer)
        self.register_load_state_dict_pre_hook(_check_extra_state_first)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_pre_hook(_cover_slots_past_rank)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say what to use instead of failing on the forward's signature
        raise TypeError(f"{self._label}: torch.jit.script cannot compile LoRAMBoLinear, whose forward calls lorambo's "
                        "op backends from Python; use torch.jit.trace or torch.export, or script the plain model "
                        "after lorambo.unload(model, merge=True)")

    def _tag_pools(self) -> None:
        # The optimizer-facing view of the active rank (see lorambo.nn.slots).
        for name, dim in POOL_SLOT_DIMS.items():
            tag_pool_parameter(getattr(self, name), self._slots, dim)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_slot_edits", 0)  # a layer pickled before the count existed
        if "_rank_tensor" not in self.__dict__:  # ... or before the rank tensor existed
            self._rank_tensor = rank_tensor(self._rank)
        move_counter_past(self.__dict__.get("_slot_ids", ()))  # ids made by the pickling process
        self._tag_pools()  # deepcopy / unpickling rebuilds the Parameters without their tags
        # unpickled in another process (torch.load of a whole model, a model handed to mp.spawn),
        # where no __init__ ran: install the process-wide optimizer hooks a new layer installs
        track_optimizers()
        install_fresh_momentum()
        refuse_unsupported_optimizers()
        zero_inactive_after_steps()
        note_frozen((p for p in self.base_layer.parameters() if not p.requires_grad), self._label)

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "base_layer" in self._modules:
            self._set_base_tensor(name, value)
            return
        if name in ("in_features", "out_features") and name in self.__dict__ and value != self.__dict__[name]:
            # the pools have these sizes (transformers' resize_token_embeddings sets out_features)
            raise ValueError(f"{self._label}: {name} is {self.__dict__[name]}, the size of its LoRA pools, and "
                             f"cannot become {value!r}; resizing an adapted layer is not supported: unload() it, "
                             "resize, and configure again")
        old = self.__dict__.get("_parameters", {}).get(name) if name in POOL_SLOT_DIMS else None
        super().__setattr__(name, value)
        # a new pool Parameter (load_state_dict(assign=True), FSDP2's DTensor) needs the tag too
        if name in POOL_SLOT_DIMS and isinstance(value, nn.Parameter) and "_slots" in self.__dict__:
            tag_pool_parameter(value, self._slots, POOL_SLOT_DIMS[name])
            note_pool_replaced(old, value)  # an optimizer holding only the old ones trains nothing: warn then

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        errors = len(error_msgs)
        ids, edits = slot_ids(self), self._slot_edits
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            # pools and rank loaded whole: their components are the saved ones, not new ones
            keys = [prefix + name for name in (*POOL_SLOT_DIMS, "_extra_state")]
            if len(error_msgs) == errors and all(key in state_dict for key in keys) and SLOT_IDS_KEY in local_metadata:
                adopt_ids(self, local_metadata[SLOT_IDS_KEY])
        finally:
            # the load restarts ids on its way (pools, then the rank) and may take the saved ones
            # back: one edit if the slots now hold other components, none if the same ones
            self._slot_edits = edits + (slot_ids(self) != ids)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._tag_pools()  # conversions that are not in place store new Parameter objects
        return out

    def _refuse_swapped_base(self) -> None:
        reason = base_layers.swapped_reason(self.base_layer, self.base_kind)
        if reason is not None:
            raise TypeError(f"{self._label}: {reason}")

    def _set_active_rank(self, rank: int) -> None:
        self._rank = rank
        self._rank_tensor.fill_(rank)
        self._slots.rank = rank

    # ----------------------------------------------------------------------------- helpers
    @property
    def _label(self) -> str:
        return f"LoRAMBoLinear {self.name!r}" if self.name else "LoRAMBoLinear"

    def _check_int(self, what: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{self._label}: {what} must be an int, got {value!r}")
        return int(value)

    def _check_finite(self, what: str, value) -> float:
        if not is_finite_number(value):
            raise ValueError(f"{self._label}: {what} must be a finite number, got {shown_number(value)}")
        return float(value)

    def _check_rank_value(self, rank: int) -> None:
        limit = min(self.in_features, self.out_features)
        if rank > limit:  # no capacity can hold it: say what bounds it, not just the pool
            raise ValueError(f"{self._label}: rank {rank} exceeds min(in, out) = {limit} of this "
                             f"{self.in_features} -> {self.out_features} layer, which bounds every rank (B A has rank "
                             f"<= {limit}); give it a rank <= {limit} (ranks={{name: rank}}) or leave it out of "
                             "target_modules")
        if not 0 <= rank <= self.capacity:
            raise ValueError(f"{self._label}: rank {rank} outside [0, capacity = {self.capacity}]")

    def validate_rank(self, rank) -> int:
        """``rank`` as an int if this layer can take it, else a TypeError/ValueError naming it."""
        rank = self._check_int("rank", rank)
        self._check_rank_value(rank)
        return rank

    @property
    def rank(self) -> int:
        """The number of active slots, ``0 <= rank <= capacity``; changed by :meth:`set_rank`."""
        return self._rank

    @property
    def slot_edits(self) -> int:
        """How many edits have changed which component a slot of this layer holds: ``set_rank``
        to another rank, ``keep_components`` other than all active slots in order, a
        ``load_state_dict`` of the pools or of the rank, ``reset_parameters``, an adapter loaded
        into the layer, ``lorambo.follow_ranks`` on a copy (``lorambo/nn/slot_lineage.py``). A
        ``load_state_dict`` counts one when it changes the slots' component ids, none when it
        brings back the ones the layer holds (its own ``state_dict``)."""
        return self._slot_edits

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as [out, in] (a view for Conv1D)."""
        return base_layers.weight_out_in(self.base_layer, self.base_kind)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None without one); assigning an ``nn.Parameter`` sets the base's."""
        return self.base_layer.bias

    def _set_base_tensor(self, name: str, value) -> None:
        """``layer.weight = p`` / ``layer.bias = p`` as on nn.Linear: ``p`` becomes the base layer's
        Parameter, stored as given (requires_grad included)."""
        if self.merged:
            raise RuntimeError(f"{self._label}: unmerge() before assigning {name}: the merged weight holds the "
                               "adapter, and unmerge() would subtract it from the new one")
        if name == "weight" and self.base_kind == "conv1d":
            raise TypeError(f"{self._label}: layer.weight reads as the [out, in] view of the Conv1D's [in, out] "
                            "weight and cannot be assigned; assign base_layer.weight (shape "
                            f"[{self.in_features}, {self.out_features}]) instead")
        shape = (self.out_features, self.in_features) if name == "weight" else (self.out_features,)
        if value is None:
            if name == "weight" or self.base_kind == "conv1d":
                raise ValueError(f"{self._label}: {name} cannot be None on a {type(self.base_layer).__name__} base")
        elif not isinstance(value, nn.Parameter) or tuple(value.shape) != shape:
            raise ValueError(f"{self._label}: {name} must be an nn.Parameter of shape {list(shape)} (or None for "
                             f"a Linear's bias), got {type(value).__name__} of shape "
                             f"{list(getattr(value, 'shape', []))}")
        setattr(self.base_layer, name, value)

    # ------------------------------------------------------------------------ rank changes
    # Rank edits run eagerly inside a compiled function (a graph break): traced, they would guard
    # on the rank values and recompile for each new one, until the recompile limit.
    @run_eagerly
    @warns_when_done  # a warning raised as an error must not stop the edit half-way
    @torch.no_grad()
    def set_rank(self, rank: int, optimizer: OptimizerArgument | None = None,
                 generator: torch.Generator | None = None) -> int:
        """Set the active rank in place and return the previous one.

        Growth initialises the new rows of A as LoRA does (Kaiming-uniform) and leaves the new
        columns of B at zero, so the layer's output is unchanged. Shrinking zeroes the dropped
        slots. The gradients (``.grad``) of every changed slot are zeroed too, so a rank change
        between ``backward()`` and ``optimizer.step()`` is safe. With ``optimizer``, the state of
        every changed slot is zeroed (with :class:`lorambo.optim.AdamW` also its Adam step count, so
        a new slot trains exactly as under a fresh optimizer). Pass a seeded ``generator`` when
        several processes must initialise new slots identically (DDP); it may live on another
        device than the pools (a CPU generator gives CUDA pools the numbers it gives CPU ones).
        """
        rank = self.validate_rank(rank)
        optimizer = optimizer_argument(optimizer, f"{self._label}.set_rank")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{self._label}.set_rank: generator must be a torch.Generator or None, got "
                            f"{generator!r:.60} (seed one: torch.Generator().manual_seed(seed))")
        if self.merged:
            raise RuntimeError(f"{self._label}: unmerge() before changing the rank")
        self._refuse_sharded()
        self._refuse_replaced_pools()
        old = self._rank
        lo, hi = min(old, rank), max(old, rank)
        # what can fail (a refused optimizer, out of memory, Ctrl-C) runs before the first write,
        # so a failed rank change leaves the layer and its optimizer state as they were
        reset_state = None
        if rank != old:
            check_slot_state_editable(optimizer, self)
            if optimizer is not None:
                reset_state = prepared_slot_reset(optimizer, self, range(lo, hi), all_active_new=(old == 0))
        if rank > old:
            rows = self.lora_A[old:rank]
            if generator is not None and generator.device != rows.device:
                # e.g. a CPU decision generator for CUDA pools: draw where the generator lives
                # (the same numbers on every device) and copy; torch refuses the mix
                drawn = torch.empty(rows.shape, dtype=rows.dtype, device=generator.device)
                rows.copy_(nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator))
            else:
                nn.init.kaiming_uniform_(rows, a=math.sqrt(5), generator=generator)
            self.lora_B[:, old:rank].zero_()
        elif rank < old:
            self.lora_A[rank:old].zero_()
            self.lora_B[:, rank:old].zero_()
        for grad, dim in self._pool_grads():
            grad.narrow(dim, lo, hi - lo).zero_()
        self._set_active_rank(rank)
        (start_ids if rank > old else drop_ids)(self, lo, hi)
        if rank != old:
            warn_if_state_left_behind(self, optimizer, f"rank changed {old} -> {rank}")
        warn_if_frozen_growth(self, old, rank)
        if reset_state is not None:
            if rank > old > 0:  # growth from 0 restarts the shared step: nothing is stale then
                warn_if_shared_step(optimizer, self)
            reset_state()
        return old

    def _zero_slot_grads(self, lo: int, hi: int) -> None:
        """Zero the gradients of slots ``lo .. hi-1`` this process holds (a DTensor's own shard):
        a rank lowered between backward() and the optimizer step would leave the dropped slots'
        gradients in ``.grad`` (kept by ``zero_grad(set_to_none=False)`` and accumulation), where
        gradient clipping and torch optimizers still read them."""
        for param, dim in ((self.lora_A, 0), (self.lora_B, 1)):
            if param.grad is not None:
                first, held = local_slots(param, dim)
                start, stop = min(max(lo - first, 0), held), min(max(hi - first, 0), held)
                if stop > start:
                    local_tensor(param.grad).narrow(dim, start, stop - start).zero_()

    def _pool_grads(self):
        """(grad, slot_dim) of the pools that hold a gradient."""
        for param, dim in ((self.lora_A, 0), (self.lora_B, 1)):
            if param.grad is not None:
                yield param.grad, dim

    @run_eagerly  # eagerly, as set_rank
    @warns_when_done
    @torch.no_grad()
    def keep_components(self, keep: Sequence[int], optimizer: OptimizerArgument | None = None) -> int:
        """Keep the active slots listed in ``keep`` (in that order) compacted into slots
        0..len(keep)-1, zero the rest, and return the previous rank. The kept components are
        moved bit for bit, with their gradients; with ``optimizer`` their state moves with them."""
        keep = self.checked_keep(keep)
        optimizer = optimizer_argument(optimizer, f"{self._label}.keep_components")
        if keep != list(range(self._rank)):
            check_slot_state_editable(optimizer, self)
        old, n = self._rank, len(keep)
        # everything kept is gathered first (the allocations: out of memory there, or Ctrl-C,
        # changes nothing), then written: a failure between the writes of A and of B would
        # leave a different adapter at the same rank
        index = torch.as_tensor(keep, dtype=torch.long, device=self.lora_A.device)
        kept_a, kept_b = self.lora_A.index_select(0, index), self.lora_B.index_select(1, index)
        kept_grads = [(grad, dim, grad.index_select(dim, index.to(grad.device))) for grad, dim in self._pool_grads()]
        write_state = None if optimizer is None else gathered_slot_state(optimizer, self, keep, old)
        self.lora_A[:n] = kept_a
        self.lora_B[:, :n] = kept_b
        self.lora_A[n:old].zero_()
        self.lora_B[:, n:old].zero_()
        for grad, dim, kept in kept_grads:
            grad.narrow(dim, 0, n).copy_(kept)
            grad.narrow(dim, n, old - n).zero_()
        self._set_active_rank(n)
        keep_ids(self, keep, old)
        if keep != list(range(old)):
            warn_if_state_left_behind(self, optimizer, f"slots {keep} of {old} kept")
        if write_state is not None:
            write_state()
        return old

    def checked_keep(self, keep: Sequence[int]) -> list[int]:
        """``keep`` as validated ints for :meth:`keep_components` (distinct, active, unmerged)."""
        keep = [self._check_int("component index", i) for i in keep]
        if len(set(keep)) != len(keep):
            raise ValueError(f"{self._label}: component indices must be distinct, got {keep}")
        bad = [i for i in keep if not 0 <= i < self._rank]
        if bad:
            raise ValueError(f"{self._label}: component indices {bad} outside active range [0, {self._rank})")
        if self.merged:
            raise RuntimeError(f"{self._label}: unmerge() before changing the rank")
        self._refuse_sharded()
        self._refuse_replaced_pools()
        return keep

    def _refuse_replaced_pools(self) -> None:
        reason = replaced_pools_reason(self)
        if reason is not None:
            raise TypeError(f"{self._label}: {reason}")

    def _refuse_sharded(self) -> None:
        # edits of a DTensor's slices land in copies, not in the shards: nothing would change
        if is_sharded(self.lora_A) or is_sharded(self.lora_B):
            raise RuntimeError(f"{self._label}: its pools are sharded (FSDP2 DTensors); change ranks through "
                               "lorambo.integrations.fsdp (set_rank, keep_components, allocator_step), "
                               "which gathers them")

    @torch.no_grad()
    def check_inactive_zero(self, caller: str) -> None:
        """ValueError naming ``caller`` and the layer if a slot past the rank holds a non-zero
        value. lorambo never leaves one (docs/architecture.md, the rank pool), so it was written
        from outside, e.g. by a weight average copied before a rank change (which
        ``lorambo.follow_ranks`` keeps in step), and what saves the active slots would drop it."""
        if is_sharded(self.lora_A) or is_sharded(self.lora_B):
            return  # a shard would need a collective; lorambo.integrations.fsdp gathers before saving
        tail = max(used_slots(getattr(self, name).narrow(dim, self._rank, self.capacity - self._rank), dim)
                   for name, dim in POOL_SLOT_DIMS.items())
        if tail:
            last = self._rank + tail
            raise ValueError(f"{caller}: {self._label} has non-zero slots up to {last} but its rank is "
                             f"{self._rank}; lorambo keeps slots past the rank at zero, so they were written "
                             "outside lorambo, e.g. by a weight average (AveragedModel, an EMA) that missed a rank "
                             "change of the trained model, and saving the active slots would drop them. Call "
                             "lorambo.follow_ranks(average, model) after every rank change")

    @torch.no_grad()
    def zero_inactive_(self) -> None:
        """Zero the inactive slots (they are zero unless something outside lorambo wrote them)."""
        self.lora_A[self._rank:].zero_()
        self.lora_B[:, self._rank:].zero_()

    # ---------------------------------------------------------------------------- forward
    def forward(self, input: torch.Tensor | None = None, *, x: torch.Tensor | None = None) -> torch.Tensor:
        # a drop-in takes the input as nn.Linear names it (``input=``) and as Conv1D does (``x=``)
        if (input is None) == (x is None):
            raise TypeError(f"{self._label}: forward takes one input tensor, by position, as input= "
                            f"(nn.Linear) or as x= (Conv1D); got {'both' if x is not None else 'none'}")
        x = input if x is None else x
        if x.dim() == 0:
            raise ValueError(f"{self._label}: input is a 0-d tensor; expected shape [..., {self.in_features}]")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self._label}: input has last dim {x.shape[-1]} (shape {tuple(x.shape)}), "
                             f"expected in_features = {self.in_features}")
        base = self.base_layer  # read once: each read of a submodule is a Module.__getattr__ call
        if self.merged or self.adapter_disabled:
            return base(x)
        if type(base) is not self._base_type:
            self._refuse_swapped_base()
        if not ("lora_A" in self._parameters and "lora_B" in self._parameters):
            self._refuse_replaced_pools()
        if base_layers.call_hooks(base):  # registered after wrapping (e.g. on every nn.Linear)
            raise RuntimeError(f"{self._label}: cannot run: {base_layers.hooks_reason(base)}")
        weight, bias = base_layers.weight_out_in(base, self.base_kind), base.bias  # self.weight, self.bias
        lora_a, lora_b = self.lora_A, self.lora_B
        if weight.shape != (self.out_features, self.in_features):  # e.g. a tied embedding resized in place
            raise ValueError(f"{self._label}: the base weight is now [out, in] = {list(weight.shape)}, but the layer "
                             f"and its LoRA pools are [{self.out_features}, {self.in_features}]; resizing an adapted "
                             "layer is not supported: unload() it, resize, and configure again")
        # The ops refuse a device mix too (lorambo/ops/op_operands.py), but their error names no layer.
        if not (x.device == weight.device == lora_a.device == lora_b.device
                and (bias is None or bias.device == x.device)):
            raise ValueError(f"{self._label}: input is on {x.device} but the base weight is on {weight.device}"
                             f"{'' if bias is None else f', its bias on {bias.device}'} and the LoRA pools on "
                             f"{lora_a.device} / {lora_b.device}; move the input or the layer to one device"
                             f"{base_layers.offload_hint(self.base_layer)}")
        # Checked before autocast, which would cast an integer input to its dtype and compute; and the
        # ops' hand-written backward has no complex conjugates, so complex gradients would be wrong.
        for what, tensor in (("input", x), ("base weight", weight), ("LoRA pool", lora_a)):
            if not tensor.dtype.is_floating_point:
                raise TypeError(f"{self._label}: {what} has dtype {tensor.dtype}; LoRAMBoLinear computes in a "
                                "real floating dtype (float32, float64, bfloat16 or float16)")
        device_type = x.device.type
        # meta tensors (shape inference, memory estimates) have no autocast state to ask about
        autocast = autocast_available(device_type)  # traceable by torch 2.11's Dynamo too
        autocasting = autocast and torch.is_autocast_enabled(device_type)
        if autocasting:
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, lora_a, lora_b = (_autocast_operand(t, dtype) for t in (x, weight, lora_a, lora_b))
            bias = None if bias is None else _autocast_operand(bias, dtype)
        if not (x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype and (bias is None or bias.dtype == x.dtype)):
            raise TypeError(f"{self._label}: input dtype {x.dtype} does not match weight dtype {weight.dtype}"
                            f"{'' if bias is None else f' / bias dtype {bias.dtype}'} / LoRA dtype {lora_a.dtype} "
                            + ("(under autocast, which casts every dtype but float64 to its own)" if autocasting
                               else "(outside autocast)"))
        p = self.dropout if self.training else 0.0
        # .half() / .to(dtype) after building, or autocast, may make the settings overflow or vanish
        check_settings_fit(self._label, x.dtype, self.scaling, p, " (under autocast)" if autocasting else "",
                           self.alpha)
        # an unbacked SymInt under torch.compile: one graph for every rank, 0 and 1 included
        rank = traced_rank(self)
        # turned off only where it is on: entering torch.autocast costs 4 us, at every layer call
        with torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext():
            return lora_linear(x, weight, bias, lora_a, lora_b, rank, self.scaling, p)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise the pool as a new layer of the current rank: Kaiming-uniform active rows of
        A, zero B, zero inactive slots. For meta-device construction: after ``to_empty`` the pools
        hold whatever the memory held, and the usual ``reset_parameters()`` pass over every
        module (FSDP's default ``param_init_fn``, ...) makes them a valid adapter again. The base
        layer is its own module with its own ``reset_parameters``; it is not touched here. An
        optimizer that has stepped the pools keeps state for the old components: a
        ``StaleOptimizerStateWarning`` says so (build a new optimizer)."""
        if self.merged:
            raise RuntimeError(f"{self._label}: unmerge() before reset_parameters()")
        self._refuse_replaced_pools()
        rank, a = self._rank, local_tensor(self.lora_A)  # a DTensor's own shard (FSDP2)
        a.zero_()
        local_tensor(self.lora_B).zero_()
        first, held = local_slots(self.lora_A, 0)
        n = max(0, min(rank - first, held))
        if n:  # the rows a whole-pool init gives these slots, so any sharding gets the same A
            drawn = torch.empty(rank, self.in_features, dtype=a.dtype,
                                device=generator.device if generator is not None else a.device)
            nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
            a[:n].copy_(drawn[first:first + n])
        restart_ids(self)
        # Adam's moments of the old components would move the new ones (see docs/architecture.md, rule 4)
        warn_if_state_left_behind(self, None, "reset_parameters() re-initialised its slots", REBUILD_IT)

    # ---------------------------------------------------------------------- state / repr
    def get_extra_state(self) -> torch.Tensor:
        # Saved in state_dict so a reload restores which slots are active and the scaling (with
        # the alpha / use_rslora it came from): the scaling is part of the adapter's function, and
        # a layer built with another alpha or rank would otherwise compute another one. All int64,
        # the two floats as their float64 bit patterns: exact, and left alone by the usual
        # "cast the floating tensors to bf16" conversion of a state_dict.
        settings = torch.tensor([self.scaling, self.alpha], dtype=torch.float64).view(torch.int64)
        return torch.cat([torch.tensor([self._rank, self.capacity]), settings,
                          torch.tensor([int(self.use_rslora)])])

    def _parse_extra_state(self, state) -> tuple[int, tuple[float, float, bool] | None]:
        """``(rank, (scaling, alpha, use_rslora))`` of a valid extra state for this layer, the
        settings None for the two-integer form ``[rank, capacity]``, which carries no scaling;
        else a ValueError naming the layer."""
        self._refuse_replaced_pools()  # a load's rank change would not zero the slots past it
        values = torch.as_tensor(state)
        if values.shape == (2,) and not (values.is_floating_point() or values.is_complex()):
            settings = None
        elif values.shape == (5,) and values.dtype == torch.int64:
            scaling, alpha = values[2:4].clone().view(torch.float64).tolist()
            rslora = int(values[4])
            if not (math.isfinite(scaling) and math.isfinite(alpha)):
                raise ValueError(f"{self._label}: state_dict has scaling {scaling} / alpha {alpha}, expected "
                                 "finite numbers")
            if rslora not in (0, 1):
                raise ValueError(f"{self._label}: state_dict has use_rslora {rslora}, expected 0 or 1")
            check_settings_fit(f"{self._label}: state_dict", self.lora_A.dtype, scaling, self.dropout, alpha=alpha)
            settings = (scaling, alpha, bool(rslora))
        else:
            raise ValueError(f"{self._label}: state_dict extra state must be the int64 [rank, capacity, "
                             "scaling bits, alpha bits, use_rslora] (or the integers [rank, capacity]), got a "
                             f"{values.dtype} tensor of shape {list(values.shape)}: {values.tolist()}")
        rank, capacity = (int(v) for v in values[:2].tolist())
        if capacity != self.capacity:
            raise ValueError(f"{self._label}: state_dict has capacity {capacity}, layer has {self.capacity}")
        if not 0 <= rank <= capacity:
            raise ValueError(f"{self._label}: state_dict has rank {rank} outside [0, capacity = {capacity}]")
        return rank, settings

    def set_extra_state(self, state) -> None:
        rank, settings = self._parse_extra_state(state)
        if self.merged:
            raise RuntimeError(f"{self._label}: unmerge() before loading a state_dict")
        old = self._rank
        self._set_active_rank(rank)
        if rank != old:
            warn_if_state_left_behind(self, None, f"rank changed {old} -> {rank} by load_state_dict", LOAD_IT)
        if settings is not None:
            self.scaling, self.alpha, self.use_rslora = settings
        self.zero_inactive_()  # keep the invariant (a load refuses non-zero values there, a plain call does not)
        self._zero_slot_grads(min(old, rank), max(old, rank))  # as set_rank does for every changed slot
        restart_ids(self)

    def extra_repr(self) -> str:
        # read with defaults: a debugger or a traceback's locals show layers whose constructor failed half-way
        get = self.__dict__.get
        scaling = get("scaling")
        return (f"in_features={get('in_features')}, out_features={get('out_features')}, rank={get('_rank')}, "
                f"capacity={get('capacity')}, scaling={scaling if scaling is None else format(scaling, '.4g')}, "
                f"dropout={get('dropout')}, rslora={get('use_rslora')}, base={get('base_kind')}, "
                f"merged={get('merged')}")
