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


def test_the_demo_preset_is_the_run_committed_in_docs():
    """``lorambo demo`` must rerun the experiment behind docs/demo_results.json and docs/demo.md:
    a preset value changed unnoticed (its learning-rate grid, say) would make `make demo` give
    other numbers than the README's."""
    import json
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    committed = json.loads((docs / "demo_results.json").read_text())
    cfg = presets.default()
    minilm_sum_d_plus_k = 41472  # 36 layers of all-MiniLM-L6-v2 (docs/demo.md: P* = 20,736 = level 0.5)
    assert cfg.tasks == (committed["task"],)
    assert [level * minilm_sum_d_plus_k for level in cfg.budgets] == [committed["budget"]]
    assert (cfg.steps, cfg.batch_size, cfg.max_length, cfg.seeds) == (
        committed["steps"], committed["batch_size"], committed["max_length"], committed["seeds"])
    assert list(cfg.methods) == list(committed["methods"])
    grid = re.search(r"from \{([^}]*)\} by validation loss", (docs / "demo.md").read_text()).group(1)
    assert cfg.lr_grid == tuple(float(x) for x in grid.split(","))
    assert cfg.lr_search == "uniform" and committed["lr"] in cfg.lr_grid
    assert (cfg.train_examples, cfg.eval_examples) == (0, 0)  # "the whole validation and test splits"
    assert (cfg.probe_rank, cfg.probe_steps, cfg.planted_text, cfg.planted_scale) == (8, 60, "docstrings", 0.1)


def test_the_sentiment_preset_is_the_run_committed_in_docs():
    """``lorambo experiment --task sentiment`` reruns docs/sentiment_results.json's experiment."""
    import json
    from pathlib import Path

    committed = json.loads((Path(__file__).resolve().parents[2] / "docs" / "sentiment_results.json").read_text())
    cfg = presets.sentiment()
    assert cfg.tasks == (committed["task"],) and list(cfg.methods) == list(committed["methods"])
    assert [level * 41472 for level in cfg.budgets] == [committed["budget"]]  # MiniLM's sum(d + k)
    assert (cfg.steps, cfg.batch_size, cfg.max_length, cfg.seeds) == (
        committed["steps"], committed["batch_size"], committed["max_length"], committed["seeds"])
    sizes = committed["split_sizes"]
    assert (cfg.train_examples, cfg.eval_examples) == (sizes["train"], sizes["val"])
    assert cfg.lr_search == "uniform" and committed["lr"] in cfg.lr_grid


def test_the_full_preset_is_what_docs_gpu_experiment_describes():
    """docs/gpu_experiment.md: both tasks, every method, budgets P*, 2 P* and 4 P* (P* = level 0.5),
    5 seeds, 1,000 steps of 32 x 64 tokens, the rate chosen per method and budget, the snippets text."""
    cfg = presets.full()
    assert cfg.tasks == presets.TASKS and cfg.methods == presets.METHODS
    assert cfg.budgets == (0.5, 1.0, 2.0)
    assert (cfg.seeds, cfg.steps, cfg.batch_size, cfg.max_length) == (5, 1000, 32, 64)
    assert cfg.lr_search == "per_budget" and cfg.planted_text == "snippets"
