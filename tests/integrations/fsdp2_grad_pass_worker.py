"""Worker for test_fsdp2_grad_pass.py: training steps with an extra ``torch.autograd.grad`` pass
(the input gradient, as for an adversarial example or a gradient penalty: it feeds no ``.grad``)
on a model whose LoRA layers are FSDP2 units themselves, with online growth and a FisherProxy
gathering statistics.

``procedure`` is also run by the test in one process on the unsharded model and the whole batch.
"""

import torch

import lorambo
from lorambo.integrations import fsdp
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity import FisherProxy
from fsdp2_worker import DT, build, shard
from rendezvous import exit_skipping_teardown, init_gloo

STEPS, BATCH = 3, 8  # BATCH rows per process


def batches(data_seed, world):
    """Per step: a list of ``world`` shards (rank r trains on shard r; one process on all)."""
    g = torch.Generator().manual_seed(data_seed)
    return [[(torch.randn(BATCH, 6, generator=g, dtype=DT), torch.randn(BATCH, 3, generator=g, dtype=DT))
             for _ in range(world)] for _ in range(STEPS)]


def procedure(net, shards):
    """The decisions (gains included) and the Fisher traces of the steps on ``shards``."""
    layers = lorambo.lora_layers(net)
    budget = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    alloc = LoRAMBoOptimizer(net, budget, interval=1, sketch_rank=2, power_iters=2, seed=5)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with FisherProxy(net) as fisher:
        for step, (x, y) in enumerate(shards):
            x = x.clone().requires_grad_(True)
            with alloc.capture(step):
                loss = ((net(x) - y) ** 2).mean()
                torch.autograd.grad(loss, x, retain_graph=True)  # feeds no .grad: in no statistic
                loss.backward()
            fsdp.allocator_step(alloc, step, optimizer=opt)
            opt.step()
            opt.zero_grad()
    return {"decisions": alloc.decisions, "fisher": {n: e.value for n, e in fisher.estimates().items()}}


def run(rank, world, rendezvous, out_dir, data_seed):
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        net = shard(build(), world)  # fully_shard on each LoRA layer, then on the root
        assert isinstance(net[0], torch.distributed.fsdp.FSDPModule)
        result = procedure(net, [step[rank] for step in batches(data_seed, world)])
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)
