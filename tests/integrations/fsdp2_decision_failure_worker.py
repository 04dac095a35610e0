"""Worker for test_fsdp2_decision_failure.py: python fsdp2_decision_failure_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes capture one step of an FSDP2-sharded model with online growth, then take the
decision through ``lorambo.integrations.fsdp.allocator_step``; process 1 runs out of memory in
its second layer's growth. Saved: each process's outcome, ranks, decisions, decision log and the
full model state before and after.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import lorambo
from lorambo.integrations import fsdp
from lorambo.nn.lora_linear import LoRAMBoLinear
from lorambo.optimizer import LoRAMBoOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_worker import DT, build, shard  # noqa: E402
from rendezvous import exit_skipping_teardown  # noqa: E402
from gloo_workers import attempt  # noqa: E402  tests/ is on the PYTHONPATH run_two_processes gives


def full_state(net):
    return {k: (v.full_tensor() if fsdp.is_sharded(v) else v).clone() for k, v in net.state_dict().items()}


def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net = shard(build(), world)
    layers = lorambo.lora_layers(net)
    budget = sum(3 * (m.in_features + m.out_features) for m in layers.values())  # room for both to grow
    alloc = LoRAMBoOptimizer(net, budget, interval=1, sketch_rank=2, seed=5)
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    g = torch.Generator().manual_seed(3 + rank)  # different data per process
    with alloc.capture(0):
        ((net(torch.randn(8, 6, generator=g, dtype=DT)) - 1.0) ** 2).mean().backward()
    result = {"ranks_before": {n: m.rank for n, m in layers.items()}, "state_before": full_state(net)}
    grown = []
    if rank == 1:
        real_set_rank = LoRAMBoLinear.set_rank

        def set_rank_failing_second(layer, *args, **kwargs):
            grown.append(layer.name)
            if len(grown) == 2:
                raise torch.OutOfMemoryError("simulated: out of memory in the second layer's growth")
            return real_set_rank(layer, *args, **kwargs)

        LoRAMBoLinear.set_rank = set_rank_failing_second
    result["outcome"] = attempt(lambda: fsdp.allocator_step(alloc, 0, optimizer=opt))
    result["grown"] = grown
    result["ranks_after"] = {n: m.rank for n, m in layers.items()}
    result["decisions"] = list(alloc.decisions)
    result["log"] = list(alloc.log.records)
    result["state_after"] = full_state(net)
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
