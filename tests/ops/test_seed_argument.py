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


def keep_mask(backend, x2, p, seed):
    """Which elements of x2 [M, K] the backend's public mask function keeps."""
    if backend == "torch":
        from lorambo.ops.lora_linear_ref import dropout_mask

        return dropout_mask(x2, p, seed) > 0
    if backend == "ext":
        from lorambo.ops.ext_linear import dropout_mask_ext

        return dropout_mask_ext(x2, p, seed) > 0
    from lorambo_kernels import dropout_keep_mask

    return dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, x2.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [7, 2**32 - 1])
def test_seeds_that_differ_only_in_the_high_bits_draw_independent_masks(backend, low):
    """The reference op seeded torch's CPU generator, which keeps the low 32 bits of a seed: seeds
    7, 7 + 2**32 and 7 + 2**62 gave one mask (and one output), where the Triton and extension
    masks read all the bits. Every mask keeps a fraction 1 - p of the elements, and two seeds'
    masks agree on a fraction p**2 + (1 - p)**2 of them, as independent Bernoulli draws do."""
    p, x2 = 0.3, torch.empty(150, 200)
    swapped = [9 + ((low % 2**31) << 32), (low % 2**31) + (9 << 32)]  # the two halves exchanged
    seeds = [low, low + 2**32, low + 2**62, *swapped]
    masks = [keep_mask(backend, x2, p, s) for s in seeds]
    sd = (p * (1 - p) / x2.numel()) ** 0.5
    agree = p**2 + (1 - p)**2
    for i, a in enumerate(masks):
        assert abs(a.double().mean().item() - (1 - p)) < 6 * sd
        for b in masks[i + 1:]:
            assert abs((a == b).double().mean().item() - agree) < 6 * (agree * (1 - agree) / x2.numel()) ** 0.5
    # the op drops what its mask drops: its output differs with the high bits
    args = inputs()
    y = [op_for(backend)(*args, 2, 1.0, p, s) for s in seeds[:2]]
    assert not torch.equal(y[0], y[1])


MASK_FUNCTIONS = {"torch": "dropout_mask", "ext": "dropout_mask_ext"}


@pytest.mark.parametrize("backend", BACKENDS[:2])  # the Triton one is lorambo_kernels' own (not checked here)
@pytest.mark.parametrize("seed", [3.5, True, "3", -1, 2**63, torch.tensor(3.0)], ids=repr)
def test_the_public_mask_functions_refuse_a_seed_their_op_refuses(backend, seed):
    """The mask must be the one the op draws for that seed: int(3.5) gave seed 3's mask, silently."""
    x2 = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=rf"^{MASK_FUNCTIONS[backend]}: .*seed must be .*got "):
        keep_mask(backend, x2, 0.5, seed)
    # the seeds the op takes give the op's mask
    assert torch.equal(keep_mask(backend, x2, 0.5, torch.tensor(3)), keep_mask(backend, x2, 0.5, 3))
