"""Worker for test_ddp_online.py: one DDP process training with online growth and rank moves."""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lorambo
from lorambo.distributed import check_identical
from lorambo.optimizer import LoRAMBoOptimizer
from rendezvous import exit_skipping_teardown, init_gloo

DT = torch.float64


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def run(rank, world, rendezvous, out_dir, data_seed):
    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        torch.manual_seed(0)  # same model everywhere (DDP would broadcast it anyway)
        net = nn.Sequential(nn.Linear(6, 12, dtype=DT), nn.Tanh(), nn.Linear(12, 12, dtype=DT),
                            nn.Tanh(), nn.Linear(12, 3, dtype=DT))
        lorambo.configure_model(net, 1, capacity={"0": 4, "2": 4, "4": 3})
        torch.manual_seed(1000 + rank)  # the global RNG now differs per process on purpose
        g = torch.Generator().manual_seed(data_seed + rank)  # each process its own data shard
        heldout = [(torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))]
        spent = sum(2 * (m.in_features + m.out_features) for m in lorambo.lora_layers(net).values())
        opt = LoRAMBoOptimizer(net, spent, interval=2, sketch_rank=2, move_threshold=0.0,
                               loss_fn=mse, heldout_batches=heldout, seed=5)
        model = DDP(net)
        torch_opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for step in range(7):
            batch = (torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT))
            with opt.capture(step):
                mse(model, batch).backward()
            opt.step(step, optimizer=torch_opt)  # ranks change between backward and step
            torch_opt.step()
            torch_opt.zero_grad()
            for layer in lorambo.lora_layers(net).values():  # the DDP-reduced gradients followed their slots
                assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()
        check_identical(opt.decisions)
        torch.save({"decisions": opt.decisions,
                    "state": {k: v.clone() for k, v in net.state_dict().items()},
                    "ranks": opt.current_ranks(),
                    "slot_steps": [torch_opt.state[p]["slot_step"].clone() for p in net.parameters()
                                   if p in torch_opt.state and "slot_step" in torch_opt.state[p]]},
                   f"{out_dir}/rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_skipping_teardown()
