"""A save that fails on the writing process of an FSDP2 model raises on every process; the
others used to wait forever in the barrier that ends the call."""

from pathlib import Path

import pytest
import torch

from gloo_workers import run_two_processes

pytest.importorskip("torch.distributed.fsdp")
WORKER = Path(__file__).with_name("fsdp2_save_failure_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_a_failed_write_is_raised_on_every_process(tmp_path):
    writer, other = run_two_processes(WORKER, tmp_path, timeout=40)
    assert writer["blocked"][0] == "error" and writer["blocked"][1] != "RuntimeError", writer["blocked"]
    assert other["blocked"][:2] == ("error", "RuntimeError"), other["blocked"]
    assert other["blocked"][2].startswith(f"save_adapter failed on another process (process 0: {writer['blocked'][1]}")
    assert writer["retry"] == other["retry"] == ("ok", None)   # both went on in step
    assert (tmp_path / "adapter").is_dir()
