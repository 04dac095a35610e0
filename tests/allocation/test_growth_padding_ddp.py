"""Two gloo processes, each with its own half of the MiniLM sentences padded its own way, take
the decision one process takes on every sentence unpadded, one at a time: same layers and
ranks, same new rows of A, gains halved (DDP averages the gradient over the processes)."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes
from minilm_batches import TEXTS, encode, load
from padded_growth import assert_same_decision, decide

WORKER = Path(__file__).with_name("ddp_padding_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_growth_on_padded_shards_decides_as_one_unpadded_process(tmp_path):
    results = run_two_processes(WORKER, tmp_path, timeout=240)
    torch.set_num_threads(1)
    model, tokenizer = load(torch.float64)
    want = decide(model, [encode(tokenizer, [t]) for t in TEXTS], pass_batch=False)
    assert want[0]
    for got in results:
        records = [{**r, "gains": [2.0 * g for g in r["gains"]]} for r in got["records"]]
        assert_same_decision((records, got["rows"], None), want)
