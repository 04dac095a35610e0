"""Cost of a compiled LoRAMBoLinear at several ranks, from one graph (docs/backends.md, *torch.compile*).

    OMP_NUM_THREADS=1 python benchmarks/bench_compiled_rank_cost.py [aot_eager|inductor]

One 1024x1024 layer with a capacity-1024 pool, 512 rows of input, forward under
``torch.no_grad()``, eager and ``torch.compile(fullgraph=True)`` with the given backend
(default ``aot_eager``): milliseconds per call, the minimum of 5 calls after a warm-up, at ranks
0, 1, 8, 256 and 1024. The compiled layer reads its rank in the graph, so it keeps one graph
(printed last) while its time follows the rank as the eager layer's does.
"""

import sys
import time

import torch

from lorambo.nn.lora_linear import LoRAMBoLinear


def best_ms(fn, x, repeats=5):
    with torch.no_grad():
        fn(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(backend="aot_eager"):
    torch.manual_seed(0)
    layer = LoRAMBoLinear(torch.nn.Linear(1024, 1024), rank=8, capacity=1024).eval()
    x = torch.randn(512, 1024)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    for rank in (0, 1, 8, 256, 1024):
        layer.set_rank(rank)
        print(f"rank {rank:4d}: eager {best_ms(layer, x):7.2f} ms  compiled ({backend}) {best_ms(compiled, x):7.2f} ms")
    print("graphs:", torch._dynamo.utils.counters["stats"]["unique_graphs"])


if __name__ == "__main__":
    main(*sys.argv[1:])
