"""DDP online growth when each process runs a different subset of the LoRA layers (routed
experts): both processes stay identical and equal one process training on both shards."""

import pytest
import torch

import ddp_routed_worker
from gloo_workers import spawn_two
from rendezvous import start_method


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_growth_of_a_layer_one_process_did_not_run_stays_identical(tmp_path):
    """The scale of a grown row of A is reduced over processes; a process without inputs for the
    layer skipped that collective, so the next one paired with another layer's: the processes'
    rows of A differed and the replicas drifted apart silently."""
    data_seed = int(torch.randint(0, 2**20, ()))
    spawn_two(ddp_routed_worker.run, (2, str(tmp_path / "rendezvous"), str(tmp_path), data_seed), start_method())
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    net = ddp_routed_worker.build()
    ref = ddp_routed_worker.procedure(net, net, ddp_routed_worker.batches(data_seed))
    assert {r["layer"] for r in ref["decisions"] if r["event"] == "grow"} >= {"e0", "e1"}
    assert a["decisions"] == b["decisions"]
    assert [(r["layer"], r["old_rank"], r["new_rank"]) for r in a["decisions"]] == \
        [(r["layer"], r["old_rank"], r["new_rank"]) for r in ref["decisions"]]
    for key, value in ref["state"].items():
        assert torch.equal(a["state"][key], b["state"][key]), key
        torch.testing.assert_close(a["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
