"""Resuming on a full disk: the decision log's rewrite fails, and nothing else was loaded either."""

import copy
import errno
import os

import pytest
import torch

from lorambo.integrations import checkpoint
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

from residual_net import ResidualNet, mse

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
_G = torch.Generator().manual_seed(3)
DATA = [(torch.randn(12, 8, generator=_G, dtype=DT), torch.randn(12, 8, generator=_G, dtype=DT)) for _ in range(8)]


def _allocator(model, log_path):
    return LoRAMBoOptimizer(model, 500, sensitivity_method="gradient", initial_budget=300, warmup_steps=2,
                            interval=3, sketch_rank=1, heldout_batches=DATA[-2:], loss_fn=mse, log_path=log_path)


def _start(log_path):
    torch.manual_seed(0)
    model = ResidualNet()
    opt = _allocator(model, log_path)
    opt.compute_optimal_ranks(DATA[:2], mse)
    opt.configure()
    return model, opt, opt.make_optimizer(lr=2e-2)


def _full_disk(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def _resumable(tmp_path):
    """The state of a run after 6 steps (decisions taken) and a fresh allocator for the same
    model: the state loads into it (same ranks, settings, layers)."""
    model, opt, torch_opt = _start(tmp_path / "run.jsonl")
    for step in range(6):
        with opt.capture(step):
            mse(model, DATA[step]).backward()
        opt.step(step)
        torch_opt.step()
        torch_opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    assert state["decisions"] and state["optimizer"]["state"]
    log = tmp_path / "resumed.jsonl"
    fresh = _allocator(model, log)
    fresh.compute_optimal_ranks(DATA[2:4], mse)  # another allocation than the saved one: visible if loaded
    return state, fresh, fresh.make_optimizer(lr=2e-2), log


def test_load_state_dict_on_a_full_disk_loads_nothing(tmp_path, monkeypatch):
    """The log's rewrite fails before the optimizer's state, the allocation (ranks, capacities,
    sensitivities) or the decisions in memory are replaced, so a caller that catches the error
    does not go on with half a resume."""
    state, opt, torch_opt, log = _resumable(tmp_path)
    log.write_text('{"step": 0}\n')  # an earlier run's log at that path
    before = (copy.deepcopy(torch_opt.state_dict()), opt.decisions, copy.deepcopy(opt.ranks),
              copy.deepcopy(opt.capacities), copy.deepcopy(opt.sensitivities), copy.deepcopy(opt.memory_report))
    assert before[4] != state["sensitivities"]
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        opt.load_state_dict(state)
    saved_torch_state = torch_opt.state_dict()
    assert saved_torch_state["state"] == {} and saved_torch_state["param_groups"] == before[0]["param_groups"]
    assert (opt.decisions, opt.ranks, opt.capacities, opt.sensitivities, opt.memory_report) == before[1:]
    assert log.read_text() == '{"step": 0}\n'
    assert [p.name for p in tmp_path.iterdir() if ".lorambo-tmp." in p.name] == []
    monkeypatch.undo()  # space freed: the same call resumes
    opt.load_state_dict(state)
    assert opt.decisions == state["decisions"] and opt.sensitivities == state["sensitivities"]
    for param_state, saved in zip(torch_opt.state.values(), state["optimizer"]["state"].values()):
        assert all(torch.equal(param_state[k], saved[k]) for k in saved)


def test_trainer_state_restore_on_a_full_disk_keeps_the_importance_tracker(tmp_path, monkeypatch):
    """checkpoint.restore (LoRAMBoCallback resuming) loaded the AdaLoRA importance statistics and
    then failed to rewrite the log: the tracker held the checkpoint's statistics, the rest not."""
    state, opt, _, log = _resumable(tmp_path)
    tracker = AdaLoRAImportance(opt.model)
    for batch in DATA[:2]:
        opt.model.zero_grad()
        mse(opt.model, batch).backward()
        tracker.update()
    other = AdaLoRAImportance(opt.model)
    opt.model.zero_grad()
    mse(opt.model, DATA[2]).backward()
    other.update()
    saved = {"version": 1, "decisions": state["decisions"], "ranks": opt.current_ranks(),
             "importance": other.state_dict(), "alora_rounds_done": None}
    before = tracker.state_dict()
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.restore(opt, tracker, saved, tmp_path)
    after = tracker.state_dict()
    assert after["steps"] == before["steps"] == 2
    for table in ("ibar", "ubar"):
        assert after[table].keys() == before[table].keys()
        for key, value in before[table].items():
            assert torch.equal(after[table][key], value), (table, key)
            assert not torch.equal(value, saved["importance"][table][key])  # a load would be seen
    assert opt.decisions == []
    monkeypatch.undo()
    assert checkpoint.restore(opt, tracker, saved, tmp_path) == state["decisions"]
    assert tracker.steps == 1
