"""Worker for test_growth_padding_ddp.py: one gloo process of two, each with its own half of the
MiniLM sentences, padded its own way (left to the longest on process 0, right to 16 tokens on
process 1), taking one online growth decision through ``opt.capture(0, batch)``."""

import faulthandler
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from minilm_batches import TEXTS, encode, load  # noqa: E402
from padded_growth import decide  # noqa: E402
from rendezvous import exit_skipping_teardown  # noqa: E402


def main(rank: int, world: int, store_path: str, out_path: str) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hung worker says where (the test waits 240 s)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model, tokenizer = load(torch.float64)
        if rank == 0:
            batch = encode(tokenizer, TEXTS[:2], "left")
        else:
            batch = encode(tokenizer, TEXTS[2:], "right", length=16)
        records, rows, _ = decide(model, [batch])
        torch.save({"records": records, "rows": rows}, out_path)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_skipping_teardown()


if __name__ == "__main__":
    rank, world, store_path, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    main(rank, world, store_path, out_path)
