"""Worker for test_ddp_routed.py: DDP with online growth on a model whose experts are routed per
process (process p's batches all go through expert p), so each process captures activations of
a different subset of the LoRA layers. ``procedure`` also runs in one process on both shards."""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer
from rendezvous import exit_skipping_teardown, init_gloo
from routed_model import Routed

DT = torch.float64
STEPS = 4


def build():
    torch.manual_seed(0)
    net = Routed()
    lorambo.configure_model(net, 1, target_modules=["inp", "e0", "e1"], capacity=3)
    return net


def batches(data_seed):
    """Per step, one batch per process; batch p goes through expert p."""
    g = torch.Generator().manual_seed(data_seed)
    return [[(torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT), p) for p in range(2)]
            for _ in range(STEPS)]


def mse(model, batch):
    x, y, expert = batch
    return ((model(x, expert) - y) ** 2).mean()


def procedure(net, model, steps, rank=None):
    """Train with growth at steps 0 and 2; ``rank`` None: one process on every shard, the loss
    averaged over them as DDP averages the gradients."""
    budget = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(net).values())
    alloc = LoRAMBoOptimizer(net, budget, interval=2, sketch_rank=2, seed=5)
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05)
    for step, shards in enumerate(steps):
        with alloc.capture(step):
            mine = shards if rank is None else [shards[rank]]
            (sum(mse(model, b) for b in mine) / len(mine)).backward()
        alloc.step(step, optimizer=opt)
        opt.step()
        opt.zero_grad()
    return {"decisions": alloc.decisions, "state": {k: v.clone() for k, v in net.state_dict().items()}}


def run(rank, world, rendezvous, out_dir, data_seed):
    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        net = build()
        result = procedure(net, DDP(net, find_unused_parameters=True), batches(data_seed), rank)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_skipping_teardown()
