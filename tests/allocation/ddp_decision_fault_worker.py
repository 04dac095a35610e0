"""Worker for test_decision_faults_ddp.py: python ddp_decision_fault_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes take online decisions in which process 1 alone runs out of memory after the
decision's first collective: in a power-iteration product, in the SVD, in the second layer's
growth, in the components a rank move or an ALoRA round drops. The outcome of each decision (records, or the
error's type, message and notes), the ranks and the pools after it, and a retry are saved; the test
times out if a process hangs.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lorambo
from lorambo.allocation import alora, benefits, online
from lorambo.allocation.alora import alora_round
from lorambo.allocation.online import OnlineGrowth

from gloo_workers import attempt  # tests/ is on the PYTHONPATH run_two_processes gives

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

DT = torch.float64


def _failing_on_process_1(rank, owner, name, at_call):
    """Replace ``owner.name`` so that its call number ``at_call`` runs out of memory on process 1."""
    real, calls = getattr(owner, name), []

    def fails(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
        return real(*args, **kwargs)

    setattr(owner, name, fails)
    return lambda: setattr(owner, name, real)


FAULTS = {  # where process 1 runs out of memory: (owner, attribute, call number); ALoRA first, at rank 1
    "alora": (alora, "keep_components_many", 1),
    "product": (benefits.LayerProducts, "apply", 2),
    "svd": (torch.linalg, "svd", 1),
    "growth": (lorambo.LoRAMBoLinear, "set_rank", 2),
    "move": (online, "keep_components_many", 1),
}


def _model():
    torch.manual_seed(0)  # the same model everywhere
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 8, dtype=DT), nn.Tanh(),
                        nn.Linear(8, 3, dtype=DT))
    return net, lorambo.lora_layers(lorambo.configure_model(net, 1, capacity={"0": 5, "2": 5, "4": 3}))


def _stepped_optimizer(net):
    """A lorambo.optim.AdamW (per-slot step counts) after one step on the same data everywhere."""
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    ((net(torch.randn(8, 6, generator=g, dtype=DT)) - 1.0) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    return opt


def _state(net, opt):
    return {n: {k: torch.as_tensor(v).clone() for k, v in opt.state[p].items()}
            for n, p in net.named_parameters() if p in opt.state}


def _noting(fn, notes):
    """``fn``, appending the notes of what it raises to ``notes``."""
    def call():
        try:
            return fn()
        except Exception as err:
            notes.extend(getattr(err, "__notes__", []))
            raise
    return call


def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(10 + rank)  # each process its own data

    def decide(net, layers, step, case, opt, notes=None):
        notes = [] if notes is None else notes  # what the error raised carries
        scores = {n: torch.arange(m.rank, dtype=DT) for n, m in layers.items()}  # component 0 the least useful
        if case == "alora":
            return attempt(_noting(lambda: alora_round(net, layers, None, None, n_prune=1, scores=scores,
                                                       step=step, optimizer=opt), notes))
        moves = case == "move"
        # moves: the budget buys layer '0' two ranks (costs 16, 18, 11 at rank 1), then every
        # component may go to fund a third
        grower = OnlineGrowth(layers, budget=77 if moves else 10**6, sketch_rank=2, power_iters=1, seed=5,
                              move_threshold=1e9 if moves else None)
        x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)
        with grower.capture:
            ((net(x) - y) ** 2).mean().backward()
        net.zero_grad()
        return attempt(_noting(lambda: grower.update(step, opt, component_scores=scores if moves else None),
                               notes))

    result = {}
    for case, (owner, name, at_call) in FAULTS.items():
        net, layers = _model()  # each case on a model of its own, with room to grow
        opt = _stepped_optimizer(net)
        held = {n: (m.rank, m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers.items()}
        held_state = _state(net, opt)
        restore = _failing_on_process_1(rank, owner, name, at_call)
        notes = []
        try:
            outcome = decide(net, layers, 0, case, opt, notes)
        finally:
            restore()
        pools = {n: (m.rank, m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers.items()}
        result[case] = {"outcome": outcome, "notes": notes, "before": held, "pools": pools, "state_before": held_state,
                        "state": _state(net, opt), "retry": decide(net, layers, 1, case, opt)}
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
