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


def test_the_wall_time_adds_each_earlier_call_once_and_this_call_from_its_start(tiny_journal, tmp_path,
                                                                                   monkeypatch):
    """results.json's ``seconds``: each earlier call's wall time (its last unit's ``elapsed``; a call
    that recorded no unit adds none) plus this call's, from its start to the finish. This call
    records the runs itself (a made-up scheduler replays them), so its own units must not be
    counted again as an earlier call's; the clock is the test's, so the sum is exact."""
    from types import SimpleNamespace

    from lorambo.experiments import runner
    from lorambo.experiments.units import unit_key

    cfg, path = tiny_journal
    header, first, *units = journal.read(path)[0]
    assert header["kind"] == "header" and first["kind"] == "session"
    setup = [r for r in units if r["kind"] != "run"]
    runs = {r["key"]: r for r in units if r["kind"] == "run"}
    assert setup and runs and all(r["session"] == 0 and r["elapsed"] > 0 for r in setup)
    idle = dict(first, session=1, started="2031-01-02T03:04:05")   # a call stopped before any unit
    edited = tmp_path / "two_calls.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in [header, first, *setup, idle]))

    def replay(cfg, pending, records, record, *args, **kwargs):
        assert {unit_key(u, cfg) for u in pending} == set(runs)
        for unit in pending:
            record({k: v for k, v in runs[unit_key(unit, cfg)].items() if k not in ("session", "elapsed")})
        return []

    handed, drawing = [], 1e6    # drawing the plots takes 1e6 s of wall and CPU time on this clock
    jump = [0.0]  # added to both clocks once the plots are drawn

    def perf_counter():   # 1,000 s between readings: any reading counted twice shows
        handed.append(1000.0 * (len(handed) + 1) + jump[0])
        return handed[-1]

    def draw(*args, **kwargs):
        drawn = real_draw(*args, **kwargs)
        jump[0] += drawing
        return drawn

    real_draw, real_cpu = runner.draw_plots, runner.time.process_time
    monkeypatch.setattr(runner, "run_units", replay)
    monkeypatch.setattr(runner, "draw_plots", draw)
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=perf_counter,
                                                        process_time=lambda: real_cpu() + jump[0]))
    _no_model(monkeypatch)
    result = run_experiment(cfg, out_dir=tmp_path / "out", resume=edited, progress=False, echo=lambda *a: None)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    recorded = journal.read(tmp_path / "out" / journal.FILE_NAME)[0]
    assert [r["session"] for r in recorded if r["kind"] == "run"] == [2] * len(runs)
    first_call = max(r["elapsed"] for r in setup)
    assert written["seconds"] == result["seconds"] == pytest.approx(first_call + handed[-1] - handed[0], abs=1e-6)
    assert written["seconds"] > drawing and written["cpu_seconds"] > drawing   # read after the plots
    assert written["sessions"] == 3 and written["started"] == first["started"]


@pytest.mark.parametrize("note", [None, "gradient: negative trace estimates clipped to 0"])
def test_results_txt_holds_each_tasks_table_verdicts_rates_and_notes_and_is_echoed(tiny_journal, tmp_path,
                                                                                     monkeypatch, note):
    """``results.txt`` (and what the call prints): per task its table, its verdicts, the learning
    rates chosen and, only where there are any, the notes of its sensitivities; then the setup line."""
    from lorambo.experiments import results as res

    cfg, path = tiny_journal
    records = journal.read(path)[0]
    if note is not None:
        next(r for r in records if r["kind"] == "sens")["sens"]["_notes"] = [note]
    edited = tmp_path / "noted.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in records))
    _no_model(monkeypatch)
    said = []
    result = run_experiment(cfg, out_dir=tmp_path / "out", resume=edited, progress=False, echo=said.append)
    text = (tmp_path / "out" / "results.txt").read_text()
    assert said[-1] + "\n" == text
    assert not any("torn" in line for line in said)   # the journal ends with a whole line: nothing ignored
    tr = result["tasks"]["planted"]
    parts = text.split("\n\n")
    assert parts[:3] == [res.format_table(tr, tr["methods"], cfg.budgets), "\n".join(tr["verdicts"]),
                         res.lr_choice_line(tr["lr_choice"], tr["diverged"])]
    assert tr["verdicts"] and "planted" in parts[1]
    assert ("notes: " + note in parts) if note is not None else not any(p.startswith("notes") for p in parts)
    env = result["environment"]
    setup = parts[4 if note is not None else 3]
    assert cfg.seeds == 1  # the tiny preset: "1 seed", not "1 seeds"
    assert setup.startswith(f"1 seed, {cfg.steps} steps of {cfg.batch_size} x {cfg.max_length} tokens")
    assert f"python {env['python']}, torch {env['torch']}, peft {env['peft']}" in setup
