"""Worker for test_distributed_uneven.py: python uneven_worker.py SPLIT RANK WORLD STORE_FILE OUT_FILE.

SPLIT gives each process's batches: "3,1" hands the first 3 of the 4 batches to process 0 and
the last to process 1; "4,0" leaves process 1 without batches; "0,0" leaves both without; "bad"
gives process 1 one batch whose loss_fn raises (a validation error on one process only);
"settings" splits the batches 2,2 and runs MISMATCHED, each estimator with a setting that
differs between the processes; "refused" splits them 2,2 and runs REFUSED, ablation_scores on a
model that process 1 alone refuses (a merged layer, the adapters disabled), then again on both
models as they were.
Every estimator runs in turn and its result or error (type, message) is saved, so a process that
raised cannot hide that the other one hung: the test times out instead. ``compute(*setup())``
without torch.distributed is the single-process reference on all batches.
"""

import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity import FisherProxy, data_covariance, gradient_sensitivity, hessian_opnorm, hessian_trace
from lorambo.sensitivity.ablation import ablation_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

DT = torch.float64
BAD = "bad"


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 3, dtype=DT))
    model = lorambo.configure_model(net, {"0": 2, "2": 2})
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :layer.rank].normal_()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT))
               for n in (5, 3, 6, 4)]
    return model, batches


def shard(batches, split, rank):
    if split in ("settings", "refused"):
        return batches[2 * rank:2 * rank + 2]
    if split == BAD:
        return batches[:2] if rank == 0 else [BAD]
    sizes = [int(n) for n in split.split(",")]
    start = sum(sizes[:rank])
    return batches[start:start + sizes[rank]]


def loss_fn(model, batch):
    if isinstance(batch, str):
        raise ValueError(f"loss_fn: batch {batch!r} is not a pair of tensors")
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def fisher(model, batches, **settings):
    with FisherProxy(model, **settings) as proxy:
        for batch in batches:
            loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return {n: (e.value, e.stderr, e.num_probes) for n, e in proxy.estimates().items()}


ESTIMATORS = {
    "hutchinson": lambda m, b: {n: (e.value, e.stderr) for n, e in
                                hessian_trace(m, loss_fn, b, num_probes=6, probes_per_pass=3).items()},
    "opnorm": lambda m, b: {n: e.value for n, e in hessian_opnorm(m, loss_fn, b, num_iters=4).items()},
    "gradient": lambda m, b: gradient_sensitivity(m, loss_fn, b),
    "data": lambda m, b: data_covariance(m, loss_fn, b),
    "ablation": lambda m, b: {n: a.score for n, a in ablation_scores(m, loss_fn, b).items()},
    "allocator": lambda m, b: LoRAMBoOptimizer(m, 200, sensitivity_method="gradient").compute_sensitivities(b, loss_fn),
    "fisher": fisher,  # last: with the "bad" batch the training loop itself raises, so it is left out
}


# (estimator, the setting that differs): run(model, batches, rank)
MISMATCHED = {
    ("hutchinson", "seed"): lambda m, b, r: hessian_trace(m, loss_fn, b, num_probes=4, seed=r),
    ("hutchinson", "num_probes"): lambda m, b, r: hessian_trace(m, loss_fn, b, num_probes=4 + 4 * r,
                                                                probes_per_pass=4),
    ("opnorm", "num_iters"): lambda m, b, r: hessian_opnorm(m, loss_fn, b, num_iters=3 + r, tol=0.0),
    ("gradient", "targets"): lambda m, b, r: gradient_sensitivity(m, loss_fn, b, modules=["0", "2"][r]),
    ("ablation", "alone"): lambda m, b, r: ablation_scores(m, loss_fn, b, alone=bool(r)),
    ("fisher", "reduction"): lambda m, b, r: fisher(m, b, reduction=["mean", "sum"][r]),
}


@contextlib.contextmanager
def _merged(model):
    layer = lorambo.lora_layers(model)["2"]
    layer.merge()
    try:
        yield model
    finally:
        layer.unmerge()


def _ablation(model, batches, rank, altered=None):
    """ablation_scores' scores, with process 1's model inside ``altered`` (a context manager)."""
    with altered(model) if altered is not None and rank == 1 else contextlib.nullcontext(model):
        return {n: (a.removed, a.alone) for n, a in ablation_scores(model, loss_fn, batches).items()}


# ablation_scores refused by process 1 alone (run(model, batches, rank)), then run on both again
REFUSED = {
    "merged": lambda m, b, r: _ablation(m, b, r, _merged),
    "disabled": lambda m, b, r: _ablation(m, b, r, lorambo.disable_adapter),
    "again": lambda m, b, r: _ablation(m, b, r),
}


def compute(model, batches, estimators=None, rank=None):
    """{estimator: ("ok", result) or ("error", exception type name, message)}."""
    out = {}
    for name, run in (estimators or ESTIMATORS).items():
        if name == "fisher" and BAD in batches:
            continue
        try:
            out[name] = ("ok", run(model, batches) if rank is None else run(model, batches, rank))
        except Exception as err:  # noqa: BLE001 - the test compares errors across processes
            out[name] = ("error", type(err).__name__, str(err))
    return out


def main(split, rank, world, store, out):
    torch.set_num_threads(1)
    model, batches = setup()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if split in ("settings", "refused"):
        result = compute(model, shard(batches, split, rank), MISMATCHED if split == "settings" else REFUSED, rank)
    else:
        result = compute(model, shard(batches, split, rank))
    torch.distributed.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
