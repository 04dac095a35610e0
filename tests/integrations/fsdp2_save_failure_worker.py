"""Worker for test_fsdp2_save_failure.py: python fsdp2_save_failure_worker.py RANK WORLD STORE_FILE OUT_FILE.

Two gloo processes save the adapter of an FSDP2-sharded model where process 0, the one that
writes, cannot (its path is an existing file); then save again where it can. The outcome of each
call (or the error's type and message) is saved; the test times out if a process hangs.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorambo.integrations import fsdp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_worker import build, shard  # noqa: E402
from rendezvous import exit_skipping_teardown  # noqa: E402
from gloo_workers import attempt  # noqa: E402  tests/ is on the PYTHONPATH run_two_processes gives



def main(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net = shard(build(), world)
    blocked = Path(out).with_name("blocked")
    blocked.write_text("a file where the adapter directory should go")
    result = {"blocked": attempt(lambda: fsdp.save_adapter(net, blocked)),
              "retry": attempt(lambda: fsdp.save_adapter(net, Path(out).with_name("adapter")) and None)}
    dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    exit_skipping_teardown()  # results are saved; see rendezvous.py for why not a normal exit
