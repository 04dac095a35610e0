"""A rank edit through lorambo.integrations.fsdp that fails on one process of an FSDP2 model is
raised on every process and made on none: the others used to keep it (and go on with other
ranks), or wait forever in a gather the failed process never joined."""

from pathlib import Path

import pytest
import torch

from fsdp2_state import assert_same_state
from gloo_workers import run_two_processes

pytest.importorskip("torch.distributed.fsdp")
WORKER = Path(__file__).with_name("fsdp2_edit_failure_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_two_processes(WORKER, tmp_path_factory.mktemp("fsdp2_edit_failure"), timeout=60)


def test_an_edit_failing_on_one_process_is_raised_everywhere_and_made_nowhere(outcomes):
    first, second = outcomes
    for result in (first, second):
        assert result["before"]["ranks"] == {"0": 3, "2": 1}
    # process 1's own error; process 0 names it
    for edit, kind in [("bad_generator", "TypeError"), ("bad_optimizer", "TypeError"),
                       ("not_a_lora_layer", "TypeError"), ("failed_after_edit", "OutOfMemoryError"),
                       ("failed_merge", "OutOfMemoryError")]:
        assert second[edit][:2] == ("error", kind), (edit, second[edit])
        assert first[edit][:2] == ("error", "RuntimeError"), (edit, first[edit])
        assert f"failed on another process (process 1: {kind}" in first[edit][2], (edit, first[edit])
    assert second["not_a_lora_layer"][2] == \
        "lorambo.integrations.fsdp.set_rank: expected LoRAMBoLinear layers, got a Tanh"
    for result in (first, second):
        assert result["different_ranks"][:2] == ("error", "ValueError"), result["different_ranks"]
        assert "rank: process 0 2, process 1 3" in result["different_ranks"][2], result["different_ranks"]
    # nothing changed anywhere: values, gradients, Adam moments and per-slot counts, ranks, slot ids
    for edit in ("bad_generator", "bad_optimizer", "not_a_lora_layer", "different_ranks", "failed_after_edit",
                 "failed_merge"):
        for result in (first, second):
            assert result[f"{edit}_merged"] == [False, False], edit
            assert_same_state(result[f"{edit}_state"], result["before"], edit)
    # an unsharded model (DDP): the edit process 0 made in place is taken back
    assert second["unsharded_bad_generator"][:2] == ("error", "TypeError"), second["unsharded_bad_generator"]
    assert first["unsharded_bad_generator"][:2] == ("error", "RuntimeError"), first["unsharded_bad_generator"]
    for result in (first, second):
        assert_same_state(result["unsharded_bad_generator_state"], result["unsharded_before"], "unsharded")
    # and the processes are still in step: an edit both make lands the same on both
    assert first["works"] == second["works"] == ("ok", 1)
    assert first["works_state"]["ranks"] == {"0": 3, "2": 3}
    assert_same_state(second["works_state"], first["works_state"], "works", ids=False)


def assert_same_statistics(got, want, what):
    assert got["steps"] == want["steps"] and got["ibar"].keys() == want["ibar"].keys(), what
    for table in ("ibar", "ubar"):
        for key, value in want[table].items():
            assert torch.equal(got[table][key], value), (what, table, key)


def test_an_importance_update_failing_on_one_process_is_raised_everywhere(outcomes):
    """AdaLoRAImportance.update() on FSDP2 pools: out of memory in process 1's product used to
    leave process 0 waiting in the next pool's gather; now both raise, before any statistic
    changes, and update again together."""
    first, second = outcomes
    assert second["importance_failed"][:2] == ("error", "OutOfMemoryError"), second["importance_failed"]
    assert first["importance_failed"][:2] == ("error", "RuntimeError"), first["importance_failed"]
    assert "AdaLoRAImportance.update failed on another process (process 1: OutOfMemoryError" in \
        first["importance_failed"][2]
    for result in (first, second):
        assert result["importance_before"]["steps"] == 1
        assert_same_statistics(result["importance_after_failure"], result["importance_before"], "failed")
        assert result["importance_retry"] == ("ok", True)
        assert result["importance_after_retry"]["steps"] == 2
    assert_same_statistics(second["importance_after_retry"], first["importance_after_retry"], "retry")
