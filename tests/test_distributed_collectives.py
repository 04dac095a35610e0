"""lorambo.distributed: the name of each collective says whether it writes into its argument.

A one-process gloo group makes the collectives run for real (is_distributed() is True), so the
in-place / untouched contract is checked on the code path a DDP job takes.
"""

import pytest
import torch
import torch.distributed as dist

from lorambo import distributed


@pytest.fixture
def one_process_group(tmp_path):
    if not dist.is_available():
        pytest.fail("torch.distributed is unavailable: lorambo.distributed cannot be tested")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_trailing_underscore_writes_into_the_argument(one_process_group):
    assert distributed.is_distributed() and distributed.world_size() == 1
    t = torch.arange(6.0).view(2, 3)
    assert distributed.all_reduce_sum_(t) is t
    assert torch.equal(t, torch.arange(6.0).view(2, 3))           # the sum over one process
    column = torch.arange(6.0).view(2, 3)[:, 1]                   # not contiguous: a copy travels
    assert distributed.all_reduce_sum_(column) is column
    assert distributed.broadcast_(t) is t


def test_all_reduced_leaves_the_argument_alone(one_process_group):
    t = torch.arange(4.0)
    total = distributed.all_reduced_sum(t)
    mean = distributed.all_reduced_mean(t)
    assert total is not t and mean is not t
    total.add_(100.0)
    assert torch.equal(t, torch.arange(4.0)) and torch.equal(mean, torch.arange(4.0))
    many = [torch.ones(3), torch.zeros(2, 2, dtype=torch.float64), torch.full((1,), 5.0)]
    sums = distributed.all_reduced_sums(many)
    assert [s.shape for s in sums] == [m.shape for m in many]
    assert [s.dtype for s in sums] == [m.dtype for m in many]
    assert all(torch.equal(s, m) and s is not m for s, m in zip(sums, many))


def test_without_a_process_group_every_collective_is_the_identity():
    assert not distributed.is_distributed() and distributed.is_main_process()
    t = torch.randn(3, generator=torch.Generator().manual_seed(0))
    assert distributed.all_reduce_sum_(t) is t and distributed.all_reduced_sum(t) is t
    assert distributed.all_reduced_mean(t) is t and distributed.broadcast_(t) is t
    assert distributed.all_reduced_sums([t])[0] is t
    distributed.check_identical({"anything": 1})                   # nothing to compare against


def test_decision_generator_depends_only_on_its_keys():
    draw = lambda *keys: torch.rand(4, generator=distributed.decision_generator(*keys))  # noqa: E731
    assert torch.equal(draw(7, "grow", 3), draw(7, "grow", 3))
    assert not torch.equal(draw(7, "grow", 3), draw(7, "grow", 4))


@pytest.mark.parametrize("group", [False, True])
def test_a_failure_propagates_at_once_without_other_processes(tmp_path, group):
    """SharedFailure holds an exception back only for other processes to see it; alone (no group,
    or a group of one) it propagates as without it, and an empty batch list stays an error."""
    from lorambo.sensitivity.inputs import as_batch_list

    if group:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        failure = distributed.SharedFailure("test")
        with pytest.raises(ValueError, match="on purpose"):
            with failure:
                raise ValueError("on purpose")
        assert failure.error is None
        failure.check()
        failure.raise_if_any(failure.status().tolist())
        with pytest.raises(ValueError, match="no batches"):
            as_batch_list([], "test")
    finally:
        if group:
            dist.destroy_process_group()
