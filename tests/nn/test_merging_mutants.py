"""Merging a LoRAMBoLinear's adapter (lorambo.nn.merging): the tied-weight key declared for
transformers' save_pretrained, and the weight copy an exact merge keeps only while merged. From
mutation testing of lorambo/nn/merging.py."""

import gc
import weakref

import pytest
import torch
from torch import nn

import lorambo


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight


def test_a_tied_base_weight_declares_its_key_tied_to_the_other_holder():
    """configure_model on a head tied to an embedding declares ``base_layer.weight`` tied to the
    embedding's dotted parameter name; an untied layer declares nothing."""
    torch.manual_seed(0)
    model = TiedHead()
    with pytest.warns(UserWarning, match=r"'head' is tied to \['emb.weight'\]"):
        lorambo.configure_model(model, 2, target_modules=["head"])
    assert model.head._tied_weights_keys == {"base_layer.weight": "emb.weight"}
    plain = lorambo.configure_model(nn.Sequential(nn.Linear(4, 3)), 1)
    assert lorambo.lora_layers(plain)["0"]._tied_weights_keys is None


def test_unmerge_restores_the_weight_bit_for_bit_and_frees_the_kept_copy():
    """merge(exact=True) keeps a copy of the weight while merged; unmerge restores the weight from it
    bit for bit and drops it (no weight-sized copy is held afterwards)."""
    torch.manual_seed(0)
    layer = lorambo.LoRAMBoLinear(nn.Linear(6, 5), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    want = layer.base_layer.weight.detach().clone()
    layer.merge(exact=True)
    merged = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B[:, :2].double() @ layer.lora_A[:2].double()) * layer.scaling
    torch.testing.assert_close(merged, (want.double() + delta).float(), rtol=0, atol=0)
    kept = weakref.ref(layer._weight_before_merge)
    layer.unmerge()
    gc.collect()
    assert kept() is None
    assert torch.equal(layer.base_layer.weight, want)
