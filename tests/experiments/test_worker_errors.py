"""An error in a worker process reaches the main process as the error it was (so `lorambo
experiment` reports it as it would with one process: a missing data file is one line naming
`make data`), with the worker's unit and traceback as its cause. It used to arrive as
'RuntimeError: a worker failed on ...' carrying the traceback as text."""

import pickle
import queue
import time

import pytest

from lorambo.experiments import bundle, journal
from lorambo.experiments import config as presets
from lorambo.experiments import scheduler


def test_missing_data_in_a_spawned_worker_is_raised_as_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path))  # no vader/ here; the worker inherits it
    monkeypatch.delenv(bundle.ENV, raising=False)
    cfg = presets.tiny().replace(tasks=("sentiment",))
    unit = {"kind": "task", "task": "sentiment"}
    with pytest.raises(FileNotFoundError) as info:
        scheduler.run_units(cfg, [unit], journal.Records(), lambda record: None, time.perf_counter(), workers=2)
    assert str(info.value).startswith(f"sentiment data not found at {tmp_path}/vader/movieReviewSnippets_"
                                      "GroundTruth.txt: run `make data`")
    cause = str(info.value.__cause__)
    assert isinstance(info.value.__cause__, scheduler.WorkerTraceback)
    assert cause.startswith("a worker failed on {'kind': 'task', 'task': 'sentiment', 'key': '[\"task\", "
                            "\"sentiment\"]'}:\nTraceback (most recent call last):")
    assert "in read_rated" in cause


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickle rebuilds exceptions from .args: this one cannot come back
        super().__init__(f"{a} and {b}")


def test_an_error_that_cannot_travel_arrives_as_a_runtime_error_naming_it(monkeypatch):
    class Broken:
        def __init__(self, cfg):
            pass

        def run(self, unit):
            raise Unpicklable(1, 2)

    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(Unpicklable(1, 2)))
    monkeypatch.setattr("lorambo.experiments.executor.Executor", Broken)
    inbox, outbox = queue.Queue(), queue.Queue()
    inbox.put({"kind": "run"})
    scheduler._worker(None, inbox, outbox)
    status, unit, payload = outbox.get_nowait()
    with pytest.raises(RuntimeError, match=r"^Unpicklable: 1 and 2$") as info:
        scheduler.raise_failure(unit, pickle.loads(pickle.dumps(payload)))
    assert "raise Unpicklable(1, 2)" in str(info.value.__cause__)
