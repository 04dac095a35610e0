"""Differential fuzz of every CPU backend's LoRA op against a float64 formula written here.

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T

Drawn: token count (1, odd, prime), odd in/out widths, 2-D to 4-D inputs, rank and capacity
(0, 1, full, just past a Triton rank bucket, past the largest bucket), scaling (negative, 0),
bias, dropout (each backend's own mask, read through its public mask function), dtype,
non-contiguous / zero-stride x, a transposed weight (transformers' Conv1D stores [in, out]),
which inputs require grad (none: inference; frozen A or B: LoRA-FA; W: Hessian estimates).

Checked, every element: the output and each gradient against float64 within a bound derived
from the dtype's epsilon and the reduction length (elementwise, from the same formula on |inputs|),
inactive pool slots' gradients exactly zero, inputs unmodified, output shape and dtype.
"""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from lorambo.ops.lora_linear_ref import dropout_mask

from cpu_backends import BACKENDS, op_for

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
# capacities around the Triton rank buckets (16/32/64/128) and past the largest one
CAPACITIES = (1, 2, 5, 16, 17, 33, 130)
SUPPORTED = {"torch": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
             "ext": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
             "triton": (torch.float32, torch.bfloat16, torch.float16)}


def multiplier_for(backend, x2, p, seed):
    """The multiplier 0 or 1/(1-p) in float64 where the backend's own mask for the flattened input
    x2 [M, K] keeps an element (only which elements are kept is read from the backend)."""
    if backend == "torch":
        keep = dropout_mask(x2.detach(), p, seed) > 0
    elif backend == "ext":
        from lorambo.ops.ext_linear import dropout_mask_ext

        keep = dropout_mask_ext(x2.detach(), p, seed) > 0
    else:
        from lorambo_kernels import dropout_keep_mask

        keep = dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, x2.device)
    return keep.double() / (1.0 - p)


def formula64(x, weight, bias, lora_A, lora_B, rank, scaling, mask):
    """The op in float64 with plain autograd; x [..., K], mask [M, K] or None."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xd = x2 if mask is None else x2 * mask
    y = x2 @ weight.t() + scaling * (xd @ lora_A[:rank].t()) @ lora_B[:, :rank].t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "permuted")


def lay_out(leaf, layout, lead, k):
    """x of shape [*lead, k] as a differentiable view/expression of ``leaf`` with the layout's strides."""
    if layout == "transposed":  # leaf [k, M]
        return leaf.t().reshape(*lead, k) if len(lead) == 1 else leaf.t().unflatten(0, lead)
    if layout == "sliced":  # leaf [M, 2k + 1]: every other column
        return leaf[:, 1::2].unflatten(0, lead)
    if layout == "expanded":  # leaf [1, k]: zero stride over the tokens
        return leaf.expand(int(torch.tensor(lead).prod()), k).unflatten(0, lead)
    if layout == "permuted":  # leaf [*reversed lead, k]: lead dims permuted
        dims = list(range(len(lead)))[::-1]
        return leaf.permute(*dims, len(lead))
    return leaf.unflatten(0, lead)


def leaf_shape(layout, lead, k):
    m = int(torch.tensor(lead).prod())
    return {"transposed": (k, m), "sliced": (m, 2 * k + 1), "expanded": (1, k),
            "permuted": (*lead[::-1], k)}.get(layout, (m, k))


# which inputs require grad: named sets (inference, LoRA-FA, Hessian estimates) or any subset
GRADS = {"all": ("x", "bias", "lora_A", "lora_B"), "x": ("x",), "pools": ("lora_A", "lora_B"),
         "A": ("x", "lora_A"), "B": ("x", "lora_B", "bias"), "none": (), "weight": ("x", "weight", "lora_B")}


@st.composite
def cases(draw):
    lead = draw(st.sampled_from([(0,), (2, 0, 3), (1,), (7,), (13,), (40,), (3, 5), (2, 1, 3), (1, 3, 1, 5), (2, 3, 2, 3)]))
    cap = draw(st.sampled_from(CAPACITIES))
    rank = draw(st.sampled_from(sorted({0, 1, cap, min(cap, 17), min(cap, 33), min(cap, 129)})))
    return dict(
        lead=lead, k=draw(st.sampled_from([1, 3, 7, 13, 29, 47])), n=draw(st.sampled_from([1, 5, 11, 31, 43])),
        cap=cap, rank=rank, scaling=draw(st.sampled_from([0.7, -2.0, 3.7, 0.0, 1.0])),  # 1 last: hypothesis favours the first
        bias=draw(st.booleans()), p=draw(st.sampled_from([0.0, 0.0, 0.25, 0.6, 0.95])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        layout=draw(st.sampled_from(LAYOUTS)), weight_t=draw(st.booleans()), pools_t=draw(st.booleans()),
        grads=draw(st.sampled_from(sorted(GRADS)) | st.frozensets(st.sampled_from(NAMES)).map(
            lambda names: tuple(sorted(names)))),
        seed=draw(st.one_of(st.integers(0, 2**40), st.sampled_from([2**31 - 1, 2**31, 2**32 + 5, 2**62, 2**63 - 1]))), create_graph=draw(st.booleans()), seed_tensor=draw(st.booleans()),
        grad_layout=draw(st.sampled_from(["contiguous", "expanded", "transposed"])),
        custom_op=draw(st.booleans()))




def make(case):
    gen = torch.Generator().manual_seed(case["seed"] % 2**31)
    k, n, cap, dtype = case["k"], case["n"], case["cap"], case["dtype"]

    def rnd(*shape):  # values representable in every dtype drawn, so float64 sees the same inputs
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.25).to(dtype)

    wants = GRADS.get(case["grads"], case["grads"])  # a named set or a drawn tuple of names
    leaves = {"x": rnd(*leaf_shape(case["layout"], case["lead"], k)),
              "weight": rnd(k, n) if case["weight_t"] else rnd(n, k),
              "bias": rnd(2 * n)[::2] if case["bias"] else None,
              "lora_A": rnd(k, cap) if case["pools_t"] else rnd(cap, k),
              "lora_B": rnd(cap, n) if case["pools_t"] else rnd(n, cap)}
    if leaves["bias"] is not None:
        leaves["bias"] = leaves["bias"].detach()  # a strided leaf
    for name, t in leaves.items():
        if t is not None:
            t.requires_grad_(name in wants)
    return leaves


def inputs_of(leaves, case):
    w = leaves["weight"]
    return dict(x=lay_out(leaves["x"], case["layout"], case["lead"], case["k"]),
                weight=w.t() if case["weight_t"] else w, bias=leaves["bias"],
                lora_A=leaves["lora_A"].t() if case["pools_t"] else leaves["lora_A"],
                lora_B=leaves["lora_B"].t() if case["pools_t"] else leaves["lora_B"])


def bound(case, m):
    """Per-unit-of-|terms| error allowed: the dtype's rounding of inputs to products (none, they
    are exact in the dtype), of intermediates (t, t' in the dtype) and of the result, plus
    accumulation in float32 over the longest reduction."""
    eps = torch.finfo(case["dtype"]).eps
    depth = max(m, case["k"], case["n"], case["rank"]) + 2
    acc = torch.finfo(torch.float64 if case["dtype"] == torch.float64 else torch.float32).eps
    return 4 * eps + 2 * depth * acc


def subnormal_floor(case, m):
    """Absolute error allowed for results in the dtype's subnormal range (spacing eps * tiny)."""
    info = torch.finfo(case["dtype"])
    return (max(m, case["k"], case["n"], case["rank"]) + 2) * info.eps * info.smallest_normal


def check_close(got, want, magnitude, tol, floor, what):
    err = (got.double() - want).abs()
    allowed = tol * magnitude + floor
    bad = err > allowed
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, worst error "
                           f"{(err - allowed).max().item():.3e} over the bound; err {err.max().item():.3e}")


def run_case(backend, case):
    op = op_for(backend)
    if case["dtype"] not in SUPPORTED[backend]:
        leaves = make(case)
        with pytest.raises(TypeError, match=r"lora_linear_\w+.*float64"):
            op(**inputs_of(leaves, case), rank=case["rank"], scaling=case["scaling"])
        return
    leaves = make(case)
    before = {n: (None if t is None else t.detach().clone()) for n, t in leaves.items()}
    inputs = inputs_of(leaves, case)
    lead, k, n, rank, s = case["lead"], case["k"], case["n"], case["rank"], case["scaling"]
    p = case["p"]
    seed = case["seed"] if p > 0 else None
    if seed is not None and case["seed_tensor"]:
        seed = torch.tensor(seed, dtype=torch.int64)
    m = int(torch.tensor(lead).prod())
    wants = [name for name in NAMES if leaves[name] is not None and leaves[name].requires_grad]

    # under a TorchDispatchMode the ops run as torch.library custom ops (their registered autograd),
    # not through the eager autograd.Function: another path to the same kernels
    mode = FlopCounterMode(display=False) if case["custom_op"] else contextlib.nullcontext()
    with mode, (torch.enable_grad() if wants else torch.no_grad()):
        y = op(**inputs, rank=rank, scaling=s, dropout_p=p, seed=seed)
    assert y.shape == (*lead, n) and y.dtype == case["dtype"], (y.shape, y.dtype)
    mask = multiplier_for(backend, inputs["x"].reshape(-1, k), p, case["seed"]) if p > 0 else None

    g_gen = torch.Generator().manual_seed(case["seed"] % 2**31 + 1)
    grad_y = grad_y_in_layout(torch.randn(*lead, n, generator=g_gen, dtype=torch.float64).to(case["dtype"]),
                              case["grad_layout"])
    # create_graph=True takes the ops' differentiable backward (double backward), a path of its own
    with mode:
        got = dict(zip(wants, torch.autograd.grad(y, [leaves[w] for w in wants], grad_y,
                                                   create_graph=case["create_graph"]))) if wants else {}

    # float64: the formula on the inputs, and on their absolute values (the sum of |terms| of every
    # output and gradient element, which scales the rounding bound)
    def run64(absolute):
        l64 = {nm: (None if t is None else (t.detach().double().abs() if absolute else t.detach().double())
                    .requires_grad_(True)) for nm, t in leaves.items()}
        i64 = inputs_of(l64, case)
        y64 = formula64(**i64, rank=rank, scaling=abs(s) if absolute else s, mask=mask)
        gy = grad_y.double().abs() if absolute else grad_y.double()
        g64 = torch.autograd.grad(y64, [l64[w] for w in wants], gy) if wants else ()
        return y64.detach(), dict(zip(wants, g64))

    y64, g64 = run64(False)
    ymag, gmag = run64(True)
    tol, floor = bound(case, m), subnormal_floor(case, m)
    check_close(y, y64, ymag, tol, floor, f"{backend} y {case}")
    for name in wants:
        assert got[name].dtype == leaves[name].dtype and got[name].shape == leaves[name].shape, name
        check_close(got[name], g64[name], gmag[name], tol, floor, f"{backend} d{name} {case}")
    if case["pools_t"]:  # the leaves are stored transposed; the op saw [cap, K] / [N, cap] views
        got = {nm: (g.t() if nm in ("lora_A", "lora_B") else g) for nm, g in got.items()}
    if "lora_A" in got:
        assert torch.count_nonzero(got["lora_A"][rank:]) == 0, f"{backend}: dA inactive slots not zero {case}"
    if "lora_B" in got:
        assert torch.count_nonzero(got["lora_B"][:, rank:]) == 0, f"{backend}: dB inactive slots not zero {case}"
    for name, t in leaves.items():
        if t is not None:
            assert torch.equal(t.detach(), before[name]), f"{backend}: {name} modified in place {case}"


def grad_y_in_layout(g, layout):
    """dY as autograd may hand it to the op: zero-stride (the backward of ``y.sum()``, here one
    row broadcast over the tokens) or with transposed strides."""
    if layout == "expanded":
        return g.reshape(-1, g.shape[-1])[:1].expand(g.numel() // g.shape[-1], g.shape[-1]).reshape(g.shape)
    if layout == "transposed":
        return g.reshape(-1, g.shape[-1]).t().contiguous().t().reshape(g.shape)
    return g


def case_of(**kw):
    base = dict(lead=(7,), k=13, n=11, cap=5, rank=5, scaling=0.7, bias=True, p=0.0, dtype=torch.float32,
                layout="contiguous", weight_t=False, pools_t=False, grads="all", seed=1, create_graph=False,
                seed_tensor=False, grad_layout="contiguous",
                custom_op=False)
    base.update(kw)
    return base


def examples(default):
    return int(os.environ.get("LORAMBO_FUZZ_EXAMPLES", default))


FUZZ = dict(deadline=None, derandomize=not os.environ.get("LORAMBO_FUZZ_EXAMPLES"),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TORCH_AND_EXT = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "triton"]
TRITON = [b for b in BACKENDS if getattr(b, "values", (b,))[0] == "triton"]


NOTABLE = [
    case_of(grads="B"),
    case_of(grads="A", p=0.25, create_graph=True),
    # past the largest Triton rank bucket (two-launch paths), dropout, bf16, zero-stride x and dY, Conv1D weight
    case_of(lead=(2, 1, 3), k=47, n=43, cap=130, rank=130, p=0.25, dtype=torch.bfloat16, layout="expanded",
            weight_t=True, grad_layout="expanded"),
    # just past a bucket, LoRA-FA (A frozen), double-backward formulas, custom-op path, transposed pools
    case_of(lead=(13,), k=29, n=31, cap=33, rank=17, p=0.6, scaling=-2.0, grads="B", create_graph=True,
            custom_op=True, pools_t=True, layout="transposed", seed_tensor=True),
    # float16 with the base weight's gradient (Hessian estimates), rank 0, one token
    case_of(lead=(1,), k=7, n=5, cap=2, rank=0, dtype=torch.float16, grads="weight", bias=False),
    # float64 (a TypeError on triton), empty token dim, inference
    case_of(lead=(2, 0, 3), dtype=torch.float64, grads="none", p=0.25),
]


def with_notable_examples(test):
    for case in NOTABLE:
        test = example(case=case)(test)
    return test


@pytest.mark.parametrize("backend", TORCH_AND_EXT)
@settings(max_examples=examples(200), **FUZZ)
@given(case=cases())
@with_notable_examples
def test_lora_op_matches_float64(backend, case):
    run_case(backend, case)


@pytest.mark.parametrize("backend", TRITON)  # the interpreter is slow: fewer drawn cases
@settings(max_examples=examples(40), **FUZZ)
@given(case=cases())
@with_notable_examples
def test_triton_op_matches_float64(backend, case):
    run_case(backend, case)
