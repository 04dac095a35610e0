"""DDP gradient accumulation with rank changes between micro-batches: ``no_sync`` on all but the
last micro-batch, gradients as views into DDP's buckets (``gradient_as_bucket_view=True``),
components moved and dropped and a layer grown from rank 0 in the middle of a step, clipping,
``zero_grad(set_to_none=False)`` and SGD momentum with dampening. The edits of the gradients are
made in place, in the buckets, so both processes stay identical and equal one process training
on both shards. Also with ``static_graph=True`` (whose first step must run without ``no_sync``:
torch's own assert otherwise, README limitations), where the graph DDP records in the first
step has a layer at rank 0 that grows later."""

import pytest
import torch

import lorambo

import ddp_accumulation_worker as worker
from gloo_workers import spawn_two
from rendezvous import start_method


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("static_graph", [False, True])
def test_rank_changes_between_accumulated_micro_batches_keep_replicas_exact(tmp_path, static_graph):
    data_seed = int(torch.randint(0, 2**20, ()))
    spawn_two(worker.run, (2, str(tmp_path / "rendezvous"), str(tmp_path), data_seed, static_graph), start_method())
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    net = worker.build()
    want = worker.train(net, net, worker.batches(data_seed))
    assert [m.rank for m in lorambo.lora_layers(net).values()] == [4, 1, 2]
    for key, value in want.items():
        assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a[key], value, rtol=1e-10, atol=1e-12, msg=key)
