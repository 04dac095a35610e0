"""Bad input gets a clear error; a failed write never leaves a corrupt JSON."""

import json
import os

import pytest

from lorambo.cli import main
from lorambo.experiments import config as presets
from lorambo.experiments import results
from lorambo.experiments.runner import check_out_dir, plan


def test_unknown_method_and_task():
    with pytest.raises(ValueError, match="unknown method.*'lora_magic'.*valid methods: uniform"):
        presets.ExperimentConfig(methods=("uniform", "lora_magic"))
    with pytest.raises(ValueError, match="unknown or no task"):
        presets.ExperimentConfig(tasks=("topics",))


@pytest.mark.parametrize("changes, match", [
    ({"budgets": ()}, "budgets"), ({"budgets": (0.0,)}, "budgets"), ({"budgets": (1.0, 1.0)}, "repeat"),
    ({"budgets": (float("inf"),)}, r"budgets must be positive mean ranks per module, got \[inf\]"),
    ({"budgets": ("1",)}, r"budgets must be positive mean ranks per module, got \['1'\]"),  # not math's TypeError
    *[({name: bad}, rf"{name} must be an int >= 0 \(0: all\), got {shown}")   # a float cap cannot slice a split
      for name in ("train_examples", "eval_examples") for bad, shown in ((-1, "-1"), (64.0, "64.0"), (True, "True"))],
    ({"seeds": 0}, "seeds"), ({"steps": 2}, "steps"), ({"lr_grid": (-1.0,)}, "lr_grid"),
    ({"lr_search": "best"}, "lr_search"), ({"device": "tpu"}, "device"), ({"methods": ()}, "methods"),
    # each clause on its own: an empty tuple passes every per-item check, a repeat passes the names check
    ({"tasks": ("planted",), "methods": ()}, r"methods must be a non-empty list without repeats, got \[\]"),
    ({"methods": ("uniform", "uniform")}, r"without repeats, got \['uniform', 'uniform'\]"),
    ({"tasks": ()}, r"unknown or no task\(s\) \[\]; valid tasks: planted, sentiment"),
    # the oracle runs on the planted task only: a sentiment run of it alone ran nothing and then
    # crashed writing its report with "max() arg is an empty sequence"
    ({"tasks": ("sentiment",), "methods": ("oracle",)}, r"task\(s\) \['sentiment'\] would run no method"),
    ({"tasks": ("planted", "sentiment"), "methods": ("oracle",)}, r"\['sentiment'\] would run no method"),
    # repeats made two units with one journal key: the same run trained twice and journalled twice
    ({"lr_grid": (1e-3, 1e-3)}, r"lr_grid repeats: \[0.001, 0.001\]"),
    ({"tasks": ("planted", "planted")}, r"tasks repeat: \['planted', 'planted'\]"),
    ({"val_every": -1}, r"val_every must be an int >= 0.*got -1"), ({"val_every": 2.0}, r"val_every.*got 2.0"),
    ({"probe_lr": 0.0}, r"probe_lr must be a positive learning rate, got 0.0"),
    ({"probe_lr": float("nan")}, r"probe_lr.*got nan"),
    ({"planted_text": "novels"}, r"planted_text must be one of docstrings, snippets, got 'novels'"),
    ({"max_length": 3}, r"max_length must be an int >= 4 tokens, got 3"),
    ({"growth_factor": 0.5}, r"growth_factor.*got 0.5"),
    # a bool is not a number here: True read as a budget of 1, a rate of 1.0 or a growth factor of 1
    ({"budgets": (True,)}, r"budgets must be positive mean ranks per module, got \[True\]"),
    ({"lr_grid": (1e-3, True)}, r"lr_grid must hold positive learning rates, got \[0.001, True\]"),
    ({"lr_grid": ("1e-3",)}, r"lr_grid must hold positive learning rates, got \['1e-3'\]"),  # not a TypeError
    ({"probe_lr": True}, r"probe_lr must be a positive learning rate, got True"),
    ({"growth_factor": True}, r"growth_factor must be a number >= 1, got True"),
    ({"max_length": 16.5}, r"max_length must be an int >= 4 tokens, got 16.5"),
    *[({name: bound}, "online_initial and alora_prune must be in \\(0, 1\\)")  # each bound excluded
      for name in ("online_initial", "alora_prune") for bound in (0.0, 1.0)],
])
def test_bad_config_values(changes, match):
    with pytest.raises(ValueError, match=match):
        presets.ExperimentConfig(**changes)


def test_each_bound_itself_is_accepted():
    """The refusals above stop at their documented bounds: the bound is a valid value."""
    cfg = presets.ExperimentConfig(max_length=4, steps=5, probe_steps=5, val_every=0, seeds=1, train_examples=0,
                                   eval_examples=0, growth_factor=1.0)
    assert (cfg.max_length, cfg.steps, cfg.probe_steps, cfg.train_examples) == (4, 5, 5, 0)


def test_cli_reports_bad_input_without_traceback(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # a usage error, before any model is loaded
        main(["experiment", "--methods", "uniform,lora_magic", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown method" in err and "Traceback" not in err


def test_output_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        check_out_dir(blocker / "run")
    assert main(["experiment", "--preset", "tiny", "--out", str(blocker / "run")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_json_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    results.write_json_atomic({"a": 1.0}, path)
    with pytest.raises(ValueError, match="non-finite"):
        results.write_json_atomic({"a": float("nan")}, path)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        results.write_json_atomic({"a": 2.0}, path)
    assert json.loads(path.read_text()) == {"a": 1.0}     # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_json_keeps_the_methods_in_the_order_the_tables_show_them(tmp_path):
    """The README's tables are rebuilt from the committed JSON in its key order: uniform first,
    then the oracle, then the rest as run, not sorted by name."""
    order = ["uniform", "oracle", "probe", "alora", "gradient"]
    path = results.write_json_atomic({"task": "planted", "methods": {m: {"seeds": [0, 1]} for m in order}},
                                     tmp_path / "demo_results.json")
    written = json.loads(path.read_text())
    assert list(written) == ["task", "methods"] and list(written["methods"]) == order


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_number_deep_in_lists_and_dicts_is_refused_by_its_path(tmp_path, bad):
    """A diverged seed's loss sits in a list of runs (or a tuple of ranks): it is found there too,
    named by where it is, and nothing is written (JSON has no inf or nan)."""
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match=r"result\.runs\[1\]\.curve\[0\]\[1\] is "):
        results.write_json_atomic({"runs": [{"metric": 0.5}, {"curve": ([10, bad],)}]}, path)
    assert not path.exists()


def test_plan_runs_grid_on_seed_zero_then_other_seeds():
    cfg = presets.ExperimentConfig(methods=("uniform",), budgets=(1.0, 2.0), seeds=3, lr_grid=(1e-3, 1e-2),
                                   lr_search="per_budget")
    assert plan(cfg) == [("uniform", 0, 0, 1e-3), ("uniform", 0, 0, 1e-2), ("uniform", 0, 1, None),
                         ("uniform", 0, 2, None), ("uniform", 1, 0, 1e-3), ("uniform", 1, 0, 1e-2),
                         ("uniform", 1, 1, None), ("uniform", 1, 2, None)]
    first = plan(cfg.replace(lr_search="first_budget"))
    assert plan(cfg.replace(methods=("uniform", "oracle")), "sentiment") == plan(cfg)  # oracle: planted only
    assert first[4:] == [("uniform", 1, 0, None), ("uniform", 1, 1, None), ("uniform", 1, 2, None)]


def test_oracle_with_an_allocator_still_runs_on_both_tasks():
    cfg = presets.ExperimentConfig(tasks=("planted", "sentiment"), methods=("uniform", "oracle"))
    assert cfg.methods == ("uniform", "oracle")


@pytest.mark.parametrize("changes, missing", [
    ({"tasks": ("sentiment",)}, "movieReviewSnippets_GroundTruth.txt"),
    ({"tasks": ("planted",), "planted_text": "snippets"}, "nytEditorialSnippets_GroundTruth.txt"),
])
def test_missing_data_fails_before_the_journal_is_started(tmp_path, monkeypatch, changes, missing):
    """Without `make data` the sentiment task (and the planted task on snippets) failed only once a
    worker had loaded the model, leaving a header-only runs.jsonl in --out: run again after
    `make data`, the same --out then refused to start ('already holds a journal')."""
    from lorambo.experiments import bundle
    from lorambo.experiments.runner import run_experiment

    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.delenv(bundle.ENV, raising=False)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=f"sentiment data not found at {tmp_path}/nothing/vader/{missing}: "
                                                "run `make data`"):
        run_experiment(presets.tiny().replace(**changes), out_dir=out, progress=False, workers=1)
    assert not (out / "runs.jsonl").exists()
