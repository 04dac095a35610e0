"""Layers the loss never reaches are skipped with a warning (FisherProxy, LoRAMBoOptimizer);
a NaN loss is an error in gradient_sensitivity, FisherProxy and the Hessian estimators; 0-token
batches and NaN/inf inputs are errors in data_covariance, NaN/inf weights or covariances in the tail
energies. Default targets follow peft's all-linear without the pooler."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import FisherProxy, data_covariance, gradient_sensitivity, targets_without_gradient

DT = torch.float64


class WithPooler(nn.Module):
    """BERT-like: a pooler computed in the forward that the hidden-state loss never uses."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"a": nn.Linear(5, 6, dtype=DT), "b": nn.Linear(6, 5, dtype=DT)})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(5, 5, dtype=DT)})
        self.classifier = nn.Linear(5, 2, dtype=DT)

    def forward(self, x):
        hidden = self.encoder["b"](torch.tanh(self.encoder["a"](x)))
        pooled = torch.tanh(self.pooler["dense"](hidden.mean(1)))
        return hidden, pooled


def hidden_loss(model, batch):
    x, y = batch
    return ((model(x)[0] - y) ** 2).mean()


def _batches(n=2):
    return [(torch.randn(3, 4, 5, dtype=DT), torch.randn(3, 4, 5, dtype=DT)) for _ in range(n)]


def test_default_targets_leave_out_pooler_and_heads():
    model = WithPooler()
    assert lorambo.model.default_targets(model) == ["encoder.a", "encoder.b"]
    assert [t.name for t in lorambo.sensitivity.find_targets(model)] == ["encoder.a", "encoder.b"]
    lorambo.configure_model(model, 2, target_modules="all-linear")
    assert list(lorambo.lora_layers(model)) == ["encoder.a", "encoder.b"]


def test_targets_without_gradient_names_the_pooler():
    model = WithPooler()
    names = ["encoder.a", "pooler.dense", "encoder.b"]
    assert targets_without_gradient(model, hidden_loss, _batches(1)[0], names) == ["pooler.dense"]


def test_fisher_skips_unreached_layer_with_a_warning_and_matches_per_example_reference():
    model = WithPooler()
    batches = _batches(2)
    with FisherProxy(model, modules=["encoder.a", "pooler.dense"], reduction="mean") as fisher:
        for b in batches:
            hidden_loss(model, b).backward()
    with pytest.warns(RuntimeWarning, match=r"no gradient reached layer\(s\) \['pooler.dense'\]"):
        est = fisher.estimates()
    assert list(est) == ["encoder.a"]
    # reference: per-example gradients of the per-example loss, float64
    w = model.encoder["a"].weight
    sq = []
    for x, y in batches:
        for n in range(x.shape[0]):
            loss = ((model(x[n:n + 1])[0] - y[n:n + 1]) ** 2).mean()
            (g,) = torch.autograd.grad(loss, w)
            sq.append(float(g.pow(2).sum()))
    assert est["encoder.a"].value == pytest.approx(sum(sq) / len(sq), rel=1e-9)
    assert est["encoder.a"].num_probes == 6


def test_fisher_with_no_layer_reached_raises():
    model = WithPooler()
    with FisherProxy(model, modules=["pooler.dense"]) as fisher:
        hidden_loss(model, _batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="no backward pass through layer .* nor through any other"):
        fisher.estimates()


def test_fisher_nan_loss_is_an_error_and_partial_nan_a_warning():
    model = WithPooler()
    good, (x, y) = _batches(1)[0], _batches(1)[0]
    nan_batch = (x, torch.full_like(y, float("nan")))
    with FisherProxy(model, modules=["encoder.a"]) as fisher:
        hidden_loss(model, nan_batch).backward()
    with pytest.raises(RuntimeError, match=r"'encoder.a' had a non-finite gradient"):
        fisher.estimates()
    with FisherProxy(model, modules=["encoder.a"]) as fisher:
        hidden_loss(model, nan_batch).backward()
        hidden_loss(model, good).backward()
    with pytest.warns(RuntimeWarning, match="left out 3 of 6"):
        est = fisher.estimates()
    with FisherProxy(model, modules=["encoder.a"]) as clean:
        hidden_loss(model, good).backward()
    assert est["encoder.a"].value == pytest.approx(clean.estimates()["encoder.a"].value, rel=1e-12)
    assert est["encoder.a"].num_probes == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gradient_sensitivity_non_finite_loss_names_the_batch(bad):
    model = WithPooler()
    batches = _batches(3)
    x, y = batches[1]
    batches[1] = (x, torch.full_like(y, bad))
    with pytest.raises(RuntimeError, match="loss on batch 1 is"):
        gradient_sensitivity(model, hidden_loss, batches, modules=["encoder.a"])


def test_data_covariance_empty_batches_are_named():
    model = WithPooler()
    batches = _batches(3)
    batches[0] = (torch.randn(3, 0, 5, dtype=DT), None)
    batches[2] = (torch.randn(0, 4, 5, dtype=DT), None)
    with pytest.raises(ValueError, match=r"batch\(es\) \[0, 2\] of 3 fed 0 tokens"):
        data_covariance(model, lambda m, b: m(b[0]), batches, modules=["encoder.a"])
    cov = data_covariance(model, lambda m, b: m(b[0]), [batches[1]], modules=["encoder.a"])
    xs = batches[1][0].reshape(-1, 5)
    torch.testing.assert_close(cov["encoder.a"], xs.T @ xs / xs.shape[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["gradient", "hessian"])
def test_optimizer_skips_unreached_target_with_a_warning(method):
    model = WithPooler()
    names = ["encoder.a", "encoder.b", "pooler.dense"]
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=200, sensitivity_method=method,
                                   target_modules=names, num_probes=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks = opt.compute_optimal_ranks(_batches(2), hidden_loss)
    assert any("pooler.dense" in str(w.message) and "skipped" in str(w.message) for w in caught)
    assert set(ranks) == {"encoder.a", "encoder.b"} and opt.names == ["encoder.a", "encoder.b"]
    assert sum(r * 11 for r in ranks.values()) <= 200
    opt.configure()
    assert set(lorambo.lora_layers(model)) == {"encoder.a", "encoder.b"}


class Checkpointed(nn.Module):
    """Two blocks run under activation checkpointing, as gradient_checkpointing_enable() does."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Linear(5, 6, dtype=DT)
        self.blocks = nn.ModuleList([nn.Linear(6, 6, dtype=DT), nn.Linear(6, 5, dtype=DT)])

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(lambda t, b=block: torch.tanh(b(t)), h,
                                                  use_reentrant=self.reentrant)
        return h, None


def _frozen_checkpointed(reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    model.embed.weight.requires_grad_(True)  # the loss has a graph, as with a trainable embedding
    for name, p in model.named_parameters():
        p.requires_grad_(name == "embed.weight")
    return model


def test_reentrant_checkpointing_is_an_error_not_zero_sensitivities():
    """Under torch.utils.checkpoint(use_reentrant=True) the weights inside the blocks are not in
    the graph torch.autograd.grad walks: gradient_sensitivity returned 0.0 and hessian_trace /
    hessian_opnorm a zero Hessian for every layer, silently."""
    modules = ["blocks.0", "blocks.1"]
    torch.manual_seed(1)
    batches = _batches(2)
    model = _frozen_checkpointed(reentrant=True)
    with pytest.raises(RuntimeError, match=r"gradient_sensitivity: none of the 2 targeted layers .*use_reentrant=False"):
        gradient_sensitivity(model, hidden_loss, batches, modules=modules)
    with pytest.raises(RuntimeError, match=r"none of the 2 targeted layers \(e.g. \['blocks.0', 'blocks.1'\]\)"):
        lorambo.sensitivity.hessian_trace(model, hidden_loss, batches, modules=modules, num_probes=2)
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
        lorambo.sensitivity.hessian_opnorm(model, hidden_loss, batches, modules=modules, num_iters=2)
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, False, False, False]
    # non-reentrant checkpointing gives the plain float64 gradients and Hessian-vector products
    plain = _frozen_checkpointed(reentrant=False)
    got = gradient_sensitivity(plain, hidden_loss, batches, modules=modules)
    trace = lorambo.sensitivity.hessian_trace(plain, hidden_loss, batches, modules=modules, num_probes=16)
    for i, name in enumerate(modules):
        w = plain.blocks[i].weight
        sq, hv = 0.0, 0.0
        for x, y in batches:
            def loss_of(weight, x=x, y=y):
                h = plain.embed(x)
                for j, block in enumerate(plain.blocks):
                    h = torch.tanh(nn.functional.linear(h, weight if j == i else block.weight, block.bias))
                return ((h - y) ** 2).mean()
            wd = w.detach().requires_grad_()
            (g,) = torch.autograd.grad(loss_of(wd), wd)
            sq += float(g.pow(2).sum()) / len(batches)
            h = torch.autograd.functional.hessian(loss_of, w.detach()).reshape(w.numel(), w.numel())
            hv += float(torch.diagonal(h).sum()) / len(batches)
        assert got[name] == pytest.approx(sq, rel=1e-10) and sq > 0
        assert abs(trace[name].value - hv) <= 6 * trace[name].stderr + 1e-12


def test_optimizer_names_reentrant_checkpointing_when_no_target_is_reached():
    """LoRAMBoOptimizer said only 'the loss depends on none of the target layers' for a model
    measured under reentrant checkpointing, whose loss does depend on them."""
    torch.manual_seed(2)
    model = _frozen_checkpointed(reentrant=True)
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=200, sensitivity_method="gradient",
                                   target_modules=["blocks.0", "blocks.1"])
    with pytest.raises(ValueError, match=r"none of the target layers .*use_reentrant=False"):
        opt.compute_optimal_ranks(_batches(2), hidden_loss)
    ok = lorambo.LoRAMBoOptimizer(_frozen_checkpointed(reentrant=False), total_budget=200,
                                  sensitivity_method="gradient", target_modules=["blocks.0", "blocks.1"])
    ranks = ok.compute_optimal_ranks(_batches(2), hidden_loss)
    assert sum(r * sum(ok.dims[n]) for n, r in ranks.items()) <= 200 and any(ranks.values())


def test_data_covariance_names_the_layer_fed_nan():
    # a NaN input token made G NaN silently; data_weighted_tail_energy then failed inside
    # torch.linalg.eigh with "ill-conditioned or has too many repeated eigenvalues"
    model = WithPooler()
    batches = _batches()
    batches[1][0][0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"data_covariance: the inputs fed to layer\(s\) \['encoder.a', 'encoder.b'"):
        data_covariance(model, hidden_loss, batches, modules=["encoder.a", "encoder.b"])


def test_tail_energies_refuse_nonfinite_inputs_and_take_numpy_ranks():
    import numpy as np

    from lorambo.sensitivity import data_weighted_tail_energy, frobenius_tail_energy

    W = torch.randn(6, 4, dtype=DT)
    G = torch.eye(4, dtype=DT)
    # max_rank from a numpy array of ranks was refused as "not a non-negative integer"
    sigma = torch.linalg.svdvals(W)
    want = torch.stack([sigma[r:].pow(2).sum() for r in range(3)])
    torch.testing.assert_close(frobenius_tail_energy(W, np.int64(2)), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(data_weighted_tail_energy(W, G, np.int64(2)), want, rtol=1e-12, atol=0)
    bad_g = G.clone()
    bad_g[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"data_weighted_tail_energy: G has 1 NaN/inf entries of 16"):
        data_weighted_tail_energy(W, bad_g)
    bad_w = W.clone()
    bad_w[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"frobenius_tail_energy: W has 1 NaN/inf entries of 24"):
        frobenius_tail_energy(bad_w)
    with pytest.raises(ValueError, match=r"data_weighted_tail_energy: W has 1 NaN/inf"):
        data_weighted_tail_energy(bad_w, G)


def _relu_net_and_linear_loss():
    """A loss linear in the first layer's weight past a ReLU: its Hessian block is exactly 0, so
    the Hessian-vector products of a NaN/inf loss came out 0 (finite) and were accepted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, dtype=DT), nn.ReLU(), nn.Linear(8, 4, dtype=DT))
    batches = [torch.randn(2, 8, dtype=DT) for _ in range(2)]
    return model, batches


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_hessian_trace_of_a_non_finite_loss_is_an_error_not_zero(bad, method):
    from lorambo.sensitivity import hessian_trace

    model, batches = _relu_net_and_linear_loss()
    finite = hessian_trace(model, lambda m, b: m(b).sum(), batches, modules=["0"], num_probes=4, method=method)
    assert finite["0"].value == 0.0  # the true trace: the same call with a finite loss

    def loss(m, b):  # the second batch's loss is not finite
        return m(b).sum() * (bad if b is batches[1] else 1.0)

    with pytest.raises(RuntimeError, match="finite matrix-vector products|non-finite"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hessian_trace(model, loss, batches, modules=["0"], num_probes=4, method=method)


def test_hessian_opnorm_of_a_non_finite_loss_is_an_error_not_zero():
    from lorambo.sensitivity import hessian_opnorm

    model, batches = _relu_net_and_linear_loss()
    assert hessian_opnorm(model, lambda m, b: m(b).sum(), batches, modules=["0"], num_iters=3)["0"].value == 0.0
    with pytest.raises(RuntimeError, match="non-finite Hessian-vector product"):
        hessian_opnorm(model, lambda m, b: m(b).sum() * float("nan"), batches, modules=["0"], num_iters=3)


def _classifier_with_one_unlabelled_batch():
    """Token classification where batch 2 has every label at ignore_index (-100): its mean
    cross-entropy is over no examples, 0/0 = NaN."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 3, dtype=DT))
    batches = [(torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))) for _ in range(3)]
    batches[2] = (batches[2][0], torch.full((4,), -100))

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], ignore_index=-100)

    assert torch.isnan(loss(model, batches[2]))  # the premise: a NaN loss, not an error
    return model, loss, batches


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_hessian_trace_names_the_batch_whose_loss_is_not_finite(method):
    from lorambo.sensitivity import hessian_trace

    model, loss, batches = _classifier_with_one_unlabelled_batch()
    assert all(e.value == e.value for e in hessian_trace(model, loss, batches[:2], num_probes=4,
                                                         method=method).values())
    with pytest.raises(RuntimeError, match=r"hessian_trace: the loss on batch 2 is nan \(not finite\).*"
                                           r"ignore_index"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hessian_trace(model, loss, batches, num_probes=4, method=method)
    # gradient_sensitivity says the same
    with pytest.raises(RuntimeError, match=r"gradient_sensitivity: the loss on batch 2 is nan"):
        gradient_sensitivity(model, loss, batches)


def test_hessian_opnorm_names_the_batch_whose_loss_is_not_finite():
    from lorambo.sensitivity import hessian_opnorm

    model, loss, batches = _classifier_with_one_unlabelled_batch()
    with pytest.raises(RuntimeError, match=r"hessian_opnorm: the loss on batch 2 is nan \(not finite\)"):
        hessian_opnorm(model, loss, batches, num_iters=3)

