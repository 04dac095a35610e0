"""Fisher proxy: per-example gradient norms from x and dY match naive per-example gradients."""

import pytest
import torch
from torch import nn

from lorambo import configure_model
from lorambo.sensitivity import FisherProxy, per_example_sq_grad_norms
from lorambo.sensitivity.fisher import sketched_sq_grad_norms


class TokenNet(nn.Module):
    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def example_losses(model, x, y):
    return (model(x) - y).square().flatten(1).sum(1)  # (B,): one loss per example


def naive_fisher(model, x, y, weights):
    for w in weights:
        w.requires_grad_(True)
    try:
        sq = {i: [] for i in range(len(weights))}
        for n in range(x.shape[0]):
            grads = torch.autograd.grad(example_losses(model, x[n:n + 1], y[n:n + 1]).sum(), weights)
            for i, g in enumerate(grads):
                sq[i].append(g.square().sum())
        return [torch.stack(v).mean() for v in sq.values()]
    finally:
        for w in weights:
            w.requires_grad_(False)


@pytest.mark.parametrize("tokens", [3, 40])  # Gram path (short) and materialised path (long)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fisher_proxy_matches_naive_per_example_gradients(tokens, reduction):
    model = configure_model(TokenNet(6, 10, 5).double(), 2)
    with torch.no_grad():
        for m in (model.fc1, model.fc2):
            m.lora_B.normal_()
    x, y = torch.randn(7, tokens, 6, dtype=torch.float64), torch.randn(7, tokens, 5, dtype=torch.float64)
    with FisherProxy(model, reduction=reduction) as fisher:
        losses = example_losses(model, x, y)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    est = fisher.estimates()
    want = naive_fisher(model, x, y, [model.fc1.base_layer.weight, model.fc2.base_layer.weight])
    for name, w in zip(("fc1", "fc2"), want):
        assert est[name].value == pytest.approx(float(w), rel=1e-10)
        assert est[name].num_probes == 7 and est[name].stderr > 0
    # training itself was untouched: the pools' gradients are those of the loss without the proxy
    pools = [p for m in (model.fc1, model.fc2) for p in (m.lora_A, m.lora_B)]
    got = [p.grad.clone() for p in pools]
    losses = example_losses(model, x, y)
    plain = torch.autograd.grad(losses.mean() if reduction == "mean" else losses.sum(), pools)
    for g, e in zip(got, plain, strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_two_dimensional_inputs_and_accumulation_over_steps():
    model = TokenNet(4, 8, 3).double()
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
    fisher = FisherProxy(model).attach()
    for x, y in zip(xs, ys):
        model.zero_grad()
        example_losses(model, x, y).mean().backward()
    fisher.detach()
    est = fisher.estimates()
    want = naive_fisher(model, torch.cat(xs)[:, None], torch.cat(ys)[:, None], [model.fc1.weight, model.fc2.weight])
    assert est["fc1"].value == pytest.approx(float(want[0]), rel=1e-10)
    assert est["fc2"].num_probes == 10
    model(xs[0]).sum().backward()  # detached: nothing more is counted
    assert fisher.estimates()["fc2"].num_probes == 10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inputs_without_a_batch_dim_count_as_one_example_each(reduction):
    # nn.Linear takes a 1-D input [in] as one example; the proxy crashed reshaping it to [B, T, in]
    model = configure_model(TokenNet(4, 8, 3).double(), 2)
    with torch.no_grad():
        for m in (model.fc1, model.fc2):
            m.lora_B.normal_()
    xs, ys = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    with FisherProxy(model, reduction=reduction) as fisher:
        for x, y in zip(xs, ys):  # one 1-D example per step
            model.zero_grad()
            (model(x) - y).square().sum().backward()
    est = fisher.estimates()
    want = naive_fisher(model, xs[:, None], ys[:, None], [model.fc1.base_layer.weight, model.fc2.base_layer.weight])
    for name, w in zip(("fc1", "fc2"), want):
        assert est[name].value == pytest.approx(float(w), rel=1e-10)
        assert est[name].num_probes == 3


def test_sketched_proxy_reads_an_input_without_a_batch_dim_as_a_batch_of_one():
    model = TokenNet(4, 8, 3).double()
    x, y = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    values = []
    for inp, target in ((x, y), (x[None], y[None])):
        with FisherProxy(model, sketch_dim=2, seed=5) as fisher:
            (model(inp) - target).square().sum().backward()
        values.append({n: e.value for n, e in fisher.estimates().items()})
    assert values[0] == values[1] and values[0]["fc1"] > 0


@pytest.mark.parametrize("tokens", [3, 40])  # Gram path (short) and materialised path (long)
def test_empty_batches_and_empty_sequences_are_counted_as_they_are(tokens):
    # reshape(B, -1, in) cannot infer -1 for 0 elements: the proxy crashed inside backward on a
    # batch of 0 examples or of 0-token sequences. Now: no example, or examples with zero gradient.
    model = configure_model(TokenNet(6, 10, 5).double(), 2)
    with torch.no_grad():
        for m in (model.fc1, model.fc2):
            m.lora_B.normal_()
    shapes = [(3, tokens), (0, tokens), (2, 0), (4, tokens)]
    xs = [torch.randn(b, t, 6, dtype=torch.float64) for b, t in shapes]
    ys = [torch.randn(b, t, 5, dtype=torch.float64) for b, t in shapes]
    for sketch_dim in (None, 3):
        with FisherProxy(model, reduction="sum", sketch_dim=sketch_dim) as fisher:
            for x, y in zip(xs, ys):
                model.zero_grad()
                example_losses(model, x, y).sum().backward()
        est = fisher.estimates()
        assert est["fc1"].num_probes == 3 + 0 + 2 + 4
        if sketch_dim is None:
            examples = [(x[n:n + 1], y[n:n + 1]) for x, y in zip(xs, ys) for n in range(x.shape[0])]
            want = naive_fisher(model, torch.cat([x for x, _ in examples if x.shape[1]]),
                                torch.cat([y for _, y in examples if y.shape[1]]),
                                [model.fc1.base_layer.weight, model.fc2.base_layer.weight])
            for name, w in zip(("fc1", "fc2"), want):  # the two token-less examples add zeros to the mean
                assert est[name].value == pytest.approx(float(w) * 7 / 9, rel=1e-10)
    for x, y in zip(xs, ys):
        got = per_example_sq_grad_norms(x, y)
        assert got.shape == (x.shape[0],)
        if x.shape[1] == 0:
            assert torch.equal(got, torch.zeros(x.shape[0], dtype=torch.float64))


def test_gram_and_materialised_paths_agree():
    x, gy = torch.randn(3, 9, 5, dtype=torch.float64), torch.randn(3, 9, 4, dtype=torch.float64)
    naive = torch.stack([(gy[n].t() @ x[n]).square().sum() for n in range(3)])
    torch.testing.assert_close(per_example_sq_grad_norms(x, gy), naive)
    x, gy = torch.randn(3, 2, 50, dtype=torch.float64), torch.randn(3, 2, 40, dtype=torch.float64)
    naive = torch.stack([(gy[n].t() @ x[n]).square().sum() for n in range(3)])
    torch.testing.assert_close(per_example_sq_grad_norms(x, gy), naive)


def test_errors():
    model = TokenNet(4, 8, 3)
    with pytest.raises(ValueError, match="reduction"):
        FisherProxy(model, reduction="avg")
    with pytest.raises(RuntimeError, match="no backward pass through layer 'fc1'"):
        FisherProxy(model).estimates()


def test_a_backward_outside_the_block_says_where_the_proxy_records():
    # before: "saw no backward pass" only, though the user had run one (outside `with proxy:`)
    torch.manual_seed(0)
    model = configure_model(TokenNet(4, 8, 3), 2)
    proxy = FisherProxy(model)
    model(torch.randn(2, 5, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"no backward pass through layer 'fc1'.*it records only the forward and "
                                           r"backward passes run inside `with proxy:`"):
        proxy.estimates()


def test_sketch_is_unbiased():
    x, gy = torch.randn(4, 6, 10, dtype=torch.float64), torch.randn(4, 6, 8, dtype=torch.float64)
    exact = per_example_sq_grad_norms(x, gy)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([sketched_sq_grad_norms(x, gy, 4, gen) for _ in range(3000)])
    mean, stderr = draws.mean(0), draws.std(0) / 3000 ** 0.5
    assert bool(((mean - exact).abs() <= 4 * stderr).all())
    assert bool((draws.std(0) > 0).all())


def test_sketched_proxy_runs_and_validates():
    model = TokenNet(6, 10, 5).double()
    x, y = torch.randn(3, 20, 6, dtype=torch.float64), torch.randn(3, 20, 5, dtype=torch.float64)
    with FisherProxy(model, sketch_dim=2) as fisher:
        example_losses(model, x, y).mean().backward()
    assert fisher.estimates()["fc1"].value > 0
    with pytest.raises(ValueError, match="sketch_dim"):
        FisherProxy(model, sketch_dim=0)


class KeywordNet(TokenNet):
    """Calls its Linears by keyword (nn.Linear's ``input=``), as some models do."""

    def forward(self, x):
        return self.fc2(input=torch.tanh(self.fc1(input=x)))


def test_layers_called_by_keyword_are_measured():
    """The hook read args[0] only: a layer called as fc(input=x) raised IndexError."""
    model = KeywordNet(4, 8, 3).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 3, dtype=torch.float64)
    with FisherProxy(model) as fisher:
        example_losses(model, x, y).mean().backward()
    want = naive_fisher(model, x, y, [model.fc1.weight, model.fc2.weight])
    for name, w in zip(("fc1", "fc2"), want):
        assert fisher.estimates()[name].value == pytest.approx(float(w), rel=1e-10)


def test_traces_under_a_grad_scaler_equal_the_unscaled_ones():
    """dY of a scaled loss carries the loss scale S, so ||g_n||^2 carries S^2; the scale also
    changes between steps (here it doubles after each step)."""
    torch.manual_seed(0)
    model = TokenNet(4, 8, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay those of naive_fisher
    xs = [torch.randn(5, 3, 4, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(5, 3, 3, dtype=torch.float64) for _ in range(2)]
    want = naive_fisher(model, torch.cat(xs), torch.cat(ys), [model.fc1.weight, model.fc2.weight])

    def run(pass_scaler):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
        with FisherProxy(model, grad_scaler=scaler if pass_scaler else None) as fisher:
            for x, y in zip(xs, ys):
                opt.zero_grad()
                scaler.scale(example_losses(model, x, y).mean()).backward()
                scaler.step(opt)
                scaler.update()
        assert scaler.get_scale() == 2.0 ** 12  # two steps, each doubled the scale
        return fisher.estimates()

    scaled = run(pass_scaler=True)
    for name, w in zip(("fc1", "fc2"), want):
        assert scaled[name].value == pytest.approx(float(w), rel=1e-10)
    unscaled = run(pass_scaler=False)
    for name in ("fc1", "fc2"):  # steps at S = 2^10 and 2^11: between 2^20 and 2^22 times too large
        assert 2.0 ** 20 < unscaled[name].value / scaled[name].value < 2.0 ** 22
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler, got float"):
        FisherProxy(model, grad_scaler=1024.0)


def test_a_reset_sketched_proxy_measures_as_a_new_one():
    """reset() kept the probe generator running: the same batches measured again after a reset
    gave another sketched estimate than a new proxy (with the same seed) gives."""
    torch.manual_seed(0)
    model = TokenNet(5, 7, 3).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, 5, generator=g, dtype=torch.float64),
                torch.randn(4, 6, 3, generator=g, dtype=torch.float64)) for _ in range(2)]

    def measure(fisher):
        with fisher:
            for x, y in batches:
                example_losses(model, x, y).mean().backward()
        return {n: (e.value, e.stderr, e.num_probes) for n, e in fisher.estimates().items()}

    fresh = measure(FisherProxy(model, sketch_dim=2, seed=4))
    assert measure(FisherProxy(model, sketch_dim=2, seed=5)) != fresh  # the estimate depends on the probes
    proxy = FisherProxy(model, sketch_dim=2, seed=4)
    assert measure(proxy) == fresh
    proxy.reset()
    assert measure(proxy) == fresh


def test_a_sketched_measurement_resumes_from_its_state_dict():
    """FisherProxy had no state_dict: a sketched estimate gathered over an interrupted run could
    not be continued. A proxy loaded from the saved state (through torch.save, weights_only)
    ends where one that went on ends, probes included."""
    import io

    torch.manual_seed(0)
    model = TokenNet(5, 7, 3).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, 5, generator=g, dtype=torch.float64),
                torch.randn(4, 6, 3, generator=g, dtype=torch.float64)) for _ in range(3)]

    def run(fisher, some):
        with fisher:
            for x, y in some:
                example_losses(model, x, y).mean().backward()

    whole = FisherProxy(model, sketch_dim=2, seed=4)
    run(whole, batches)
    first = FisherProxy(model, sketch_dim=2, seed=4)
    run(first, batches[:1])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = FisherProxy(model, sketch_dim=2, seed=4)
    resumed.load_state_dict(saved)
    run(resumed, batches[1:])
    expected = {n: (e.value, e.stderr, e.num_probes) for n, e in whole.estimates().items()}
    assert {n: (e.value, e.stderr, e.num_probes) for n, e in resumed.estimates().items()} == expected
    other = FisherProxy(model, sketch_dim=2, seed=5)
    with pytest.raises(ValueError, match=r"FisherProxy.load_state_dict: .*other settings .*'seed': \(4, 5\)"):
        other.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="saw no backward pass"):
        other.estimates()  # nothing was loaded


def test_loss_multiplier_of_gradient_accumulation():
    """Four micro-batches per step, each loss divided by 4 (Trainer's gradient accumulation):
    every dY carries 1/4, so the traces come out 16 times too small unless the proxy is told."""
    torch.manual_seed(1)
    model = TokenNet(4, 8, 3).double()
    xs = [torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(4)]
    ys = [torch.randn(3, 5, 3, dtype=torch.float64) for _ in range(4)]
    want = naive_fisher(model, torch.cat(xs), torch.cat(ys), [model.fc1.weight, model.fc2.weight])

    def run(**kwargs):
        with FisherProxy(model, **kwargs) as fisher:
            for x, y in zip(xs, ys):
                (example_losses(model, x, y).mean() / 4).backward()
        return fisher.estimates()

    told, untold = run(loss_multiplier=0.25), run()
    for name, w in zip(("fc1", "fc2"), want):
        assert told[name].value == pytest.approx(float(w), rel=1e-10)
        assert told[name].num_probes == 12
        assert untold[name].value == pytest.approx(float(w) / 16, rel=1e-10)
    for bad in (0, -0.5, float("nan"), float("inf"), True, "0.25"):
        with pytest.raises(ValueError, match=f"loss_multiplier must be a finite number > 0, got {bad!r}"):
            FisherProxy(model, loss_multiplier=bad)
