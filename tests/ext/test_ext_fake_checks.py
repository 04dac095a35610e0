"""The fake implementations (lorambo/ext/fake.py, what torch.compile traces with) refuse what the
CPU kernels refuse, with the kernels' own message: a trace must not accept a call that fails at
run time."""

import pytest
import torch
from ext_testutil import needs_ext

pytestmark = needs_ext

GEN = torch.Generator().manual_seed(4)


def _t(shape, dtype=torch.float32):
    return torch.randn(shape, generator=GEN).to(dtype)


# (op, the arguments on CPU) that the kernel refuses
BAD = {
    "dropout_mask int64": ("dropout_mask", (_t(5, torch.int64), 0.5, 3)),
    "dropout_mask bool": ("dropout_mask", (_t(5, torch.bool), 0.0, 3)),
    "dropout_mask p=1": ("dropout_mask", (_t(5), 1.0, 3)),
    "dropout_mask p<0": ("dropout_mask", (_t(5), -0.25, 3)),
    "dropout_mask seed<0": ("dropout_mask", (_t(5), 0.5, -1)),
    "multi_dot int32 x": ("multi_dot", ([_t(3), _t(3, torch.int32)], [_t(3), _t(3, torch.int32)], 1)),
    "multi_dot bool y": ("multi_dot", ([_t(3)], [_t(3, torch.bool)], 1)),
    "multi_dot shapes": ("multi_dot", ([_t((3, 4))], [_t((3, 2, 2))], 1)),
    "multi_dot rows": ("multi_dot", ([_t((3, 4)), _t((2, 6))], [_t((3, 4)), _t((2, 6))], 3)),
    "multi_dot rows=0": ("multi_dot", ([_t(3)], [_t(3)], 0)),
    "multi_dot lengths": ("multi_dot", ([_t(3), _t(3)], [_t(3)], 1)),
    "multi_sq_norm complex": ("multi_sq_norm", ([_t(3), _t(3, torch.complex64)], 1)),
    "multi_sq_norm float8": ("multi_sq_norm", ([_t(3, torch.float8_e4m3fn)], 1)),
    "multi_sq_norm uint8": ("multi_sq_norm", ([_t(3, torch.uint8)], 1)),
    "multi_sq_norm rows": ("multi_sq_norm", ([_t((2, 5)), _t((3, 2))], 2)),
    "dropout_mask 0-d": ("dropout_mask", (_t(()), 0.5, 3)),
}


def _fwd(x=(4, 8), w=(6, 8), b=(6,), a=(4, 8), bb=(6, 4), rank=2, scaling=0.5, p=0.0, seed=0,
         dtypes=(torch.float32,) * 5):
    """lora_linear_fwd's arguments: x [M, K], weight [N, K], bias [N], lora_A [cap, K], lora_B [N, cap]."""
    tensors = [None if shape is None else _t(shape, dtype) for shape, dtype in zip((x, w, b, a, bb), dtypes)]
    return (*tensors, rank, scaling, p, seed)


def _bwd(g=(4, 6), t=(4, 2), rank=2, mask=(True, True, True, True, True), g_dtype=torch.float32,
         t_dtype=torch.float32, **fwd):
    x, w, _, a, bb, _, scaling, p, seed = _fwd(rank=rank, **fwd)
    return (_t(g, g_dtype), x, w, a, bb, _t(t, t_dtype), rank, scaling, p, seed, list(mask))


F64 = torch.float64
BAD.update({
    "lora_linear_fwd x 3-D": ("lora_linear_fwd", _fwd(x=(2, 2, 8))),
    "lora_linear_fwd x last dim": ("lora_linear_fwd", _fwd(x=(4, 7))),
    "lora_linear_fwd weight 3-D": ("lora_linear_fwd", _fwd(w=(6, 8, 1))),
    "lora_linear_fwd weight in_features": ("lora_linear_fwd", _fwd(w=(6, 9))),
    "lora_linear_fwd lora_A": ("lora_linear_fwd", _fwd(a=(4, 7))),
    "lora_linear_fwd lora_B": ("lora_linear_fwd", _fwd(bb=(6, 5))),
    "lora_linear_fwd rank > capacity": ("lora_linear_fwd", _fwd(rank=5)),
    "lora_linear_fwd rank < 0": ("lora_linear_fwd", _fwd(rank=-1)),
    "lora_linear_fwd bias": ("lora_linear_fwd", _fwd(b=(7,))),
    "lora_linear_fwd int64": ("lora_linear_fwd", _fwd(dtypes=(torch.int64,) * 5)),
    "lora_linear_fwd mixed dtypes": ("lora_linear_fwd", _fwd(dtypes=(torch.float32,) * 3 + (F64, torch.float32))),
    "lora_linear_fwd bias dtype": ("lora_linear_fwd", _fwd(dtypes=(F64, F64, torch.float16, F64, F64))),
    "lora_linear_fwd scaling nan": ("lora_linear_fwd", _fwd(scaling=float("nan"))),
    "lora_linear_fwd scaling -inf": ("lora_linear_fwd", _fwd(scaling=-float("inf"))),
    "lora_linear_fwd p=1": ("lora_linear_fwd", _fwd(p=1.0)),
    "lora_linear_fwd seed<0": ("lora_linear_fwd", _fwd(p=0.25, seed=-3)),
    "lora_linear_bwd x last dim": ("lora_linear_bwd", _bwd(x=(4, 5))),
    "lora_linear_bwd rank": ("lora_linear_bwd", _bwd(rank=6, t=(4, 6))),
    "lora_linear_bwd grad_y shape": ("lora_linear_bwd", _bwd(g=(4, 5))),
    "lora_linear_bwd grad_y dtype": ("lora_linear_bwd", _bwd(g_dtype=F64)),
    "lora_linear_bwd t shape": ("lora_linear_bwd", _bwd(t=(4, 3))),
    "lora_linear_bwd t dtype": ("lora_linear_bwd", _bwd(t_dtype=F64)),
    "lora_linear_bwd p<0": ("lora_linear_bwd", _bwd(p=-0.5)),
})


def _to_meta(arg):
    if isinstance(arg, torch.Tensor):
        return arg.to("meta")
    if isinstance(arg, list):
        return [_to_meta(a) for a in arg]
    return arg


def _message(call):
    with pytest.raises(RuntimeError) as err:
        call()
    return str(err.value).splitlines()[0]


@pytest.mark.parametrize("case", BAD)
def test_the_fake_refuses_what_the_kernel_refuses_with_its_message(case):
    name, args = BAD[case]
    op = getattr(torch.ops.lorambo, name)
    kernel = _message(lambda: op(*args))
    assert kernel.startswith(f"lorambo::{name}: ")
    meta = [_to_meta(arg) for arg in args]
    assert all(t.is_meta for arg in meta for t in (arg if isinstance(arg, list) else [arg])
               if isinstance(t, torch.Tensor))
    assert _message(lambda: op(*meta)) == kernel  # meta tensors take the fake


def test_the_fakes_still_take_what_the_kernels_take():
    xs = [_t((3, 4)), _t((3,)).to(torch.bfloat16), _t((3, 2, 2), torch.float64)]
    ys = [_t((3, 4), torch.float16), _t((3,)), _t((3, 2, 2))]
    for args, op in (((xs, ys, 3), torch.ops.lorambo.multi_dot.default),
                     ((xs, 3), torch.ops.lorambo.multi_sq_norm.default),
                     ((_t((4, 5)), 0.25, 7), torch.ops.lorambo.dropout_mask.default)):
        torch.library.opcheck(op, args)


def test_the_lora_fakes_take_the_edge_calls_the_kernels_take():
    # the whole pool (rank = capacity), rank 0, and a stand-in t where the kernel does not read it
    # (only dB at rank > 0 reads t): the fake's shapes are the kernel's
    calls = [("lora_linear_fwd", _fwd(rank=4)), ("lora_linear_fwd", _fwd(rank=0, b=None)),
             ("lora_linear_bwd", _bwd(rank=4, t=(4, 4))), ("lora_linear_bwd", _bwd(rank=0, t=(3, 3))),
             ("lora_linear_bwd", _bwd(t=(0,), mask=(True, True, True, True, False)))]
    for name, args in calls:
        op = getattr(torch.ops.lorambo, name)
        kernel, fake = op(*args), op(*[_to_meta(arg) for arg in args])
        assert [tuple(g.shape) for g in fake] == [tuple(g.shape) for g in kernel]


def test_the_lora_fake_refuses_operands_on_two_devices():
    # a meta operand beside CPU ones dispatches to the fake, which must not return as if it ran
    x, w, b, a, bb, *scalars = _fwd()
    with pytest.raises(RuntimeError, match=r"^lorambo::lora_linear_fwd: lora_B is on meta but x is on cpu$"):
        torch.ops.lorambo.lora_linear_fwd(x, w, b, a, bb.to("meta"), *scalars)


@pytest.mark.parametrize("operand", [0, 5])
def test_the_backward_fake_refuses_grad_y_or_t_on_another_device(operand):
    # the kernels' check_lora_bwd_args refuses it too; here only the fake can see two devices
    args = list(_bwd())
    args[operand] = args[operand].to("meta")
    name = {0: "grad_y", 5: "t"}[operand]
    with pytest.raises(RuntimeError, match=rf"^lorambo::lora_linear_bwd: {name} is on meta but x is on cpu$"):
        torch.ops.lorambo.lora_linear_bwd(*args)


def test_a_bad_call_fails_in_fake_tensor_mode_with_the_kernels_message():
    from torch._subclasses.fake_tensor import FakeTensorMode

    good, bad = _fwd(), _fwd(x=(4, 7))
    kernel = _message(lambda: torch.ops.lorambo.lora_linear_fwd(*bad))
    with FakeTensorMode() as mode:
        fake_good, fake_bad = ([mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                               for args in (good, bad))
        y, t = torch.ops.lorambo.lora_linear_fwd(*fake_good)
        assert (tuple(y.shape), tuple(t.shape)) == ((4, 6), (4, 2))
        assert _message(lambda: torch.ops.lorambo.lora_linear_fwd(*fake_bad)) == kernel


@pytest.mark.parametrize("op, args", [("lora_linear_fwd", _fwd(x=(4, 7))), ("lora_linear_bwd", _bwd(g=(4, 5))),
                                      ("dropout_mask", (_t(()), 0.5, 3))])
def test_a_bad_call_fails_while_torch_compile_traces_it(op, args):
    """fullgraph=True: the fake refuses the call while dynamo traces (TorchRuntimeError, with the
    kernel's message), not once the compiled graph runs the kernel."""
    import torch._dynamo

    fn = getattr(torch.ops.lorambo, op)
    kernel = _message(lambda: fn(*args))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a), fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as err:
        compiled(*args)
    assert kernel in str(err.value)
