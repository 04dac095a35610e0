"""LoRAMBoLinear: construction, forward, in-place rank changes, merge, state, bad input."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorambo import LoRAMBoLinear, configure_model


def filled(layer: LoRAMBoLinear) -> LoRAMBoLinear:
    """Non-zero B in the active slots, so the adapter changes the output."""
    with torch.no_grad():
        layer.lora_B[:, : layer.rank].normal_()
    return layer


def plain_lora(layer: LoRAMBoLinear, x: torch.Tensor) -> torch.Tensor:
    r = layer.rank
    return layer.base_layer(x) + layer.scaling * (x @ layer.lora_A[:r].t()) @ layer.lora_B[:, :r].t()


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_plain_lora_float64(bias):
    layer = filled(LoRAMBoLinear(nn.Linear(12, 9, bias=bias).double(), rank=3, capacity=8, alpha=6.0))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain_lora(layer, x), rtol=1e-12, atol=1e-12)
    assert layer.scaling == 2.0 and layer.rank == 3 and layer.capacity == 8


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(12, 9), lambda: Conv1D(9, 12)])
def test_input_by_keyword_as_linear_and_conv1d_name_it(make_base):
    """nn.Linear's forward names its input ``input``, Conv1D's ``x``: model code may call
    either by keyword, and a drop-in must accept both."""
    torch.manual_seed(0)
    layer = filled(LoRAMBoLinear(make_base().double(), rank=3, capacity=8, alpha=6.0))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for out in (layer(input=x), layer(x=x)):
        torch.testing.assert_close(out, plain_lora(layer, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="forward takes one input tensor.*got both"):
        layer(x, x=x)
    with pytest.raises(TypeError, match="got none"):
        layer()


def test_conv1d_base_matches_its_linear_twin():
    conv = Conv1D(7, 10).double()  # nf=7 outputs, nx=10 inputs, weight [10, 7]
    with torch.no_grad():
        conv.weight.normal_(), conv.bias.normal_()
    lin = nn.Linear(10, 7).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t()), lin.bias.copy_(conv.bias)
    a, b = LoRAMBoLinear(conv, rank=2, capacity=4), LoRAMBoLinear(lin, rank=2, capacity=4)
    with torch.no_grad():
        b.lora_A.copy_(a.lora_A), a.lora_B.normal_(), b.lora_B.copy_(a.lora_B)
        a.zero_inactive_(), b.zero_inactive_()
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a(x), conv(x) + (x @ a.lora_A[:2].t()) @ a.lora_B[:, :2].t())
    assert (a.in_features, a.out_features) == (10, 7)


def test_base_is_frozen_and_pools_have_contract_shapes():
    base = nn.Linear(16, 24)
    layer = LoRAMBoLinear(base, rank=4, capacity=8)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (8, 16) and layer.lora_B.shape == (24, 8)
    assert torch.equal(layer.lora_A[4:], torch.zeros(4, 16)) and layer.lora_A[:4].abs().min() > 0
    assert torch.equal(layer.lora_B, torch.zeros(24, 8))  # LoRA starts as the identity change


def test_rslora_and_default_capacity():
    layer = LoRAMBoLinear(nn.Linear(64, 64), rank=4, alpha=8.0, use_rslora=True)
    assert layer.scaling == pytest.approx(8.0 / math.sqrt(4))
    assert layer.capacity == 8
    assert LoRAMBoLinear(nn.Linear(6, 40), rank=5).capacity == 6  # capped at min(in, out)


def test_growth_is_function_preserving_and_in_place():
    layer = filled(LoRAMBoLinear(nn.Linear(20, 14).double(), rank=2, capacity=12, alpha=4.0))
    x = torch.randn(7, 20, dtype=torch.float64)
    before_out = layer(x)
    ids = (id(layer.lora_A), id(layer.lora_B))
    ptrs = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
    sizes = (layer.lora_A.untyped_storage().nbytes(), layer.lora_B.untyped_storage().nbytes())
    scaling = layer.scaling
    for rank in (3, 7, 12):
        assert layer.set_rank(rank) in (2, 3, 7)
        after_out = layer(x)
        rel = (after_out - before_out).abs().max() / before_out.abs().max()
        assert rel <= 1e-12
        assert layer.lora_A[:rank].abs().min() > 0  # new components got LoRA's A init
    assert (id(layer.lora_A), id(layer.lora_B)) == ids
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == ptrs
    assert (layer.lora_A.untyped_storage().nbytes(), layer.lora_B.untyped_storage().nbytes()) == sizes
    assert layer.scaling == scaling


def test_shrink_zeroes_dropped_slots_and_gradients_stay_zero():
    layer = filled(LoRAMBoLinear(nn.Linear(10, 10), rank=6, capacity=8))
    layer.set_rank(3)
    assert torch.equal(layer.lora_A[3:], torch.zeros(5, 10)) and torch.equal(layer.lora_B[:, 3:], torch.zeros(10, 5))
    layer(torch.randn(4, 10)).square().sum().backward()
    assert torch.equal(layer.lora_A.grad[3:], torch.zeros(5, 10))
    assert torch.equal(layer.lora_B.grad[:, 3:], torch.zeros(10, 5))
    assert layer.lora_B.grad[:, :3].abs().sum() > 0


def test_keep_components_compacts_the_chosen_subset():
    layer = filled(LoRAMBoLinear(nn.Linear(9, 11).double(), rank=5, capacity=6))
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    x = torch.randn(3, 9, dtype=torch.float64)
    assert layer.keep_components([4, 1]) == 5
    assert layer.rank == 2
    assert torch.equal(layer.lora_A[:2], a[[4, 1]]) and torch.equal(layer.lora_B[:, :2], b[:, [4, 1]])
    assert torch.equal(layer.lora_A[2:], torch.zeros(4, 9)) and torch.equal(layer.lora_B[:, 2:], torch.zeros(11, 4))
    kept = layer.base_layer(x) + layer.scaling * (x @ a[[4, 1]].t()) @ b[:, [4, 1]].t()
    torch.testing.assert_close(layer(x), kept, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keep,match", [([0, 0], "distinct"), ([5], r"\[5\] outside"), ([-1], "outside")])
def test_keep_components_rejects_bad_indices(keep, match):
    layer = LoRAMBoLinear(nn.Linear(8, 8), rank=3, capacity=6, name="enc.q")
    with pytest.raises(ValueError, match=match):
        layer.keep_components(keep)


def test_merge_unmerge_round_trip_is_exact_in_float32():
    for base in (nn.Linear(32, 16), Conv1D(16, 32)):
        layer = filled(LoRAMBoLinear(base, rank=4, capacity=8, alpha=3.0))
        original = base.weight.detach().clone()
        x = torch.randn(5, 32)
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert torch.equal(base.weight, original)
        assert torch.equal(layer(x), y)


def test_merge_without_copy_in_bfloat16_stays_within_one_rounding():
    layer = filled(LoRAMBoLinear(nn.Linear(64, 48).to(torch.bfloat16), rank=8, capacity=8))
    original = layer.base_layer.weight.detach().clone()
    layer.merge(exact=False)
    layer.unmerge()
    err = (layer.base_layer.weight.float() - original.float()).abs()
    bound = 2.0 ** -7 * (original.float().abs() + layer.delta_weight().float().abs())  # 2 bf16 roundings
    assert bool((err <= bound + 1e-30).all())


def test_delta_weight_and_merged_state_guards():
    layer = filled(LoRAMBoLinear(nn.Linear(6, 5).double(), rank=2, capacity=4, alpha=5.0))
    torch.testing.assert_close(layer.delta_weight(), 2.5 * layer.lora_B[:, :2] @ layer.lora_A[:2])
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_rank(3)
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_state_dict_restores_rank_and_values():
    src = filled(LoRAMBoLinear(nn.Linear(8, 8), rank=5, capacity=8))
    dst = LoRAMBoLinear(nn.Linear(8, 8), rank=2, capacity=8)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 8)
    assert dst.rank == 5 and torch.equal(dst(x), src(x))
    with pytest.raises(ValueError, match="capacity 8"):
        LoRAMBoLinear(nn.Linear(8, 8), rank=2, capacity=4).load_state_dict(src.state_dict(), strict=False)


def test_extra_repr_shows_rank_capacity_scaling():
    text = repr(LoRAMBoLinear(nn.Linear(8, 8), rank=2, capacity=4, alpha=8.0))
    assert "rank=2" in text and "capacity=4" in text and "scaling=4" in text


def test_autocast_runs_in_the_autocast_dtype_within_twice_torchs_own_error():
    layer = LoRAMBoLinear(nn.Linear(64, 48), rank=4, capacity=8, alpha=8.0)
    with torch.no_grad():
        layer.lora_B[:, :4].normal_()
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    # float64 oracle on the bf16-rounded operands that autocast feeds the op
    xb, wb, bb, ab, bbb = (t.detach().to(torch.bfloat16).double().requires_grad_()
                           for t in (x, layer.weight, layer.bias, layer.lora_A[:4], layer.lora_B[:, :4]))
    ref = xb @ wb.t() + bb + layer.scaling * (xb @ ab.t()) @ bbb.t()
    ref.square().sum().backward()
    with torch.no_grad():  # PyTorch's own bf16 result for the same math
        bf = [t.to(torch.bfloat16) for t in (x, layer.weight, layer.bias, layer.lora_A[:4], layer.lora_B[:, :4])]
        own = torch.nn.functional.linear(bf[0], bf[1], bf[2]) + layer.scaling * (bf[0] @ bf[3].t()) @ bf[4].t()
    own_err = (own.double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 2 * own_err + 1e-6
    for got, want in ((layer.lora_A.grad[:4], ab.grad), (layer.lora_B.grad[:, :4], bbb.grad)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 2e-2  # bf16 forward and backward: a few units of 2^-8
    assert not layer.lora_A.grad[4:].any() and not layer.lora_B.grad[:, 4:].any()


def test_float64_layer_stays_float64_under_autocast_as_nn_linear_does(backend):
    """Autocast never lowers float64 (a float64 nn.Linear computes in float64 under it); the layer
    used to cast everything to bfloat16 and return a bfloat16 output ~1e-2 off."""
    layer = filled(LoRAMBoLinear(nn.Linear(12, 9).double(), rank=3, capacity=8, alpha=6.0))
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert layer.base_layer(x).dtype == torch.float64  # what the drop-in must match
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.lora_A, layer.lora_B)]
    xr, wr, ar, br = leaves
    want = xr @ wr.t() + layer.bias + layer.scaling * (xr @ ar[:3].t()) @ br[:, :3].t()
    want.backward(grad_y)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for got, ref in zip((x, layer.weight, layer.lora_A, layer.lora_B), leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-12, atol=1e-12)
    # a float64 input into a float32 layer is a dtype mix under autocast too (nn.Linear raises)
    layer32 = filled(LoRAMBoLinear(nn.Linear(12, 9), rank=3, capacity=8))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="float64.*under autocast"):
        layer32(x)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"rank": -1}, ValueError, r"'blk\.0\.q'.*rank -1 outside \[0, capacity = 8\]"),
    ({"rank": 9, "capacity": 8}, ValueError, r"'blk\.0\.q'.*rank 9"),
    ({"rank": 2.5}, TypeError, r"'blk\.0\.q'.*rank must be an int, got 2.5"),
    ({"rank": True}, TypeError, "rank must be an int"),
    ({"rank": 2, "capacity": 17}, ValueError, r"'blk\.0\.q'.*capacity 17.*min\(in, out\) = 16"),
    ({"rank": 2, "dropout": 1.0}, ValueError, "dropout 1.0"),
    ({"rank": 2, "alpha": float("nan")}, ValueError, r"'blk\.0\.q'.*alpha must be a finite number, got nan"),
    ({"rank": 2, "scaling": float("inf")}, ValueError, r"'blk\.0\.q'.*scaling must be a finite number, got inf"),
])
def test_bad_construction_names_module_and_value(kwargs, exc, match):
    kwargs.setdefault("capacity", 8)
    with pytest.raises(exc, match=match):
        LoRAMBoLinear(nn.Linear(16, 32), name="blk.0.q", **kwargs)


@pytest.mark.parametrize("kwargs,dtype,match", [
    # before: OverflowError "int too large to convert to float", naming no argument
    ({"alpha": 10**400}, torch.float32, r"'blk\.0\.q'.*alpha must be a finite number, got 10000000\.\.\. "
                                        r"\(a number of 401 digits\)"),
    ({"scaling": -10**400}, torch.float32, r"scaling must be a finite number, got -1000000\.\.\."),
    # before: accepted, and the adapter added exactly nothing (or inf)
    ({"alpha": 1e-320}, torch.float32, r"'blk\.0\.q'.*scaling 5e-321 \(alpha=1e-320\) rounds to 0 \(the adapter "
                                       r"would add nothing\) in torch.float32"),
    ({"alpha": 1e-8}, torch.float16, r"scaling 5e-09 \(alpha=1e-08\) rounds to 0 .* in torch.float16"),
    ({"alpha": 1e300}, torch.float32, r"scaling 5e\+299 .* rounds to inf in torch.float32"),
    # before: the kept inputs were scaled by inf
    ({"dropout": 0.99999}, torch.float16, r"'blk\.0\.q'.*dropout 0.99999 scales the kept inputs by 1 / \(1 - p\) = "
                                          r"1e\+05, which overflows torch.float16"),
])
def test_settings_beyond_the_layer_dtype_are_refused_naming_them(kwargs, dtype, match):
    with pytest.raises(ValueError, match=match):
        LoRAMBoLinear(nn.Linear(16, 32, dtype=dtype), name="blk.0.q", rank=2, capacity=8, **kwargs)


def test_settings_just_inside_the_layer_dtype_are_kept():
    tiny = LoRAMBoLinear(nn.Linear(16, 32), rank=2, capacity=8, alpha=1e-40)  # subnormal, not 0, in float32
    assert tiny.scaling == 5e-41 and float(torch.tensor(tiny.scaling)) > 0
    half = LoRAMBoLinear(nn.Linear(16, 32, dtype=torch.float16), rank=2, capacity=8, dropout=0.9999)
    assert half.dropout == 0.9999  # 1 / (1 - p) = 1e4 < 65504


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("in_features, out_features", [(6, 0), (0, 6)])
def test_a_base_layer_without_inputs_or_outputs_is_refused_naming_its_features(in_features, out_features):
    # before: "capacity 1 must be in [1, min(in, out) = 0]", a capacity nobody had asked for
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(in_features, out_features))
    with pytest.raises(ValueError, match=rf"LoRAMBoLinear '1': the base layer has in_features={in_features}, "
                                         rf"out_features={out_features}: a layer without inputs or outputs"):
        configure_model(model, ranks=2)
    assert all(type(m) is nn.Linear for m in model)  # nothing half-applied


def test_bad_module_type_and_set_rank_values():
    with pytest.raises(TypeError, match="Conv2d"):
        LoRAMBoLinear(nn.Conv2d(3, 3, 1))
    layer = LoRAMBoLinear(nn.Linear(8, 8), rank=2, capacity=4, name="fc")
    with pytest.raises(ValueError, match=r"'fc'.*rank 5"):
        layer.set_rank(5)
    with pytest.raises(TypeError, match=r"'fc'.*'3'"):
        layer.set_rank("3")


def test_bad_input_shape_and_dtype():
    layer = LoRAMBoLinear(nn.Linear(8, 4), rank=2, name="enc.fc")
    with pytest.raises(ValueError, match=r"'enc\.fc'.*last dim 7.*in_features = 8"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match=r"'enc\.fc'.*torch.float64.*torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_bias_of_another_dtype_is_refused_naming_the_layer(backend):
    """Each backend's op raised its own error, none naming the layer (the torch backend's:
    'self and mat2 must have the same dtype')."""
    layer = LoRAMBoLinear(nn.Linear(8, 4), rank=2, name="enc.fc").to(torch.bfloat16)
    layer.base_layer.bias = nn.Parameter(layer.base_layer.bias.float(), requires_grad=False)
    with pytest.raises(TypeError, match=r"'enc\.fc'.*weight dtype torch.bfloat16 / bias dtype torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))


def test_integer_input_is_refused_under_autocast_too():
    """Autocast used to cast an integer input (token ids passed by mistake) to bfloat16 and
    compute, where nn.Linear raises."""
    layer = LoRAMBoLinear(nn.Linear(8, 4), rank=2, name="enc.fc")
    ids = torch.randint(0, 5, (2, 8))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(TypeError, match=r"'enc\.fc'.*input has dtype torch.int64.*real floating"):
                layer(ids)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_complex_layer_is_refused_instead_of_wrong_gradients(backend):
    """A layer converted with .to(torch.complex64) used to run on the reference op, whose
    hand-written backward lacks the complex conjugates: silently wrong gradients."""
    layer = filled(LoRAMBoLinear(nn.Linear(8, 4), rank=2, name="enc.fc")).to(torch.complex64)
    x = torch.randn(2, 8, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"'enc\.fc'.*input has dtype torch.complex64.*real floating"):
        layer(x)


@pytest.mark.parametrize("on_meta", ["input", "weight", "bias", "lora_A", "lora_B"])
def test_input_and_layer_on_different_devices_are_refused_clearly(backend, on_meta):
    """A device mix used to reach the ops, which with a meta operand (pools left on meta after a
    partial meta-device load) dispatch to their fake implementations and return uninitialised
    memory as the output; with an input on the wrong device the error named no layer."""
    layer = LoRAMBoLinear(nn.Linear(8, 4), rank=2, name="enc.fc")
    x = torch.randn(3, 8)
    if on_meta == "input":
        x = x.to("meta")
    elif on_meta in ("weight", "bias"):
        module, name = layer.base_layer, on_meta
        setattr(module, name, nn.Parameter(getattr(module, name).detach().to("meta"), requires_grad=False))
    else:
        setattr(layer, on_meta, nn.Parameter(getattr(layer, on_meta).detach().to("meta")))
    with pytest.raises(ValueError, match=r"'enc\.fc': input is on") as err:
        layer(x)
    assert "meta" in str(err.value) and "cpu" in str(err.value)
    assert "accelerate" not in str(err.value)  # no offloading hook on the base: no offloading hint


def test_growth_with_a_seeded_generator_is_reproducible():
    a = LoRAMBoLinear(nn.Linear(8, 8), rank=1, capacity=4)
    b = LoRAMBoLinear(nn.Linear(8, 8), rank=1, capacity=4)
    a.set_rank(4, generator=torch.Generator().manual_seed(7))
    b.set_rank(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.lora_A[1:], b.lora_A[1:]) and a.lora_A[1:].abs().min() > 0


def test_zero_dim_input_is_refused_clearly():
    layer = LoRAMBoLinear(nn.Linear(8, 8), rank=2, capacity=4, name="fc")
    with pytest.raises(ValueError, match=r"'fc'.*0-d tensor"):
        layer(torch.tensor(1.0))


def test_pools_without_their_rank_load_with_a_rank_that_covers_their_slots():
    """A state_dict filtered to its lora_ keys has no _extra_state: it loaded into a rank-1 layer
    with strict=False, the grown slots 1 and 2 were ignored and the output was off by ~2. The rank
    now covers the loaded non-zero slots."""
    torch.manual_seed(0)
    src = filled(LoRAMBoLinear(nn.Linear(8, 6, dtype=torch.float64), rank=3, capacity=4, name="fc"))
    pools = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    dst = LoRAMBoLinear(nn.Linear(8, 6, dtype=torch.float64), rank=1, capacity=4, name="fc")
    dst.load_state_dict(pools, strict=False)
    assert dst.rank == 3
    x = torch.randn(5, 8, dtype=torch.float64)
    A, B = src.lora_A[:3].detach(), src.lora_B[:, :3].detach()
    expected = dst.base_layer(x) + src.scaling * (x @ A.T) @ B.T
    torch.testing.assert_close(dst(x), expected, rtol=1e-12, atol=1e-12)
    # pools whose slots past the rank are zero (no growth since saving) keep the layer's rank
    larger = LoRAMBoLinear(nn.Linear(8, 6, dtype=torch.float64), rank=4, capacity=4)
    larger.load_state_dict(pools, strict=False)
    assert larger.rank == 4 and torch.equal(larger.lora_B, src.lora_B)


@pytest.mark.parametrize("extra, match", [
    (torch.tensor([99, 8]), r"'fc'.*rank 99 outside \[0, capacity = 8\]"),
    (torch.tensor([-3, 8]), r"'fc'.*rank -3 outside"),
    (torch.tensor([2, 16]), r"'fc'.*capacity 16"),
    (torch.tensor([2.5, 8.0]), r"'fc'.*integers \[rank, capacity\]"),
    (torch.cat([torch.tensor([2, 8]), torch.tensor([float("nan"), 2.0], dtype=torch.float64).view(torch.int64),
                torch.tensor([0])]), r"'fc'.*scaling nan"),
    (torch.cat([torch.tensor([2, 8]), torch.tensor([1.0, 2.0], dtype=torch.float64).view(torch.int64),
                torch.tensor([7])]), r"'fc'.*use_rslora 7"),
])
def test_state_dict_with_a_bad_rank_is_refused(extra, match):
    """torch copies a module's tensors before handing it the extra state: the pools of a rank-5
    adapter loaded, the bad rank was refused after, and the layer kept rank 2 with non-zero slots
    past it. The extra state is checked first, so nothing of the layer changes."""
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(8, 12), rank=2, capacity=8, name="fc")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = filled(LoRAMBoLinear(nn.Linear(8, 12), rank=5, capacity=8)).state_dict()
    state["_extra_state"] = extra
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    assert layer.rank == 2
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_restores_the_scaling_of_a_layer_built_with_another_alpha():
    """The extra state held the rank only: loaded into a layer built with another alpha (rank 2,
    alpha 4, rsLoRA: scaling 2.83), the rank-6 adapter saved with scaling 16/6 came back with the
    new layer's scaling and computed another function without a word."""
    torch.manual_seed(0)
    src = filled(LoRAMBoLinear(nn.Linear(8, 12, dtype=torch.float64), rank=6, capacity=8, alpha=16.0, name="fc"))
    dst = LoRAMBoLinear(nn.Linear(8, 12, dtype=torch.float64), rank=2, capacity=8, alpha=4.0, use_rslora=True)
    dst.load_state_dict(src.state_dict())
    assert (dst.rank, dst.scaling, dst.alpha, dst.use_rslora) == (6, 16.0 / 6, 16.0, False)
    x = torch.randn(5, 8, dtype=torch.float64)
    A, B = src.lora_A[:6].detach(), src.lora_B[:, :6].detach()
    expected = x @ src.base_layer.weight.detach().T + src.base_layer.bias.detach() + (16.0 / 6) * (x @ A.T) @ B.T
    torch.testing.assert_close(dst(x), expected, rtol=1e-12, atol=1e-12)


def test_extra_state_of_rank_and_capacity_only_keeps_the_layers_scaling():
    src = filled(LoRAMBoLinear(nn.Linear(8, 12), rank=6, capacity=8, alpha=16.0))
    dst = LoRAMBoLinear(nn.Linear(8, 12), rank=2, capacity=8, alpha=4.0)
    state = src.state_dict()
    state["_extra_state"] = torch.tensor([6, 8])  # the two integers older versions wrote
    dst.load_state_dict(state)
    assert (dst.rank, dst.scaling, dst.alpha) == (6, 2.0, 4.0)


def test_state_dict_with_its_floating_tensors_cast_keeps_the_exact_scaling():
    """The usual conversion of a checkpoint to half precision casts its floating tensors: the
    extra state is int64, so rank and scaling come through it exactly."""
    torch.manual_seed(0)
    src = filled(LoRAMBoLinear(nn.Linear(8, 12), rank=6, capacity=8, alpha=16.0, use_rslora=True))
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    dst = LoRAMBoLinear(nn.Linear(8, 12, dtype=torch.bfloat16), rank=2, capacity=8)
    dst.load_state_dict(half)
    assert (dst.rank, dst.scaling, dst.alpha, dst.use_rslora) == (6, 16.0 / math.sqrt(6), 16.0, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int32])
def test_extra_state_cast_to_another_dtype_is_refused(dtype):
    layer = LoRAMBoLinear(nn.Linear(8, 12), rank=2, capacity=8, alpha=16.0, name="fc")
    state = filled(LoRAMBoLinear(nn.Linear(8, 12), rank=6, capacity=8, alpha=16.0)).state_dict()
    state["_extra_state"] = state["_extra_state"].to(dtype)
    with pytest.raises(ValueError, match=rf"'fc'.*int64.*{dtype}"):
        layer.load_state_dict(state)
    assert (layer.rank, layer.scaling) == (2, 8.0)


@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8),
                                                  (torch.float16, 2.0**-11)])
def test_inexact_unmerge_is_within_the_documented_bound(dtype, unit_roundoff):
    layer = LoRAMBoLinear(nn.Linear(40, 30, dtype=dtype), rank=6, capacity=8, alpha=12.0)
    with torch.no_grad():
        layer.lora_B[:, :6].normal_()
    w = layer.base_layer.weight.detach().double().clone()
    delta = layer._delta_as_base_layout()
    layer.merge(exact=False)
    layer.unmerge()
    err = (layer.base_layer.weight.double() - w).abs()
    bound = 2 * unit_roundoff * torch.maximum(w.abs(), (w + delta).abs())
    assert (err <= bound).all()
    assert err.max() > 0  # the bound is exercised: inexact unmerge does round


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("make", [lambda: LoRAMBoLinear(nn.Linear(8, 4, dtype=torch.complex64), rank=2, name="enc.fc"),
                                  lambda: configure_model(nn.Sequential(nn.Linear(8, 4, dtype=torch.complex64)), 2)])
def test_complex_base_is_refused_when_adapted(make):
    """A complex Linear used to be wrapped (complex pools) and configured without complaint, and
    then every forward raised: the error now comes where the layer is adapted."""
    with pytest.raises(TypeError, match=r"(enc\.fc|'0').*base weight has dtype torch.complex64.*real floating"):
        make()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_exact_unmerge_after_a_cast_restores_the_cast_original(dtype):
    # the copy merge(exact=True) keeps is converted on use: after model.to(dtype) unmerge gives the
    # original weight as that cast gives it, in the model's dtype, as an unmerged layer would hold it
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(9, 7), rank=3, capacity=4, alpha=5.0)
    with torch.no_grad():
        layer.lora_B[:, :3].normal_()
    unmerged = LoRAMBoLinear(nn.Linear(9, 7), rank=3, capacity=4, alpha=5.0)
    unmerged.load_state_dict(layer.state_dict())
    layer.merge(exact=True)
    layer.to(dtype)
    unmerged.to(dtype)
    layer.unmerge()
    assert layer.base_layer.weight.dtype == dtype
    assert torch.equal(layer.base_layer.weight, unmerged.base_layer.weight)
    x = torch.randn(5, 9, dtype=dtype)
    assert torch.equal(layer(x), unmerged(x))


def test_a_rank_loaded_alone_zeroes_the_slots_past_it_and_their_gradients():
    """A state_dict holding only a layer's ``_extra_state`` (loaded with strict=False) lowers its
    rank: the slots past the new rank, and their gradients, must become exactly zero (the pool
    rule that saving checks), and the output the rank-2 adapter of the slots kept."""
    torch.manual_seed(0)
    src = LoRAMBoLinear(nn.Linear(8, 6, dtype=torch.float64), rank=2, capacity=6, alpha=4.0, name="fc")
    layer = filled(LoRAMBoLinear(nn.Linear(8, 6, dtype=torch.float64), rank=5, capacity=6, alpha=4.0, name="fc"))
    layer(torch.randn(3, 8, dtype=torch.float64)).square().sum().backward()
    assert layer.lora_A.grad[2:5].abs().min() > 0 and layer.lora_B.grad[:, 2:5].abs().min() > 0
    A, B = layer.lora_A[:2].detach().clone(), layer.lora_B[:, :2].detach().clone()
    grad_a, grad_b = layer.lora_A.grad[:2].clone(), layer.lora_B.grad[:, :2].clone()
    layer.load_state_dict({"_extra_state": src.get_extra_state()}, strict=False)
    assert layer.rank == 2
    assert torch.equal(layer.lora_A[:2], A) and torch.equal(layer.lora_B[:, :2], B)
    assert torch.equal(layer.lora_A[2:], torch.zeros(4, 8, dtype=torch.float64))
    assert torch.equal(layer.lora_B[:, 2:], torch.zeros(6, 4, dtype=torch.float64))
    assert torch.equal(layer.lora_A.grad[:2], grad_a) and torch.equal(layer.lora_B.grad[:, :2], grad_b)
    assert torch.equal(layer.lora_A.grad[2:], torch.zeros(4, 8, dtype=torch.float64))
    assert torch.equal(layer.lora_B.grad[:, 2:], torch.zeros(6, 4, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = layer.base_layer(x) + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.3, False)], ids=["no-dropout", "eval"])
def test_a_forward_without_dropout_draws_nothing_from_the_global_generator(backend, dropout, training):
    """As nn.Linear: a forward that drops nothing leaves torch's random stream (data order,
    other layers' dropout) where it was; only a dropout mask draws its seed."""
    import lorambo
    from lorambo.ext import loader as ext_loader

    if backend == "ext" and ext_loader.load() is None:
        pytest.skip("extension not built")
    torch.manual_seed(0)
    layer = filled(LoRAMBoLinear(nn.Linear(8, 6), rank=2, capacity=4, dropout=dropout)).train(training)
    x = torch.randn(3, 8)
    lorambo.set_backend(backend)
    try:
        torch.manual_seed(1)
        expected = torch.rand(4)
        torch.manual_seed(1)
        layer(x).sum().backward()
        assert torch.equal(torch.rand(4), expected)
    finally:
        lorambo.set_backend(None)


def test_delta_weight_of_a_bfloat16_layer_is_rounded_once():
    """``s * B_r A_r`` accumulates and scales in float32 and rounds once to bfloat16: equal to
    the float64 product rounded to bfloat16 (a bfloat16 product rounded again after the
    scaling is off by one unit in many elements)."""
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(24, 16, dtype=torch.bfloat16), rank=8, capacity=8, alpha=2.4)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = ((layer.lora_B.double() @ layer.lora_A.double()) * layer.scaling).to(torch.bfloat16)
    delta = layer.delta_weight()
    assert delta.dtype == torch.bfloat16 and torch.equal(delta, expected)


def test_slot_edits_count_a_load_only_when_it_brings_other_components():
    """``slot_edits`` (what importance estimates and weight averages follow): loading the layer's
    own state_dict brings back the components it holds and counts nothing; another layer's
    state_dict counts one edit."""
    torch.manual_seed(0)
    layer = filled(LoRAMBoLinear(nn.Linear(8, 6), rank=3, capacity=4))
    other = filled(LoRAMBoLinear(nn.Linear(8, 6), rank=3, capacity=4))
    edits = layer.slot_edits
    layer.load_state_dict(layer.state_dict())
    assert layer.slot_edits == edits
    layer.load_state_dict(other.state_dict())
    assert layer.slot_edits == edits + 1


def test_a_state_dict_with_a_bad_rank_is_refused_before_a_merged_layer_unmerges():
    # the unmerge a load does first must not happen for a load that is then refused
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in before.items()}
    bad["_extra_state"][0] = 5
    with pytest.raises(ValueError, match="LoRAMBoLinear"):
        layer.load_state_dict(bad)
    assert layer.merged and layer.rank == 2
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_slot_ids_and_edits_follow_set_rank_and_keep_components():
    """Each slot's component id (what ``lorambo.follow_ranks`` and importance statistics follow),
    against a list kept by hand: growth starts new ids above every earlier one, a shrink and
    ``keep_components`` leave -1 in the slots they empty, ``keep_components`` moves ids with their
    slots; each edit that changes an id counts one ``slot_edits``, a same-rank ``set_rank`` and an
    in-order ``keep_components`` none."""
    from lorambo.nn.slot_lineage import slot_ids

    layer = filled(LoRAMBoLinear(nn.Linear(8, 6), rank=2, capacity=6))
    ids, edits = slot_ids(layer), layer.slot_edits
    assert len(ids) == 6 and ids[2:] == [-1] * 4 and len(set(ids[:2])) == 2 and min(ids[:2]) >= 0

    layer.set_rank(2)
    assert (slot_ids(layer), layer.slot_edits) == (ids, edits)

    layer.set_rank(4)
    grown = slot_ids(layer)
    assert grown[:2] == ids[:2] and grown[4:] == [-1, -1] and len(set(grown[:4])) == 4
    assert min(grown[2:4]) > max(ids), (ids, grown)
    assert layer.slot_edits == edits + 1

    layer.keep_components([3, 0, 2])
    assert slot_ids(layer) == [grown[3], grown[0], grown[2], -1, -1, -1]
    assert layer.slot_edits == edits + 2

    layer.keep_components([0, 1, 2])
    assert slot_ids(layer) == [grown[3], grown[0], grown[2], -1, -1, -1] and layer.slot_edits == edits + 2

    layer.keep_components([1])  # from rank 3: slots 1 and 2 empty
    assert slot_ids(layer) == [grown[0], -1, -1, -1, -1, -1] and layer.slot_edits == edits + 3

    layer.set_rank(0)
    assert slot_ids(layer) == [-1] * 6 and layer.slot_edits == edits + 4


def test_a_layer_pickled_before_slots_carried_ids_gets_ids_without_an_edit():
    """A layer unpickled from before ``_slot_ids`` / ``_slot_edits`` existed: its active slots get
    distinct new ids on first use (kept from then on), -1 past the rank, and 0 edits; ids started
    later in this process never repeat them."""
    import pickle

    from lorambo.nn.slot_lineage import slot_ids

    layer_old = pickle.loads(pickle.dumps(filled(LoRAMBoLinear(nn.Linear(8, 6), rank=3, capacity=5))))
    for key in ("_slot_ids", "_slot_edits"):
        del layer_old.__dict__[key]
    layer_old = pickle.loads(pickle.dumps(layer_old))  # as a layer from before both fields
    assert "_slot_ids" not in layer_old.__dict__
    assert layer_old.slot_edits == 0
    ids = slot_ids(layer_old)
    assert len(ids) == 5 and ids[3:] == [-1, -1] and len(set(ids[:3])) == 3 and min(ids[:3]) >= 0
    assert slot_ids(layer_old) == ids and layer_old.slot_edits == 0
    other = LoRAMBoLinear(nn.Linear(8, 6), rank=1, capacity=5)
    other.set_rank(4)
    assert not set(slot_ids(other)[:4]) & set(ids[:3])
    layer_old.set_rank(5)  # the ids it got are its components' from then on
    assert slot_ids(layer_old)[:3] == ids[:3] and layer_old.slot_edits == 1
