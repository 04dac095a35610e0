"""The results record the command that made them, however the ``lorambo`` command was started."""

import sys

import pytest

from lorambo.experiments.runner import run_by_the_lorambo_command


@pytest.mark.parametrize("script, expected", [
    ("/venv/bin/lorambo", True),
    ("/src/lorambo/__main__.py", True),          # python -m lorambo
    ("/src/lorambo/cli/__main__.py", True),      # python -m lorambo.cli
    ("/src/other/__main__.py", False),
    ("/home/me/train.py", False),                # run_experiment called from a script
    ("/src/cli/__main__.py", False),
])
def test_run_by_the_lorambo_command(monkeypatch, script, expected):
    monkeypatch.setattr(sys, "argv", [script, "experiment", "--task", "sentiment"])
    assert run_by_the_lorambo_command() is expected
