"""Worker for test_trainer_callback_fsdp2.py: LoRAMBoCallback driven through Trainer's events on a
model sharded by FSDP2. ``train`` is also run by the test in one process on the unsharded model."""

import types

import torch
import torch.distributed as dist

import fsdp2_worker
import lorambo
from lorambo.integrations import LoRAMBoCallback
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance
from rendezvous import exit_skipping_teardown, init_gloo

STEPS = 5


def train(net, shards, out_dir, moves, should_save=True):
    """Trainer's event order per optimizer step; a checkpoint at the end. Returns the callback.
    With ``moves``: rank moves scored by AdaLoRAImportance (updated every step)."""
    layers = lorambo.lora_layers(net)
    budget = sum(3 * (m.in_features + m.out_features) for m in layers.values())
    alloc = LoRAMBoOptimizer(net, budget, interval=2, sketch_rank=2, seed=5,
                             move_threshold=1e30 if moves else None, max_moves=1)
    opt = alloc.make_optimizer(lr=0.05)
    callback = LoRAMBoCallback(alloc, importance=AdaLoRAImportance(net) if moves else None)
    args = types.SimpleNamespace(should_save=should_save, output_dir=out_dir)
    for step, (x, y) in enumerate(shards[:STEPS]):
        state = types.SimpleNamespace(global_step=step)
        callback.on_step_begin(args, state, None)
        ((net(x) - y) ** 2).mean().backward()
        callback.on_pre_optimizer_step(args, state, None, optimizer=opt)
        opt.step()
        opt.zero_grad()
    callback.on_save(args, types.SimpleNamespace(global_step=STEPS), None)
    return callback


def run(rank, world, rendezvous, out_dir, data_seed, moves):
    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        net = fsdp2_worker.shard(fsdp2_worker.build(), world)
        shards = [step[rank] for step in fsdp2_worker.batches(data_seed, world)]
        callback = train(net, shards, out_dir, moves, should_save=rank == 0)
        torch.save({"decisions": callback.decisions, "ranks": callback.allocator.current_ranks(),
                    "state": {k: fsdp2_worker._full(v) for k, v in net.state_dict().items()}},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)
