"""Worker for test_ddp_accumulation.py: DDP gradient accumulation (``no_sync`` on all but the
last micro-batch) with gradients as views into DDP's buckets, ranks changed between micro-batches
(components moved and dropped, a layer grown from rank 0), clipping and ``zero_grad(set_to_none=
False)``. ``train`` also runs in one process on both shards."""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lorambo
from lorambo.nn import keep_components_many
from rendezvous import exit_skipping_teardown, init_gloo

DT = torch.float64
STEPS, MICRO = 3, 2


def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 7, dtype=DT), nn.Tanh(), nn.Linear(7, 5, dtype=DT), nn.Tanh(),
                        nn.Linear(5, 3, dtype=DT))
    lorambo.configure_model(net, {"0": 3, "2": 2, "4": 0}, capacity={"0": 4, "2": 4, "4": 3})
    gen = torch.Generator().manual_seed(9)
    for layer in lorambo.lora_layers(net).values():
        layer.lora_B.data[:, :layer.rank].normal_(generator=gen)
    return net


def batches(data_seed):
    """Per step and micro-batch, one batch per process."""
    gen = torch.Generator().manual_seed(data_seed)
    return [[[(torch.randn(8, 6, generator=gen, dtype=DT), torch.randn(8, 3, generator=gen, dtype=DT))
              for _ in range(2)] for _ in range(MICRO)] for _ in range(STEPS)]


def _edit(net, opt, step):
    layers = lorambo.lora_layers(net)
    if step == 0:
        keep_components_many([(layers["0"], [2, 0])], opt)
        layers["4"].set_rank(2, optimizer=opt, generator=torch.Generator().manual_seed(5))
    elif step == 1:
        layers["2"].set_rank(1, optimizer=opt)
        layers["0"].set_rank(4, optimizer=opt, generator=torch.Generator().manual_seed(6))


def train(net, model, steps, rank=None, sync_first_step=False):
    """``rank`` None: one process on both shards, the loss averaged over them as DDP averages.
    ``sync_first_step``: no ``no_sync`` in the first step (DDP's static_graph needs it, see the
    README's limitations)."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    for step, micro_batches in enumerate(steps):
        for i, shards in enumerate(micro_batches):
            mine = shards if rank is None else [shards[rank]]
            last = i == len(micro_batches) - 1
            sync = rank is None or last or (sync_first_step and step == 0)
            with contextlib.nullcontext() if sync else model.no_sync():
                (sum(((model(x) - y) ** 2).mean() for x, y in mine) / len(mine) / MICRO).backward()
            if not last:
                _edit(net, opt, step)
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return {k: v.clone() for k, v in net.state_dict().items()}


def run(rank, world, rendezvous, out_dir, data_seed, static_graph=False):
    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        net = build()
        model = DDP(net, gradient_as_bucket_view=True, static_graph=static_graph)
        torch.save(train(net, model, batches(data_seed), rank, sync_first_step=static_graph), f"{out_dir}/rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_skipping_teardown()
