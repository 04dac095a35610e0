"""Two gloo processes (DDP on CPU) take identical online decisions and keep identical weights."""

import pytest
import torch

import ddp_online_worker
from gloo_workers import spawn_two
from rendezvous import start_method


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_processes_decide_identically(tmp_path):
    data_seed = int(torch.randint(0, 2**20, ()))
    spawn_two(ddp_online_worker.run, (2, str(tmp_path / "rendezvous"), str(tmp_path), data_seed), start_method())
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["decisions"] == b["decisions"]
    assert any(r["event"] == "grow" for r in a["decisions"])
    assert a["ranks"] == b["ranks"] != {n: 1 for n in a["ranks"]}
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key
    assert a["slot_steps"] and all(torch.equal(x, y) for x, y in zip(a["slot_steps"], b["slot_steps"]))
