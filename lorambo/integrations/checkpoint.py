"""What a Trainer checkpoint must hold besides the model and optimizer for lorambo to resume.

Trainer already restores the pools (full ``lora_A`` / ``lora_B`` tensors), the ranks and
scalings (each LoRAMBoLinear's ``_extra_state``) and the torch optimizer's state
(``lorambo.optim.AdamW``'s per-slot step counts included) from ``model.safetensors`` and
``optimizer.pt``, and its RNG state and data position (the pools under keys it saves but cannot
load come from the checkpoint's ``adapter.safetensors``: :mod:`lorambo.integrations.pool_resume`).
The rank decisions themselves are deterministic functions of the step, the seed and the captured
activations (:func:`lorambo.distributed.decision_generator`), so what is left is small and lives
here:

- the decisions taken so far (and the decision log file, cut back to them);
- the AdaLoRA importance EMAs when rank moves are scored with them;
- the number of ALoRA rounds done;
- the ranks, to check that the model Trainer reloaded has them.

It is written as ``lorambo_state.pt`` (atomically) next to the checkpoint's other files, with the
adapter itself as ``adapter.safetensors`` (``lorambo.load_adapter`` reads it onto a fresh base
model; modules_to_save included).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorambo.adapters.atomic import atomic_write
from lorambo.allocation.resume import check_model_ranks

STATE_FILE = "lorambo_state.pt"
FORMAT_VERSION = 1

__all__ = ["STATE_FILE", "callback_state", "save_callback_state", "load_callback_state"]


def callback_state(allocator, importance, decisions: list[dict]) -> dict:
    state = {"version": FORMAT_VERSION, "decisions": [dict(r) for r in decisions],
             "ranks": allocator.current_ranks(), "importance": None, "alora_rounds_done": None}
    if importance is not None:
        state["importance"] = importance.state_dict()
    if allocator._alora is not None:
        state["alora_rounds_done"] = allocator._alora.rounds_done
    return state


def save_callback_state(folder: str | Path, state: dict) -> Path:
    return atomic_write(Path(folder) / STATE_FILE, lambda tmp: _save(state, tmp))


def _save(state: dict, tmp: str) -> None:
    # through a file object: given a path, torch.save names the archive's records after the file,
    # here a temporary name holding the host and the process id, so the bytes would differ per run
    with open(tmp, "wb") as f:
        torch.save(state, f)


def complete_checkpoints(output_dir: str | Path, before: int) -> list[str]:
    """Trainer's ``checkpoint-N`` folders in ``output_dir`` with N < ``before`` that hold
    LoRAMBoCallback's state, oldest first."""
    found = []
    for sub in Path(output_dir).glob("checkpoint-*"):
        step = sub.name.removeprefix("checkpoint-")
        if step.isdigit() and int(step) < before and (sub / STATE_FILE).is_file():
            found.append((int(step), str(sub)))
    return [folder for _, folder in sorted(found)]


def load_callback_state(folder: str | Path) -> dict:
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in checkpoint {folder}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises anything (KeyError, IndexError, ...) on random bytes
        raise ValueError(f"{file} is not a readable lorambo trainer state (corrupt or truncated?): {err}") from err
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file} is not a lorambo trainer state of version {FORMAT_VERSION}")
    missing = [k for k in ("decisions", "ranks") if not isinstance(state.get(k), (list, dict))]
    if missing:
        raise ValueError(f"{file}: lorambo trainer state without {missing}")
    return state


def restore(allocator, importance, state: dict, where) -> list[dict]:
    """Apply ``state`` to the allocator / importance (after Trainer reloaded the model) and
    return the decisions; raises when the model's ranks are not the checkpoint's."""
    check_model_ranks(allocator, state["ranks"], f"resuming from {where}", error=RuntimeError)
    saved_imp = state.get("importance")
    if (saved_imp is None) != (importance is None):
        raise ValueError(f"resuming from {where}: the checkpoint was written "
                         f"{'with' if saved_imp is not None else 'without'} an importance tracker, "
                         f"this callback has {'one' if importance is not None else 'none'}")
    rounds_done = None if state.get("alora_rounds_done") is None else int(state["alora_rounds_done"])
    alora = None if rounds_done is None else allocator.alora_schedule()
    decisions = [dict(r) for r in state["decisions"]]
    # all or nothing: the tracker loads (it checks its statistics against the pools first), then
    # the log is rewritten, which a full disk can refuse: the tracker's attributes, which loading
    # replaces and never edits, are then put back
    before = None if importance is None else dict(vars(importance))
    if importance is not None:
        importance.load_state_dict(saved_imp)
    try:
        allocator.log.restore(decisions)  # drops what an interrupted run logged after the checkpoint
    except BaseException:
        if importance is not None:
            vars(importance).clear()
            vars(importance).update(before)
        raise
    if alora is not None:
        alora.rounds_done = rounds_done
    return decisions
