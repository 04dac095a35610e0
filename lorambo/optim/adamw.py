"""AdamW with one Adam step count per rank slot of LoRAMBoLinear pools.

torch.optim's Adam keeps one ``step`` per parameter. In a rank pool a slot activated at step t
then starts with zero moments but the bias correction of step t, and its first updates are
2.5-5x those of a fresh Adam. :class:`AdamW` keeps ``slot_step`` ([capacity]) for every pool
parameter and applies Adam's bias correction per slot, so a slot activated at step t moves
exactly as under a fresh optimizer fed the same gradients.

Every other parameter is updated by torch's own AdamW code path (same arguments, foreach or
fused as torch chooses), so for a model without pools this *is* torch.optim.AdamW, except for
float16 parameters: torch keeps their moments in float16, where the second moment of small
gradients underflows (see ``moment_dtype``), so they keep float32 moments and take the pools'
float32 multi-tensor update as whole tensors, with torch's one ``step`` per parameter.

Pool parameters are recognised by their tag (:mod:`lorambo.nn.slots`); only their active slots
are read and written (cost follows the rank). Rank changes must pass the optimizer
(``layer.set_rank(r, optimizer=opt)``, ``keep_components(..., optimizer=opt)``): that zeroes or
moves the moments and step counts of the changed slots with them.

Under FSDP2 (DTensor pools) each process updates the active slots of its own shard and keeps
every slot's count, so the counts stay identical on all processes and rank edits
(``lorambo.integrations.fsdp``) move them like any replicated value.

Pool parameters take one call of the compiled extension on the CPU (see
``_compiled_step_applies``) and otherwise the multi-tensor (``torch._foreach_*``) path, with the
step counts on the parameter's device, so the update never reads a device value on the host.
Both compute the same formulas in the same order, equal up to rounding (bf16/fp16 pools: the
update works in float32 and rounds once per element, on both paths). float16 pools keep their
moments in float32 (see ``moment_dtype``) and take the multi-tensor path.
Under ``torch.compile(optimizer.step)`` torch's update of the other parameters is compiled; the
pools' update runs eagerly (it is one call of the extension on the CPU, and its per-slot
bookkeeping changes with every rank edit).
``fused`` and ``capturable`` apply to the other parameters; with a GradScaler the scaler unscales the gradients
and skips inf steps itself, also for ``fused=True``. ``differentiable=True`` is not supported.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lorambo.nn.optimizer_state import SLOT_STEP
from lorambo.nn.slots import local_slots, pool_slots
from lorambo.ops.backend import compiled_multi_tensor_where, ready_on_cpu, use_compiled_multi_tensor
from lorambo.ops.compile_support import run_eagerly
from lorambo.optim.hyperparameters import check_adamw_settings
from lorambo.sharding import is_sharded, local_tensor

__all__ = ["AdamW"]


def _unhooked_step(cls):
    """``cls.step`` without torch's profiling/hook wrapper: the hooks already ran around our step."""
    fn = cls.step
    while getattr(fn, "hooked", False):
        fn = fn.__wrapped__
    return fn


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _bias_correction(slot_steps: torch.Tensor, beta: float) -> torch.Tensor:
    """``1 - beta^t`` per slot, to the rounding of ``slot_steps``' dtype even for beta close to 1."""
    if beta == 0.0:
        return torch.ones_like(slot_steps)
    return -torch.expm1(slot_steps * math.log(beta))


def _denominator_coefficients(slot_steps, layouts, lr, beta1, beta2):
    """Per-slot ``inv_sqrt_bc2``, ``bc1_over_lr`` with ``lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``
    = ``m / ((sqrt(v) * inv_sqrt_bc2 + eps) * bc1_over_lr)``, bc_i = 1 - beta_i^t. At lr = 0 (a
    warm-up's first step, or torch.distributed.checkpoint initialising the state) ``bc1_over_lr``
    is inf and the update exactly 0; eps is added before that factor so that 0 * inf cannot
    arise. Computed for all pools of one device and precision at once (a few small ops per step
    instead of a few per pool)."""
    inv_sqrt_bc2, bc1_over_lr = [None] * len(slot_steps), [None] * len(slot_steps)
    groups: dict[tuple, list[int]] = {}
    for i, (steps, (_, dtype)) in enumerate(zip(slot_steps, layouts)):
        groups.setdefault((steps.device, dtype), []).append(i)
    for (_, dtype), members in groups.items():
        steps = torch.cat([slot_steps[i] for i in members]).to(dtype)
        bc1, bc2 = _bias_correction(steps, beta1), _bias_correction(steps, beta2)
        group_a, group_c = bc2.rsqrt(), bc1 / lr  # tensor / 0 is inf, not an error
        sizes = [slot_steps[i].numel() for i in members]
        for i, a, c in zip(members, group_a.split(sizes), group_c.split(sizes)):
            shape = layouts[i][0]
            inv_sqrt_bc2[i], bc1_over_lr[i] = a.view(shape), c.view(shape)
    return inv_sqrt_bc2, bc1_over_lr


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of Adam's moments for a parameter (pool or not) of ``dtype``: float32 for float16, else
    ``dtype``. float16's smallest normal value is 6.1e-5 (subnormals down to 6e-8): the second
    moment's ``(1 - beta2) g^2`` of gradients below about 0.25 loses precision there and below
    about 8e-3 (LoRA's usual range) rounds to 0, and then ``m / sqrt(v)`` takes steps of hundreds
    of learning rates. bfloat16 has float32's range and keeps its moments."""
    return torch.float32 if dtype == torch.float16 else dtype


# bf16/fp16 pools are updated in float32 and rounded once per element (so is the foreach path)
_COMPILED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compiled_step_applies(work, amsgrad: bool) -> bool:
    """Whether the compiled extension's one-call update (csrc/cpu/pool_adamw_cpu.cpp) runs: pools
    of a float dtype with contiguous gradients and state, outside FSDP2, where the backend
    switch allows it as for the other multi-tensor ops (``auto``: CPU tensors; ``torch``: never;
    ``ext``: also CUDA, whose kernel has not run on a GPU yet). On the CPU it measured about 5x
    faster than the multi-tensor path (docs/performance.md)."""
    for param, state, _, _ in work:
        if is_sharded(param) or param.dtype not in _COMPILED_DTYPES or state["exp_avg"].dtype != param.dtype:
            return False  # the compiled step keeps the moments in the pool's dtype
    where = compiled_multi_tensor_where()
    if where != "cpu":
        return where == "any"
    # use_compiled_multi_tensor's test (ready_on_cpu) written out per pool: no list of its 5
    # tensors, no detach() to ask a parameter as the op gets it, no call per tensor. This runs at
    # every step; it took 160 us over 96 pools, and each attribute read costs 0.07 us.
    for param, state, _, _ in work:
        grad, exp_avg, exp_avg_sq, counts = param.grad, state["exp_avg"], state["exp_avg_sq"], state[SLOT_STEP]
        if not (param.is_cpu and param.is_contiguous()
                and grad.is_cpu and grad.is_contiguous() and not grad.requires_grad
                and exp_avg.is_cpu and exp_avg.is_contiguous() and not exp_avg.requires_grad
                and exp_avg_sq.is_cpu and exp_avg_sq.is_contiguous() and not exp_avg_sq.requires_grad
                and counts.is_cpu and counts.is_contiguous() and not counts.requires_grad
                and (not amsgrad or ready_on_cpu(state["max_exp_avg_sq"]))):
            return False
    return True


def _compiled_pool_step(group: dict, work) -> None:
    beta1, beta2 = (float(b) for b in group["betas"])
    params = [p.detach() for p, _, _, _ in work]
    grads = [p.grad for p, _, _, _ in work]  # only read, and step() runs under no_grad: no detach() needed
    states = [state for _, state, _, _ in work]
    max_sqs = [state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else []
    torch.ops.lorambo.pool_adamw_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                  max_sqs, [s[SLOT_STEP] for s in states], [dim for _, _, dim, _ in work],
                                  [rank for _, _, _, rank in work], float(group["lr"]), beta1, beta2,
                                  float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"]))


def _count_steps(steps: list) -> None:
    """Add 1 to every count of ``steps`` (torch's per-parameter ``step``): one compiled call for
    CPU counts where the backend switch allows compiled multi-tensor ops (its kernel is CPU only),
    else ``torch._foreach_add_``, whose CPU path costs about 1.4 us per count."""
    # the kernel's CPU test for every backend switch that allows it (``ext`` included): one pass
    if compiled_multi_tensor_where() is not None and all(map(ready_on_cpu, steps)):
        torch.ops.lorambo.scalars_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, 1.0)


def _foreach_pool_step(group: dict, work) -> None:
    """The update as torch._foreach ops on the active slots (any device, dtype and FSDP2 shard)."""
    amsgrad = group["amsgrad"]
    values, grads, exp_avgs, exp_avg_sqs, max_sqs, slot_steps, layouts = ([] for _ in range(7))
    counted = []  # every active slot's count, also those held by other processes (kept identical)
    for param, state, dim, rank in work:
        counted.append(state[SLOT_STEP][:rank])
        first, n, shard = 0, rank, _whole
        if is_sharded(param):  # FSDP2: its gradient and state are sharded alike
            first, held = local_slots(param, dim)  # this process's slots, maybe none
            n, shard = max(0, min(rank - first, held)), local_tensor
            if n == 0:
                continue
        active = lambda t: shard(t).narrow(dim, 0, n)  # noqa: E731  (cost follows the rank)
        values.append(active(param))
        grads.append(active(param.grad))
        exp_avgs.append(active(state["exp_avg"]))
        exp_avg_sqs.append(active(state["exp_avg_sq"]))
        if amsgrad:
            max_sqs.append(active(state["max_exp_avg_sq"]))
        slot_steps.append(state[SLOT_STEP][first:first + n])
        # per-slot coefficients broadcast along the slot dim, in >= float32 like torch's scalars
        layouts.append(((n, 1) if dim == 0 else (1, n), torch.promote_types(param.dtype, torch.float32)))
    torch._foreach_add_(counted, 1.0)
    _foreach_adamw(group, values, grads, exp_avgs, exp_avg_sqs, max_sqs, slot_steps, layouts)


def _foreach_whole_step(group: dict, work) -> None:
    """The update of whole parameters that are not pools, as :func:`_foreach_pool_step` computes
    it: float16 parameters (float32 moments, see ``moment_dtype``), with torch's one ``step``
    count per parameter."""
    values, grads, exp_avgs, exp_avg_sqs, max_sqs, slot_steps, layouts = ([] for _ in range(7))
    torch._foreach_add_([state["step"] for _, state in work], 1.0)
    for param, state in work:
        shard = local_tensor if is_sharded(param) else _whole
        values.append(shard(param))
        grads.append(shard(param.grad))
        exp_avgs.append(shard(state["exp_avg"]))
        exp_avg_sqs.append(shard(state["exp_avg_sq"]))
        if group["amsgrad"]:
            max_sqs.append(shard(state["max_exp_avg_sq"]))
        slot_steps.append(state["step"].detach().to(device=values[-1].device, dtype=torch.float32).reshape(1))
        layouts.append(((1,) * param.dim(), torch.promote_types(param.dtype, torch.float32)))
    _foreach_adamw(group, values, grads, exp_avgs, exp_avg_sqs, max_sqs, slot_steps, layouts)


def _foreach_adamw(group, values, grads, exp_avgs, exp_avg_sqs, max_sqs, slot_steps, layouts) -> None:
    """AdamW on lists of tensors with counts ``slot_steps`` (already incremented) broadcast as
    ``layouts`` give them, computed in each layout's dtype and rounded once into the stored tensors."""
    if not values:
        return
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    amsgrad, maximize = group["amsgrad"], group["maximize"]
    # bf16/fp16 pools are updated in float32 copies and rounded once per element, as the compiled
    # step is: in float16 eps = 1e-8 is 0 and squared gradients underflow, so an element whose
    # moments are 0 (all of A on a LoRA's first step, where B = 0) would take 0/0 = NaN, and one
    # whose squared gradient underflows a step of m / eps
    stored = [values, exp_avgs, exp_avg_sqs, max_sqs]
    values, grads, exp_avgs, exp_avg_sqs, max_sqs = (
        [t.to(dtype) for t, (_, dtype) in zip(tensors, layouts)]
        for tensors in (values, grads, exp_avgs, exp_avg_sqs, max_sqs))
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        torch._foreach_mul_(values, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    second = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
        second = max_sqs
    inv_sqrt_bc2, bc1_over_lr = _denominator_coefficients(slot_steps, layouts, lr, beta1, beta2)
    denoms = torch._foreach_sqrt(second)
    torch._foreach_mul_(denoms, inv_sqrt_bc2)
    torch._foreach_add_(denoms, eps)
    torch._foreach_mul_(denoms, bc1_over_lr)
    torch._foreach_addcdiv_(values, exp_avgs, denoms, -1.0)
    pairs = [(out, wide) for outs, wides in zip(stored, (values, exp_avgs, exp_avg_sqs, max_sqs))
             for out, wide in zip(outs, wides) if out is not wide]
    if pairs:
        torch._foreach_copy_([out for out, _ in pairs], [wide for _, wide in pairs])


_PER_ELEMENT = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _saved_states(state_dict: dict):
    """(param group index, position in it, saved state or {}) of every parameter ``state_dict`` lists."""
    states = state_dict.get("state", {})
    for g, group in enumerate(state_dict.get("param_groups", ())):
        for i, pid in enumerate(group.get("params", ())):
            yield g, i, states.get(pid) or {}


def _check_state_shapes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Refuse saved state whose shapes are not its parameter's (pools of another capacity):
    torch does not look, and the first step would fail in the update naming no parameter."""
    saved = [group.get("params", ()) for group in state_dict.get("param_groups", ())]
    if [len(g) for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
        return  # torch's own load_state_dict reports that
    for g, i, state in _saved_states(state_dict):
        param = optimizer.param_groups[g]["params"][i]
        tagged = pool_slots(param)
        expected = {key: tuple(param.shape) for key in _PER_ELEMENT}
        if tagged is not None:
            expected[SLOT_STEP] = (param.shape[tagged[1]],)
        for key, shape in expected.items():
            value = state.get(key)
            if torch.is_tensor(value) and tuple(value.shape) != shape:
                raise ValueError(f"{type(optimizer).__name__}.load_state_dict: parameter {i} of param group {g} "
                                 f"has saved state {key!r} of shape {list(value.shape)}, expected "
                                 f"{list(shape)} (the parameter is {list(param.shape)}); was it saved for "
                                 "a model with other LoRA capacities?")


def _check_state_is_adams(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Refuse saved state that is not Adam's (step, exp_avg, exp_avg_sq), such as Adamax's (no
    exp_avg_sq): a pool would take its exp_avg as Adam's first moment with a second moment starting
    at zero, so its first steps would be far too large; torch's AdamW fails at its first step with a
    KeyError."""
    for g, i, state in _saved_states(state_dict):
        missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in state]
        if state and missing:
            raise ValueError(f"{type(optimizer).__name__}.load_state_dict: parameter {i} of param group {g} has "
                             f"saved state {sorted(map(str, state))}, which lacks Adam's {missing}: was it saved "
                             "by another optimizer? Load an Adam/AdamW state, or start this optimizer fresh")


def _check_state_follows(param: torch.Tensor, state: dict) -> None:
    """A model cast or moved after the optimizer's first step (``model.double()``,
    ``model.to(device)``) leaves the moments behind; the update would then fail inside torch or
    the extension with a message about the dtypes of internal tensors, or mix dtypes."""
    if _state_left_behind(param, state):
        value = state["exp_avg"]
        raise RuntimeError(
            f"lorambo.optim.AdamW: the exp_avg of a parameter of shape {list(param.shape)} is {value.dtype} on "
            f"{value.device}, but the parameter is now {param.dtype} on {param.device}: the model was cast or moved "
            "after the optimizer's first step. Build the optimizer after model.to(...), or bring its state along "
            "with optimizer.load_state_dict(optimizer.state_dict())")


def _state_left_behind(param: torch.Tensor, state: dict) -> bool:
    """:func:`_check_state_follows`'s condition, as cheap as it gets: ``step`` tests it for every
    parameter at every step. Two CPU tensors are on one device, so the ``torch.device``
    objects (the larger part of the cost) are made only off the CPU."""
    value = state.get("exp_avg")  # the other moments were made, and are cast or moved, with it
    if not isinstance(value, torch.Tensor):  # torch.is_tensor, without the call
        return False
    dtype = param.dtype
    return (value.dtype is not (torch.float32 if dtype is torch.float16 else dtype)  # moment_dtype
            or not (value.is_cpu and param.is_cpu or value.device == param.device))


class AdamW(torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` (same arguments and defaults; ``differentiable=True``
    is refused with a ``ValueError``) with per-slot Adam step counts for LoRAMBoLinear pools.
    See the module docstring."""

    # it updates the active slots of pools only, so the inactive-slot zeroing after each step
    # (lorambo/nn/inactive_slots.py) has nothing to do
    _lorambo_keeps_inactive_slots = True

    if not TYPE_CHECKING:  # type checkers see torch.optim.AdamW's signature, which this passes on whole
        def __init__(self, params, *args, **kwargs):
            try:
                given = inspect.signature(torch.optim.AdamW.__init__).bind(self, params, *args, **kwargs)
            except TypeError:
                given = None  # torch names the wrong argument itself
            if given is not None:  # before torch's own checks, whose messages name neither class nor argument
                given.apply_defaults()
                check_adamw_settings(given.arguments)
            super().__init__(params, *args, **kwargs)
            if any(group.get("differentiable", False) for group in self.param_groups):
                raise ValueError("lorambo.optim.AdamW: differentiable=True is not supported")
            # torch's fused AdamW unscales and skips inf steps inside its kernel when a GradScaler hands
            # it the scale; the pool update does not, so the scaler must unscale and skip for us.
            self._step_supports_amp_scaling = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch checks no group's values: 10**400 would fail at the first step with an OverflowError
        # naming nothing, and inf or a beta of 1 would give inf/NaN pools; refused before the group joins
        check_adamw_settings({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pools, wide = self._own_params()
        hidden = [(p, p.grad) for kept in (pools, wide) for group_params in kept for p in group_params]
        for p, _ in hidden:
            p.grad = None  # torch's update skips parameters without a gradient
        try:
            _unhooked_step(torch.optim.AdamW)(self)
        finally:
            for p, grad in hidden:
                p.grad = grad
        for group, group_pools, group_wide in zip(self.param_groups, pools, wide):
            if group_pools:
                self._update_pools(group, group_pools)
            if group_wide:
                _foreach_whole_step(group, [(p, self._wide_state(p, group["amsgrad"])) for p in group_wide])
        return loss

    @run_eagerly  # traced, it would guard on every parameter object: a recompile per parameter
    def _own_params(self) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Per group, the parameters with a gradient that this class updates itself: the pools,
        and the float16 parameters that are not pools (float32 moments, see moment_dtype); the
        moments of every one checked against a cast or move before any update."""
        pools, wide = [], []
        state_of = self.state.get  # one hash per parameter; a defaultdict's get adds no entry
        for group in self.param_groups:
            group_pools, group_wide = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = state_of(p)
                if state and _state_left_behind(p, state):  # every group checked before any update
                    _check_state_follows(p, state)  # raises, naming the cast or move
                if pool_slots(p) is not None:
                    group_pools.append(p)
                elif moment_dtype(p.dtype) != p.dtype:
                    group_wide.append(p)
            pools.append(group_pools)
            wide.append(group_wide)
        return pools, wide

    def _wide_state(self, param: torch.Tensor, amsgrad: bool) -> dict:
        """The state of a float16 parameter that is not a pool: torch's ``step`` and moments in
        ``moment_dtype``."""
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        dtype = moment_dtype(param.dtype)
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _pool_state(self, param: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[param]
        if SLOT_STEP not in state:
            slots, dim = pool_slots(param)
            # state without per-slot counts comes from torch's Adam/AdamW (a loaded checkpoint;
            # load_state_dict refused any other optimizer's): keep its moments and give every active
            # slot its one step count, which is exactly how torch's AdamW would have continued; a
            # new state starts from zero
            step = float(state["step"]) if "exp_avg" in state and "step" in state else 0.0
            state["step"] = torch.tensor(step)
            keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
            dtype = moment_dtype(param.dtype)
            for key in keys:
                if key not in state:
                    state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                else:  # a torch AdamW checkpoint of a float16 pool holds float16 moments
                    state[key] = state[key].to(dtype)
            counts = torch.zeros(param.shape[dim], dtype=torch.float32, device=param.device)
            counts[:slots.rank] = step
            state[SLOT_STEP] = counts
        return state

    @run_eagerly  # traced, it would guard on the gradients, which zero_grad() frees: a recompile per step
    def _update_pools(self, group: dict, params: list[torch.Tensor]) -> None:
        """AdamW on the active slots of pool parameters, with per-slot bias correction."""
        amsgrad = group["amsgrad"]
        work = []  # (param, state, slot_dim, rank) of every pool with active slots
        for param in params:
            slots, dim = pool_slots(param)
            if slots.rank > 0:
                work.append((param, self._pool_state(param, amsgrad), dim, slots.rank))
        if not work:
            return
        if _compiled_step_applies(work, amsgrad):  # state dtypes and devices checked in step()
            _compiled_pool_step(group, work)
        else:
            _foreach_pool_step(group, work)
        _count_steps([state["step"] for _, state, _, _ in work])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_state_is_adams(self, state_dict)
        _check_state_shapes(self, state_dict)
        # torch casts every floating state tensor to its parameter's dtype on load; step counts
        # must stay float32 (bfloat16 counts are exact only up to 256).
        # Converted before torch's load changes anything: out of memory on the device then leaves
        # the optimizer as it was, not loaded with rounded counts.
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        saved = state_dict["state"]
        counts = {pid: saved[pid][SLOT_STEP].to(device=param.device, dtype=torch.float32, copy=True)
                  for pid, param in zip(saved_ids, params) if SLOT_STEP in saved.get(pid, {})}
        # and so are the moments of float16 parameters (see moment_dtype), which torch would round to float16;
        # only of those the state holds: writing back {} would give a parameter that never stepped an entry
        wide = {pid: {key: value.to(device=param.device, dtype=moment_dtype(param.dtype), copy=True)
                      for key, value in saved[pid].items() if key in _PER_ELEMENT and torch.is_tensor(value)}
                for pid, param in zip(saved_ids, params) if moment_dtype(param.dtype) != param.dtype and pid in saved}
        super().load_state_dict(state_dict)
        for pid, param in zip(saved_ids, params):
            if pid in counts:
                self.state[param][SLOT_STEP] = counts[pid]
            if pid in wide:
                self.state[param].update(wide[pid])
