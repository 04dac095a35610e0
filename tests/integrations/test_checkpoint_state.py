"""lorambo_state.pt: a damaged file is refused naming it."""

import pytest
import torch

from lorambo.integrations import checkpoint

STATE = {"version": 1, "decisions": [{"step": 3, "layer": "a", "event": "grow"}], "ranks": {"a": 2},
         "importance": None, "alora_rounds_done": None}


def test_round_trip(tmp_path):
    checkpoint.save_callback_state(tmp_path, STATE)
    assert checkpoint.load_callback_state(tmp_path) == STATE


@pytest.mark.parametrize("keep", [0, 10, 0.5, -4])
def test_truncated_file_is_named(tmp_path, keep):
    """torch.load's own error (RuntimeError from the zip reader) named no file."""
    file = checkpoint.save_callback_state(tmp_path, STATE)
    raw = file.read_bytes()
    file.write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=rf"{file.name} is not a readable lorambo trainer state"):
        checkpoint.load_callback_state(tmp_path)


@pytest.mark.parametrize("content", [b"hello world" * 10, b"\x80\x02}q\x00(X", b"u\xccg\xe0\xb2P\x89\xb2",
                                     b"X\x1a\x80\xb8\xaa\xb8\x1d\xc4\xaeY\x91\xf3\x16\x9b\xa3\x8a\xa3&\xb2\n"],
                         ids=["KeyError", "struct.error", "IndexError", "UnicodeDecodeError"])
def test_a_file_of_other_bytes_is_named(tmp_path, content):
    """torch.load of bytes that are no torch file raised KeyError (here: 101), struct.error,
    IndexError or UnicodeDecodeError, none naming the file."""
    file = tmp_path / checkpoint.STATE_FILE
    file.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{file.name} is not a readable lorambo trainer state"):
        checkpoint.load_callback_state(tmp_path)


def test_missing_entries_are_named(tmp_path):
    """A version-1 dict without decisions or ranks loaded and failed later with a KeyError in restore."""
    torch.save({"version": 1, "ranks": {"a": 2}}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match=r"lorambo trainer state without \['decisions'\]"):
        checkpoint.load_callback_state(tmp_path)


def test_the_same_state_gives_the_same_bytes_in_another_process(tmp_path, monkeypatch):
    """torch.save given the temporary path named the archive's records after it (host, process
    id): the same state saved by another process (a rerun) had other bytes."""
    import os

    state = dict(STATE, importance={"steps": torch.arange(3.0)})
    first = checkpoint.save_callback_state(tmp_path / "run0", state).read_bytes()
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # a rerun: another process id
    second = checkpoint.save_callback_state(tmp_path / "run1", state).read_bytes()
    assert second == first
    loaded = checkpoint.load_callback_state(tmp_path / "run1")
    assert loaded["decisions"] == STATE["decisions"] and torch.equal(loaded["importance"]["steps"], torch.arange(3.0))


def test_alora_rounds_done_travel_through_the_callbacks_checkpoint(tmp_path):
    """LoRAMBoCallback's state of an ALoRA run holds the rounds done, and a fresh allocator that
    restores it (Trainer resume) reports them, as LoRAMBoOptimizer.load_state_dict does."""
    from lorambo.optimizer import LoRAMBoOptimizer
    from residual_net import ResidualNet, mse

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64))
            for _ in range(6)]

    def alora(model):
        return LoRAMBoOptimizer(model, 600, allocation="alora", initial_budget=600, heldout_batches=data[-2:],
                                loss_fn=mse, alora=dict(k1=1, k2=2, rounds=3, n_prune=1))

    torch.manual_seed(0)
    model = ResidualNet()
    allocator = alora(model)
    allocator.compute_optimal_ranks(data[:2], mse)
    allocator.configure()
    optimizer = allocator.make_optimizer(lr=2e-2)
    decisions = []
    for step in range(4):  # rounds at steps 1 and 3
        with allocator.capture(step):
            mse(model, data[step]).backward()
        decisions += allocator.step(step)
        optimizer.step()
        optimizer.zero_grad()
    assert decisions
    checkpoint.save_callback_state(tmp_path, checkpoint.callback_state(allocator, None, decisions))
    saved = checkpoint.load_callback_state(tmp_path)
    assert saved["alora_rounds_done"] == 2
    resumed = alora(model)
    assert checkpoint.restore(resumed, None, saved, tmp_path) == decisions
    assert resumed.alora_schedule().rounds_done == 2


@pytest.mark.parametrize("state", [dict(STATE, version=2), [STATE]], ids=["version 2", "a list"])
def test_another_version_or_no_dict_is_refused(tmp_path, state):
    torch.save(state, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match=r"lorambo_state.pt is not a lorambo trainer state of version 1"):
        checkpoint.load_callback_state(tmp_path)


class _Unpickled:
    """Not on torch's weights_only allow-list: loading it would run this module's code."""


def test_a_file_holding_arbitrary_objects_is_not_unpickled(tmp_path):
    """The state is read with weights_only=True: a checkpoint folder from elsewhere cannot run code."""
    torch.save(dict(STATE, extra=_Unpickled()), tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match=r"lorambo_state.pt is not a readable lorambo trainer state"):
        checkpoint.load_callback_state(tmp_path)


def _growth_run(tmp_path):
    """A small configured model with its online-growth allocator and importance tracker."""
    import lorambo
    from lorambo.optimizer import LoRAMBoOptimizer
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    torch.manual_seed(0)
    net = lorambo.configure_model(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)),
                                  2, capacity=4)
    allocator = LoRAMBoOptimizer(net, 10**4, interval=2, sketch_rank=2, seed=5, log_path=tmp_path / "log.jsonl")
    return net, allocator, AdaLoRAImportance(net)


@pytest.mark.parametrize("saved_with", [True, False], ids=["saved with a tracker", "saved without"])
def test_an_importance_tracker_present_on_one_side_only_is_refused_before_anything_changes(tmp_path, saved_with):
    """A run checkpointed with AdaLoRAImportance resumed by a callback without one (or the other
    way round) would take its rank moves from other scores than the run it continues."""
    _, allocator, importance = _growth_run(tmp_path)
    state = checkpoint.callback_state(allocator, importance if saved_with else None, [])
    other = None if saved_with else importance
    before = None if other is None else {k: v for k, v in vars(other).items()}
    with pytest.raises(ValueError, match=rf"the checkpoint was written {'with' if saved_with else 'without'} an "
                                         rf"importance tracker, this callback has {'none' if saved_with else 'one'}"):
        checkpoint.restore(allocator, other, state, tmp_path)
    if other is not None:
        assert vars(other) == before


def test_a_model_at_other_ranks_than_the_checkpoints_is_refused_before_anything_changes(tmp_path):
    """Trainer did not load the checkpoint's model (other ranks): restoring the decisions and
    importance averages of another allocation onto it would describe a model that is not there."""
    net, allocator, importance = _growth_run(tmp_path)
    state = checkpoint.callback_state(allocator, importance, [{"step": 0, "event": "grow", "layer": "0"}])
    import lorambo

    lorambo.lora_layers(net)["0"].set_rank(3)
    before = dict(vars(importance))
    with pytest.raises(RuntimeError, match=r"resuming from .*: the model's ranks differ from the saved ones "
                                           r"\(layer: \(saved, model\)\) \{'0': \(2, 3\)\}"):
        checkpoint.restore(allocator, importance, state, tmp_path)
    assert vars(importance) == before and allocator.log.records == []
