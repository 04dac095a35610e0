"""Running the experiment in pieces: the journal, resume, the time limit and worker processes all
give the numbers of one uninterrupted run (tiny sizes, CPU)."""

import importlib.util
import json
import sys
import time
import types

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import journal, scheduler
from lorambo.experiments.runner import plots_from, run_experiment
from lorambo.experiments.units import all_units, grid_of, plan, unit_key

# uniform LoRA's grid on seed 0, then its seed 1 and both seeds of "gradient" at its choice;
# "gradient" also waits for the sensitivities
CFG = presets.tiny(methods=("uniform", "gradient")).replace(tasks=("planted",), budgets=(1.0,), seeds=2,
                                                            lr_grid=(1e-3, 1e-2), lr_search="uniform")
TIMINGS = ("seconds", "train_seconds")


def _numbers(result: dict) -> dict:
    """Everything a result says about the runs, without timings."""
    return {name: {"runs": [{k: v for k, v in r.items() if k not in TIMINGS} for r in tr["runs"]],
                   "lr_choice": tr["lr_choice"], "summary": tr["summary"], "sensitivities": tr["sensitivities"],
                   "verdicts": tr["verdicts"], "describe": tr["describe"], "budgets": tr["budgets"]}
            for name, tr in result["tasks"].items()}


def _unit_records(path) -> list[dict]:
    records, torn = journal.read(path)
    assert torn == 0
    return [r for r in records if r["kind"] in ("task", "sens", "run")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run in this process."""
    out = tmp_path_factory.mktemp("reference")
    return run_experiment(CFG, out_dir=out, progress=False, echo=lambda *a: None), out


def test_journal_ignores_only_a_torn_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"kind": "header"}\n{"kind": "session"}\n{"kind": "run", "key": "[\\"ru')
    records, torn = journal.read(path)
    assert [r["kind"] for r in records] == ["header", "session"] and torn == len('{"kind": "run", "key": "[\\"ru')
    path.write_text('{"kind": "header"}\n{"kind": "se\n{"kind": "session"}\n')
    with pytest.raises(ValueError, match=r"runs.jsonl:2: not a journal record"):
        journal.read(path)
    # a hand-edited unit record without its key was a bare KeyError('key') when indexed
    path.write_text('{"kind": "header"}\n{"kind": "run", "task": "planted"}\n')
    with pytest.raises(ValueError, match=r"runs.jsonl:2: a 'run' record without its unit's 'key'"):
        journal.read(path)


@pytest.mark.parametrize("lr_search", ["uniform", "first_budget", "per_budget"])
def test_units_come_after_what_they_read(lr_search):
    cfg = CFG.replace(budgets=(1.0, 2.0), lr_search=lr_search)
    units = all_units(cfg)
    assert [u["kind"] for u in units[:2]] == ["task", "sens"]
    assert len(units) == 2 + len(plan(cfg, "planted")) and len({unit_key(u, cfg) for u in units}) == len(units)
    seen_grid = set()
    for u in units[2:]:
        if u["lr"] is not None:
            seen_grid.add((u["method"], u["li"]))
        else:
            assert grid_of(cfg, u["method"], u["li"]) in seen_grid


@pytest.mark.slow
def test_time_limit_stops_then_resume_finishes_with_the_same_numbers(reference, tmp_path, monkeypatch, capsys):
    ref, _ = reference
    out = tmp_path / "pieces"
    calls = []

    def clock():  # the first 4 start checks see no time pass, every later one is past the limit
        calls.append(1)
        return time.perf_counter() + (0.0 if len(calls) <= 4 else 1e6)

    monkeypatch.setattr(scheduler, "time", types.SimpleNamespace(perf_counter=clock))
    command = ["experiment", "--preset", "tiny", "--time-limit", "1000", "--out", str(out)]
    first = run_experiment(CFG, out_dir=out, time_limit=1000, command=command)  # progress=None
    captured = capsys.readouterr()
    printed, total = captured.out, len(all_units(CFG))
    # stderr is no terminal here, so no bar: a line per finished unit, for a log file
    lines = captured.err.splitlines()
    assert [line.split(" s: ")[0].rsplit(", ", 1)[0] for line in lines] == [
        f"experiment {k}/{total} units" for k in range(1, 5)]
    runs = [r["run"] for r in _unit_records(out / "runs.jsonl") if r["kind"] == "run"]
    assert sorted(line.split(" s: ")[1] for line in lines) == sorted(
        ["planted: task", "planted: sens"] + [f"planted: uniform, level 1, seed 0, lr {r['lr']:g}" for r in runs])
    assert sorted(r["lr"] for r in runs) == [1e-3, 1e-2]
    assert first == {"complete": False, "remaining": total - 4, "remaining_runs": total - 4,
                     "journal": str(out / "runs.jsonl"), "out_dir": str(out)}
    assert f"{total - 4} runs and 0 other units remain" in printed
    continue_line = next(line for line in printed.splitlines() if line.startswith("continue with: "))
    assert continue_line.endswith(f"experiment --preset tiny --time-limit 1000 --out {out} --resume {out}/runs.jsonl")
    assert len(_unit_records(out / "runs.jsonl")) == 4 and not (out / "results.json").exists()
    monkeypatch.undo()

    with open(out / "runs.jsonl", "a") as f:  # a crash in the middle of writing a record
        f.write('{"kind":"run","key":"[\\"run\\", \\"planted')
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # the GPU machine has none
        second = run_experiment(CFG, out_dir=out, progress=False, resume=out / "runs.jsonl")
    printed, logged = capsys.readouterr()
    assert "ignored the torn last line" in printed and "experiment " not in logged  # progress=False: silent
    assert sum("plots skipped: matplotlib is not installed" in line for line in printed.splitlines()) == 1
    assert _numbers(second) == _numbers(ref) and second["plots"] == [] and second["sessions"] == 2
    records = _unit_records(out / "runs.jsonl")
    assert len({r["key"] for r in records}) == len(records) == total      # nothing ran twice
    assert sum(r["session"] == 1 for r in records) == total - 4
    written = json.loads((out / "results.json").read_text())["tasks"]["planted"]
    assert written["lr_choice"] == ref["tasks"]["planted"]["lr_choice"]

    if importlib.util.find_spec("matplotlib") is None:  # the GPU image: plots are drawn here later
        with pytest.raises(ImportError, match="needs matplotlib"):
            plots_from(out / "results.json")
        return
    drawn = plots_from(out / "results.json")
    assert drawn and all((out / p).read_bytes()[:4] == b"\x89PNG" for p in drawn)


@pytest.mark.slow
def test_a_complete_journal_needs_no_model_and_other_configs_are_refused(reference, tmp_path, monkeypatch):
    ref, ref_out = reference

    def no_model(*a, **k):
        raise AssertionError("a complete journal must not load the model")

    monkeypatch.setattr("lorambo.experiments.minilm.load_minilm", no_model)
    again = run_experiment(CFG, out_dir=tmp_path / "again", progress=False, echo=lambda *a: None,
                           resume=ref_out / "runs.jsonl")
    assert _numbers(again) == _numbers(ref)
    with pytest.raises(ValueError, match=r"another configuration \(steps: journal 5, now 6\)"):
        run_experiment(CFG.replace(steps=6), out_dir=tmp_path / "other", resume=ref_out / "runs.jsonl")
    with pytest.raises(ValueError, match="already holds a journal: pass --resume"):
        run_experiment(CFG, out_dir=ref_out)
    with pytest.raises(FileNotFoundError, match="no such journal file"):
        run_experiment(CFG, out_dir=tmp_path / "x", resume=tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_two_workers_record_what_one_worker_records(reference, tmp_path):
    ref, _ = reference
    result = run_experiment(CFG, out_dir=tmp_path, progress=False, echo=lambda *a: None, workers=2)
    assert _numbers(result) == _numbers(ref)
    records = _unit_records(tmp_path / "runs.jsonl")
    assert {r["session"] for r in records} == {0}
    assert result["cpu_seconds"] >= sum(r["cpu"] for r in records) > 0  # the workers' CPU time counts


def test_an_unusable_device_fails_before_anything_is_written(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="device 'cuda' requested but torch sees no CUDA device"):
        run_experiment(CFG.replace(device="cuda"), out_dir=out, progress=False, echo=lambda *a: None)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("workers, expected", [(1, 3.0 + 5.0 + 10.0 - 5.0), (2, 3.0 + 5.0 + 10.0)])
def test_cpu_seconds_count_each_unit_once_across_sessions(monkeypatch, workers, expected):
    """An earlier session's units count by their records; this session's, run in this process, are
    already in its own CPU time (10 s here) and count once; run by workers, they count by their records."""
    from lorambo.experiments import runner

    records = journal.Records([{"kind": "header"}, {"kind": "session", "workers": 1},
                               {"kind": "session", "workers": workers},
                               {"kind": "task", "key": "t", "task": "planted", "session": 0, "cpu": 3.0},
                               {"kind": "run", "key": "r", "task": "planted", "session": 1, "cpu": 5.0},
                               {"kind": "sens", "key": "s", "task": "planted", "session": 1}])
    monkeypatch.setattr(runner.time, "process_time", lambda: 110.0)
    assert runner.cpu_seconds(records, 100.0) == expected
