"""A ``torch.autograd.grad`` pass feeds no ``.grad`` and is left out of the step's statistics
(lorambo/nn/grad_passes.py), also where ``fully_shard`` wraps the LoRA layer itself: there FSDP2
puts the sharded parameters back before lorambo's forward hook runs, which then found none of
them in the graph and counted every pass (the online gains and Fisher traces of two processes
came out unlike one process's on the same global batch)."""

import pytest
import torch

import fsdp2_grad_pass_worker as worker
from fsdp2_worker import build
from gloo_workers import spawn_two
from rendezvous import start_method

pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_statistics_of_fsdp2_units_leave_autograd_grad_passes_out(tmp_path):
    data_seed = int(torch.randint(0, 2**20, ()))
    spawn_two(worker.run, (2, str(tmp_path / "rendezvous"), str(tmp_path), data_seed), start_method())
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    whole = [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])) for step in worker.batches(data_seed, 2)]
    ref = worker.procedure(build(), whole)
    assert a["decisions"] == b["decisions"] and a["fisher"] == b["fisher"]
    grown = [r for r in ref["decisions"] if r["event"] == "grow"]
    assert grown and [(r["layer"], r["old_rank"], r["new_rank"]) for r in a["decisions"]] == \
        [(r["layer"], r["old_rank"], r["new_rank"]) for r in ref["decisions"]]
    for got, want in zip(a["decisions"], ref["decisions"]):
        torch.testing.assert_close(torch.tensor(got["gains"], dtype=torch.float64),
                                   torch.tensor(want["gains"], dtype=torch.float64), rtol=1e-9, atol=0)
    assert a["fisher"].keys() == ref["fisher"].keys() == {"0", "2"}
    for name, value in ref["fisher"].items():
        torch.testing.assert_close(torch.as_tensor(a["fisher"][name]), torch.as_tensor(value), rtol=1e-9, atol=0)
