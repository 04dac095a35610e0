"""Worker for test_online_refusal_ddp.py: python ddp_refusal_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes take online decisions where one process alone refuses: first its
component_scores hold a NaN, then it captured no step; then the processes' growers have
different budgets; then an ALoRA round where process 1's scores lack a layer; then a rank move
from component_scores that differ between the processes. The outcome of each update (records, or
the error's type and message) is saved; the test times out if a process hangs.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lorambo
from lorambo.allocation.alora import alora_round
from lorambo.allocation.online import OnlineGrowth

from gloo_workers import attempt  # tests/ is on the PYTHONPATH run_two_processes gives

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

DT = torch.float64



def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same model everywhere
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    layers = lorambo.lora_layers(lorambo.configure_model(net, 2, capacity={"0": 4, "2": 3}))
    grower = OnlineGrowth(layers, budget=10**6, sketch_rank=2, power_iters=2, seed=5, move_threshold=0.0)
    g = torch.Generator().manual_seed(10 + rank)  # each process its own data
    x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    def scores():  # one per active slot: every slot as useful as any other
        return {n: torch.ones(m.rank, dtype=DT) for n, m in layers.items()}

    bad = dict(scores(), **{"0": torch.tensor([1.0, float("nan")], dtype=DT)}) if rank == 1 else scores()
    result = {"bad_scores": attempt(lambda: grower.update(0, component_scores=bad)),
              "kept": grower.capture.has_data()}
    result["retry"] = attempt(lambda: grower.update(0, component_scores=scores()))
    if rank == 0:  # process 1 captures no step this time
        with grower.capture:
            ((net(x) - y) ** 2).mean().backward()
    result["no_capture"] = attempt(lambda: grower.update(1, component_scores=scores()))
    result["ranks"] = {n: m.rank for n, m in layers.items()}
    other = OnlineGrowth(layers, budget=10**6 + rank, sketch_rank=2, power_iters=2, seed=5)
    with other.capture:
        ((net(x) - y) ** 2).mean().backward()
    result["budgets"] = attempt(lambda: other.update(2))
    result["ranks_after"] = {n: m.rank for n, m in layers.items()}
    given = scores() if rank == 0 else {"0": scores()["0"]}
    result["alora"] = attempt(lambda: alora_round(net, layers, None, None, n_prune=1, scores=given, step=3))
    result["alora_retry"] = attempt(lambda: alora_round(net, layers, None, None, n_prune=1, scores=scores(), step=3))
    # scores differ per process (they come from local gradients): both use process 0's, so both
    # shrink component 0 of layer "0" (costs 16 per rank) to grow "2" (13): no budget is left
    torch.manual_seed(1)
    net2 = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    fresh = lorambo.lora_layers(lorambo.configure_model(net2, 2, capacity={"0": 4, "2": 3}))
    mover = OnlineGrowth(fresh, budget=2 * 16 + 2 * 13, sketch_rank=2, power_iters=2, seed=5, move_threshold=0.0)
    with mover.capture:
        ((net2(x) - y) ** 2).mean().backward()
    local = {"0": torch.tensor([-1.0, 1.0] if rank == 0 else [1.0, -1.0], dtype=DT), "2": torch.ones(2, dtype=DT)}
    result["moves"] = attempt(lambda: mover.update(4, component_scores=local))
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
