"""FisherProxy.detach() lets go of the calls of a retained graph that is gone.

A call whose last backward kept the graph (``retain_graph=True``) waits, holding the layer's
input and its dY, until the next forward of a measured layer folds it; after detach() no such
forward runs, so it waited until estimates(): a run that measured its first steps and trained on
held the last one's activations to the end.
"""

import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lorambo.sensitivity import FisherProxy

from residual_net import ResidualNet


def _retained_step(model, proxy, x):
    """One step whose backward keeps the graph, then drops it; a weak reference to the memory of
    the input of the layer ``blocks.0.down``."""
    seen = {}
    handle = model.blocks[0]["down"].register_forward_hook(
        lambda module, args, output: seen.__setitem__("x", StorageWeakRef(args[0].untyped_storage())))
    with proxy:
        loss = model(x).square().mean()
        handle.remove()
        loss.backward(retain_graph=True)
        del loss
    return seen["x"]


def test_detach_frees_the_inputs_of_a_retained_graph_that_is_gone():
    torch.manual_seed(0)
    model, x = ResidualNet(), torch.randn(6, 8, dtype=torch.float64)
    gc.collect()
    gc.disable()  # reference counting alone must free it
    try:
        proxy = FisherProxy(model)
        memory = _retained_step(model, proxy, x)
        assert memory.expired(), "FisherProxy still holds a layer input after detach()"
        assert proxy.estimates()["blocks.0.down"].num_probes == 6  # the step was folded in
    finally:
        gc.enable()


def test_the_estimates_are_those_of_a_fold_at_estimates():
    torch.manual_seed(0)
    model, x = ResidualNet(), torch.randn(6, 8, dtype=torch.float64)
    folded_at_detach = FisherProxy(model)
    _retained_step(model, folded_at_detach, x)
    reference = FisherProxy(model).attach()  # the same step, folded by estimates()
    loss = model(x).square().mean()
    loss.backward(retain_graph=True)
    del loss
    assert folded_at_detach.estimates() == reference.estimates()
