"""Worker for test_growth_tail_fault_ddp.py: python ddp_growth_tail_fault_worker.py STEP RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes take an online decision in which process 1 alone runs out of memory in a
local step of the first growth after the growth's one collective (the activation ratio's
all-reduce): STEP "ratio", the ratio computed from the reduced sums; "copy", the last one, the
copy of the aligned directions into the new rows of A. Saved per process: the outcome (error
type, message and notes), every layer's rank, pools, gradients and optimizer state before and
after it, a retried decision at the next step, and the same decision taken by an uninterrupted
run (a fresh model, never failed). The test times out if a process hangs.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lorambo
from lorambo.allocation import online
from lorambo.allocation.online import OnlineGrowth
from lorambo.distributed import SharedFailure

from gloo_workers import attempt  # tests/ is on the PYTHONPATH run_two_processes gives

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

DT = torch.float64
INJECTED = "CUDA out of memory. Tried to allocate 20.00 MiB (injected)"


def _model():
    torch.manual_seed(0)  # the same model everywhere
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 8, dtype=DT), nn.Tanh(),
                        nn.Linear(8, 3, dtype=DT))
    layers = lorambo.lora_layers(lorambo.configure_model(net, 1, capacity={"0": 5, "2": 5, "4": 3}))
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)  # one step on the same data everywhere
    ((net(torch.randn(8, 6, generator=g, dtype=DT)) - 1.0) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    return net, layers, opt


def _snapshot(net, layers, opt):
    """Ranks, pools, gradients and optimizer state, copied."""
    return {"pools": {n: (m.rank, m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers.items()},
            "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
            "state": {n: {k: torch.as_tensor(v).clone() for k, v in opt.state[p].items()}
                      for n, p in net.named_parameters() if p in opt.state}}


def _decide(net, layers, opt, rank, step, before=None):
    """One decision from this process's batch of ``step``, with the gradients averaged over the
    processes as DDP leaves them; ("ok", records) or ("error", type, message, notes). ``before``:
    a dict that receives the state the decision starts from."""
    grower = OnlineGrowth(layers, budget=10**6, sketch_rank=2, power_iters=1, seed=5)
    g = torch.Generator().manual_seed(100 * step + rank)  # each process its own data
    x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)
    net.zero_grad()
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    for p in net.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    if before is not None:
        before.update(_snapshot(net, layers, opt))
    notes = []

    def update():
        try:
            return grower.update(step, opt)
        except Exception as err:
            notes.extend(getattr(err, "__notes__", []))
            raise

    outcome = attempt(update)
    return outcome if outcome[0] == "ok" else (*outcome, notes)


def _fails_after_the_collective(rank, step):
    """On process 1, the first call of the ``Tensor`` method ``step`` names (``sqrt``: the ratio
    from the reduced sums; ``copy_``: the rows' copy) after the first activation ratio's
    all-reduce runs out of memory. Returns a function that undoes this and says whether it did."""
    method = {"ratio": "sqrt", "copy": "copy_"}[step]
    real_mean, real_method, armed, fired = SharedFailure.mean, getattr(torch.Tensor, method), [], []

    def failing(self, *args, **kwargs):
        if armed:
            armed.clear()
            fired.append(1)
            raise torch.OutOfMemoryError(INJECTED)
        return real_method(self, *args, **kwargs)

    def mean(self, *args, **kwargs):
        out = real_mean(self, *args, **kwargs)
        if rank == 1 and not fired and sys._getframe(1).f_code.co_filename == online.__file__:
            armed.append(1)
        return out

    SharedFailure.mean = mean
    setattr(torch.Tensor, method, failing)

    def restore():
        SharedFailure.mean = real_mean
        setattr(torch.Tensor, method, real_method)
        return bool(fired)

    return restore


def main(step, rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net, layers, opt = _model()
    restore = _fails_after_the_collective(rank, step)
    held = {}
    try:
        outcome = _decide(net, layers, opt, rank, 0, held)
    finally:
        injected = restore()
    result = {"injected": injected, "outcome": outcome, "before": held, "after": _snapshot(net, layers, opt)}
    result["retry"] = _decide(net, layers, opt, rank, 1)
    result["retried"] = _snapshot(net, layers, opt)
    net, layers, opt = _model()  # the uninterrupted run: the decision at step 1, no failed one before
    result["reference"] = _decide(net, layers, opt, rank, 1)
    result["uninterrupted"] = _snapshot(net, layers, opt)
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
