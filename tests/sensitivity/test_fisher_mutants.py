"""FisherProxy and the per-example norms of lorambo.sensitivity.fisher against float64 per-example gradients.

Written from mutation testing of lorambo/sensitivity/fisher.py.
"""

import math
import warnings

import pytest
import torch
from torch import nn

from lorambo.ops.sketch import set_sketch_backend
from lorambo.sensitivity import FisherProxy
from lorambo.sensitivity import fisher as fisher_module
from test_fisher_padding_rows import Net as MaskedNet, token_mean_loss  # two Linears reading attention_mask

DT = torch.float64


def _per_example_reference(model, x, y):
    """mean_n ||d loss_n / d W||^2 for each Linear, loss_n example n's own mean squared error."""
    sq = {"0": [], "2": []}
    for n in range(x.shape[0]):
        loss = ((model(x[n:n + 1]) - y[n:n + 1]) ** 2).mean()
        grads = torch.autograd.grad(loss, [model[0].weight, model[2].weight])
        sq["0"].append(float(grads[0].square().sum()))
        sq["2"].append(float(grads[1].square().sum()))
    return {k: sum(v) / len(v) for k, v in sq.items()}


def _per_example_squares(model, layers, x, y):
    """||d loss_n / d W||^2 per example n and layer, loss_n example n's own mean squared error."""
    out = {name: [] for name in layers}
    for n in range(x.shape[0]):
        loss = ((model(x[n:n + 1]) - y[n:n + 1]) ** 2).mean()
        grads = torch.autograd.grad(loss, [model.get_submodule(name).weight for name in layers])
        for name, g in zip(layers, grads):
            out[name].append(float(g.square().sum()))
    return out


class Unused(nn.Module):
    """A Linear the forward never calls, ahead of the two it does."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4, dtype=DT)
        self.a = nn.Linear(4, 5, dtype=DT)
        self.b = nn.Linear(5, 3, dtype=DT)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_estimates_after_an_unreached_layer_and_their_standard_errors():
    """With an unreached layer ahead of the reached ones, every reached layer's estimate is the mean
    of its own per-example squared gradient norms, with stderr = sample std (ddof 1) / sqrt(n)."""
    torch.manual_seed(5)
    model = Unused()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 4, generator=gen, dtype=DT), torch.randn(7, 3, generator=gen, dtype=DT)
    with FisherProxy(model, modules=["first", "a", "b"]) as proxy:
        ((model(x) - y) ** 2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the unreached layer is left out with a warning
        got = proxy.estimates()
    assert set(got) == {"a", "b"}
    for name, squares in _per_example_squares(model, ["a", "b"], x, y).items():
        n = len(squares)
        mean = sum(squares) / n
        stderr = math.sqrt(sum((s - mean) ** 2 for s in squares) / (n - 1) / n)
        assert got[name].num_probes == n
        assert got[name].value == pytest.approx(mean, rel=1e-10)
        assert got[name].stderr == pytest.approx(stderr, rel=1e-8)


@pytest.mark.parametrize("scaler", [None, "disabled"])
def test_a_disabled_grad_scaler_measures_as_no_scaler(scaler):
    """A GradScaler that is disabled (an fp32 run) leaves the traces unscaled: the same per-example
    gradient norms as without a scaler."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=gen, dtype=DT), torch.randn(6, 3, generator=gen, dtype=DT)
    grad_scaler = torch.amp.GradScaler("cpu", enabled=False) if scaler else None
    with FisherProxy(model, grad_scaler=grad_scaler) as proxy:
        ((model(x) - y) ** 2).mean().backward()
    got = proxy.estimates()
    want = _per_example_reference(model, x, y)
    assert set(got) == {"0", "2"}
    for name, value in want.items():
        assert got[name].num_probes == 6
        assert got[name].value == pytest.approx(value, rel=1e-10)


@pytest.mark.parametrize("multiplier", [2.0, 0.25])
def test_loss_multiplier_is_divided_out(multiplier):
    """A loss multiplied by ``loss_multiplier`` before its backward gives the traces of the plain loss
    (each ||g_n||^2 divided by the multiplier squared), for multipliers above and below 1."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 4, generator=gen, dtype=DT), torch.randn(5, 3, generator=gen, dtype=DT)
    with FisherProxy(model, loss_multiplier=multiplier) as proxy:
        (((model(x) - y) ** 2).mean() * multiplier).backward()
    got = proxy.estimates()
    for name, value in _per_example_reference(model, x, y).items():
        assert got[name].value == pytest.approx(value, rel=1e-10)


@pytest.fixture
def kernels():
    set_sketch_backend("triton")
    yield
    set_sketch_backend(None)


def test_exact_norms_use_the_gram_kernel_only_for_matching_dtypes(kernels, monkeypatch):
    """With the sketch kernels requested, the exact per-example norms of 3-D inputs run the Gram
    kernel when x and dY share a dtype, and the PyTorch path when they do not; both give the float64
    norms ||dY_n^T X_n||^2."""
    calls = []
    real = fisher_module.sq_grad_norms_many
    monkeypatch.setattr(fisher_module, "sq_grad_norms_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 16, generator=gen)
    g = torch.randn(3, 2, 16, generator=gen)
    want = torch.stack([(g[n].double().T @ x[n].double()).square().sum() for n in range(3)])
    same = fisher_module._exact_sq_grad_norms(x, g)
    assert calls == [1]
    torch.testing.assert_close(same.double(), want, rtol=1e-5, atol=1e-6)
    g16 = g.to(torch.bfloat16)
    want16 = torch.stack([(g16[n].double().T @ x[n].double()).square().sum() for n in range(3)])
    mixed = fisher_module._exact_sq_grad_norms(x, g16)
    assert calls == [1]
    torch.testing.assert_close(mixed.double(), want16, rtol=1e-5, atol=1e-6)


def _reference_sq_norms(x, g):
    """||dY_n^T X_n||_F^2 per example in float64, one example at a time, tokens flattened."""
    out = []
    for n in range(x.shape[0]):
        xn = x[n].double().reshape(-1, x.shape[-1])
        gn = g[n].double().reshape(-1, g.shape[-1])
        out.append((gn.T @ xn).square().sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=DT)


# (x shape, dY shape): 2-D rows, 3-D with T (in + out) < in out (Gram form) and with T (in + out) >= in out
# (materialised form), 4-D (two token dims) in both forms
NORM_SHAPES = [((5, 6), (5, 4)), ((4, 2, 8), (4, 2, 7)), ((4, 6, 3), (4, 6, 4)),
               ((3, 2, 1, 9), (3, 2, 1, 8)), ((3, 2, 3, 3), (3, 2, 3, 2))]


@pytest.mark.parametrize("shapes", NORM_SHAPES, ids=["2d", "3d-gram", "3d-materialised", "4d-gram", "4d-materialised"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_per_example_sq_grad_norms_match_per_example_gradients(shapes, dtype):
    """per_example_sq_grad_norms(x, dY) is ||dY_n^T X_n||_F^2 of each example (its tokens the product of the
    middle dims), accumulated in at least float32 (bfloat16 inputs give float32 results at float32 accuracy)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*shapes[0], generator=gen, dtype=DT).to(dtype)
    g = torch.randn(*shapes[1], generator=gen, dtype=DT).to(dtype)
    got = fisher_module.per_example_sq_grad_norms(x, g)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    assert got.shape == (x.shape[0],)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), _reference_sq_norms(x, g), rtol=tol, atol=0)


@pytest.mark.parametrize("chunk_elements", [1, 2 * 12, 3 * 12])
def test_materialised_norms_in_chunks_of_examples(chunk_elements, monkeypatch):
    """The materialised form takes the examples in chunks of max(1, budget // (in * out)); chunks of 1, 2 and
    3 examples (the last one short) give every example's ||dY_n^T X_n||^2, in order."""
    monkeypatch.setattr(fisher_module, "_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, 6, 3, generator=gen, dtype=DT)  # T (in + out) = 42 >= in out = 12: materialised
    g = torch.randn(5, 6, 4, generator=gen, dtype=DT)
    got = fisher_module.per_example_sq_grad_norms(x, g)
    torch.testing.assert_close(got, _reference_sq_norms(x, g), rtol=1e-12, atol=0)


@pytest.mark.parametrize("tokens", [6, 1], ids=["materialised", "gram"])
def test_per_example_norms_of_an_empty_batch(tokens):
    """An empty batch (B = 0) gives an empty [0] tensor in either form."""
    x, g = torch.zeros(0, tokens, 3, dtype=DT), torch.zeros(0, tokens, 4, dtype=DT)
    got = fisher_module.per_example_sq_grad_norms(x, g)
    assert got.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sketched_norms_are_unbiased(dtype):
    """sketched_sq_grad_norms with k Rademacher probes per example averages to ||dY_n^T X_n||^2: with
    k = 20000 each example's estimate is within 5% of the float64 value (its relative sd is about 1%);
    bfloat16 inputs are sketched in float32."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 4, 5, generator=gen, dtype=DT).to(dtype)
    g = torch.randn(3, 4, 3, generator=gen, dtype=DT).to(dtype)
    got = fisher_module.sketched_sq_grad_norms(x, g, 20000, torch.Generator().manual_seed(14))
    assert got.dtype == torch.promote_types(dtype, torch.float32) and got.shape == (3,)
    torch.testing.assert_close(got.double(), _reference_sq_norms(x, g), rtol=0.05, atol=0)


def _example_squares(model, layers, batches, example_loss):
    """||d example_loss(x_n, y_n) / d W||^2 of every example of every batch, per layer, in float64."""
    out = {name: [] for name in layers}
    for x, y in batches:
        for n in range(x.shape[0]):
            loss = example_loss(model(x[n]), y[n])
            grads = torch.autograd.grad(loss, [model.get_submodule(name).weight for name in layers])
            for name, g in zip(layers, grads):
                out[name].append(float(g.square().sum()))
    return out


def _mean_and_stderr(squares):
    n = len(squares)
    mean = sum(squares) / n
    return mean, (math.sqrt(sum((s - mean) ** 2 for s in squares) / (n - 1) / n) if n > 1 else math.inf)


def _assert_estimate(got, squares, num_probes):
    """``got`` (an Estimate) is the mean of ``squares`` with its standard error, over ``num_probes``."""
    mean, stderr = _mean_and_stderr(squares)
    assert got.num_probes == num_probes
    assert got.value == pytest.approx(mean, rel=1e-10)
    assert got.stderr == pytest.approx(stderr, rel=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_statistics_accumulate_over_batches_of_different_sizes(reduction):
    """Over several backward passes with batches of 3, 4 and 2 examples, each layer's estimate is the mean of
    all 9 per-example squared gradient norms (g_n = B dY_n^T X_n for a mean over each batch's B examples, dY_n^T
    X_n for a sum), with stderr = their sample std (ddof 1) / sqrt(9)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(b, 4, generator=gen, dtype=DT), torch.randn(b, 3, generator=gen, dtype=DT))
               for b in (3, 4, 2)]
    reduce = torch.mean if reduction == "mean" else torch.sum
    with FisherProxy(model, reduction=reduction) as proxy:
        for x, y in batches:
            reduce(((model(x) - y) ** 2).sum(-1)).backward()
    got = proxy.estimates()
    want = _example_squares(model, ["0", "2"], batches, lambda out, y: ((out - y) ** 2).sum())
    assert set(got) == {"0", "2"}
    for name, squares in want.items():
        _assert_estimate(got[name], squares, 9)


def test_an_input_without_a_batch_dim_is_one_example():
    """A Linear called on a 1-D input (no batch dim) counts it as one example: after two such calls the
    estimate is the mean of their two squared gradient norms; after one, that norm with an infinite stderr."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3, dtype=DT))
    gen = torch.Generator().manual_seed(10)
    batches = [(torch.randn(1, 4, generator=gen, dtype=DT), torch.randn(1, 3, generator=gen, dtype=DT))
               for _ in range(2)]
    squares = _example_squares(model, ["0"], batches, lambda out, y: ((out - y) ** 2).sum())["0"]
    with FisherProxy(model, reduction="sum") as proxy:
        for i, (x, y) in enumerate(batches):
            ((model(x[0]) - y[0]) ** 2).sum().backward()
            got = proxy.estimates()["0"]
            mean, stderr = _mean_and_stderr(squares[:i + 1])
            assert got.num_probes == i + 1
            assert got.value == pytest.approx(mean, rel=1e-10)
            assert got.stderr == pytest.approx(stderr, rel=1e-8)


def test_float32_layers_accumulate_their_statistics_in_float64():
    """A float32 layer's squared norms are summed in float64: examples whose ||g_n||^2 ~ 1e5 differ by ~1e-4
    relative still get the stderr of a float64 computation (a float32 sum of squares would cancel to noise)."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(16)
    x = 100 + 0.01 * torch.randn(16, 4, generator=gen)
    c = torch.randn(3, generator=gen)
    with FisherProxy(model, reduction="sum") as proxy:
        (model(x) * c).sum().backward()
    got = proxy.estimates()["0"]
    reference = nn.Sequential(nn.Linear(4, 3, dtype=DT))
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    squares = _example_squares(reference, ["0"], [(x.double(), c.double().expand(16, 3))],
                               lambda out, c_n: (out * c_n).sum())["0"]
    mean, stderr = _mean_and_stderr(squares)
    assert stderr < 1e-3 * mean  # nearly equal norms: their spread is far below their size
    assert got.num_probes == 16
    assert got.value == pytest.approx(mean, rel=1e-6)
    assert got.stderr == pytest.approx(stderr, rel=1e-2)


def test_non_finite_examples_are_counted_over_batches():
    """Examples with a non-finite gradient (a NaN target) in each of two batches are left out of the
    estimate and counted over both: 2 of 7 reported, the value the mean over the 5 finite examples."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(4, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    gen = torch.Generator().manual_seed(18)
    batches = [(torch.randn(b, 4, generator=gen, dtype=DT), torch.randn(b, 3, generator=gen, dtype=DT))
               for b in (3, 4)]
    for _, y in batches:
        y[1, 0] = math.nan
    with FisherProxy(model, reduction="sum") as proxy:
        for x, y in batches:
            ((model(x) - y) ** 2).sum().backward()
    with pytest.warns(RuntimeWarning, match=r"left out 2 of 7 examples of layer '[02]'"):
        got = proxy.estimates()
    finite = [(x[[0, *range(2, len(x))]], y[[0, *range(2, len(y))]]) for x, y in batches]
    want = _example_squares(model, ["0", "2"], finite, lambda out, y: ((out - y) ** 2).sum())
    for name, squares in want.items():
        _assert_estimate(got[name], squares, 5)


def test_padding_rows_are_counted_over_batches_and_apart_from_non_finite_ones():
    """With reduction='token_mean', rows of padding in two batches are no examples (counted over both
    batches), and a padding row whose gradient is non-finite (a NaN target) is left out once, as non-finite:
    of 8 rows, 3 padding (one of them NaN), the estimate is the mean over the 5 real ones."""
    torch.manual_seed(19)
    model = MaskedNet()
    gen = torch.Generator().manual_seed(20)
    data = []
    for padding in ([3], [2, 3]):
        x, y = torch.randn(4, 5, 4, generator=gen, dtype=DT), torch.randn(4, 5, 3, generator=gen, dtype=DT)
        mask = torch.ones(4, 5, dtype=torch.long)
        mask[1, 3:] = 0
        mask[padding] = 0
        data.append((x, y, mask))
    data[1][1][3, 0, 0] = math.nan
    with FisherProxy(model, reduction="token_mean") as proxy:
        for x, y, mask in data:
            token_mean_loss(model, x, y, mask).backward()
    with pytest.warns(RuntimeWarning, match=r"left out 1 of 8 examples of layer 'fc[12]'"):
        got = proxy.estimates()
    squares = {"fc1": [], "fc2": []}
    for x, y, mask in data:
        for n in range(4):
            if mask[n].sum() > 0:
                loss = token_mean_loss(model, x[n:n + 1], y[n:n + 1], mask[n:n + 1])
                for name, g in zip(squares, torch.autograd.grad(loss, [model.fc1.weight, model.fc2.weight])):
                    squares[name].append(float(g.square().sum()))
    for name, values in squares.items():
        _assert_estimate(got[name], values, 5)


def test_no_warning_when_every_layer_is_reached():
    """estimates() warns about unreached layers only when there are some: with every layer reached and
    every gradient finite it warns nothing."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    gen = torch.Generator().manual_seed(22)
    x, y = torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(3, 3, generator=gen, dtype=DT)
    with FisherProxy(model) as proxy:
        ((model(x) - y) ** 2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = proxy.estimates()
    assert set(got) == {"0", "2"}


@pytest.mark.parametrize("sketch_dim", [True, 2.5, 0])
def test_sketch_dim_must_be_a_positive_int(sketch_dim):
    """sketch_dim must be None or an int >= 1: a bool, a float or 0 is a ValueError naming FisherProxy
    and the value."""
    model = nn.Sequential(nn.Linear(4, 3, dtype=DT))
    with pytest.raises(ValueError, match=rf"^FisherProxy: sketch_dim must be a positive int or None, "
                                         rf"got {sketch_dim!r}$"):
        FisherProxy(model, sketch_dim=sketch_dim)


@pytest.mark.parametrize("reduction", ["none", "MEAN", None])
def test_an_unknown_reduction_is_refused_naming_fisher_proxy(reduction):
    """reduction is one of 'mean', 'sum' and 'token_mean'; anything else is a ValueError naming
    FisherProxy and the value."""
    model = nn.Sequential(nn.Linear(4, 3, dtype=DT))
    with pytest.raises(ValueError, match=rf"^FisherProxy: reduction must be 'mean', 'sum' or 'token_mean', "
                                         rf"got {reduction!r}$"):
        FisherProxy(model, reduction=reduction)


def test_sketch_dim_one_and_token_mask_checked_under_any_reduction():
    """sketch_dim=1 is a valid sketch; a token_mask that is neither 'auto', a callable nor None is a
    ValueError naming FisherProxy even when the reduction does not read it."""
    model = nn.Sequential(nn.Linear(4, 3, dtype=DT))
    assert FisherProxy(model, sketch_dim=1).sketch_dim == 1
    with pytest.raises(ValueError, match=r"FisherProxy: token_mask must be 'auto', a callable"):
        FisherProxy(model, reduction="mean", token_mask=42)
