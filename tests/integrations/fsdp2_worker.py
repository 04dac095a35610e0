"""Worker for test_fsdp2.py: training with online growth, rank moves and explicit rank edits on a
model sharded by FSDP2 (``fully_shard``), then merge / unmerge / save / unload.

``procedure`` is also run by the test itself in one process on the unsharded model: the same
code, with lorambo.integrations.fsdp reducing to the plain lorambo calls there.
"""

import torch
from torch import nn

import lorambo
from lorambo.integrations import fsdp
from lorambo.distributed import decision_generator
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64
STEPS, BATCH = 6, 8  # BATCH rows per process


OPTIMIZERS = {"adam": lambda params: torch.optim.Adam(params, lr=0.05),
              "lorambo_adamw": lambda params: lorambo.optim.AdamW(params, lr=0.05, weight_decay=0.0)}


def build(capacity=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12, dtype=DT), nn.Tanh(), nn.Linear(12, 12, dtype=DT), nn.Tanh(),
                        nn.Linear(12, 3, dtype=DT))
    lorambo.configure_model(net, {"0": 1, "2": 1}, capacity={"0": capacity, "2": 4}, modules_to_save=["4"])
    return net


def batches(data_seed, world):
    """Per step: a list of ``world`` shards (rank r trains on shard r; one process on all)."""
    g = torch.Generator().manual_seed(data_seed)
    return [[(torch.randn(BATCH, 6, generator=g, dtype=DT), torch.randn(BATCH, 3, generator=g, dtype=DT))
             for _ in range(world)] for _ in range(STEPS)]


def _full(t):
    return t.full_tensor() if fsdp.is_sharded(t) else t.detach().clone()


def procedure(net, shards, out_dir, write_files=True, optimizer="adam"):
    """Train, edit ranks, merge, save, unload; returns everything to compare."""
    layers = lorambo.lora_layers(net)
    budget = sum(3 * (m.in_features + m.out_features) for m in layers.values())
    alloc = LoRAMBoOptimizer(net, budget, interval=2, sketch_rank=2, seed=5, move_threshold=1e30, max_moves=1)
    importance_scores = lambda: {n: torch.linspace(1.0, 2.0, m.rank, dtype=DT) for n, m in layers.items()}  # noqa: E731
    opt = OPTIMIZERS[optimizer]([p for p in net.parameters() if p.requires_grad])
    losses = []
    for step, shard in enumerate(shards):
        x, y = shard
        with alloc.capture(step):
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
        losses.append(loss.detach().clone())
        fsdp.allocator_step(alloc, step, optimizer=opt, component_scores=importance_scores())
        if step == 3:  # a move by hand: components reordered and one dropped, state moving with them
            r = layers["0"].rank
            fsdp.keep_components([(layers["0"], list(reversed(range(r)))[: max(1, r - 1)])], opt)
        if step == 4:  # growth by hand, seeded identically everywhere
            fsdp.set_rank(layers["2"], min(layers["2"].rank + 1, 4), opt, generator=decision_generator(7, step))
        opt.step()
        opt.zero_grad()
    probe = torch.randn(5, 6, generator=torch.Generator().manual_seed(11), dtype=DT)
    result = {"losses": losses, "decisions": alloc.decisions, "ranks": {n: m.rank for n, m in layers.items()},
              "state": {k: _full(v) for k, v in net.state_dict().items()},
              "opt_state": {i: {k: _full(v) for k, v in opt.state[p].items()}
                            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}}
    with torch.no_grad():
        result["out"] = net(probe)
        fsdp.merge(net)
        result["out_merged"] = net(probe)
        result["merged_weight"] = _full(net[0].base_layer.weight)
        fsdp.unmerge(net)
        result["out_unmerged"] = net(probe)
        if write_files:
            fsdp.save_adapter(net, f"{out_dir}/adapter")
        plain = build(layers["0"].capacity)
        lorambo.unload(plain, merge=False)
        plain.load_state_dict(fsdp.unloaded_state_dict(net))
        result["out_unloaded"] = plain(probe)
        if fsdp.is_sharded(net[0].lora_A):
            try:
                fsdp.unload(net)
            except NotImplementedError as err:
                result["unload_error"] = str(err)
        else:
            fsdp.unload(net)
            result["out_unloaded_in_place"] = net(probe)
        result["has_lora"] = bool(lorambo.lora_layers(net))
    return result


def run(rank, world, port, out_dir, data_seed, optimizer="adam", capacity=4):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = build(capacity)
        mesh = init_device_mesh("cpu", (world,))
        for i in (0, 2):
            fully_shard(net[i], mesh=mesh)
        fully_shard(net, mesh=mesh)
        held = net[0].lora_A.to_local().shape[0]  # torch.chunk's layout: uneven for capacity 5
        assert fsdp.is_sharded(net[0].lora_A) and held == len(torch.arange(capacity).chunk(world)[rank])
        storage = {n: (id(p), p.to_local().data_ptr()) for n, p in net.named_parameters()}
        torch.manual_seed(1000 + rank)  # the global RNG differs per process on purpose
        shards = [step[rank] for step in batches(data_seed, world)]
        result = procedure(net, shards, out_dir, optimizer=optimizer)
        result["same_storage"] = all(
            (id(p), p.to_local().data_ptr()) == storage[n] for n, p in net.named_parameters() if n in storage)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
