"""Worker for test_fsdp2_edit_failure.py: python fsdp2_edit_failure_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes train an FSDP2-sharded model one step (lorambo.optim.AdamW: sharded moments,
per-slot step counts every process keeps whole), then make rank edits through
lorambo.integrations.fsdp that fail on process 1 only, each at another point of the call. Saved
per edit: its outcome (or the error's type and message) and the full model and optimizer state
after it; then the state after an edit that works on both. Last, AdaLoRAImportance.update (which
gathers every pool) fails on process 1 and is retried.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import lorambo
from lorambo.integrations import fsdp
from lorambo.distributed import decision_generator
from lorambo.nn.slot_lineage import slot_ids
from lorambo.sensitivity import adalora_importance
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_worker import DT, build, shard  # noqa: E402
from rendezvous import exit_skipping_teardown  # noqa: E402
from gloo_workers import attempt  # noqa: E402  tests/ is on the PYTHONPATH run_two_processes gives


def full_state(net, opt):
    """Ranks, slot ids, and every parameter, gradient and optimizer state tensor in full."""
    full = lambda t: t.full_tensor() if fsdp.is_sharded(t) else torch.as_tensor(t).clone()  # noqa: E731
    layers = lorambo.lora_layers(net)
    return {"ranks": {n: m.rank for n, m in layers.items()}, "ids": {n: slot_ids(m) for n, m in layers.items()},
            "params": {n: full(p) for n, p in net.named_parameters()},
            "grads": {n: full(p.grad) for n, p in net.named_parameters() if p.grad is not None},
            "opt": {n: {k: full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()
                    if p in opt.state}}


REAL_KEEP = fsdp.keep_components_many


def edit_then_fail(plans, optimizer):
    """keep_components_many that makes the edit, then runs out of memory (process 1 only)."""
    REAL_KEEP(plans, optimizer)
    raise torch.OutOfMemoryError("simulated: out of memory after the edit")


def fail_merge(exact=True):
    raise torch.OutOfMemoryError("simulated: out of memory in the merge")


def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net = shard(build(), world)
    layers = lorambo.lora_layers(net)
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    g = torch.Generator().manual_seed(3 + rank)  # different data per process
    for _ in range(2):
        fsdp.set_rank(layers["0"], layers["0"].rank + 1, opt, generator=decision_generator(1, layers["0"].rank))
        ((net(torch.randn(8, 6, generator=g, dtype=DT)) - 1.0) ** 2).mean().backward()
        opt.step()  # gradients stay: edits must keep them too
    result = {"before": full_state(net, opt)}

    def edits():
        # an argument only process 1 refuses, checked inside the edit (after the gathers)
        yield "bad_generator", lambda: fsdp.set_rank(layers["0"], 4, opt, generator=(
            decision_generator(2, 0) if rank == 0 else "seed"))
        # an argument only process 1 refuses, checked before the gathers
        yield "bad_optimizer", lambda: fsdp.set_rank(layers["0"], 1, opt if rank == 0 else "adamw")
        # a module that is no LoRA layer, on process 1 only: refused before the gathers
        yield "not_a_lora_layer", lambda: fsdp.set_rank(layers["0"] if rank == 0 else net[1], 1, opt)
        # valid arguments that differ: the processes would part
        yield "different_ranks", lambda: fsdp.set_rank(layers["2"], 2 + rank, opt, generator=decision_generator(2, 1))
        # out of memory on process 1 after its edit of the gathered pools
        yield "failed_after_edit", lambda: fsdp.keep_components([(layers["0"], [1, 0])], opt)
        # out of memory on process 1 in its second layer's merge (it unmerges the first again)
        yield "failed_merge", lambda: fsdp.merge(net)

    for name, edit in edits():
        if rank == 1 and name == "failed_after_edit":
            fsdp.keep_components_many = edit_then_fail
        if rank == 1 and name == "failed_merge":
            layers["2"].merge = fail_merge
        result[name] = attempt(edit)
        fsdp.keep_components_many = REAL_KEEP
        layers["2"].__dict__.pop("merge", None)
        result[name + "_merged"] = [m.merged for m in layers.values()]
        result[name + "_state"] = full_state(net, opt)
    # the same functions on an unsharded model (DDP's replicas): its pools are edited in place
    plain = build()
    plain_opt = lorambo.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    ((plain(torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=DT)) - 1.0) ** 2).mean().backward()
    plain_opt.step()
    result["unsharded_before"] = full_state(plain, plain_opt)
    result["unsharded_bad_generator"] = attempt(lambda: fsdp.set_rank(
        lorambo.lora_layers(plain)["0"], 3, plain_opt, generator=decision_generator(2, 0) if rank == 0 else "seed"))
    result["unsharded_bad_generator_state"] = full_state(plain, plain_opt)
    result["works"] = attempt(lambda: fsdp.set_rank(layers["2"], 3, opt, generator=decision_generator(2, 2)))
    result["works_state"] = full_state(net, opt)
    # AdaLoRAImportance.update gathers every pool: out of memory in process 1's second product
    importance = AdaLoRAImportance(net)
    importance.update()
    result["importance_before"] = importance.state_dict()
    real_sample, calls = adalora_importance._sample, []

    def sample_then_fail(value, grad):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated: out of memory in the importance product")
        return real_sample(value, grad)

    if rank == 1:
        adalora_importance._sample = sample_then_fail
    result["importance_failed"] = attempt(lambda: bool(importance.update()))
    adalora_importance._sample = real_sample
    result["importance_after_failure"] = importance.state_dict()
    result["importance_retry"] = attempt(lambda: bool(importance.update()))
    result["importance_after_retry"] = importance.state_dict()
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
