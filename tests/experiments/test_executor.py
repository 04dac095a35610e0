"""What the executor hands each unit (lorambo/experiments/executor.py), with a made-up task and
training replaced by a recorder (no model): every run of a seed trains on that seed's whole
stream, whatever ran before it in the process; the sensitivities see enough batches for the
probe; grid and selected runs are scored and guarded as the protocol says."""

import time

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import executor as ex


class FakeTask:
    """Batches are (seed, step) pairs: which stream a run got is visible in what it received."""
    name, metric, higher_is_better = "planted", "rel_loss", False
    dims = {"layer.0": (8, 8), "layer.1": (8, 16)}
    pretrained = {"train": 1.0, "val": 0.9, "test": 0.8}

    def __init__(self):
        self.built_streams = []

    def train_batches(self, seed, steps, batch_size):
        self.built_streams.append((seed, steps))
        return [(seed, step) for step in range(steps)]

    def heldout_batches(self, examples):
        return [("heldout", examples)]

    def describe(self):
        return {"sizes": {}}


@pytest.fixture
def setup(monkeypatch):
    """An executor whose model, task and training are fakes; ``calls`` records what training got."""
    cfg = presets.tiny(methods=("uniform", "gradient", "probe")).replace(tasks=("planted",), steps=6,
                                                                       calib_batches=2, probe_steps=4, val_every=0)
    task, calls, loads = FakeTask(), [], []

    class Model:
        def to(self, device):
            return self

    def load():
        loads.append(1)
        time.sleep(0.01)  # setup takes time: it must be measured, not a clock reading
        return Model(), "tokenizer"

    def train_run(ctx, method, lr, stream, score_val, record_divergence):
        calls.append({"ctx": ctx, "method": method, "lr": lr, "stream": list(stream), "score_val": score_val,
                      "record_divergence": record_divergence})
        return {"method": method, "seed": ctx.seed, "lr": lr}

    def sensitivities(task, cfg, seed, calib, methods, stream=None):
        calls.append({"sens_seed": seed, "calib": list(calib), "stream": list(stream), "methods": methods})
        return {"gradient": {}}, {"gradient": 0.5}

    monkeypatch.setattr("lorambo.experiments.minilm.load_minilm", load)
    monkeypatch.setattr("lorambo.experiments.tasks.make_task", lambda name, bert, tok, cfg: task)
    monkeypatch.setattr(ex, "train_run", train_run)
    monkeypatch.setattr(ex, "compute_sensitivities", sensitivities)
    return cfg, ex.Executor(cfg), task, calls, loads


def _run(li, seed, lr=1e-3, selected=False, method="uniform") -> dict:
    return {"kind": "run", "task": "planted", "method": method, "li": li, "seed": seed, "lr": lr, "sens": {},
            "selected": selected}


def test_the_task_record_measures_setup_and_names_the_untrained_baseline(setup):
    cfg, executor, task, calls, loads = setup
    started = time.perf_counter()
    rec = executor.run({"kind": "task", "task": "planted"})
    wall = time.perf_counter() - started
    assert 0.01 <= rec["setup_seconds"] <= wall and 0 <= rec["cpu"] <= time.process_time()
    assert rec["baselines"] == {"pretrained model, no LoRA": 0.8}  # the test split, never train or val
    assert rec["budgets"] == {str(lv): ex.budget_of(lv, task.dims) for lv in cfg.budgets}
    executor.run(_run(0, 0))
    assert loads == [1]  # the model is loaded once, the task built once


def test_sensitivities_get_the_calibration_prefix_and_enough_stream_for_the_probe(setup):
    cfg, executor, task, calls, _ = setup
    rec = executor.run({"kind": "sens", "task": "planted", "seed": 0})
    (call,) = calls
    assert call["calib"] == [(0, 0), (0, 1)] and call["stream"] == [(0, s) for s in range(4)]
    assert call["methods"] == ("uniform", "gradient", "probe")
    assert rec == {"kind": "sens", "task": "planted", "seed": 0, "sens": {"gradient": {}},
                   "seconds": {"gradient": 0.5}, "cpu": rec["cpu"]}


def test_each_run_trains_on_its_own_seeds_whole_stream_whatever_ran_before(setup):
    cfg, executor, task, calls, _ = setup
    for seed in (1, 0, 0, 1):
        executor.run(_run(0, seed))
    assert [c["stream"] for c in calls] == [[(s, step) for step in range(cfg.steps)] for s in (1, 0, 0, 1)]
    assert [c["ctx"].seed for c in calls] == [1, 0, 0, 1]
    # calibration: seed 0's first batches for every seed (sensitivities measured on seed 0 only)
    assert all(c["ctx"].calib == [(0, 0), (0, 1)] for c in calls)
    assert calls[0]["ctx"].heldout == [("heldout", cfg.alora_heldout)]
    full = [s for s in task.built_streams if s[1] == cfg.steps]
    assert full == [(1, 6), (0, 6), (1, 6)]  # the last stream is kept for the next run of its seed


def test_a_run_gets_its_level_budget_and_per_seed_calibration(setup):
    cfg, executor, task, calls, _ = setup
    executor.cfg = cfg.replace(budgets=(0.5, 1.0), sensitivities_per_seed=True)
    executor.run(_run(1, 2, method="gradient"))
    ctx = calls[0]["ctx"]
    assert (ctx.level, ctx.budget, ctx.seed) == (1.0, ex.budget_of(1.0, task.dims), 2)
    assert ctx.calib == [(2, 0), (2, 1)] and calls[0]["method"] == "gradient"


@pytest.mark.parametrize("selected, val_every, score_val, record_divergence", [
    (False, 0, True, True),    # a grid run: scored on validation (the choice reads it), may diverge
    (True, 0, False, False),   # at the selected rate, no validation curve asked for: not scored, may not diverge
    (True, 1, True, False),    # a curve every step asked for
    (True, 2, True, False),
])
def test_grid_and_selected_runs_are_scored_and_guarded_as_the_protocol_says(setup, selected, val_every, score_val,
                                                                            record_divergence):
    cfg, executor, task, calls, _ = setup
    executor.cfg = cfg.replace(val_every=val_every)
    rec = executor.run(_run(0, 0, selected=selected))
    assert (calls[0]["score_val"], calls[0]["record_divergence"]) == (score_val, record_divergence)
    assert rec["run"] == {"method": "uniform", "seed": 0, "lr": 1e-3} and rec["kind"] == "run"


@pytest.mark.parametrize("available, name, expected", [
    (False, "cpu", "cpu"), (False, "auto", "cpu"), (True, "auto", "cuda"), (True, "cpu", "cpu"), (True, "cuda", "cuda"),
])
def test_resolve_device(monkeypatch, available, name, expected):
    monkeypatch.setattr(ex.torch.cuda, "is_available", lambda: available)
    assert ex.resolve_device(name).type == expected
