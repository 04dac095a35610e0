"""The resumable state of a :class:`lorambo.LoRAMBoOptimizer`, as plain data.

What a rank decision depends on is the step, the seed, the settings and the captured step, so
resuming needs little: the decisions taken so far (``opt.decisions`` and the decision log), the
ALoRA rounds done, the allocation made before training (ranks, capacities, sensitivities) and
the state of the optimizer from ``make_optimizer``. The pools and ranks travel in the model's own
``state_dict``; the saved ranks are only compared with the model's.

Everything is str / int / float / bool / None, lists, dicts and tensors, so
``torch.load(..., weights_only=True)`` reads it back.
"""

from __future__ import annotations

import dataclasses
import numbers

from lorambo.allocation import capacity as pools

__all__ = ["FORMAT_VERSION", "allocator_state", "check_allocator_state", "apply_allocator_state",
           "check_model_ranks"]

FORMAT_VERSION = 1
_ENTRIES = ("names", "dims", "settings", "ranks", "decisions", "alora_rounds_done", "allocated_ranks",
            "capacities", "sensitivities", "optimizer")


def _plain(value):
    """Python numbers for numpy ones (weights_only loading refuses numpy scalars)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def _settings(opt) -> dict:
    """The settings the decisions depend on (a state written under others would not resume)."""
    return _plain({"total_budget": opt.total_budget, "initial_budget": opt.initial_budget, "seed": opt.seed,
            "allocation": opt.allocation, "warmup_steps": opt.warmup_steps, "interval": opt.interval,
            "stop_step": opt.stop_step, "loss_improvement_threshold": opt.threshold,
            "sketch_rank": opt.sketch_rank, "power_iters": opt.power_iters, "max_tokens": opt.max_tokens,
            "move_threshold": opt.move_threshold, "max_moves": opt.max_moves, "min_rank": opt.min_rank,
            "max_rank": opt.max_rank, "alora": dataclasses.asdict(opt.alora_config),
            # None when there are none, as in a state saved before the setting existed
            "modules_to_save": list(opt.modules_to_save) or None})


def allocator_state(opt) -> dict:
    """``opt``'s resumable state (see the module docstring)."""
    if opt.scheduled_growth._growth is not None and opt.scheduled_growth._growth.capture.has_data():
        raise RuntimeError("LoRAMBoOptimizer.state_dict(): activations of a decision step are captured and "
                           "not yet used; call it after opt.step(step), not between capture and step")
    optimizer = opt.default_optimizer
    return {"version": FORMAT_VERSION, "names": list(opt.names),
            "dims": {n: list(opt.dims[n]) for n in opt.names}, "settings": _settings(opt),
            "ranks": opt.current_ranks(), "decisions": [dict(r) for r in opt.log.records],
            "alora_rounds_done": None if opt._alora is None else opt._alora.rounds_done,
            "allocated_ranks": _plain(opt.ranks), "capacities": _plain(opt.capacities),
            "sensitivities": _plain(opt.sensitivities),
            "optimizer": None if optimizer is None else optimizer.state_dict()}


def _differences(saved: dict, have: dict) -> dict:
    return {k: (saved.get(k), have.get(k)) for k in sorted(set(saved) | set(have), key=str)
            if saved.get(k) != have.get(k)}


def check_model_ranks(opt, saved_ranks: dict, where: str, error=ValueError) -> None:
    """``error`` naming the layers unless ``opt``'s model has the ranks ``saved_ranks``."""
    have = opt.current_ranks()
    if have != saved_ranks:
        diff = dict(list(_differences(saved_ranks, have).items())[:4])
        raise error(f"{where}: the model's ranks differ from the saved ones (layer: (saved, model)) {diff}; "
                    "load the model's state_dict (or adapter) saved with it first, into a model configured "
                    "with the same capacities")


def check_allocator_state(opt, state, where: str = "LoRAMBoOptimizer.load_state_dict") -> None:
    """ValueError naming what differs unless ``state`` (from :func:`allocator_state`) fits ``opt``
    and its model as they are now. Nothing is changed."""
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: not a LoRAMBoOptimizer state of version {FORMAT_VERSION} (got {got!r})")
    missing = [k for k in _ENTRIES if k not in state]
    if missing:
        raise ValueError(f"{where}: state without {missing}")
    if list(state["names"]) != list(opt.names):
        saved, have = list(state["names"]), list(opt.names)
        raise ValueError(f"{where}: the state is for layers {saved[:6]}, this optimizer has {have[:6]} "
                         f"(only saved: {[n for n in saved if n not in have][:4]}, only here: "
                         f"{[n for n in have if n not in saved][:4]})")
    dims = {n: list(opt.dims[n]) for n in opt.names}
    if state["dims"] != dims:
        raise ValueError(f"{where}: layer shapes (d, k) differ (layer: (saved, here)) "
                         f"{_differences(state['dims'], dims)}")
    settings = _differences(state["settings"], _settings(opt))
    if settings:
        raise ValueError(f"{where}: the state was written with other settings (setting: (saved, here)) {settings}")
    check_model_ranks(opt, state["ranks"], where)
    if state["optimizer"] is not None and opt.default_optimizer is None:
        raise ValueError(f"{where}: the state holds the state of the optimizer from make_optimizer; call "
                         "opt.make_optimizer(...) before load_state_dict")


def apply_allocator_state(opt, state) -> None:
    """Apply a state :func:`check_allocator_state` accepted, all or nothing: every value is
    converted first; then the two steps that can fail midway run, the optimizer's
    ``load_state_dict`` (which checks shapes before it changes anything) and the rewrite of the
    decision log (a full disk), the optimizer put back if the log fails; only then are the
    allocator's attributes set."""
    converted = {}
    for attr, key, convert in (("ranks", "allocated_ranks", int), ("capacities", "capacities", int),
                               ("sensitivities", "sensitivities", float)):
        saved = state[key]
        converted[attr] = None if saved is None else {n: convert(v) for n, v in saved.items()}
    memory_report = opt.memory_report
    if converted["capacities"] is not None:  # what compute_optimal_ranks would have reported (not logged again)
        memory_report = pools.pool_memory(converted["capacities"], opt.dims, opt.dtypes, converted["ranks"])
    rounds_done = None if state["alora_rounds_done"] is None else int(state["alora_rounds_done"])
    alora = None if rounds_done is None else opt.alora_schedule()
    optimizer = opt.default_optimizer if state["optimizer"] is not None else None
    before = None if optimizer is None else optimizer.state_dict()  # the current state tensors, not copies
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    try:
        opt.log.restore(state["decisions"])
    except BaseException:
        if optimizer is not None:
            optimizer.load_state_dict(before)
        raise
    for attr, value in converted.items():
        setattr(opt, attr, value)
    opt.memory_report = memory_report
    if alora is not None:
        alora.rounds_done = rounds_done
