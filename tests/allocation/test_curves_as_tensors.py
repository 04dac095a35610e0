"""Gain curves given as torch tensors of any float dtype (kept in a bfloat16 model's dtype)
allocate as the same values given as float64 arrays; numpy refused bfloat16
tensors saying they were "not a 1-D array of numbers"."""
import numpy as np
import pytest
import torch

from lorambo.allocation import allocate

DIMS = {"a": (6, 4), "b": (5, 5), "c": (3, 7)}


def curves(dtype):
    g = torch.Generator().manual_seed(0)
    spectra = {n: torch.sort(torch.rand(min(dk), generator=g) * 3, descending=True).values.to(dtype)
               for n, dk in DIMS.items()}
    benefits = {n: torch.sort(torch.rand(min(dk) + 1, generator=g) * 2, descending=True).values.to(dtype)
                for n, dk in DIMS.items()}
    return spectra, benefits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("exact", [False, True])
def test_tensor_curves_allocate_as_their_float64_values(dtype, exact):
    spectra, benefits = curves(dtype)
    as_arrays = [{n: np.array([float(v) for v in t]) for n, t in table.items()} for table in (spectra, benefits)]
    sens = {"a": 1.0, "b": 2.5, "c": 0.4}
    for budget in (20, 45, 80):
        got = allocate(DIMS, sens, budget, method="frobenius_greedy", spectra=spectra, exact=exact)
        assert got == allocate(DIMS, sens, budget, method="frobenius_greedy", spectra=as_arrays[0], exact=exact)
        got = allocate(DIMS, None, budget, method="knapsack", benefits=benefits, exact=exact)
        assert got == allocate(DIMS, None, budget, method="knapsack", benefits=as_arrays[1], exact=exact)
