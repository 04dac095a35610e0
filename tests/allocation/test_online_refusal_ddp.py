"""An online decision that one gloo process alone refuses (bad component_scores, no captured
step) raises on both processes and leaves both able to decide again; it used to leave the
other process waiting forever in the decision's first collective."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

WORKER = Path(__file__).with_name("ddp_refusal_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each process's outcomes (one run of the worker for the tests of this file)."""
    return run_two_processes(WORKER, tmp_path_factory.mktemp("refusal"), timeout=40)


def test_a_refusal_on_one_process_is_raised_on_both(outcomes):
    first, second = outcomes
    assert second["bad_scores"][:2] == ("error", "ValueError"), second["bad_scores"]
    assert "component_scores['0'] must be 2 finite numbers" in second["bad_scores"][2]
    assert first["bad_scores"][:2] == ("error", "RuntimeError"), first["bad_scores"]
    assert "process 1: ValueError: component_scores['0'] must be 2 finite numbers" in first["bad_scores"][2]
    assert first["kept"] and second["kept"]  # nothing changed: the captured step is kept for a retry
    assert first["retry"] == second["retry"] and first["retry"][0] == "ok" and first["retry"][1]
    assert second["no_capture"][:2] == ("error", "RuntimeError"), second["no_capture"]
    assert "no activations were captured" in second["no_capture"][2]
    assert first["no_capture"][:2] == ("error", "RuntimeError"), first["no_capture"]
    assert "process 1: RuntimeError: update_ranks: no activations were captured" in first["no_capture"][2]
    assert first["ranks"] == second["ranks"]


def test_settings_that_differ_between_processes_are_an_error_on_both(outcomes):
    """Growers with different budgets (or seeds, thresholds, ranks...) decided differently: the
    replicas' rank pools parted without a word."""
    for got in outcomes:
        assert got["budgets"][:2] == ("error", "ValueError"), got["budgets"]
        assert "update_ranks: the processes passed different settings (budget: process 0 1000000, " \
               "process 1 1000001)" in got["budgets"][2]
        assert got["ranks_after"] == got["ranks"]  # nothing changed


def test_alora_scores_missing_on_one_process_are_an_error_on_both(outcomes):
    """Process 1's scores lack layer '2': it raised KeyError alone while process 0 waited in the
    broadcast of the scores."""
    first, second = outcomes
    assert second["alora"] == ("error", "ValueError", "ALoRA scores lack layer(s) ['2']")
    assert first["alora"][:2] == ("error", "RuntimeError"), first["alora"]
    assert "process 1: ValueError: ALoRA scores lack layer(s) ['2']" in first["alora"][2]
    assert first["alora_retry"] == second["alora_retry"] and first["alora_retry"][0] == "ok"


def test_a_rank_move_uses_process_0s_scores_on_both(outcomes):
    """Each process's scores name another component of layer "0" as the least useful: both drop
    process 0's (component 0), or the replicas' pools would hold different components."""
    first, second = outcomes
    assert first["moves"] == second["moves"] and first["moves"][0] == "ok", (first["moves"], second["moves"])
    assert [(r["event"], r["layer"], r.get("components")) for r in first["moves"][1]] == \
        [("shrink", "0", [0]), ("grow", "2", None)]
