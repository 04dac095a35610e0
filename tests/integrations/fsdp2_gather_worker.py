"""Worker for test_fsdp2_gather.py: python fsdp2_gather_worker.py RANK WORLD STORE_FILE OUT_FILE.

The process group's timeout is short (PG_TIMEOUT_S): a process left waiting in a collective
fails in seconds, and the test's own deadline catches what hangs longer.

First (saved under "equal"): lorambo.dtensor_gather against DTensor.full_tensor() on fresh random
data, float32 and bfloat16: DTensors of every supported placement on 1-D and 2-D meshes (uneven
and empty pieces included), then the values, gradients and Adam state full_pools swaps in for an
FSDP2 model whose pools split 3/2, and the shards after it.

Then: on an FSDP2 model trained one step, process 1 runs out of memory (simulated) for the
first, the fourth or the last tensor set_rank gathers; saved per case: the outcome, which
allocation failed, and the full state after it; then an edit both processes make; then
unloaded_state_dict, failing on process 1 and then on neither.
"""

import contextlib
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorambo
from lorambo.distributed import decision_generator
from lorambo.integrations import fsdp
from lorambo.dtensor_gather import prepare_gather
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gloo_workers import attempt  # noqa: E402  tests/ is on the PYTHONPATH run_two_processes gives
from rendezvous import exit_skipping_teardown  # noqa: E402

PG_TIMEOUT_S = 20
# (mesh shape, placements, tensor shape): every placement full_pools takes, uneven (3/2, 2/1)
# and empty pieces (1 row over 2 processes: 1/0) included
CASES = [((2,), ("S0",), (5, 3)), ((2,), ("S0",), (4, 3)), ((2,), ("S0",), (1, 3)), ((2,), ("S0",), (0, 3)),
         ((2,), ("S1",), (3, 5)), ((2,), ("S1",), (2, 3, 5)), ((2,), ("R",), (4, 3)),
         ((1, 2), ("R", "S0"), (5, 4)), ((2, 1), ("S0", "R"), (5, 4)),
         ((2, 1), ("S1", "S0"), (5, 7)), ((1, 2), ("S1", "S0"), (5, 7)), ((1, 2), ("S0", "S1"), (3, 5))]


def placements(names):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if n == "R" else Shard(int(n[1:])) for n in names]


def model(dtype, world):
    """A small FSDP2-sharded model: pools of capacity 5 (lora_A rows split 3/2), head rows 2/1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12, dtype=dtype), nn.Tanh(), nn.Linear(12, 12, dtype=dtype), nn.Tanh(),
                        nn.Linear(12, 3, dtype=dtype))
    lorambo.configure_model(net, {"0": 2, "2": 3}, capacity={"0": 5, "2": 5}, modules_to_save=["4"])
    mesh = init_device_mesh("cpu", (world,))
    for i in (0, 2):
        fully_shard(net[i], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def train_one_step(net, opt, rank, dtype):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3 + rank), dtype=dtype)  # data per process
    ((net(x) - 1.0) ** 2).mean().backward()
    opt.step()  # gradients stay: the gathers take them too


def equal(rank, world):
    """Gathered DTensors with the source and full_tensor(); what full_pools swaps in with what
    full_tensor() gives before it; the shards after it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    result = {"dtensors": [], "pools": []}
    g = torch.Generator().manual_seed(20)  # the same source tensor on both processes
    meshes = {shape: init_device_mesh("cpu", shape) for shape in sorted({m for m, _, _ in CASES})}
    for dtype in (torch.float32, torch.bfloat16):
        for mesh_shape, names, shape in CASES:
            source = torch.randn(shape, generator=g).to(dtype)
            dt = distribute_tensor(source, meshes[mesh_shape], placements(names))
            gathered = prepare_gather(dt, "test").run()
            aliased = bool(source.numel()) and gathered.data_ptr() == dt.to_local().data_ptr()
            result["dtensors"].append(((mesh_shape, names, shape, dtype), source, gathered, dt.full_tensor(),
                                       gathered.is_contiguous(), aliased))
        net = model(dtype, world)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05)
        train_one_step(net, opt, rank, dtype)
        layers = list(lorambo.lora_layers(net).values())
        head = net[4]  # modules_to_save: trained, rows split 2/1
        sharded = [(layer, name) for layer in layers for name in ("lora_A", "lora_B")] + \
                  [(layer.base_layer, "weight") for layer in layers] + \
                  [(sub, name) for sub in head.modules() for name, p in sub._parameters.items() if p is not None]
        want = [(p.full_tensor(), p.grad.full_tensor() if p.grad is not None else None,
                 {k: v.full_tensor() for k, v in opt.state[p].items() if fsdp.is_sharded(v)}, p.to_local().clone())
                for p in (module._parameters[name] for module, name in sharded)]
        with fsdp.full_pools(layers, opt, base_weights=True, extra_modules=[head]) as view:
            got = [(p.detach().clone(), p.grad.clone() if p.grad is not None else None,
                    {k: view.state[p][k].clone() for k in w[2]}, fsdp.is_sharded(p))
                   for (module, name), w in zip(sharded, want) for p in [module._parameters[name]]]
        after = [module._parameters[name].to_local().clone() for module, name in sharded]
        result["pools"].append((dtype, [n + (".trained" if m._parameters[n].requires_grad else "")
                                        for m, n in sharded], want, got, after))
    partial = DTensor.from_local(torch.randn(4, 3, generator=g), meshes[(world,)], [Partial()])
    result["partial"] = attempt(lambda: prepare_gather(partial, "test_caller"))
    return result


def full_state(net, opt):
    """Ranks and every parameter, gradient and optimizer state tensor in full."""
    full = lambda t: t.full_tensor() if fsdp.is_sharded(t) else torch.as_tensor(t).clone()  # noqa: E731
    return {"ranks": {n: m.rank for n, m in lorambo.lora_layers(net).items()},
            "params": {n: full(p) for n, p in net.named_parameters()},
            "grads": {n: full(p.grad) for n, p in net.named_parameters() if p.grad is not None},
            "opt": {n: {k: full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()
                    if p in opt.state}}


class AllocationFails(TorchDispatchMode):
    """Simulated out of memory at the (``skip`` + 1)-th allocation of ``least`` elements or more:
    a factory op, or the output DTensor.full_tensor's functional all-gather allocates inside
    the collective (what lorambo did before it allocated the outputs itself)."""

    FACTORIES = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
                 "aten::zeros", "aten::new_zeros", "aten::full", "aten::new_full"}

    def __init__(self, least, skip):
        super().__init__()
        self.least, self.skip, self.fired = least, skip, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, numel = func._schema.name, None
        if name == "_c10d_functional::all_gather_into_tensor":
            numel = args[0].numel() * args[1]
        elif name in self.FACTORIES:
            size = args[1] if name.startswith("aten::new_") else args[0]
            numel = torch.Size(size).numel()
        if self.fired is None and numel is not None and numel >= self.least:
            if self.skip == 0:
                self.fired = (name, numel)
                raise torch.OutOfMemoryError(f"simulated: out of memory allocating {numel} elements ({name})")
            self.skip -= 1
        return func(*args, **kwargs)


def oom(rank, world):
    net = model(torch.float64, world)
    layers = lorambo.lora_layers(net)
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    train_one_step(net, opt, rank, torch.float64)
    result = {"before": full_state(net, opt)}
    # set_rank on layer "2" gathers lora_A [5, 12] and lora_B [12, 5], each with its gradient and
    # two Adam moments: 8 gathers of 60 elements or more (lora_A's in 2 padded pieces of 3 rows:
    # 72); no allocation before or between them is that large (a shard: 36 at most)
    for skip in (0, 3, 7):
        mode = AllocationFails(least=60, skip=skip)

        def edit():
            if rank != 1:
                return fsdp.set_rank(layers["2"], 4, opt, generator=decision_generator(2, skip))
            with mode:
                return fsdp.set_rank(layers["2"], 4, opt, generator=decision_generator(2, skip))

        result[f"skip{skip}"] = attempt(edit)
        result[f"skip{skip}_fired"] = mode.fired
        result[f"skip{skip}_state"] = full_state(net, opt)
    result["works"] = attempt(lambda: fsdp.set_rank(layers["2"], 4, opt, generator=decision_generator(2, 9)))
    result["works_state"] = full_state(net, opt)
    # unloaded_state_dict gathers the whole model (base weights of 72 and 144 elements too)
    mode = AllocationFails(least=60, skip=2)
    with mode if rank == 1 else contextlib.nullcontext():
        result["unloaded_failed"] = attempt(lambda: sorted(fsdp.unloaded_state_dict(net)))
    result["unloaded_fired"] = mode.fired
    result["unloaded"] = attempt(lambda: fsdp.unloaded_state_dict(net))
    # AdaLoRAImportance.update gathers every pool and gradient: out of memory for one of them
    importance = AdaLoRAImportance(net)
    mode = AllocationFails(least=60, skip=1)
    with mode if rank == 1 else contextlib.nullcontext():
        result["importance_failed"] = attempt(importance.update)
    result["importance_fired"] = mode.fired
    result["importance_calls"] = importance._calls
    result["importance_works"] = attempt(lambda: bool(importance.update()))
    result["importance_scores"] = attempt(importance.component_scores)
    return result


def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    result = {"equal": equal(rank, world)}
    result.update(oom(rank, world))
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
