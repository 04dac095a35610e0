"""Worker processes are a knob of the configuration, and not part of what a journal must match."""

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import journal


def test_sentiment_cpu_preset_runs_two_single_thread_workers():
    cfg = presets.sentiment()
    assert (cfg.workers, cfg.threads) == (2, 1)
    assert presets.default().workers == 1  # the demo: one process, one thread


def test_worker_count_may_change_between_sessions_of_one_journal():
    weights = {"source": "test"}
    one = journal.header(presets.tiny().replace(workers=1), weights)
    three = journal.header(presets.tiny().replace(workers=3), weights)
    assert one == three
    journal.check_header(one, three, "runs.jsonl")  # accepted: no error
    other = journal.header(presets.tiny().replace(steps=6), weights)
    with pytest.raises(ValueError, match="steps"):
        journal.check_header(one, other, "runs.jsonl")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_worker_count_is_refused(bad):
    with pytest.raises(ValueError, match="workers"):
        presets.tiny().replace(workers=bad)
