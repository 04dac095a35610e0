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
}


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
