"""Worker for test_growth_sketch_ddp.py: one gloo DDP process taking online growth decisions
through the grouped sketch kernels (Triton interpreter on CPU), counting its collectives."""

import faulthandler
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
os.environ["LORAMBO_SKETCH"] = "triton"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import lorambo  # noqa: E402
from lorambo.allocation import benefits  # noqa: E402
from lorambo.allocation.online import OnlineGrowth  # noqa: E402
from lorambo.distributed import SharedFailure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402


def main(rank: int, world: int, store_path: str, out_path: str, data_seed: int) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hung worker says where (the test waits 240 s)
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        calls = []  # the power iteration's all-reduces (each carries the decision's failure flag)
        real = SharedFailure.mean

        def mean(self, tensor, *args):
            if sys._getframe(1).f_code.co_filename == benefits.__file__:
                calls.append(1)
            return real(self, tensor, *args)

        SharedFailure.mean = mean
        torch.manual_seed(0)  # same model everywhere
        net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))
        lorambo.configure_model(net, 1, capacity={"0": 4, "2": 4, "4": 3})
        layers = lorambo.lora_layers(net)
        torch.manual_seed(1000 + rank)  # the global RNG differs per process on purpose
        g = torch.Generator().manual_seed(data_seed + rank)  # each process its own data
        grower = OnlineGrowth(layers, budget=sum(m.in_features + m.out_features for m in layers.values()) * 3,
                              sketch_rank=2, power_iters=1, seed=5)
        model = DDP(net)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        records, per_decision = [], []
        for step in range(2):
            x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
            with grower.capture:
                ((model(x) - y) ** 2).mean().backward()
            before = len(calls)
            records += grower.update(step)
            per_decision.append(len(calls) - before)
            opt.step()
            opt.zero_grad()
        torch.save({"records": records, "per_decision": per_decision,
                    "state": {k: v.clone() for k, v in net.state_dict().items()}}, out_path)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_skipping_teardown()



if __name__ == "__main__":
    main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[1]))  # SEED RANK WORLD STORE OUT
