"""The experiment's bar: only on a terminal unless asked for, and messages never glued to it."""

import sys

from lorambo.experiments import config as presets
from lorambo.experiments import runner


def _stop_at_once(monkeypatch, message=None):
    """run_units that starts nothing (all units stay pending), printing ``message`` through its
    ``warn`` as a running experiment does (a diverged grid, a worker's note)."""
    def run_units(cfg, pending, records, record, started, time_limit, workers, warn):
        if message is not None:
            warn(message)
        return pending

    monkeypatch.setattr(runner, "run_units", run_units)


def test_no_bar_in_a_log_file_by_default(tmp_path, monkeypatch, capsys):
    """progress=None (the CLI without --no-progress) drew the bar into a redirected stderr."""
    _stop_at_once(monkeypatch)
    result = runner.run_experiment(presets.tiny(), out_dir=tmp_path, progress=None, echo=lambda *a: None,
                                   time_limit=1e6)
    assert result["complete"] is False and result["remaining"] > 0
    assert not sys.stderr.isatty()
    assert capsys.readouterr().err == ""
    runner.run_experiment(presets.tiny(), out_dir=tmp_path / "shown", progress=True, echo=lambda *a: None,
                          time_limit=1e6)
    assert "experiment:" in capsys.readouterr().err  # asked for: shown anyway


def test_a_message_during_the_run_starts_on_a_line_of_its_own(tmp_path, monkeypatch, capsys):
    """A note printed while the bar was drawn landed on the bar's line (``... 0/12 [00:00<?]note``)."""
    _stop_at_once(monkeypatch, "NOTE from a unit")
    runner.run_experiment(presets.tiny(), out_dir=tmp_path, progress=True, time_limit=1e6,
                          echo=lambda message: print(message, file=sys.stderr))
    err = capsys.readouterr().err
    before = err.split("NOTE from a unit")[0]
    assert "experiment:" in before  # the bar was drawn first
    assert before.endswith("\r") and before.rsplit("\r", 2)[-2].strip() == "", repr(before[-120:])
