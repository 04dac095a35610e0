"""Out of memory on one gloo process in the middle of a rank decision, after its first
collective (an online decision's power-iteration product, its SVD, a layer's growth, a rank
move's shrink; an ALoRA round's shrink), raises on both processes within the timeout: it used to
leave the other process waiting forever in the decision's next collective (an ALoRA round, with
no collective after its edits, left the other process going on alone). Where the failing step is
followed by a collective inside the same layer's edit (the products, the SVD, a growth), both
processes keep the same pools and decide together again. A shrink (and an ALoRA round's growth)
that one process made and the other could not is taken back on both, which then decide together
again."""

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
def test_a_shrink_one_process_could_not_make_is_taken_back_on_both(outcomes, case, donor):
    """Process 0 made the shrink (and an ALoRA round its growth) that process 1 ran out of memory
    for: it used to keep them, and the next decision was refused on the parted pools. The move's
    decision keeps the growth both made before it; the ALoRA round changes nothing."""
    first, second = (o[case] for o in outcomes)
    assert first["pools"][donor][0] == first["before"][donor][0] == 1
    if case == "alora":
        assert first["pools"].keys() == first["before"].keys()
        for name, (rank, a, b) in first["before"].items():
            assert first["pools"][name][0] == rank, name
            assert torch.equal(first["pools"][name][1], a) and torch.equal(first["pools"][name][2], b), name
    assert first["pools"].keys() == second["pools"].keys()
    for name, (rank, a, b) in first["pools"].items():
        assert second["pools"][name][0] == rank, (case, name)
        assert torch.equal(second["pools"][name][1], a) and torch.equal(second["pools"][name][2], b), (case, name)
    # lorambo.optim.AdamW's moments and per-slot step counts too
    assert first["state"].keys() == second["state"].keys()
    for name, state in second["state"].items():
        for key, value in state.items():
            assert torch.equal(first["state"][name][key], value), (case, name, key)
    if case == "alora":
        assert first["state"].keys() == first["state_before"].keys()
        for name, state in first["state_before"].items():
            for key, value in state.items():
                assert torch.equal(first["state"][name][key], value), (case, name, key)
    assert first["retry"][0] == "ok" and first["retry"][1] and first["retry"] == second["retry"]


KEPT = ("update_ranks (step 0) stopped after {} rank change(s) {}, which stay and are in the decisions and "
        "the decision log; the rest of the decision was not taken")


@pytest.mark.parametrize("case, notes", [
    ("product", []),
    ("svd", []),
    ("growth", [KEPT.format(1, "[('0', 1, 3)]")]),
    ("move", ["update_ranks (step 0): the rank move's shrinks of ['2'] were taken back on every process",
              KEPT.format(2, "[('0', 1, 2), ('4', 1, 2)]")]),
    ("alora", ["alora_round (step 0): every process took the round's rank changes back"]),
])
def test_both_errors_say_what_was_kept_and_what_was_taken_back(outcomes, case, notes):
    """The notes (Python 3.11+) on the error of each process: the growths made before the failure
    stay; the shrinks and the ALoRA round are taken back on both."""
    for rank, result in enumerate(outcomes):
        assert result[case]["notes"] == notes, (rank, case)
