"""Worker for test_distributed_collectives.py: python collectives_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes call every collective of lorambo.distributed on values that differ per
process (process r holds (r + 1) times the common values, so a sum is 3x, a mean 1.5x), on
non-contiguous arguments too, and every SharedFailure path; each outcome is saved for the test
to compare with the closed forms.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorambo import distributed
from lorambo.distributed import SharedFailure

from gloo_workers import attempt  # tests/ is on the PYTHONPATH run_two_processes gives

sys.path.insert(0, str(Path(__file__).resolve().parent / "integrations"))
from rendezvous import exit_skipping_teardown  # noqa: E402

DT = torch.float64


def base():
    """The values every process scales by (its rank + 1)."""
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=DT)


def collectives(rank):
    out = {}
    own = base() * (rank + 1)
    t = own.clone()
    column = t[:, 2]  # not contiguous: written back through a copy
    assert not column.is_contiguous()
    out["sum_in_place_is_arg"] = distributed.all_reduce_sum_(column) is column
    out["sum_in_place"] = t.clone()  # column 2 summed, the rest untouched
    t = own.clone()
    out["summed"] = distributed.all_reduced_sum(t[:, 1])
    out["mean"] = distributed.all_reduced_mean(t[:, 1])
    out["untouched"] = torch.equal(t, own)
    t = own.clone()
    row = t[:, 3]
    out["broadcast_is_arg"] = distributed.broadcast_(row, src=1) is row
    out["broadcast"] = t.clone()  # column 3 process 1's, the rest this process's own
    # two dtypes, packed into buckets of up to 7 elements: float64 5 | 3 + 1, float32 4 + 3 (exactly 7) | 2 + 2
    distributed._BUCKET_ELEMENTS = 7
    many = [own[0], own[1, :3], own[2, :4].float(), own[3, :1].reshape(1, 1), own[3, 1:4].float(),
            own[0, 3:5].float(), own[1:3, 4].float()]
    before = [m.clone() for m in many]
    calls, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda t, **kw: calls.append(t.numel()) or all_reduce(t, **kw)
    try:
        out["sums"] = distributed.all_reduced_sums(many)
    finally:
        dist.all_reduce = all_reduce
    out["sums_collectives"] = calls
    out["sums_untouched"] = all(torch.equal(a, b) for a, b in zip(many, before))
    out["identical"] = attempt(lambda: distributed.check_identical({"ranks": [1, 2]}))
    out["not_identical"] = attempt(lambda: distributed.check_identical({"ranks": [1, 2 + rank]}, "ranks"))
    return out


def shared_failures(rank):
    out = {}
    same = {"seed": 5, "targets": ["0", "2"]}
    failure = SharedFailure("same", settings=same)
    out["sum_and_check"] = attempt(lambda: failure.sum_and_check(torch.tensor([1.0, 2.0], dtype=DT) * (rank + 1)))
    out["broadcast_and_check"] = attempt(lambda: failure.broadcast_and_check(
        torch.tensor([1.5, -2.0], dtype=DT) * (rank + 1)))
    out["check"] = attempt(failure.check)
    out["failure_mean"] = attempt(lambda: failure.mean(own_flat(rank), 6, DT, "cpu"))
    out["failure_broadcast"] = attempt(lambda: failure.broadcast(own_flat(rank), 6, DT, "cpu"))

    differ = SharedFailure("differ", settings={"seed": 5 + rank, "targets": ["0", "2"], "only_here": rank or None})
    out["differ_sum"] = attempt(lambda: differ.sum_and_check(torch.ones(2, dtype=DT)))
    out["differ_check"] = attempt(differ.check)
    listed = SharedFailure("listed", settings=[1, rank])
    out["differ_list"] = attempt(listed.check)

    for name, collective in (("failed_sum", lambda f: f.sum_and_check(torch.ones(2, dtype=DT))),
                             ("failed_check", lambda f: f.check()),
                             ("failed_mean", lambda f: f.mean(None if rank else own_flat(rank), 6, DT, "cpu")),
                             ("failed_broadcast", lambda f: f.broadcast(None if rank else own_flat(rank), 6, DT,
                                                                        "cpu"))):
        failed = SharedFailure(name, settings=same)
        with failed:
            if rank == 1:
                raise KeyError("only on process 1")
        out[f"{name}_held"] = failed.error is not None
        out[name] = attempt(lambda: collective(failed))

    # run(): a step skipped after a failure, and after an argument that is None
    stepped = SharedFailure("run", settings=same)
    calls = []
    first = stepped.run(lambda x: calls.append(x) or (1 / 0 if rank == 1 else x + 1), 10)
    second = stepped.run(lambda x: calls.append(x) or x, first)
    third = stepped.run(lambda x, y: calls.append((x, y)) or x, 1, None)
    out["run"] = (first, second, third, calls, stepped.error is not None)
    out["run_mean"] = attempt(lambda: stepped.mean(first if first is None else torch.full((2,), float(first)),
                                                   2, DT, "cpu"))
    return out


def own_flat(rank):
    return base().reshape(-1)[:6] * (rank + 1)


def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save({**collectives(rank), **shared_failures(rank)}, out)
    finally:
        dist.destroy_process_group()
    exit_skipping_teardown()  # results saved: skip the teardown that can abort (see rendezvous.py)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
