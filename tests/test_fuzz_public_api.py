"""Fuzzing the public API with hypothesis: every case works and matches a float64 reference, or
raises one of lorambo's documented errors (docs/guarantees.md).

- LoRAMBoLinear forward and backward on random shapes (M including 0 and 1, odd K and N),
  dtypes, ranks within and beyond capacity, and input layouts (contiguous, transposed, expanded,
  sliced, 3-D), on the backend ``auto`` picks and on the torch reference op. The reference and
  the error bound come from the same formula in float64: on |inputs| it bounds every rounding.
- Adapter files truncated or with random bits flipped: AdapterFormatError with the model
  untouched, or a load that gives exactly the saved adapter.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorambo
from lorambo import AdapterFormatError, LoRAMBoLinear, configure_model, load_adapter, lora_layers, save_adapter

DOCUMENTED = (ValueError, TypeError, RuntimeError)  # AdapterFormatError is a ValueError
EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8,
       torch.float16: 2.0 ** -10}
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def layer_cases(draw):
    k = draw(st.integers(1, 33))
    n = draw(st.integers(1, 33))
    capacity = draw(st.integers(1, min(k, n)))
    return {
        "m": draw(st.sampled_from([0, 1, 2, 3, 7])),
        "k": k, "n": n, "capacity": capacity,
        "rank": draw(st.integers(0, capacity + 2)),  # up to 2 beyond capacity
        "dtype": draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "expanded", "sliced", "3d"])),
        "bias": draw(st.booleans()),
        "alpha": draw(st.sampled_from([None, 0.5, 3.0])),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def _input(case, gen):
    """A leaf to differentiate and the input built from it in the case's layout."""
    m, k, dtype = case["m"], case["k"], case["dtype"]
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    layout = case["layout"]
    if layout == "transposed":
        leaf = rand(k, m).requires_grad_(True)
        return leaf, lambda t: t.t()
    if layout == "expanded":
        leaf = rand(1, k).requires_grad_(True)
        return leaf, lambda t: t.expand(m, k)
    if layout == "sliced":
        leaf = rand(m, 2 * k + 1).requires_grad_(True)
        return leaf, lambda t: t[:, 1::2]
    if layout == "3d":
        leaf = rand(2, m, k).requires_grad_(True)
        return leaf, lambda t: t
    leaf = rand(m, k).requires_grad_(True)
    return leaf, lambda t: t


def _reference(x64, w, b, a, bm, r, s):
    y = x64 @ w.T + s * (x64 @ a[:r].T) @ bm[:, :r].T
    return y if b is None else y + b


def _check_layer(case, backend):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, k, n = case["dtype"], case["k"], case["n"]
    base = nn.Linear(k, n, bias=case["bias"], dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=gen, dtype=torch.float64))
        if base.bias is not None:
            base.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
    try:
        layer = LoRAMBoLinear(base, rank=case["rank"], capacity=case["capacity"], alpha=case["alpha"],
                              name="fuzz")
    except DOCUMENTED as err:
        assert case["rank"] > case["capacity"] and "'fuzz'" in str(err) and str(case["rank"]) in str(err)
        return
    assert case["rank"] <= case["capacity"]
    r = layer.rank
    with torch.no_grad():  # B is zero after init: fill the active slots so the LoRA term counts
        layer.lora_A[:r].copy_(torch.randn(r, k, generator=gen, dtype=torch.float64))
        layer.lora_B[:, :r].copy_(torch.randn(n, r, generator=gen, dtype=torch.float64))
    leaf, shape_input = _input(case, gen)
    lorambo.set_backend(backend)
    try:
        out = layer(shape_input(leaf))
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        out.backward(grad_out)
    finally:
        lorambo.set_backend(None)
    assert out.dtype == dtype and out.shape == (*shape_input(leaf).shape[:-1], n)

    # float64 reference and an error bound: the same formula on absolute values
    s = layer.scaling
    params = [t.detach().double().requires_grad_(True)
              for t in (base.weight, layer.lora_A, layer.lora_B)]
    bias = None if base.bias is None else base.bias.detach().double()
    leaf64 = leaf.detach().double().requires_grad_(True)
    ref = _reference(shape_input(leaf64), params[0], bias, params[1], params[2], r, s)
    ref.backward(grad_out.double())
    absolute = [t.detach().double().abs().requires_grad_(True)
                for t in (leaf, base.weight, layer.lora_A, layer.lora_B)]
    bound = _reference(shape_input(absolute[0]), absolute[1], None if bias is None else bias.abs(),
                       absolute[2], absolute[3], r, abs(s))
    bound.backward(grad_out.double().abs())
    tol = 4 * (k + r + 2) * EPS[dtype] if dtype in (torch.float64, torch.float32) else 3 * EPS[dtype]

    def close(got, want, scale, what):
        err = (got.double() - want).abs()
        limit = tol * scale + 1e-300
        assert bool((err <= limit).all()), f"{what}: max error {float(err.max())} over bound, {case}"

    close(out.detach(), ref.detach(), bound.detach(), "output")
    close(leaf.grad, leaf64.grad, absolute[0].grad, "grad x")
    close(layer.lora_A.grad[:r], params[1].grad[:r], absolute[2].grad[:r], "grad A")
    close(layer.lora_B.grad[:, :r], params[2].grad[:, :r], absolute[3].grad[:, :r], "grad B")
    assert not layer.lora_A.grad[r:].any() and not layer.lora_B.grad[:, r:].any()  # inactive slots
    assert base.weight.grad is None

    # rank changes beyond capacity are refused and change nothing
    before = (layer.rank, layer.lora_A.detach().clone())
    with pytest.raises(ValueError, match=r"'fuzz'.*(outside \[0, capacity|exceeds min\(in, out\))"):
        layer.set_rank(case["capacity"] + 1)
    assert layer.rank == before[0] and torch.equal(layer.lora_A, before[1])


@pytest.mark.parametrize("backend", ["auto", "torch"])
@FUZZ
@given(case=layer_cases())
def test_lora_linear_matches_float64_or_raises_documented_errors(backend, case):
    _check_layer(case, backend)


# --------------------------------------------------------------------------- adapter files
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _saved():
    model = configure_model(_net(), {"0": 2, "2": 3}, capacity={"0": 4, "2": 3}, alpha=2.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A[:layer.rank].normal_()
            layer.lora_B[:, :layer.rank].normal_()
    folder = Path(tempfile.mkdtemp(prefix="lorambo-fuzz-"))
    file = save_adapter(model, folder / "a.safetensors")
    return model, file, file.read_bytes()


MODEL, FILE, ORIGINAL = _saved()


def _state(model):
    return {n: (l.rank, l.scaling, l.lora_A.detach().clone(), l.lora_B.detach().clone())
            for n, l in lora_layers(model).items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
        for x, y in ((a[n], b[n]) for n in a))


damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(ORIGINAL) - 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(ORIGINAL) - 1), st.integers(0, 7)),
                                         min_size=1, max_size=3)),
)


@FUZZ
@given(damage=damage)
def test_damaged_adapter_files_raise_format_error_or_load_exactly(damage):
    kind, where = damage
    data = bytearray(ORIGINAL)
    if kind == "truncate":
        data = data[:where]
    else:
        for pos, bit in where:
            data[pos] ^= 1 << bit
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "a.safetensors"
        file.write_bytes(bytes(data))
        configured = configure_model(_net(), {"0": 1, "2": 1}, capacity={"0": 4, "2": 3})
        bare = _net()
        for model in (configured, bare):
            before = _state(model)
            bare_before = {n: type(m) for n, m in model.named_modules()}
            try:
                load_adapter(model, file)
            except AdapterFormatError:
                assert _same_state(_state(model), before)
                assert {n: type(m) for n, m in model.named_modules()} == bare_before
                continue
            # it loaded: then it must be exactly the saved adapter
            assert _same_state(_state(model), _state(MODEL)), damage
