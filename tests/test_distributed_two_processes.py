"""lorambo.distributed between two gloo processes (tests/collectives_worker.py): every collective
and every SharedFailure path, against closed forms (process r holds (r + 1) times the common
values, so sums are 3x, means 1.5x and broadcasts from process 1 are 2x)."""

from pathlib import Path

import pytest
import torch

import collectives_worker
from gloo_workers import run_two_processes

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Each process's outcomes (one run of the worker for the tests of this file)."""
    return run_two_processes(Path(__file__).with_name("collectives_worker.py"), tmp_path_factory.mktemp("collectives"),
                             timeout=60)


def test_two_processes_sum_average_and_broadcast_into_non_contiguous_arguments(two_processes):
    """Process r holds (r + 1) * base: sums are 3 * base, means 1.5 * base, broadcasts from
    process 1 are 2 * base, on strided views written back into the tensors they view."""
    base = collectives_worker.base()
    for rank, got in enumerate(two_processes):
        own = base * (rank + 1)
        want = own.clone()
        want[:, 2] = 3 * base[:, 2]
        assert got["sum_in_place_is_arg"] and torch.equal(got["sum_in_place"], want)
        torch.testing.assert_close(got["summed"], 3 * base[:, 1], rtol=0, atol=1e-15)
        torch.testing.assert_close(got["mean"], 1.5 * base[:, 1], rtol=0, atol=1e-15)
        assert got["untouched"]
        want = own.clone()
        want[:, 3] = 2 * base[:, 3]
        assert got["broadcast_is_arg"] and torch.equal(got["broadcast"], want)


def test_two_processes_sum_many_tensors_packed_in_buckets(two_processes):
    """Buckets of 7 elements (patched): as few collectives as fit, every tensor its own 3 * value,
    shape and dtype, across bucket boundaries and dtype groups, the inputs untouched."""
    base = collectives_worker.base()
    want = [base[0], base[1, :3], base[2, :4].float(), base[3, :1].reshape(1, 1), base[3, 1:4].float(),
            base[0, 3:5].float(), base[1:3, 4].float()]
    for got in two_processes:
        assert got["sums_untouched"]
        # one collective per bucket, filled up to 7 elements: float64 [5] [3, 1], float32 [4, 3] [2, 2]
        assert got["sums_collectives"] == [5, 4, 7, 4]
        assert [s.shape for s in got["sums"]] == [w.shape for w in want]
        assert [s.dtype for s in got["sums"]] == [w.dtype for w in want]
        for s, w in zip(got["sums"], want):
            torch.testing.assert_close(s, 3 * w)


def test_two_processes_that_disagree_are_told_so_on_both(two_processes):
    for got in two_processes:
        assert got["identical"] == ("ok", None)
        assert got["not_identical"][:2] == ("error", "RuntimeError")
        assert "DDP processes took different ranks" in got["not_identical"][2]


def test_shared_failure_collectives_carry_the_values(two_processes):
    """The values of each SharedFailure collective when no process failed and the settings agree:
    sums, process 0's values, means."""
    flat = collectives_worker.base().reshape(-1)[:6]
    for got in two_processes:
        assert got["sum_and_check"] == ("ok", [3.0, 6.0])
        assert got["broadcast_and_check"] == ("ok", [1.5, -2.0])
        assert got["check"] == ("ok", None)
        assert got["failure_mean"][0] == "ok" and torch.equal(got["failure_mean"][1], 1.5 * flat)
        assert got["failure_broadcast"][0] == "ok" and torch.equal(got["failure_broadcast"][1], flat)


def test_settings_that_differ_are_a_value_error_naming_them_on_both(two_processes):
    for got in two_processes:
        for key in ("differ_sum", "differ_check"):
            assert got[key][:2] == ("error", "ValueError"), got[key]
            assert got[key][2] == ("differ: the processes passed different settings (seed: process 0 5, process 1 6; "
                                   "only_here: process 0 None, process 1 1); every process must pass the same")
        assert got["differ_list"][:2] == ("error", "ValueError")
        assert "(process 0 [1, 0], process 1 [1, 1])" in got["differ_list"][2]


@pytest.mark.parametrize("name", ["failed_sum", "failed_check", "failed_mean", "failed_broadcast"])
def test_an_error_on_process_1_is_raised_by_every_collective_on_both(two_processes, name):
    """Process 1 raises its own error, process 0 a RuntimeError naming process 1 and the error."""
    first, second = two_processes
    assert not first[f"{name}_held"] and second[f"{name}_held"]
    assert second[name] == ("error", "KeyError", "'only on process 1'")
    assert first[name][:2] == ("error", "RuntimeError")
    assert first[name][2].startswith(f"{name} failed on another process (process 1: KeyError: 'only on process 1'); "
                                     "process 0 stops too")


def test_run_skips_every_step_after_a_failure_and_the_next_collective_raises(two_processes):
    first, second = two_processes
    assert first["run"] == (11, 11, None, [10, 11], False)  # a None argument skips the step
    assert second["run"] == (None, None, None, [10], True)  # failed: later steps skipped
    assert first["run_mean"][:2] == ("error", "RuntimeError") and "process 1: ZeroDivisionError" in first["run_mean"][2]
    assert second["run_mean"][:2] == ("error", "ZeroDivisionError")
