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
from lorambo.sharding import local_tensor
from rendezvous import exit_skipping_teardown, init_gloo

DT = torch.float64
STEPS, BATCH = 6, 8  # BATCH rows per process


OPTIMIZERS = {"adam": lambda params: torch.optim.Adam(params, lr=0.05),
              "lorambo_adamw": lambda params: lorambo.optim.AdamW(params, lr=0.05, weight_decay=0.0),
              # a list: one optimizer per parameter, every rank change given all of them
              "adamw_per_parameter": lambda params: [lorambo.optim.AdamW([p], lr=0.05, weight_decay=0.0)
                                                     for p in params]}


def build_plain():
    return nn.Sequential(nn.Linear(6, 12, dtype=DT), nn.Tanh(), nn.Linear(12, 12, dtype=DT), nn.Tanh(),
                         nn.Linear(12, 3, dtype=DT))


def build(capacity=4):
    torch.manual_seed(0)
    net = build_plain()
    lorambo.configure_model(net, {"0": 1, "2": 1}, capacity={"0": capacity, "2": 4}, modules_to_save=["4"])
    return net


def batches(data_seed, world):
    """Per step: a list of ``world`` shards (rank r trains on shard r; one process on all)."""
    g = torch.Generator().manual_seed(data_seed)
    return [[(torch.randn(BATCH, 6, generator=g, dtype=DT), torch.randn(BATCH, 3, generator=g, dtype=DT))
             for _ in range(world)] for _ in range(STEPS)]


def _full(t):
    return t.full_tensor() if fsdp.is_sharded(t) else t.detach().clone()


def procedure(net, shards, out_dir, write_files=True, optimizer="adam", after_training=None):
    """Train, edit ranks, merge, save, unload; returns everything to compare. ``after_training(net,
    opt)`` runs between training and merging; what it returns is stored under "after_training"."""
    layers = lorambo.lora_layers(net)
    budget = sum(3 * (m.in_features + m.out_features) for m in layers.values())
    alloc = LoRAMBoOptimizer(net, budget, interval=2, sketch_rank=2, seed=5, move_threshold=1e30, max_moves=1)
    importance_scores = lambda: {n: torch.linspace(1.0, 2.0, m.rank, dtype=DT) for n, m in layers.items()}  # noqa: E731
    opt = OPTIMIZERS[optimizer]([p for p in net.parameters() if p.requires_grad])
    opts = opt if isinstance(opt, list) else [opt]
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
        for one in opts:
            one.step()
            one.zero_grad()
    checked = after_training(net, opt) if after_training is not None else None
    probe = torch.randn(5, 6, generator=torch.Generator().manual_seed(11), dtype=DT)
    result = {"after_training": checked, "losses": losses, "decisions": alloc.decisions, "ranks": {n: m.rank for n, m in layers.items()},
              "state": {k: _full(v) for k, v in net.state_dict().items()},
              "opt_state": {i: {k: _full(v) for k, v in one.state[p].items()}
                            for i, (one, p) in enumerate((one, p) for one in opts for g in one.param_groups
                                                         for p in g["params"])}}
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


def shard(net, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for i in (0, 2):
        fully_shard(net[i], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def checkpoint_round_trip(out_dir, world, capacity):
    """torch.distributed.checkpoint: save the trained model and optimizer, load both into a fresh
    sharded copy; returns the mismatches (state keys, dtypes, values, ranks), empty when none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def check(net, opt):
        model_state, optim_state = get_state_dict(net, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=f"{out_dir}/dcp")
        fresh = shard(build(capacity), world)
        fresh_opt = OPTIMIZERS["lorambo_adamw"]([p for p in fresh.parameters() if p.requires_grad])
        model_state, optim_state = get_state_dict(fresh, fresh_opt)  # lr 0 steps initialise fresh_opt
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=f"{out_dir}/dcp")
        set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        wrong = []
        ranks = ({n: m.rank for n, m in lorambo.lora_layers(net).items()},
                 {n: m.rank for n, m in lorambo.lora_layers(fresh).items()})
        if ranks[0] != ranks[1]:
            wrong.append(f"ranks {ranks}")
        params = [(p, q) for g, h in zip(opt.param_groups, fresh_opt.param_groups) for p, q in zip(g["params"], h["params"])]
        for i, (p, q) in enumerate(params):
            if not torch.equal(local_tensor(p), local_tensor(q)):
                wrong.append(f"param {i}")
            mine, theirs = opt.state[p], fresh_opt.state[q]
            if mine.keys() != theirs.keys():
                wrong.append(f"param {i}: state keys {sorted(mine)} vs {sorted(theirs)}")
                continue
            for key, value in mine.items():
                a, b = local_tensor(torch.as_tensor(value)), local_tensor(torch.as_tensor(theirs[key]))
                if a.dtype != b.dtype or not torch.equal(a, b):
                    wrong.append(f"param {i}: {key}")
        return wrong

    return check


def run(rank, world, rendezvous, out_dir, data_seed, optimizer="adam", capacity=4):
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        net = shard(build(capacity), world)
        held = net[0].lora_A.to_local().shape[0]  # torch.chunk's layout: uneven for capacity 5
        assert fsdp.is_sharded(net[0].lora_A) and held == len(torch.arange(capacity).chunk(world)[rank])
        storage = {n: (id(p), p.to_local().data_ptr()) for n, p in net.named_parameters()}
        torch.manual_seed(1000 + rank)  # the global RNG differs per process on purpose
        shards = [step[rank] for step in batches(data_seed, world)]
        round_trip = checkpoint_round_trip(out_dir, world, capacity) if optimizer == "lorambo_adamw" else None
        result = procedure(net, shards, out_dir, optimizer=optimizer, after_training=round_trip)
        result["same_storage"] = all(
            (id(p), p.to_local().data_ptr()) == storage[n] for n, p in net.named_parameters() if n in storage)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)


def run_meta_init(rank, world, rendezvous, out_dir):
    """Meta-device construction, fully_shard, to_empty, then the reset_parameters pass (seeded for
    the pools); records the full pools and what a direct rank edit of a sharded layer says."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        with torch.device("meta"):
            net = build_plain()
        lorambo.configure_model(net, {"0": 2, "2": 3}, capacity={"0": 5, "2": 4})
        net = shard(net, world)
        net.to_empty(device="cpu")
        for name, module in net.named_modules():
            if isinstance(module, lorambo.LoRAMBoLinear):
                module.reset_parameters(generator=torch.Generator().manual_seed(len(name)))
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
        pools = {f"{n}.{p}": getattr(m, p).full_tensor() for n, m in lorambo.lora_layers(net).items()
                 for p in ("lora_A", "lora_B")}
        try:
            net[0].set_rank(3)
            refused = ""
        except RuntimeError as err:
            refused = str(err)
        torch.save({"pools": pools, "refused": refused}, f"{out_dir}/meta{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)


def stale_state_warnings(net) -> list[bool]:
    """After one step of a torch AdamW: whether a StaleOptimizerStateWarning came from a rank
    change without that optimizer (its state is left at the old slots), then from one given it."""
    import warnings

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    net(x).square().mean().backward()
    opt.step()
    layers = lorambo.lora_layers(net)
    seen = []
    for change in (lambda: fsdp.set_rank(layers["0"], 3, generator=decision_generator(1)),
                   lambda: fsdp.set_rank(layers["2"], 3, opt, generator=decision_generator(2))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            change()
        seen.append(any(isinstance(w.message, lorambo.nn.StaleOptimizerStateWarning) for w in caught))
    return seen


def run_stale_warning(rank, world, rendezvous, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, rendezvous)
    try:
        result = stale_state_warnings(shard(build(), world))
        torch.save(result, f"{out_dir}/stale{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)
