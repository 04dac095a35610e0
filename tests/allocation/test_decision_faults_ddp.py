"""Out of memory on one gloo process in the middle of a rank decision, after its first
collective (an online decision's power-iteration product, its SVD, a layer's growth, a rank
move's shrink; an ALoRA round's shrink), raises on both processes within the timeout: it used to
leave the other process waiting forever in the decision's next collective (an ALoRA round, with
no collective after its edits, left the other process going on alone). Where the failing step is
followed by a collective inside the same layer's edit (the products, the SVD, a growth), both
processes keep the same pools and decide together again. A shrink that one process made and the
other could not stays (as the note on each error says), and the next decision on those parted
pools is refused on both: never a silent divergence."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("ddp_decision_fault_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

INJECTED = "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (injected)"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_two_processes(WORKER, tmp_path_factory.mktemp("decision_faults"), timeout=60)


@pytest.mark.parametrize("case", ["product", "svd", "growth", "move", "alora"])
def test_out_of_memory_on_one_process_is_raised_on_both(outcomes, case):
    first, second = (o[case] for o in outcomes)
    assert second["outcome"][:2] == ("error", "OutOfMemoryError"), second["outcome"]
    assert first["outcome"][:2] == ("error", "RuntimeError"), first["outcome"]
    who = "alora_round" if case == "alora" else "update_ranks"
    assert f"{who} failed on another process (process 1: {INJECTED})" in first["outcome"][2]


@pytest.mark.parametrize("case", ["product", "svd", "growth"])
def test_both_processes_keep_the_same_pools_and_decide_again(outcomes, case):
    first, second = (o[case] for o in outcomes)
    assert first["pools"].keys() == second["pools"].keys()
    for name in first["pools"]:
        rank_a, a_a, b_a = first["pools"][name]
        rank_b, a_b, b_b = second["pools"][name]
        assert rank_a == rank_b and torch.equal(a_a, a_b) and torch.equal(b_a, b_b), (case, name)
    assert first["retry"][0] == "ok" and first["retry"][1] and first["retry"] == second["retry"]


@pytest.mark.parametrize("case, donor", [("move", "2"), ("alora", "0")])
def test_a_shrink_made_on_one_process_only_is_refused_at_the_next_decision(outcomes, case, donor):
    first, second = (o[case] for o in outcomes)
    assert first["pools"][donor][0] == 0 and second["pools"][donor][0] == 1  # process 0 alone shrank it
    for got in (first, second):
        assert got["retry"][:2] == ("error", "ValueError") and "the processes passed different settings (ranks:" \
            in got["retry"][2], got["retry"]
