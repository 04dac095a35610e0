"""Process-group setup and teardown for the 2-process gloo tests.

A file rendezvous, not TCP: a free port found by binding port 0 and closing it can be taken by
another process before init_process_group binds it (the tests flaked with parallel jobs).
"""

import os
import sys

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, rendezvous: str) -> None:
    """Join the gloo group whose rendezvous file is ``rendezvous`` (a fresh path per test)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def start_method() -> str:
    """How the tests start their worker processes.

    fork where torch is a CPU build: the workers inherit the imported modules, and spawned
    workers aborted at exit now and then ("terminate called without an active exception", 2 of
    4 runs of the FSDP2 tests on torch 2.13+cpu). spawn where torch has CUDA: there an earlier
    test's backward starts the autograd engine's device threads, after which a forked child's
    backward fails ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"; torch 2.11+cu130, the GPU image).
    """
    return "spawn" if torch.version.cuda else "fork"


def exit_skipping_teardown() -> None:
    """End a worker that has written its results: exit 0 without the interpreter's teardown.

    That teardown can fail a finished worker in two ways on torch 2.13+cpu:
    - freshly started (spawned or script) gloo workers abort at exit now and then ("terminate
      called without an active exception"; seen with the FSDP2 save-failure worker under load);
    - in a DDP worker, freeing the DDP wrapper after destroy_process_group drops the process
      group's last reference inside the Reducer's destructor, which joins gloo's worker threads
      while holding the GIL; a worker thread still freeing its last job's Python-owned tensors
      waits for the GIL: a deadlock (1 run in 180 under load; gdb: ~Reducer ->
      ~ProcessGroupGloo -> thread::join, against ~AsyncBroadcastWork -> take_gil on the gloo
      thread).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
