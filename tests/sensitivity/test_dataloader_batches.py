"""Batches given as a DataLoader are read without moving torch's global generator. Each pass over a
DataLoader draws a seed from it (its workers' base seed; a shuffling sampler draws one more), so
otherwise every measurement and every rank decision on held-out batches would shift the training
run's dropout masks and data order after it."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lorambo
from lorambo.allocation.alora import alora_round
from lorambo.sensitivity import gradient_sensitivity

from side_effect_net import model_and_batches, mse

DT = torch.float64


def _loader(batches, shuffle):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=len(batches[0][0]), shuffle=shuffle)


@pytest.mark.parametrize("shuffle", [False, True])
def test_gradient_sensitivity_on_a_dataloader_leaves_the_global_generator(shuffle):
    model, batches = model_and_batches()
    loader = _loader(batches, shuffle)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    got = gradient_sensitivity(model, mse, loader)
    assert torch.equal(torch.get_rng_state(), state)
    seen = list(loader)  # the batches that pass read: the same draw from the same state
    ref = {"0": 0.0, "4": 0.0}  # by hand in float64, eval mode
    model.eval()
    for batch in seen:
        g0, g4 = torch.autograd.grad(mse(model, batch), [model[0].weight, model[4].weight])
        ref["0"] += float(g0.pow(2).sum()) / len(seen)
        ref["4"] += float(g4.pow(2).sum()) / len(seen)
    assert got == pytest.approx(ref, rel=1e-12)


def test_alora_round_on_heldout_dataloader_leaves_the_global_generator():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8, dtype=DT), torch.nn.Tanh(), torch.nn.Linear(8, 4, dtype=DT))
    lorambo.configure_model(net, 3, capacity=4)
    g = torch.Generator().manual_seed(2)
    for layer in lorambo.lora_layers(net).values():  # trained adapters: components that matter
        with torch.no_grad():
            layer.lora_B[:, :3].copy_(torch.randn(layer.out_features, 3, generator=g, dtype=DT))
    batches = [(torch.randn(5, 6, generator=g, dtype=DT), torch.randn(5, 4, generator=g, dtype=DT)) for _ in range(2)]
    listed = copy.deepcopy(net)

    torch.manual_seed(11)
    state = torch.get_rng_state()
    records = alora_round(net, lorambo.lora_layers(net), mse, _loader(batches, False), n_prune=1, step=4)
    assert torch.equal(torch.get_rng_state(), state)
    want = alora_round(listed, lorambo.lora_layers(listed), mse, batches, n_prune=1, step=4)
    assert records == want and any(r["event"] == "shrink" for r in records)


def test_a_generator_of_batches_still_draws_from_the_global_generator():
    """Only a DataLoader's own seed draws are hidden: batches a user's generator draws at random
    are data, and the next ones must not repeat them."""
    model, _ = model_and_batches()
    torch.manual_seed(3)
    drawn = [(torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)) for _ in range(2)]
    torch.manual_seed(3)
    gradient_sensitivity(model, mse, ((torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)) for _ in range(2)))
    after = torch.randn(8, 4, dtype=DT)
    assert not any(torch.equal(after, x) for x, _ in drawn)
