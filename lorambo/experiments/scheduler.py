"""Hands the pending units of an experiment to one or more processes, respecting their
dependencies (``units.inputs``) and a time limit, and records each result as it arrives.

- ``workers=1``: the units run in this process, in the order of ``units.all_units`` (which
  meets every dependency in turn).
- ``workers=N``: N worker processes (``torch.multiprocessing``, spawn), each with its own model
  and tasks (``executor.py``), take whole units; each gets the first pending unit whose inputs
  are recorded. They share the GPU, or the CPU with ``cfg.threads`` threads each.
- ``time_limit``: no unit starts once that many seconds have passed since ``started``, nor one
  whose recorded duration (the longest of its task and method so far) would carry it past the
  limit; the units in flight finish and are recorded.
- A run whose grid diverged at every rate can never start (``units.GridDivergedError``): it is
  set aside and every other unit that can run does. The error is raised once nothing else is
  left; when the time limit leaves other units pending, the set-aside runs count among them (a
  later call raises once they are all that is left) and ``warn`` says why they cannot start.

Only this process writes the journal; the records are the same whichever process ran a unit.
"""

from __future__ import annotations

import pickle
import queue as queue_errors
import time
import traceback

from lorambo.experiments.units import GridDivergedError, inputs, unit_key


def _estimate(unit: dict, records) -> float:
    """Seconds a unit is expected to take: the longest recorded unit of its kind (runs: of its
    task and method); 0 when none is recorded yet."""
    if unit["kind"] == "run":
        times = [r["run"]["seconds"] for r in records.of_kind("run", unit["task"])
                 if r["run"]["method"] == unit["method"]]
    elif unit["kind"] == "sens":
        times = [sum(r["seconds"].values()) for r in records.of_kind("sens", unit["task"])]
    else:
        times = []
    return max(times, default=0.0)


def none_started_reason(left: list[dict], records, elapsed: float, time_limit: float) -> str:
    """Why a time-limited call started no unit, and what to change: rerunning it with the same
    limit would again start nothing."""
    shortest = min((_estimate(u, records) for u in left), default=0.0)
    if shortest > time_limit:
        why = f"the shortest pending unit is expected to take {shortest:.0f} s (its longest recorded kind)"
    else:
        why = f"{elapsed:.0f} s had passed (setup) before a unit could start"
    return f"no unit started within the time limit of {time_limit:g} s: {why}; continue with a larger --time-limit"


class Dispatcher:
    """Picks the next unit to start; ``record(unit, result)`` is the caller's journal writer."""

    def __init__(self, cfg, pending: list[dict], records, record, started: float, time_limit: float | None):
        self.cfg, self.pending, self.records, self.record = cfg, list(pending), records, record
        self.started, self.time_limit = started, time_limit
        self.blocked: dict[str, list[dict]] = {}  # GridDivergedError message -> runs it keeps from starting

    def _allowed(self, unit: dict) -> bool:
        if self.time_limit is None:
            return True
        elapsed = time.perf_counter() - self.started
        return elapsed < self.time_limit and elapsed + _estimate(unit, self.records) <= self.time_limit

    def next_unit(self) -> dict | None:
        """The first pending unit whose inputs are recorded and that fits the time left (removed
        from the pending list, its journal key under "key"), or None. A unit whose grid diverged at
        every rate leaves the pending list for ``blocked``."""
        i = 0
        while i < len(self.pending):
            unit = self.pending[i]
            try:
                ready = inputs(unit, self.cfg, self.records)
            except GridDivergedError as err:
                self.blocked.setdefault(str(err), []).append(self.pending.pop(i))
                continue
            if ready is not None and self._allowed(unit):
                del self.pending[i]
                return dict(ready, key=unit_key(unit, self.cfg))  # the key says "selected", not the rate
            i += 1
        return None

    def done(self, unit: dict, result: dict) -> None:
        self.record(dict(result, key=unit["key"]))


def run_units(cfg, pending: list[dict], records, record, started: float, time_limit: float | None = None,
              workers: int = 1, executor=None, warn=print) -> list[dict]:
    """Run what fits; returns the units left pending (empty when the experiment is complete).
    Raises :class:`~lorambo.experiments.units.GridDivergedError` once nothing else can start
    when some run's grid diverged at every rate."""
    dispatch = Dispatcher(cfg, pending, records, record, started, time_limit)
    if workers == 1:
        if executor is None:
            from lorambo.experiments.executor import Executor

            executor = Executor(cfg)  # loads the model on its first unit only
        while (unit := dispatch.next_unit()) is not None:
            dispatch.done(unit, executor.run(unit))
    else:
        _run_pool(cfg, dispatch, workers)
    if dispatch.blocked:
        if dispatch.pending and time_limit is not None:  # the time limit stopped the rest: continuable
            for message, runs in dispatch.blocked.items():
                warn(f"{message}: {len(runs)} run(s) at its selected rate cannot start; the experiment "
                     "fails once they are all that is left, unless that grid changes")
            return dispatch.pending + [run for runs in dispatch.blocked.values() for run in runs]
        raise GridDivergedError("; ".join(f"{message} ({len(runs)} run(s) at its selected rate cannot start; the "
                                          "other units that ran are in the journal)"
                                          for message, runs in dispatch.blocked.items()))
    if dispatch.pending and time_limit is None:
        raise RuntimeError(f"{len(dispatch.pending)} units could not start: their inputs were never recorded "
                           f"(first: {dispatch.pending[0]})")
    return dispatch.pending


def _worker(cfg, inbox, outbox) -> None:
    """A worker process: run each unit received until None arrives; report errors, then stop."""
    from lorambo.experiments.executor import Executor

    executor = Executor(cfg)
    while (unit := inbox.get()) is not None:
        try:
            outbox.put(("ok", unit, executor.run(unit)))
        except BaseException as err:  # noqa: BLE001 - reported to the main process, which raises it
            outbox.put(("error", unit, _portable(err)))
            return


class WorkerTraceback(Exception):
    """Where an error re-raised by the main process happened: the worker's unit and traceback
    (the error's ``__cause__``, printed above it)."""


def _portable(err: BaseException) -> tuple[BaseException, str]:
    """``(err, its traceback as text)`` for the queue; an error that does not survive pickling
    travels as a RuntimeError carrying its type and message."""
    text = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - any pickling failure
        err = RuntimeError(f"{type(err).__name__}: {err}")
    return err, text


def raise_failure(unit: dict, payload: tuple[BaseException, str]) -> None:
    """Raise a worker's error in the main process as the error it was, so that it is reported as it
    would be had this process run the unit (a diverged run, missing data: one line), with the
    worker's unit and traceback as its cause."""
    error, text = payload
    raise error from WorkerTraceback(f"a worker failed on {unit}:\n{text}")


def _run_pool(cfg, dispatch: Dispatcher, workers: int) -> None:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    outbox = context.Queue()
    pool = []
    for _ in range(min(workers, len(dispatch.pending))):
        inbox = context.Queue()
        process = context.Process(target=_worker, args=(cfg, inbox, outbox), daemon=True)
        process.start()
        pool.append({"process": process, "inbox": inbox, "unit": None})
    try:
        while True:
            for slot in pool:
                if slot["unit"] is None and (unit := dispatch.next_unit()) is not None:
                    slot["unit"] = unit
                    slot["inbox"].put(unit)
            busy = [slot for slot in pool if slot["unit"] is not None]
            if not busy:
                return
            try:
                status, unit, payload = outbox.get(timeout=5.0)
            except queue_errors.Empty:
                for slot in busy:
                    if not slot["process"].is_alive():
                        raise RuntimeError(f"a worker process exited (code {slot['process'].exitcode}) while "
                                           f"running {slot['unit']}; the units recorded so far are kept") from None
                continue
            if status != "ok":
                raise_failure(unit, payload)
            slot = next(s for s in busy if s["unit"] == unit)
            slot["unit"] = None
            dispatch.done(unit, payload)
    finally:
        for slot in pool:
            if slot["process"].is_alive():
                slot["inbox"].put(None)
        for slot in pool:
            slot["process"].join(timeout=30)
            if slot["process"].is_alive():
                slot["process"].terminate()
                slot["process"].join()
