"""Keep optimizer state consistent with rank-slot changes of LoRAMBoLinear pools.

A slot s is row s of ``lora_A`` and column s of ``lora_B``. Per-element state tensors
(Adam's exp_avg / exp_avg_sq / max_exp_avg_sq, SGD's momentum_buffer, ...) are recognised as
tensors with the parameter's shape and are edited in place, so the optimizer keeps working.
Factored statistics with one entry per slot (torch.optim.Adafactor's ``row_var`` of ``lora_A``,
``col_var`` of ``lora_B``) move and reset with their slots too.
:class:`lorambo.optim.AdamW` also keeps ``slot_step``, one Adam step count per slot (shape
[capacity]); it moves and resets with its slot like the moments.

A slot that becomes active starts as under a fresh optimizer: zero state, or the start value of
the few torch optimizers that do not start at zero (Rprop's step size, Adagrad's accumulator:
:mod:`lorambo.nn.fresh_state`; SGD's momentum with dampening: :mod:`lorambo.nn.fresh_momentum`).

Why zeroing is required, not cosmetic: Adam with zero gradient still moves a parameter whose
moments are non-zero, so a slot deactivated with stale moments would drift away from 0.

torch.optim's Adam family keeps one ``step`` per parameter, so a slot activated at step t gets
the bias correction of step t while its moments start from zero: its first updates are several
times those of a fresh Adam. lorambo cannot fix that from outside the optimizer; it resets
``step`` when every active slot of the layer is new (growth from rank 0, where that is exactly a
fresh start) and otherwise warns, once per optimizer. Adagrad with ``lr_decay`` and ASGD scale their updates by
the same shared ``step`` and are warned about alike. :class:`lorambo.optim.AdamW` has per-slot counts and no such error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lorambo.ext.ops import slot_state_tensors, state_tensors
from lorambo.nn.fresh_momentum import mark_new_slots, move_new_slots
from lorambo.nn.fresh_state import fresh_scalar_values, fresh_state_values, step_scales_updates
from lorambo.nn.optimizer_argument import OptimizerArgument, each_optimizer, optimizer_argument
from lorambo.nn.optimizer_kind import optimizer_kind
from lorambo.nn.whole_vector_state import restart_whole_vector_state
from lorambo.user_warnings import warn_user

SLOT_STEP = "slot_step"  # lorambo.optim.AdamW's per-slot Adam step count, shape [capacity]
# optimizers warned about their shared step: each one once, so every run in a process (a
# notebook's second experiment, a teacher's and a student's optimizer) hears of its own
_WARNED_SHARED_STEP = WeakIdKeyDictionary()  # optimizer -> True once warned (by identity, as optimizer_tracking)
_STEPPED_MOMENTS = {"exp_avg", "row_var", "variance"}  # Adam family; Adafactor (2-D and 1-D params)


def _slot_views(optimizer: torch.optim.Optimizer, layer):
    """Yield (state_tensor, dim) for every per-slot state tensor of the layer's pools."""
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        for value in state_tensors(optimizer, param):
            yield value, dim
        for value, value_dim in slot_state_tensors(optimizer, param, dim):
            yield value, value_dim


def check_slot_state_editable(optimizer, layer) -> None:
    """RuntimeError, before anything changes, if ``optimizer`` holds per-element state for the
    layer's pools that is not floating point: quantized moments (bitsandbytes' 8-bit optimizers
    keep uint8 codes scaled per block of 256 elements, blocks that span several slots). Such a
    code cannot be set to a fresh optimizer's state (code 0 decodes to minus the block's scale,
    not to zero) nor moved to a slot of another block, so a rank change would corrupt it.
    ``optimizer`` may be a tuple of optimizers (see :func:`each_optimizer`)."""
    for one in each_optimizer(optimizer, layer):
        _check_editable(one, layer)


def _check_editable(optimizer, layer) -> None:
    _refuse_schedule_free(optimizer, layer)
    for param in (layer.lora_A, layer.lora_B):
        state = optimizer.state.get(param) or {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and not value.is_floating_point():
                kind = optimizer_kind(optimizer)
                raise RuntimeError(
                    f"{layer._label}: {kind.__module__}.{kind.__name__} holds its state {key!r} for the LoRA pools as "
                    f"{value.dtype} (quantized), which a rank change cannot reset or move slot by slot; nothing was "
                    "changed. Keep the pools' optimizer state in floating point (bitsandbytes: a min_8bit_size above "
                    "the pool size, or GlobalOptimManager.get_instance().override_config(pool, 'optim_bits', 32)), "
                    "or use lorambo.optim.AdamW")


def _refuse_schedule_free(optimizer, layer) -> None:
    """RuntimeError if a schedule-free optimizer (``schedulefree.*ScheduleFree``, transformers'
    ``optim="schedule_free_*"``) has stepped the pools. Its parameter holds an interpolation
    y of the iterates x and z, ``z`` (state of the parameter's shape) starts at the parameter's
    value, not 0, and the averaging weight (``weight_sum``, ``lr_max``) is shared by every slot:
    a zeroed ``z`` pulls a grown slot's Kaiming row towards 0, and no per-slot edit makes a new
    slot train as under a fresh schedule-free optimizer."""
    for param in (layer.lora_A, layer.lora_B):
        state = optimizer.state.get(param) or {}
        z = state.get("z")
        if torch.is_tensor(z) and z.shape == param.shape and "weight_sum" in _group_holding(optimizer, param):
            kind = type(optimizer)
            raise RuntimeError(
                f"{layer._label}: {kind.__module__}.{kind.__name__} is schedule-free: its state 'z' starts at the "
                "parameter's value and its averaging weights are shared by every slot, so a rank change cannot give "
                "changed slots a fresh optimizer's state; nothing was changed. Change ranks before its first step, "
                "or use lorambo.optim.AdamW")


def _group_holding(optimizer, param) -> dict:
    """The param group holding ``param`` ({} if none; the last one if several). Looked up only for
    a pool with a ``z`` state: a scan of every group at every rank change of every layer made a
    decision over all layers quadratic in their number."""
    found = {}
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            found = group
    return found


def warn_if_shared_step(optimizer: torch.optim.Optimizer, layer) -> None:
    """Warn, once per optimizer, when new slots join a pool whose optimizer (Adam family,
    Adafactor, Adagrad with ``lr_decay``, ASGD) has one ``step`` per parameter that sets the
    update and has already counted steps (see the module docstring); ``optimizer`` may be a
    list of optimizers."""
    for one in each_optimizer(optimizer, layer):
        _warn_shared_step(one, layer)


def _warn_shared_step(optimizer, layer) -> None:
    warned = getattr(optimizer, "stands_in_for", optimizer)  # lorambo.integrations.fsdp's view: the real one
    if warned in _WARNED_SHARED_STEP:
        return
    for param in (layer.lora_A, layer.lora_B):
        state = optimizer.state.get(param)
        if not state or SLOT_STEP in state or "step" not in state:
            continue
        if not (_STEPPED_MOMENTS & state.keys() or step_scales_updates(optimizer, param)):
            continue
        if float(state["step"]) > 0:
            _WARNED_SHARED_STEP[warned] = True
            warn_user(
                f"{optimizer_kind(optimizer).__name__} keeps one step count per parameter: slots that become active "
                f"now in {layer._label} take their first step at step {int(float(state['step'])) + 1} of it, not at "
                "step 1 (Adam's bias correction, Adafactor's averaging rate, Adagrad's lr_decay, ASGD's eta and mu), "
                "so their first updates differ from a fresh optimizer's (2.5-5x larger measured for Adam). Use "
                "lorambo.optim.AdamW for per-slot Adam step counts. Warned once per optimizer.")
            return


@torch.no_grad()
def reset_slot_state(optimizer: OptimizerArgument, layer: torch.nn.Module, slots: Sequence[int] | range,
                     all_active_new: bool = False) -> None:
    """Give ``slots`` the optimizer state of a fresh optimizer (zero, or the start values of
    :mod:`lorambo.nn.fresh_state`); with ``all_active_new`` also restart ``step`` (and the other
    per-parameter scalars listed there). ``optimizer`` may be a wrapper such as accelerate's
    ``AcceleratedOptimizer`` (the optimizer it wraps is edited), or a list of optimizers (each
    edits the state of the pools it holds). ``TypeError`` for a ``layer`` that is not a
    LoRAMBoLinear or an ``optimizer`` that is not a torch optimizer; ``ValueError`` for a slot
    outside ``[0, capacity)``."""
    prepared_slot_reset(optimizer, layer, slots, all_active_new)()


@torch.no_grad()
def prepared_slot_reset(optimizer, layer, slots: Sequence[int] | range,
                        all_active_new: bool = False) -> Callable[[], None]:
    """:func:`reset_slot_state` in two parts: the arguments are checked and the slot indices
    made on every state tensor's device now (what can fail: a refused optimizer, out of memory,
    Ctrl-C), and the function returned only fills state in place. A rank change prepares before
    it writes the pools, so a failure leaves the layer and its state as they were."""
    checked = optimizer_argument(optimizer, "reset_slot_state")
    if checked is None:
        raise TypeError("reset_slot_state: optimizer is None; pass the torch optimizer that steps the LoRA pools")
    if not callable(getattr(layer, "_check_int", None)):
        raise TypeError(f"reset_slot_state: layer must be a LoRAMBoLinear, got {type(layer).__name__}")
    check_slot_state_editable(checked, layer)
    slots = [layer._check_int("slot", s) for s in slots]
    bad = [s for s in slots if not 0 <= s < layer.capacity]
    if bad:  # a negative index would silently reset a slot counted from the end
        raise ValueError(f"{layer._label}: slots {bad} outside [0, capacity = {layer.capacity})")
    if not slots:
        return lambda: None
    writes = [_prepared_reset(one, layer, slots, all_active_new) for one in each_optimizer(checked, layer)]

    def write() -> None:
        for one_write in writes:
            one_write()

    return write


def _prepared_reset(optimizer, layer, slots: list[int], all_active_new: bool) -> Callable[[], None]:
    indices = {}  # device -> the slots as an index there

    def index_on(device: torch.device) -> torch.Tensor:
        if device not in indices:
            indices[device] = torch.as_tensor(slots, dtype=torch.long, device=device)
        return indices[device]

    fills = [(value, dim, index_on(value.device), 0) for value, dim in _slot_views(optimizer, layer)]
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):  # state that does not start at 0
        state = optimizer.state.get(param) or {}
        for key, start in fresh_state_values(optimizer, param).items():
            value = state.get(key)
            if torch.is_tensor(value) and value.shape == param.shape:
                fills.append((value, dim, index_on(value.device), start))

    def write() -> None:
        restart_whole_vector_state(optimizer, [layer])  # LBFGS: no per-slot state to reset
        for value, dim, index, start in fills:
            value.index_fill_(dim, index, start)
        mark_new_slots(optimizer, layer, slots)  # SGD's first buffer is the update itself
        if all_active_new:
            _restart_step(optimizer, layer)

    return write


def _restart_step(optimizer, layer) -> None:
    for param in (layer.lora_A, layer.lora_B):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, start in {"step": 0.0, **fresh_scalar_values(optimizer, param)}.items():
            if key in state:
                value = state[key]
                state[key] = value.fill_(start) if torch.is_tensor(value) else type(value)(start)


@torch.no_grad()
def gather_slot_state(optimizer: OptimizerArgument, layer: torch.nn.Module, keep: Sequence[int],
                      old_rank: int) -> None:
    """Move state of slots ``keep`` to slots 0..len(keep)-1 and zero slots len(keep)..old_rank-1,
    mirroring :meth:`LoRAMBoLinear.keep_components`; ``optimizer`` may be a list of optimizers."""
    gathered_slot_state(optimizer, layer, keep, old_rank)()


@torch.no_grad()
def gathered_slot_state(optimizer, layer, keep: Sequence[int], old_rank: int) -> Callable[[], None]:
    """:func:`gather_slot_state` in two parts: the kept slots' state is gathered now (the
    allocations: out of memory here changes nothing), and the function returned writes it."""
    checked = optimizer_argument(optimizer, "gather_slot_state")
    if list(keep) != list(range(old_rank)):
        check_slot_state_editable(checked, layer)
    writes = [_gathered_slots(one, layer, keep, old_rank) for one in each_optimizer(checked, layer)]

    def write() -> None:
        for one_write in writes:
            one_write()

    return write


def _gathered_slots(optimizer, layer, keep: Sequence[int], old_rank: int) -> Callable[[], None]:
    n = len(keep)
    moved = [(value, dim, value.index_select(dim, torch.as_tensor(list(keep), dtype=torch.long, device=value.device)))
             for value, dim in _slot_views(optimizer, layer)]

    def write() -> None:
        if list(keep) != list(range(old_rank)):
            restart_whole_vector_state(optimizer, [layer])  # LBFGS: no per-slot state to move
        for value, dim, kept in moved:
            value.narrow(dim, 0, n).copy_(kept)
            if old_rank > n:
                value.narrow(dim, n, old_rank - n).zero_()
        move_new_slots(optimizer, layer, keep, old_rank)  # SGD's slots waiting for their first step

    return write
