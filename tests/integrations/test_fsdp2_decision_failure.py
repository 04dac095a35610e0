"""A rank decision through ``lorambo.integrations.fsdp.allocator_step`` that runs out of memory
on one process part-way (in its second layer's growth) stops on every process at the same
layer: the growth made before stays on both, on record in the decisions and the decision log,
and the failed layer's growth is taken back on both. Processes never part: their full model
states are equal, and the kept ranks are the ones the records say."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

pytest.importorskip("torch.distributed.fsdp")
WORKER = Path(__file__).with_name("fsdp2_decision_failure_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def test_a_decision_failing_part_way_on_one_process_keeps_the_same_growth_everywhere(tmp_path):
    first, second = run_two_processes(WORKER, tmp_path, timeout=90)
    assert second["outcome"][:2] == ("error", "OutOfMemoryError")
    assert first["outcome"][:2] == ("error", "RuntimeError")
    assert "failed on another process (process 1: OutOfMemoryError" in first["outcome"][2]
    assert len(second["grown"]) == 2  # the failure came in the second layer's growth
    kept_layer, failed_layer = second["grown"]
    for result in (first, second):
        records = [(r["layer"], r["old_rank"], r["new_rank"]) for r in result["decisions"]]
        assert records == [(r["layer"], r["old_rank"], r["new_rank"]) for r in result["log"]]
        assert [layer for layer, _, _ in records] == [kept_layer]
        old, new = records[0][1:]
        assert old == result["ranks_before"][kept_layer] < new
        assert result["ranks_after"] == {**result["ranks_before"], kept_layer: new}
        failed_keys = [key for key in result["state_before"] if key.startswith(failed_layer + ".lora_")]
        assert len(failed_keys) == 2
        for key in failed_keys:  # the failed layer's pools: as before, every element
            assert torch.equal(result["state_after"][key], result["state_before"][key]), key
    assert first["state_after"].keys() == second["state_after"].keys()
    for key, value in first["state_after"].items():
        assert torch.equal(second["state_after"][key], value), key
