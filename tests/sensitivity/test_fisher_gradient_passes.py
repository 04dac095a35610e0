"""FisherProxy when a training step is not one forward and one backward. The reference is the
empirical Fisher of the step's gradient, from per-example float64 gradients of the loss that
``.grad`` accumulates.

Several backward passes through one forward (``retain_graph=True``, one loss per task) counted
each example once per pass and summed the squared norms of each pass's gradient, not the norm of
their sum (``reduction="sum"``: traces 16.6 / 41.3 over 64 examples instead of 39.3 / 91.3 over
32). ``torch.autograd.grad`` passes (an adversarial example's input gradient, a gradient
penalty's first gradient) were counted as more examples of the step."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import FisherProxy

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 3, dtype=DT))
    model = lorambo.configure_model(net, 2, capacity=3)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B.normal_()
    return model


def _losses(out, y):
    """Two task losses, summed over examples (reduction="sum")."""
    return ((out - y) ** 2).sum(), 3 * out.abs().sum()


def _reference(model, batches):
    """mean over all examples of ||dL_n/dW||^2 per layer, L_n example n's summed loss."""
    bases = [model[0].base_layer.weight, model[2].base_layer.weight]
    sq = [[], []]
    for w in bases:
        w.requires_grad_(True)
    for x, y in batches:
        for n in range(x.shape[0]):
            loss = sum(_losses(model(x[n:n + 1]), y[n:n + 1]))
            for i, g in enumerate(torch.autograd.grad(loss, bases)):
                sq[i].append(float(g.square().sum()))
    for w in bases:
        w.requires_grad_(False)
    return {"0": sum(sq[0]) / len(sq[0]), "2": sum(sq[1]) / len(sq[1])}


def _batches(count, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=g, dtype=DT), torch.randn(size, 3, generator=g, dtype=DT))
            for _ in range(count)]


def _check(fisher, want, examples):
    est = fisher.estimates()
    assert set(est) == set(want)
    for name, value in want.items():
        assert est[name].num_probes == examples
        assert est[name].value == pytest.approx(value, rel=1e-10)


def test_one_loss_per_task_backpropagated_separately_is_one_gradient():
    model = _model()
    batches = _batches(2)
    with FisherProxy(model, reduction="sum") as fisher:
        for x, y in batches:
            l1, l2 = _losses(model(x), y)
            l1.backward(retain_graph=True)
            with torch.no_grad():  # an evaluation forward between the passes
                model(x)
            model(x.clone().requires_grad_())  # a forward with a graph that no pass ever reaches
            l2.backward()
    _check(fisher, _reference(model, batches), 16)


def test_kept_graphs_are_folded_in_once_no_pass_can_reach_them():
    """Every pass keeps its graph: the calls wait until their graph is gone, then count once."""
    model = _model()
    batches = _batches(3)
    with FisherProxy(model, reduction="sum") as fisher:
        for x, y in batches:
            l1, l2 = _losses(model(x), y)
            l1.backward(retain_graph=True)
            l2.backward(retain_graph=True)
            del l1, l2  # the graph is gone: the next forward folds its calls
        assert len(getattr(fisher, "_pending", ())) <= 2  # the last batch's layer calls, nothing older
    _check(fisher, _reference(model, batches), 24)


@pytest.mark.parametrize("extra", ["adversarial", "penalty"])
def test_autograd_grad_passes_are_not_the_steps_gradient(extra):
    model = _model()
    (x, y), = _batches(1)
    if extra == "adversarial":  # FGSM: train on x + eps sign(dL/dx)
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(sum(_losses(model(xx), y)), xx)
        want = _reference(model, [(x + 0.3 * gx.sign(), y)])
    else:
        want = _reference(model, [(x, y)])
    pools = [p for p in model.parameters() if p.requires_grad]
    with FisherProxy(model, reduction="sum") as fisher:
        if extra == "adversarial":
            xx = x.clone().requires_grad_()
            (gx,) = torch.autograd.grad(sum(_losses(model(xx), y)), xx)
            sum(_losses(model(x + 0.3 * gx.sign()), y)).backward()
        else:  # a penalty on the pools' gradient, weighted 0: .grad holds the loss's gradient
            loss = sum(_losses(model(x), y))
            grads = torch.autograd.grad(loss, pools, create_graph=True)
            (loss + 0 * sum(g.square().sum() for g in grads)).backward()
    _check(fisher, want, 8)


def test_a_call_that_uses_no_trainable_parameter_counts_every_pass():
    """A merged LoRA layer trains nothing (its pools are not in the graph): there is no .grad to
    follow, so its backward passes count as the step's, as for a frozen plain layer."""
    model = _model()
    model[2].merge()
    (x, y), = _batches(1)
    want = _reference(model, [(x, y)])
    with FisherProxy(model, reduction="sum") as fisher:
        sum(_losses(model(x), y)).backward()
    _check(fisher, want, 8)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_one_loss_per_task_under_activation_checkpointing(use_reentrant):
    """Reentrant checkpointing recomputes the segment in each pass and backpropagates the copy
    on its own: the copies of one call were counted as calls of their own (21.7 / 22.4 over 16
    examples, not 38.4 / 57.8 over 8 on a plain model)."""
    from torch.utils.checkpoint import checkpoint

    model = _model()
    batches = _batches(2)
    with FisherProxy(model, reduction="sum") as fisher:
        for x, y in batches:
            out = checkpoint(model, x.clone().requires_grad_(), use_reentrant=use_reentrant)
            l1, l2 = _losses(out, y)
            l1.backward(retain_graph=True)
            l2.backward(retain_graph=True)  # kept: folded in once the graph is gone
    _check(fisher, _reference(model, batches), 16)
