"""Process-group setup for the 2-process gloo tests.

A file rendezvous, not TCP: a free port found by binding port 0 and closing it can be taken by
another process before init_process_group binds it (the tests flaked with parallel jobs).
"""

import torch.distributed as dist


def init_gloo(rank: int, world: int, rendezvous: str) -> None:
    """Join the gloo group whose rendezvous file is ``rendezvous`` (a fresh path per test)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
