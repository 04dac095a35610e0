"""One compiled variant per rank bucket, shown on CPU: the specialization keys of every launch.

Triton compiles a kernel once per *specialization key* of its arguments: besides the declared
``tl.constexpr`` values and the launch options, every int argument that is not in
``do_not_specialize`` is specialized on its value (triton 3.6 and 3.9 alike): equal to 1 -> a
constexpr, a multiple of 16 -> a ``tt.divisibility`` hint, and i32 vs i64 by range. An argument
whose value follows the rank (e.g. the row stride of a fresh [M, r] buffer) therefore compiles a
new variant at rank 1, at every multiple of 16, and once more for the other ranks.

Here the real launchers run on meta tensors with every launch recorded (tools/aot_sm90.py's
recorder, configs as on an H100) over a sweep of ranks, through every path (forward without and
with dropout, the backward with each set of needed gradients, ranks above 128), and the launches
are keyed twice: by triton's own specialization (``aot_cases.bind``: the installed triton's
``native_specialize_impl``) and by the rules above written out, which hold for triton 3.6 too.
Within one rank bucket (and the same side of 128, where the launch sequence itself changes)
every rank must produce the same keys.
"""

import inspect

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import aot_cases  # noqa: E402  (tools/, put on sys.path by conftest.py)
import aot_sm90 as aot  # noqa: E402
from lorambo_kernels import config, fused_gemm, lora_linear  # noqa: E402

M, K, N, CAPACITY = 64, 96, 80, 272
RANKS = [*range(1, 41), 47, 48, 63, 64, 65, 96, 127, 128, 129, 143, 144, 160, 255, 256, 257]
NEEDS = [(True, False, True, True, True), (True, True, False, False, False), (False, False, False, True, True)]
I32 = range(-2**31, 2**31)


def launches_for(rank, sink):
    """Every kernel launch (key, jit, args, kwargs) of forward + backward at this rank, through
    the TMA GEMM (sm_90's default) and the pointer GEMM (everywhere else, and LORAMBO_TMA=0)."""
    out = []
    for tma in (True, False):
        fused_gemm._tma_disabled = None if tma else "the pointer-kernel pass"  # restored by _recording
        out += _launches(rank, sink)
    return out


def _launches(rank, sink):
    meta = torch.device("meta")

    def mk(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device=meta)

    x, w, bias, A, B = mk(M, K), mk(N, K), mk(N), mk(CAPACITY, K), mk(N, CAPACITY)
    out = []
    for p, seed in ((0.0, 0), (0.1, 2**40 + 7)):
        sink.clear()
        _, t = lora_linear.lora_linear_forward(x, w, bias, A, B, rank, 0.5, p, seed)
        for needs in NEEDS:
            lora_linear.lora_linear_backward(mk(M, N), x, w, A, B, t, rank, 0.5, p, seed, needs)
        out += [(p, *launch) for launch in sink]
    return out


def rule_key(key, jit, args, kwargs):
    """The specialization key by the written-out rules (triton 3.6 / 3.9 semantics)."""
    fn, dont_specialize, _ = aot_cases.jit_parts(jit)
    parts = []
    for i, (name, param) in enumerate(inspect.signature(fn).parameters.items()):
        val = args[i] if i < len(args) else kwargs.get(name, param.default)
        if aot_cases.is_constexpr(param):
            parts.append((name, val))
        elif isinstance(val, bool):
            parts.append((name, "i1"))
        elif isinstance(val, int):
            width = "i32" if val in I32 else "i64"
            if i in dont_specialize or name in dont_specialize:
                parts.append((name, width))
            else:
                parts.append((name, "1" if val == 1 else width, val % 16 == 0))
        elif isinstance(val, float):
            parts.append((name, "fp32"))
        else:  # tensors / descriptors: dtype and shape-independent layout (aligned allocations)
            parts.append((name, str(getattr(val, "dtype", type(val).__name__))))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in inspect.signature(fn).parameters))
    return key, tuple(parts), options


@pytest.fixture(scope="module")
def keys_by_rank():
    from triton.compiler.compiler import make_backend

    backend = make_backend(aot.H100)
    by_rank = {}
    with aot._recording((9, 0), aot.SM_COUNT[90]) as sink:
        for rank in RANKS:
            launches = launches_for(rank, sink)
            by_rank[rank] = ({(p, aot_cases.bind(k, jit, args, kw, backend)) for p, k, jit, args, kw in launches},
                             {(p, rule_key(k, jit, args, kw)) for p, k, jit, args, kw in launches})
    return by_rank


def _kernel(item):
    _, key = item
    return key.kernel if isinstance(key, aot_cases.Case) else key[0]


def group(rank):
    return config.rank_bucket(rank), rank > config.MAX_BLOCK_R


@pytest.mark.parametrize("which", ["triton's specialization", "triton 3.6 rules"])
def test_one_compile_per_rank_bucket_without_a_gpu(keys_by_rank, which):
    index = 0 if which == "triton's specialization" else 1
    first = {}
    for rank in RANKS:
        keys = keys_by_rank[rank][index]
        ref_rank = first.setdefault(group(rank), rank)
        ref = keys_by_rank[ref_rank][index]
        assert keys == ref, (f"rank {rank} and rank {ref_rank} (same bucket) compile different variants of "
                             f"{sorted({_kernel(k) for k in keys ^ ref})}; an int argument that follows the rank "
                             "is specialised (leave it out of the key with do_not_specialize)")
    # the sweep reaches every bucket and both sides of 128, with and without dropout
    assert {group(r) for r in RANKS} == {(16, False), (32, False), (64, False), (128, False), (128, True)}
    all_keys = set().union(*(keys_by_rank[r][index] for r in RANKS))
    assert {p for p, _ in all_keys} == {0.0, 0.1}
    assert {_kernel(k).rsplit(":")[1] for k in all_keys} == {
        "_lora_gemm_kernel", "_lora_gemm_tma_kernel", "_lora_down_kernel", "_lora_wgrad_kernel"}
