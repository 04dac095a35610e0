"""Every public launcher of lorambo_kernels that takes a Philox seed refuses what lorambo's ops
refuse (a float, a bool, a value outside [0, 2**63), a tensor that is no 0-d int64 CPU tensor)
with a ValueError naming the launcher and the value, before any launch; ``int(seed)`` truncated
1.7 to 1 and read True as 1. The seeds it takes draw the stream of the equal Python int. The
launchers with a dropout probability refuse one outside [0, 1) as lorambo's ops do."""

import sys

import numpy as np
import pytest
import torch

from lorambo_kernels import (SketchGroup, dropout_keep_mask, gaussian_probe, lora_down, lora_gemm,
                             lora_linear_backward, lora_linear_forward, lora_wgrad)

M, K, N, CAP, RANK, P_DROP = 5, 8, 6, 4, 2, 0.4
GEN = torch.Generator().manual_seed(21)


def _t(*shape):
    return torch.randn(*shape, generator=GEN)


X, W, A, B, G = _t(M, K), _t(N, K), _t(CAP, K), _t(N, CAP), _t(M, N)


def _sketch(seed):
    group = SketchGroup([X], [G], [0], [K], [N], 2, seeds=[seed])
    return group.apply(None)


# launcher name in the error: a call of it with ``seed`` (dropout on where the launcher has one)
LAUNCHERS = {
    "dropout_keep_mask": lambda seed: dropout_keep_mask(seed, M, K, P_DROP, "cpu"),
    "lora_gemm": lambda seed: lora_gemm(X, W.t(), rank=RANK, scaling=0.5, d=A[:RANK].t(), v=B[:, :RANK].t(),
                                        dropout_p=P_DROP, seed=seed)[0],
    "lora_down": lambda seed: lora_down(X, A[:RANK].t(), RANK, P_DROP, seed),
    "lora_wgrad": lambda seed: _wgrad(seed),
    "lora_linear_forward": lambda seed: lora_linear_forward(X, W, None, A, B, RANK, 0.5, P_DROP, seed)[0],
    "lora_linear_backward": lambda seed: lora_linear_backward(G, X, W, A, B, _t(M, RANK), RANK, 0.5, P_DROP, seed,
                                                              (True, False, False, True, False))[0],
    "lorambo_kernels.sketch.gaussian_probe": lambda seed: gaussian_probe(seed, 7, 3, "cpu"),
    "lorambo_kernels.sketch.SketchGroup": _sketch,
}


def _wgrad(seed):
    out = torch.zeros(K, RANK)
    lora_wgrad(X, _t(M, RANK), 0.5, out, dropout_p=P_DROP, seed=seed)
    return out


BAD_SEEDS = [1.7, 3.0, True, -1, 2**63, "3", None, np.float64(2.0), torch.tensor(3.0), torch.tensor([3]),
             torch.tensor(3, dtype=torch.int32)]


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_launchers_refuse_a_seed_outside_the_contract_naming_themselves(name, seed):
    with pytest.raises(ValueError, match=rf"^{name}: (a tensor )?seed must be"):
        LAUNCHERS[name](seed)


DROPOUT = {name: LAUNCHERS[name] for name in ("lora_gemm", "lora_down", "lora_wgrad", "lora_linear_forward",
                                               "lora_linear_backward")}


@pytest.mark.parametrize("name", DROPOUT)
@pytest.mark.parametrize("p, error", [(1.0, ValueError), (1.5, ValueError), (-0.5, ValueError),
                                      (float("nan"), ValueError), (True, TypeError), ("0.5", TypeError)])
def test_launchers_refuse_a_dropout_p_outside_zero_one(name, p, error, monkeypatch):
    # the kernels dropped nothing for p <= 0 or nan and everything for p >= 1, silently
    monkeypatch.setattr(sys.modules[__name__], "P_DROP", p)
    with pytest.raises(error, match=rf"^{name}: dropout_p"):
        DROPOUT[name](7)


@pytest.mark.parametrize("name", ["dropout_keep_mask", "lora_down", "lorambo_kernels.sketch.gaussian_probe"])
def test_seeds_in_the_contract_draw_the_stream_of_the_equal_int(name):
    call = LAUNCHERS[name]
    want = call(7)
    assert not torch.equal(want, call(8))  # the seed matters here, so equal results mean equal seeds
    for seed in (np.int64(7), torch.tensor(7)):
        assert torch.equal(call(seed), want)
    top = call(2**63 - 1)  # the largest seed the contract takes
    assert not torch.equal(top, want)
