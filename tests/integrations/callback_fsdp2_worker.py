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


def parts(net, moves):
    """The allocator, its optimizer and the callback a run builds on ``net``."""
    layers = lorambo.lora_layers(net)
    budget = sum(3 * (m.in_features + m.out_features) for m in layers.values())
    alloc = LoRAMBoOptimizer(net, budget, interval=2, sketch_rank=2, seed=5,
                             move_threshold=1e30 if moves else None, max_moves=1)
    opt = alloc.make_optimizer(lr=0.05)
    return opt, LoRAMBoCallback(alloc, importance=AdaLoRAImportance(net) if moves else None)


def take_steps(net, opt, callback, args, shards, steps):
    """Trainer's event order per optimizer step."""
    for step in steps:
        x, y = shards[step]
        state = types.SimpleNamespace(global_step=step)
        callback.on_step_begin(args, state, None)
        ((net(x) - y) ** 2).mean().backward()
        callback.on_pre_optimizer_step(args, state, None, optimizer=opt)
        opt.step()
        opt.zero_grad()


def train(net, shards, out_dir, moves, should_save=True):
    """Trainer's event order per optimizer step; a checkpoint at the end. Returns the callback.
    With ``moves``: rank moves scored by AdaLoRAImportance (updated every step)."""
    opt, callback = parts(net, moves)
    args = types.SimpleNamespace(should_save=should_save, output_dir=out_dir)
    take_steps(net, opt, callback, args, shards, range(STEPS))
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


RESUME_AT = 3  # after the decision of step 2, before the one of step 4


def run_to_checkpoint(rank, world, out_dir, data_seed, moves, steps, **arguments):
    """A sharded run's first ``steps`` steps from on_train_begin, then the callback's checkpoint
    at ``steps``; ``arguments``: more of Trainer's arguments. Returns this process's data shards,
    the arguments, the model, its optimizer and the callback."""
    shards = [step[rank] for step in fsdp2_worker.batches(data_seed, world)]
    args = types.SimpleNamespace(should_save=rank == 0, output_dir=out_dir, **arguments)
    net = fsdp2_worker.shard(fsdp2_worker.build(), world)
    opt, callback = parts(net, moves)
    callback.on_train_begin(args, types.SimpleNamespace(global_step=0), None, optimizer=opt)
    take_steps(net, opt, callback, args, shards, range(steps))
    callback.on_save(args, types.SimpleNamespace(global_step=steps), None)
    return shards, args, net, opt, callback


def run_resumed(rank, world, rendezvous, out_dir, data_seed, moves):
    """Steps 0-2 and a checkpoint (lorambo's files by the callback, the sharded model and
    optimizer by torch.distributed.checkpoint, as accelerate saves them under FSDP2), then a new
    sharded model, optimizer and callback load it and Trainer resumes at step 3."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        shards, args, net, opt, callback = run_to_checkpoint(rank, world, out_dir, data_seed, moves, RESUME_AT)
        folder = f"{out_dir}/checkpoint-{RESUME_AT}"
        model_state, optim_state = get_state_dict(net, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=f"{folder}/dcp")

        net = fsdp2_worker.shard(fsdp2_worker.build(), world)
        opt, callback = parts(net, moves)
        model_state, optim_state = get_state_dict(net, opt)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=f"{folder}/dcp")
        set_state_dict(net, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        callback.on_train_begin(args, types.SimpleNamespace(global_step=RESUME_AT), None, optimizer=opt)
        restored = list(callback.decisions)
        take_steps(net, opt, callback, args, shards, range(RESUME_AT, STEPS))
        torch.save({"restored": restored, "decisions": callback.decisions, "ranks": callback.allocator.current_ranks(),
                    "state": {k: fsdp2_worker._full(v) for k, v in net.state_dict().items()}},
                   f"{out_dir}/resumed{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)


BEST_AT = 1  # the checkpoint Trainer calls best: saved before the rank move of step 2 (moves go one way,
# so with two layers the move of step 2 is the run's only one)


def full_values(value):
    """``value`` with every (sharded) tensor in its nested dicts and lists full and copied."""
    if isinstance(value, torch.Tensor):
        return fsdp2_worker._full(value)
    if isinstance(value, dict):
        return {k: full_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_values(v) for v in value)
    return value


def run_best_model(rank, world, rendezvous, out_dir, data_seed, moves):
    """``load_best_model_at_end`` under FSDP2: the first BEST_AT steps and a checkpoint (lorambo's files by the
    callback, the sharded model by torch.distributed.checkpoint, as accelerate saves it), the
    remaining steps, then Trainer's end: it loads the best checkpoint's model into the trained
    one and calls on_train_end with that checkpoint. Saved: the decisions, ranks and importance
    state at the checkpoint and after on_train_end, and the full model state there."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from lorambo.nn.slot_lineage import slot_ids

    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        shards, args, net, opt, callback = run_to_checkpoint(rank, world, out_dir, data_seed, moves, BEST_AT,
                                                             load_best_model_at_end=True)
        folder = f"{out_dir}/checkpoint-{BEST_AT}"
        dcp.save({"model": get_model_state_dict(net)}, checkpoint_id=f"{folder}/dcp")
        full = lambda: {k: fsdp2_worker._full(v) for k, v in net.state_dict().items()}  # noqa: E731
        importance = lambda: None if callback.importance is None else full_values(  # noqa: E731
            callback.importance.state_dict())
        at_best = {"decisions": list(callback.decisions), "ranks": callback.allocator.current_ranks(),
                   "state": full(), "importance": importance()}
        take_steps(net, opt, callback, args, shards, range(BEST_AT, fsdp2_worker.STEPS))
        at_end = {"decisions": list(callback.decisions), "ranks": callback.allocator.current_ranks()}
        loaded = {"model": get_model_state_dict(net)}
        dcp.load(loaded, checkpoint_id=f"{folder}/dcp")
        set_model_state_dict(net, loaded["model"])
        callback.on_train_end(args, types.SimpleNamespace(global_step=fsdp2_worker.STEPS, best_model_checkpoint=folder),
                              None)
        followed = {"decisions": list(callback.decisions), "ranks": callback.allocator.current_ranks(),
                    "state": full(), "importance": importance(), "log": list(callback.allocator.log.records),
                    "slot_ids": {n: slot_ids(m) for n, m in lorambo.lora_layers(net).items()}}
        torch.save({"at_best": at_best, "at_end": at_end, "followed": followed}, f"{out_dir}/best{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)
