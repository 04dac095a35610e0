"""Every backend's LoRA op takes the dropout seed its docstring names (an int in [0, 2**63) or a
0-d int64 CPU tensor) and refuses any other with a ValueError naming the op and the value, rather
than truncating it (3.5 -> 3, True -> 1) or handing the generator another number."""

import pytest
import torch

from cpu_backends import BACKENDS, OPS, op_for


def inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen) for s in ((3, 4), (5, 4), (5,), (2, 4), (5, 2))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [3.5, 3.0, True, -1, 2**63, torch.tensor(3, dtype=torch.int32),
                                  torch.tensor([3]), torch.tensor(3.0)], ids=repr)
def test_bad_seed_is_refused(backend, seed):
    with pytest.raises(ValueError, match=rf"{OPS[backend]}: .*seed must be .*got "):
        op_for(backend)(*inputs(), 2, 1.0, 0.5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_range_ends_and_tensor_seed_are_taken(backend):
    op = op_for(backend)
    for seed in (0, 2**63 - 1):
        assert torch.equal(op(*inputs(), 2, 1.0, 0.5, seed), op(*inputs(), 2, 1.0, 0.5, torch.tensor(seed)))
