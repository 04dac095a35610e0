"""Statistics gathered in hooks keep their float32 products when the model runs under autocast.
data_covariance's hook runs inside the forward, so under a loss_fn that uses autocast x^T x would
be computed and summed in bfloat16 (0.7% off after 2048 tokens, and a bfloat16 sum stalls as
tokens grow); FisherProxy's hook runs inside the backward, which a backward() called under
autocast runs in bfloat16 too. Against float64 computations on the same inputs and output
gradients."""

import torch

from lorambo.sensitivity import FisherProxy, data_covariance


def _model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 64, 16, generator=gen) + 1.0, torch.randn(4, 64, 4, generator=gen)) for _ in range(8)]
    return model, batches


def test_data_covariance_under_autocast_sums_in_float32():
    model, batches = _model_and_batches()

    def loss_fn(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (m(batch[0]).float() - batch[1]).square().mean()

    got = data_covariance(model, loss_fn, batches, modules=["0"], token_mask=None, progress=False)["0"]
    x = torch.cat([b[0].reshape(-1, 16) for b in batches]).double()
    want = x.T @ x / x.shape[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert got.dtype == torch.float32


def test_fisher_proxy_with_backward_under_autocast_keeps_float32_products():
    model, batches = _model_and_batches()
    seen = []  # (x, dY) of layer "0" per batch, for the float64 reference

    def keep(module, args, out):
        out.register_hook(lambda g, x=args[0]: seen.append((x.detach().double(), g.detach().double())))

    model[0].register_forward_hook(keep)
    with FisherProxy(model, modules=["0"], reduction="sum") as fisher:
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (model(x).float() - y).square().sum()
                loss.backward()
    got = fisher.estimates()["0"].value
    per_example = torch.cat([torch.einsum("bto,bti->boi", dy, x).square().sum((1, 2)) for x, dy in seen])
    want = float(per_example.mean())
    assert abs(got - want) <= 1e-5 * want, (got, want)
