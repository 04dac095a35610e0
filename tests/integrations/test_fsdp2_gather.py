"""full_pools all-gathers into buffers it allocated before the first collective
(lorambo/dtensor_gather.py): the same tensors as DTensor.full_tensor(), and out of
memory for them on one process is raised on every process with nothing changed. With
full_tensor() the allocation happened inside the all-gather: the other process waited there
until the process group's timeout."""

from pathlib import Path

import pytest
import torch

from fsdp2_state import assert_same_state
from gloo_workers import run_two_processes

pytest.importorskip("torch.distributed.fsdp")
WORKER = Path(__file__).with_name("fsdp2_gather_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The workers' process group times out in 20 s: a process left waiting in an all-gather
    fails with gloo's timeout instead of the errors the tests name, and the 120 s deadline here
    stops one that waits longer."""
    return run_two_processes(WORKER, tmp_path_factory.mktemp("fsdp2_gather"), timeout=120)


def test_gathers_equal_full_tensor_bit_for_bit(outcomes):
    for result in (outcome["equal"] for outcome in outcomes):
        assert len(result["dtensors"]) == 24
        for case, source, gathered, full, contiguous, aliased in result["dtensors"]:
            assert gathered.dtype == full.dtype == source.dtype and gathered.shape == full.shape, case
            assert torch.equal(gathered, full) and torch.equal(gathered, source), case
            assert contiguous and not aliased, case  # a tensor of its own: edits reach the shard by write-back only
        assert [dtype for dtype, *_ in result["pools"]] == [torch.float32, torch.bfloat16]
        for dtype, names, want, got, after in result["pools"]:
            for name, (value, grad, state, shard), (got_value, got_grad, got_state, still_sharded), kept in \
                    zip(names, want, got, after):
                assert not still_sharded and value.dtype == got_value.dtype == dtype, (dtype, name)
                assert torch.equal(got_value, value), (dtype, name)
                trained = name.endswith(".trained")  # the pools and the head; the base weights are frozen
                assert (grad is not None) == (got_grad is not None) == trained, (dtype, name)
                assert grad is None or torch.equal(got_grad, grad), (dtype, name)
                assert state.keys() == got_state.keys() == ({"exp_avg", "exp_avg_sq"} if trained else set()), name
                for key in state:
                    assert torch.equal(got_state[key], state[key]), (dtype, name, key)
                assert torch.equal(kept, shard), (dtype, name)  # written back unchanged
        # what full_pools gathered: lora_A [5, in] split 3/2, the head [3, 12] split 2/1
        assert result["pools"][0][1] == ["lora_A.trained", "lora_B.trained"] * 2 + ["weight"] * 2 + \
            ["weight.trained", "bias.trained"]
        assert [tuple(v.shape) for v, *_ in result["pools"][0][2]] == [(5, 6), (12, 5), (5, 12), (12, 5), (12, 6),
                                                                         (12, 12), (3, 12), (3,)]
        outcome = result["partial"]
        assert outcome[:2] == ("error", "NotImplementedError"), outcome
        assert outcome[2].startswith("test_caller: gathers support Shard/Replicate placements") and \
            "Partial" in outcome[2], outcome


def test_prepare_gather_refuses_a_plain_tensor_naming_the_caller():
    from lorambo.dtensor_gather import prepare_gather

    with pytest.raises(TypeError, match="^the_caller: prepare_gather takes a DTensor, got a Tensor$"):
        prepare_gather(torch.randn(3, generator=torch.Generator().manual_seed(0)), "the_caller")


def test_out_of_memory_for_a_gather_on_one_process_stops_every_process_and_changes_nothing(outcomes):
    """Process 1 runs out of memory for the first, the fourth and the last of set_rank's 8
    gathered tensors. Before, process 0 was left in that all-gather: process 1 then ran into it
    with its next collective (gloo aborts it on the size mismatch) or, with none, process 0 waited
    for the process group's timeout."""
    first, second = outcomes
    assert first["before"]["ranks"] == {"0": 2, "2": 3}
    for skip in (0, 3, 7):
        case = f"skip{skip}"
        assert first[f"{case}_fired"] is None and second[f"{case}_fired"] is not None, case
        assert second[f"{case}_fired"][1] >= 60, second[f"{case}_fired"]  # a gathered pool, not a shard
        assert second[case][:2] == ("error", "OutOfMemoryError"), (case, second[case])
        assert second[case][2].startswith("simulated: out of memory allocating"), (case, second[case])
        assert first[case][:2] == ("error", "RuntimeError"), (case, first[case])
        assert "set_rank failed on another process (process 1: OutOfMemoryError: simulated" in first[case][2], \
            (case, first[case])
        for result in (first, second):
            assert_same_state(result[f"{case}_state"], result["before"], case, ids=False)
    # the processes are still in step: an edit both make lands the same on both
    assert first["works"] == second["works"] == ("ok", 3)
    assert first["works_state"]["ranks"] == {"0": 2, "2": 4}
    assert_same_state(second["works_state"], first["works_state"], "works", ids=False)


def _only_process_1_ran_out(first, second, case, who):
    """Process 1 ran out of memory for a gathered tensor (not a shard) and raised it; process 0
    raised a RuntimeError naming ``who`` and process 1's error, instead of waiting in an all-gather."""
    fired, failed = f"{case}_fired", f"{case}_failed"
    assert first[fired] is None and second[fired][1] >= 60, second[fired]
    assert second[failed][:2] == ("error", "OutOfMemoryError"), second[failed]
    assert first[failed][:2] == ("error", "RuntimeError"), first[failed]
    assert f"{who} failed on another process (process 1: OutOfMemoryError: simulated" in first[failed][2], \
        first[failed]


def test_out_of_memory_for_the_gathered_state_dict_on_one_process_stops_every_process(outcomes):
    first, second = outcomes
    _only_process_1_ran_out(first, second, "unloaded", "unloaded_state_dict")
    # then both gather it, alike: the plain model's full tensors
    assert first["unloaded"][0] == second["unloaded"][0] == "ok"
    state, other = first["unloaded"][1], second["unloaded"][1]
    assert state.keys() == other.keys() and "2.weight" in state and not any("lora" in k for k in state)
    for key, value in state.items():
        assert torch.equal(value, other[key]), key
    assert state["2.weight"].shape == (12, 12) and state["4.weight"].shape == (3, 12)


def test_out_of_memory_for_a_gather_of_adalora_importance_on_one_process_stops_every_process(outcomes):
    """Before, AdaLoRAImportance.update gathered with full_tensor(): process 1's out of memory was
    raised inside the all-gather process 0 waited in."""
    first, second = outcomes
    _only_process_1_ran_out(first, second, "importance", "AdaLoRAImportance.update")
    assert first["importance_calls"] == second["importance_calls"] == 0  # nothing folded in
    # then both fold the step in, alike
    assert first["importance_works"] == second["importance_works"] == ("ok", True)
    assert first["importance_scores"][0] == second["importance_scores"][0] == "ok"
    scores, other = first["importance_scores"][1], second["importance_scores"][1]
    assert scores.keys() == other.keys() == {"0", "2"}
    for name, value in scores.items():
        assert torch.equal(value, other[name]), name
