"""A run that diverges at the learning rates asked for ends `lorambo experiment` with one error
line naming the runs and what to change (exit 1), not a FloatingPointError traceback, whether it
diverged in this process or in a worker process."""

import json
import queue

import pytest

from lorambo.cli import main
from lorambo.experiments import scheduler


def test_every_rate_diverging_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["experiment", "--preset", "tiny", "--tasks", "planted", "--methods", "uniform", "--budgets", "1",
            "--lrs", "1e8,1e9", "--no-progress", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line, = [x for x in err.splitlines() if "error" in x]
    assert line.startswith("lorambo experiment: error: planted: every learning rate of uniform's grid at budget "
                           "level 1 diverged (lr 1e+08: ")
    assert line.endswith("no rate can be selected; lower the grid (--lrs) and start a new --out")
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    diverged = sorted(r["run"]["lr"] for r in runs if r["kind"] == "run" and r["run"]["diverged"])
    assert diverged == [1e8, 1e9]  # both grid runs are kept in the journal


def test_a_run_diverging_in_a_worker_reaches_the_main_process_as_a_divergence(monkeypatch):
    message = "planted: uniform at budget level 1, seed 1, lr 0.01: training loss nan at step 3: the run diverged"

    class Diverging:
        def __init__(self, cfg):
            pass

        def run(self, unit):
            raise FloatingPointError(message)

    monkeypatch.setattr("lorambo.experiments.executor.Executor", Diverging)
    inbox, outbox = queue.Queue(), queue.Queue()
    unit = {"kind": "run", "seed": 1}
    inbox.put(unit)
    scheduler._worker(None, inbox, outbox)
    status, sent, payload = outbox.get_nowait()
    assert (status, sent) == ("error", unit)
    with pytest.raises(FloatingPointError) as info:
        scheduler.raise_failure(sent, payload)
    assert str(info.value) == message
    assert isinstance(info.value.__cause__, scheduler.WorkerTraceback)
