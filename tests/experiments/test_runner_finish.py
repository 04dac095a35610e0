"""Building the artefacts from a finished journal in a later call (lorambo/experiments/runner.py):
results.json reports the machine that ran the units, the wall time of every call, and the
command line only where the ``lorambo`` command made it (tiny sizes, CPU)."""

import json
import sys

import pytest

from lorambo.experiments import journal
from lorambo.experiments.runner import run_experiment

pytestmark = pytest.mark.slow


def _no_model(monkeypatch):
    def load(*a, **k):
        raise AssertionError("a complete journal must not load the model")

    monkeypatch.setattr("lorambo.experiments.minilm.load_minilm", load)


def test_a_later_finish_reports_the_machine_that_ran_the_units(tiny_journal, tmp_path, monkeypatch):
    """docs/gpu_experiment.md: the units run on the GPU machine, the artefacts may be rebuilt
    elsewhere from its journal; the environment reported is the GPU machine's."""
    cfg, path = tiny_journal
    records = journal.read(path)[0]
    ran_on = dict(records[1]["environment"], gpu="NVIDIA H100 80GB HBM3", threads=16, processor="the GPU host")
    records[1]["environment"] = ran_on
    edited = tmp_path / "gpu.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in records))
    _no_model(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lorambo", "experiment", "--preset", "tiny", "--resume", str(edited)])
    result = run_experiment(cfg, out_dir=tmp_path / "out", resume=edited, progress=False, echo=lambda *a: None)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["environment"] == written["environment"] == ran_on
    assert written["sessions"] == 2 and written["command"] == f"lorambo experiment --preset tiny --resume {edited}"
    # the first call's wall time (its last unit's) counts, and this call's is added to it
    first_call = max(r["elapsed"] for r in records if r["kind"] in ("task", "sens", "run"))
    assert written["seconds"] > first_call > 0
    units_cpu = sum(r["cpu"] for r in records if r["kind"] in ("task", "sens", "run"))
    assert written["cpu_seconds"] >= units_cpu > 0


def test_run_experiment_from_a_script_records_no_command(tiny_journal, tmp_path, monkeypatch):
    """Only the lorambo command line can be rerun as it is; a script's argv would mislead."""
    cfg, path = tiny_journal
    _no_model(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["/home/me/train.py", "--epochs", "3"])
    result = run_experiment(cfg, out_dir=tmp_path / "out", resume=path, progress=False, echo=lambda *a: None)
    assert result["command"] == json.loads((tmp_path / "out" / "results.json").read_text())["command"] == ""
