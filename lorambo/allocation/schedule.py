"""When online rank decisions are taken, and the activation capture that feeds them.

A training loop wraps the forward and backward of every step in ``capture(step)`` (or calls
``begin_step(step)`` before them), then calls ``step(step)``. Only on a decision step are the
hooks armed, so other steps pay nothing, and the decision uses exactly that step's activations:

    growth = ScheduledGrowth(DecisionSchedule(warmup_steps=100, interval=50),
                             lambda: OnlineGrowth(layers, budget))
    for step, batch in enumerate(loader):
        with growth.capture(step):
            loss_fn(model, batch).backward()
        growth.step(step, optimizer)          # grows ranks in place when due
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

from lorambo.allocation.online import OnlineGrowth, nothing_captured
from lorambo.nn.finite_numbers import is_int
from lorambo.user_warnings import warn_user

__all__ = ["DecisionSchedule", "ScheduledGrowth"]


class DecisionSchedule:
    """Decision steps ``warmup_steps + j * interval`` (j = 0, 1, ...) before ``stop_step``
    (None: no end); ``interval=None`` means no decision at all."""

    def __init__(self, warmup_steps: int = 0, interval: int | None = None, stop_step: int | None = None):
        if interval is not None and not (is_int(interval) and interval >= 1):
            raise ValueError(f"interval={interval!r} must be an int >= 1 or None")
        # int() would truncate 2.7 to 2 and take "3"; a negative warmup shifts every decision step
        if not (is_int(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} must be an int >= 0")
        if stop_step is not None and not (is_int(stop_step) and stop_step >= 0):
            raise ValueError(f"stop_step={stop_step!r} must be an int >= 0 or None")
        self.warmup_steps, self.interval, self.stop_step = int(warmup_steps), interval, stop_step

    def is_decision_step(self, step: int) -> bool:
        if self.interval is None or step < self.warmup_steps:
            return False
        if self.stop_step is not None and step >= self.stop_step:
            return False
        return (step - self.warmup_steps) % self.interval == 0


class ScheduledGrowth:
    """:class:`OnlineGrowth` driven by a :class:`DecisionSchedule`.

    Args:
        schedule: which steps decide.
        build: makes the :class:`OnlineGrowth` on first use (its layers exist only once the
            model is configured, possibly after this object is made).
        score_components: ``() -> {name: scores}`` for rank moves when a decision is given no
            ``component_scores`` (e.g. ablation on held-out batches); None: they must be given.
    """

    def __init__(self, schedule: DecisionSchedule, build: Callable[[], OnlineGrowth],
                 score_components: Callable[[], Mapping] | None = None):
        self.schedule, self._build, self.score_components = schedule, build, score_components
        self._growth: OnlineGrowth | None = None
        self._captured_step = None  # the decision step whose activations the capture holds
        self._warned_missing: set[str] = set()  # why a decision step had no capture, warned once each

    @property
    def growth(self) -> OnlineGrowth:
        if self._growth is None:
            self._growth = self._build()
        return self._growth

    @property
    def built(self) -> OnlineGrowth | None:
        """The :class:`OnlineGrowth` if it has been built, else None (nothing is built)."""
        return self._growth

    def rebuild(self) -> None:
        """Drop the built :class:`OnlineGrowth` (its hooks and what it captured): the next use
        builds it again, e.g. on the layers a reconfigured model holds now."""
        self.close()
        self._growth = None

    def is_decision_step(self, step: int) -> bool:
        return self.schedule.is_decision_step(step)

    def begin_step(self, step: int, mask=None) -> None:
        """Arm the activation hooks if ``step`` is a decision step (else nothing). ``mask``: the
        [B, T] token mask of the batch that follows (see :meth:`ActivationCapture.set_token_mask`);
        None: every row is captured."""
        if self.is_decision_step(step):
            capture = self.growth.capture
            if step != self._captured_step:
                # what another step captured belongs to no decision of this one: a loop stopped
                # (an error, Ctrl-C) between its capture and step() and started again
                capture.clear()
                self._captured_step = step
            capture.arm()
            capture.set_token_mask(mask)

    def disarm(self) -> None:
        if self._growth is not None:
            self._growth.capture.disarm()

    @contextmanager
    def capture(self, step: int, mask=None):
        """Wrap the forward and backward of ``step``: records X and dY only on decision steps
        (``mask``: see :meth:`begin_step`). A block that raises leaves nothing captured for the
        step: its backward stopped partway, so only some layers have dY and a decision would grow
        those alone, and X of every layer would hold the memory an out-of-memory recovery frees."""
        self.begin_step(step, mask)
        try:
            yield self
        except BaseException:
            self.close()
            raise
        finally:
            self.disarm()

    def step(self, step: int, optimizer=None, component_scores=None, grad_scaler=None) -> list[dict]:
        """Take the decision of ``step`` if one is due; returns its records (possibly []).
        ``grad_scaler``: see :meth:`OnlineGrowth.update`."""
        self.disarm()
        if not self.is_decision_step(step):
            if self._growth is not None:
                self._growth.capture.clear()
            return []
        if self._growth is None or not self._growth.capture.has_data():
            capture = None if self._growth is None else self._growth.capture
            cause = nothing_captured() if capture is None else capture.missing_data()
            if cause not in self._warned_missing:  # a loop without capture() would warn at every decision step
                self._warned_missing.add(cause)
                missing = cause if capture is None else capture.missing_data(step)
                warn_user(f"step {step} is a rank decision step but {missing}; its decision is skipped, as is "
                          "every later one for this reason, without another warning", RuntimeWarning)
            return []
        return self.update(step, optimizer, component_scores, grad_scaler)

    def update(self, step=None, optimizer=None, component_scores=None, grad_scaler=None) -> list[dict]:
        """Grow (and, with rank moves, move) ranks now from the captured step."""
        growth = self.growth
        if component_scores is None and growth.move_threshold is not None:
            if self.score_components is None:
                raise ValueError("rank moves need component_scores")
            component_scores = self.score_components()
        return growth.update(step, optimizer, component_scores, grad_scaler)

    def close(self) -> None:
        """Remove the activation hooks and drop what they recorded."""
        if self._growth is not None:
            self._growth.capture.disarm()
            self._growth.capture.clear()
