"""lorambo::probe_fill_ and lorambo::dropout_mask: Philox stream layout, determinism, statistics,
bad input.

The oracle is an independent NumPy Philox4x32-10 (checked against Random123's known answers),
so the stream layout documented in csrc/include/lorambo/philox.h is tested value by value.
"""

import math

import numpy as np
import pytest
import torch
from ext_testutil import EXT, FLOAT_DTYPES, cpu_kernel, generator, needs_ext, random_dtype, random_shape

from lorambo.ops.ext_linear import dropout_mask_ext

pytestmark = needs_ext

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF
KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: (counter, key, output)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
DROPOUT_DOMAIN = 0x4C6F5241


def philox_np(c0, c1, c2, c3, k0, k1):
    """Vectorised Philox4x32-10 on uint64 arrays holding 32-bit words."""
    c = [np.asarray(v, dtype=np.uint64) & MASK for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(M0) * c[0]
        p1 = np.uint64(M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & np.uint64(MASK)
        hi1, lo1 = p1 >> np.uint64(32), p1 & np.uint64(MASK)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + np.uint64(W0)) & np.uint64(MASK), (k1 + np.uint64(W1)) & np.uint64(MASK)
    return c


def stream_words(seed, start, n, domain=0):
    """Word of stream positions start..start+n-1 (the layout of philox.h)."""
    q = np.arange(start, start + n, dtype=np.uint64)
    g = q >> np.uint64(2)
    words = philox_np(g & np.uint64(MASK), g >> np.uint64(32), np.full_like(g, domain), np.zeros_like(g),
                      seed & MASK, seed >> 32)
    return np.choose((q & np.uint64(3)).astype(np.int64), words), words, (q & np.uint64(3)).astype(np.int64)


def expected(seed, start, n, dist):
    w, words, lane = stream_words(seed, start, n)
    if dist == "rademacher":
        return np.where(w >> np.uint64(31), -1.0, 1.0)
    if dist == "uniform":
        return w.astype(np.float64) * 2.0**-32
    even = np.where(lane < 2, words[0], words[2]).astype(np.float64)
    odd = np.where(lane < 2, words[1], words[3]).astype(np.float64)
    r = np.sqrt(-2.0 * np.log((even + 0.5) * 2.0**-32))
    angle = 2 * math.pi * (odd * 2.0**-32)
    return np.where(lane % 2 == 0, r * np.cos(angle), r * np.sin(angle))


def fill(tensors, seed, offset, dist):
    """torch.ops.lorambo.probe_fill_ on ``tensors``: at their own ``offset`` (a list), or laid out
    back to back from ``offset`` (an int) as one concatenated tensor; returns them."""
    if isinstance(offset, int):
        starts, pos = [], offset
        for t in tensors:
            starts.append(pos)
            pos += t.numel()
        offset = starts
    torch.ops.lorambo.probe_fill_(tensors, seed, offset, dist)
    return tensors


def test_philox_known_answers():
    for counter, key, out in KAT:
        assert tuple(EXT._philox4x32_10(list(counter), list(key))) == out
        assert tuple(int(v) for v in philox_np(*counter, *key)) == out


@pytest.mark.parametrize("dist", ["rademacher", "uniform", "gaussian"])
def test_float64_values_follow_the_documented_stream(dist):
    seed, offset = 2**40 + 12345, 2**33 + 3  # high words of seed and position in use
    t = torch.empty(1001, dtype=torch.float64)
    fill([t], seed, offset, dist)
    want = torch.from_numpy(expected(seed, offset, 1001, dist))
    if dist == "gaussian":  # glibc vs NumPy libm: ulp-level differences in log/sin/cos
        torch.testing.assert_close(t, want, rtol=1e-14, atol=1e-14)
    else:
        assert torch.equal(t, want)


def test_low_precision_dtypes_round_the_same_stream():
    seed = 7
    f32 = fill([torch.empty(4099)], seed, 5, "gaussian")[0]
    for dtype in (torch.bfloat16, torch.float16):
        low = fill([torch.empty(4099, dtype=dtype)], seed, 5, "gaussian")[0]
        assert torch.equal(low, f32.to(dtype))
        signs = fill([torch.empty(4099, dtype=dtype)], seed, 5, "rademacher")[0]
        assert torch.equal(signs.float(), fill([torch.empty(4099)], seed, 5, "rademacher")[0])
        uni = fill([torch.empty(20000, dtype=dtype)], seed, 0, "uniform")[0]
        assert float(uni.min()) >= 0.0 and float(uni.max()) < 1.0


def test_same_seed_same_values_and_offsets_shift_the_stream():
    a = fill([torch.empty(3, 100)], 11, 0, "gaussian")[0]
    b = fill([torch.empty(3, 100)], 11, 0, "gaussian")[0]
    c = fill([torch.empty(3, 100)], 12, 0, "gaussian")[0]
    d = fill([torch.empty(250)], 11, 50, "gaussian")[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(d, a.flatten()[50:300])


def test_a_list_is_one_stream_and_tensors_can_have_their_own_offsets():
    gen = generator()
    shapes = [random_shape(gen) for _ in range(300)]
    dtypes = [random_dtype(gen) for _ in shapes]
    tensors = [torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)]
    fill(tensors, 99, 1000, "gaussian")
    total = sum(t.numel() for t in tensors)
    flat = fill([torch.empty(total, dtype=torch.float64)], 99, 1000, "gaussian")[0]
    pos = 0
    for t in tensors:  # float64 keeps the double Box-Muller value; other dtypes round it via float32
        want = flat[pos:pos + t.numel()]
        assert torch.equal(t.flatten(), want if t.dtype == torch.float64 else want.float().to(t.dtype))
        pos += t.numel()
    offsets = [i << 40 for i in range(len(tensors))]  # independent regions per tensor
    fill(tensors, 99, offsets, "rademacher")
    for i in (0, 17, 299):
        alone = fill([torch.empty(shapes[i], dtype=dtypes[i])], 99, offsets[i], "rademacher")[0]
        assert torch.equal(tensors[i], alone)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_statistics(dtype):
    n = 200_000
    r = fill([torch.empty(n, dtype=dtype)], 3, 0, "rademacher")[0].double()
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 5 / math.sqrt(n)
    g = fill([torch.empty(n, dtype=dtype)], 4, 0, "gaussian")[0].double()
    assert abs(float(g.mean())) < 5 / math.sqrt(n)
    assert abs(float(g.var()) - 1.0) < 5 * math.sqrt(2 / n) + (0.01 if dtype == torch.bfloat16 else 0.0)
    assert abs(float((g**4).mean()) - 3.0) < 5 * math.sqrt(96 / n) + 0.05  # Gaussian kurtosis, not uniform's
    assert abs(float((g < 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_non_contiguous_targets_follow_their_logical_order():
    base = torch.zeros(30, 40)
    view = base.t()[::2]  # (20, 30), non-contiguous
    fill([view], 5, 0, "gaussian")
    want = fill([torch.empty(20, 30)], 5, 0, "gaussian")[0]
    assert torch.equal(view, want)
    assert int((base != 0).sum()) == 600  # nothing outside the view was written


def test_empty_tensors_and_thread_count_independence():
    before = torch.get_num_threads()
    shapes = [(0,), (100_000,), (3, 0), (70_001,)]
    try:
        torch.set_num_threads(1)
        one = fill([torch.empty(s) for s in shapes], 8, 0, "gaussian")
        torch.set_num_threads(max(2, before))
        many = fill([torch.empty(s) for s in shapes], 8, 0, "gaussian")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_dropout_mask_stream_and_statistics():
    p, seed = 0.3, 2**35 + 9
    x = torch.empty(64, 129)
    mask = dropout_mask_ext(x, p, seed)
    w, _, _ = stream_words(seed, 0, x.numel(), DROPOUT_DOMAIN)
    keep = torch.from_numpy(w >= math.ceil(p * 2**32)).view(64, 129)
    assert torch.equal(mask, keep.float() / (1 - p))
    big = dropout_mask_ext(torch.empty(400_000), p, 1)
    assert abs(float((big == 0).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / big.numel())
    assert torch.equal(dropout_mask_ext(x, 0.0, 0), torch.ones_like(x))
    assert not torch.equal(dropout_mask_ext(x, p, seed + 1), mask)


def test_opcheck():
    tensors = [torch.empty(3, 4), torch.empty(7, dtype=torch.bfloat16), torch.empty(0)]
    torch.library.opcheck(torch.ops.lorambo.probe_fill_.default, (tensors, 3, [0, 12, 19], "gaussian"))
    torch.library.opcheck(torch.ops.lorambo.dropout_mask.default, (torch.randn(5, 6), 0.3, 5))


# ------------------------------------------------------------------------------- bad input
def test_seed_and_offset_out_of_range():
    t = [torch.empty(4)]
    with pytest.raises(RuntimeError, match=r"probe_fill_: seed must be in \[0, 2\^63\), got -1"):
        torch.ops.lorambo.probe_fill_(t, -1, [0], "gaussian")
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be in \[0, 2\^63\), got -5"):
        torch.ops.lorambo.probe_fill_(t, 1, [-5], "gaussian")
    with pytest.raises(RuntimeError, match=r"offsets\[0\] = 9223372036854775805 plus tensors\[0\].numel\(\) = 4"):
        torch.ops.lorambo.probe_fill_(t, 1, [2**63 - 3], "gaussian")
    with pytest.raises(RuntimeError, match=r"dropout_mask: seed must be in \[0, 2\^63\), got -3"):
        torch.ops.lorambo.dropout_mask(torch.empty(3), 0.5, -3)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1"):
        torch.ops.lorambo.dropout_mask(torch.empty(3), 1.0, 3)


def test_mismatched_lengths_dtypes_and_distribution():
    with pytest.raises(RuntimeError, match=r"tensors has 2 entries but offsets has 1"):
        torch.ops.lorambo.probe_fill_([torch.empty(2), torch.empty(2)], 0, [0], "gaussian")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Long"):
        torch.ops.lorambo.probe_fill_([torch.empty(2), torch.empty(2, dtype=torch.long)], 0, [0, 2], "gaussian")
    with pytest.raises(RuntimeError, match=r"distribution must be 'rademacher', 'gaussian' or 'uniform', got 'cauchy'"):
        torch.ops.lorambo.probe_fill_([torch.empty(2)], 0, [0], "cauchy")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on meta but the other tensors are on cpu"):
        cpu_kernel(torch.ops.lorambo.probe_fill_)([torch.empty(2), torch.empty(2, device="meta")], 0, [0, 2],
                                                   "gaussian")


def test_overlapping_or_self_overlapping_targets_are_refused_before_any_write():
    # contiguous targets are filled in place by parallel items: two sharing memory would race
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(40_000, generator=gen, dtype=torch.float64)
    first = torch.randn(5, generator=gen)
    keep = (first.clone(), base.clone())
    with pytest.raises(RuntimeError, match=r"probe_fill_: tensors\[1\] and tensors\[2\] share memory"):
        torch.ops.lorambo.probe_fill_([first, base[:30_000], base[10_000:]], 3, [0, 5, 9], "gaussian")
    expanded = torch.randn(3, generator=gen).expand(4, 3)
    with pytest.raises(RuntimeError, match=r"probe_fill_: tensors\[1\] \(shape \[4, 3\], strides \[0, 1\]\) has "
                                           r"elements sharing memory"):
        torch.ops.lorambo.probe_fill_([first, expanded], 3, [0, 5], "gaussian")
    assert torch.equal(first, keep[0]) and torch.equal(base, keep[1])  # nothing written
    # adjacent views of one buffer do not share memory: each follows its own stream offset
    halves = [base[:20_000], base[20_000:]]
    torch.ops.lorambo.probe_fill_(halves, 3, [0, 7], "uniform")
    assert torch.equal(halves[0], torch.from_numpy(expected(3, 0, 20_000, "uniform")))
    assert torch.equal(halves[1], torch.from_numpy(expected(3, 7, 20_000, "uniform")))


@pytest.mark.parametrize("views", [
    lambda b: [b[:, 0], b[0]],              # a non-contiguous column, then the row holding its first element
    lambda b: [b[0], b[:, 0]],              # the same two the other way round
    lambda b: [b[:, 0], b[:2, :2].t()],     # two non-contiguous views sharing b[0, 0]
    lambda b: [b[:, 1], b[:, 1]],           # one non-contiguous view twice
], ids=["column-row", "row-column", "two-strided", "same-view-twice"])
def test_targets_sharing_memory_with_a_non_contiguous_one_are_refused_before_any_write(views):
    # a non-contiguous target is filled through a staging tensor and copied back after the
    # contiguous ones are filled in place: b[0, 0] took the column's value in both list orders
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    keep = base.clone()
    with pytest.raises(RuntimeError, match=r"lorambo::probe_fill_: tensors\[0\] \(shape .*\) and tensors\[1\] "
                                           r"\(shape .*\) lie in one stretch of memory, and one of them is not "
                                           r"contiguous"):
        torch.ops.lorambo.probe_fill_(views(base), 3, [0, 100], "gaussian")
    assert torch.equal(base, keep)  # nothing written


def test_a_non_contiguous_target_beside_others_in_their_own_memory_is_filled():
    left, right = torch.zeros(4, 6), torch.zeros(5)
    fill([left[:, 1], right], 9, [0, 50], "rademacher")
    assert torch.equal(left[:, 1], torch.from_numpy(expected(9, 0, 4, "rademacher")).float())
    assert torch.equal(right, torch.from_numpy(expected(9, 50, 5, "rademacher")).float())
    assert int((left != 0).sum()) == 4
