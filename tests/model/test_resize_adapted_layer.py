"""An adapted layer's sizes are its pools' sizes. transformers' resize_token_embeddings on a model
whose tied lm_head is adapted resized the shared weight in place and set lm_head.out_features,
leaving a layer that claimed 70 outputs over [64, cap] pools and failed at the next forward with
an op error naming no layer. Both changes are now refused naming the layer and the sizes; the
resize itself is refused before it changes anything (tests/model/test_resize_guard.py)."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear


def test_in_and_out_features_keep_the_pool_sizes():
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, name="blocks.0.fc")
    layer.out_features, layer.in_features = 5, 6  # the same sizes: fine
    with pytest.raises(ValueError, match="'blocks.0.fc': out_features is 5, .* cannot become 7"):
        layer.out_features = 7
    with pytest.raises(ValueError, match="'blocks.0.fc': in_features is 6, .* cannot become 3"):
        layer.in_features = 3
    assert (layer.in_features, layer.out_features) == (6, 5)


def test_a_base_weight_resized_in_place_stops_the_forward_naming_the_layer():
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, name="blocks.0.fc")
    layer.base_layer.weight.data = torch.randn(7, 6)  # what a tied embedding's resize does
    with pytest.raises(ValueError, match=r"'blocks.0.fc': the base weight is now \[out, in\] = \[7, 6\].*\[5, 6\]"):
        layer(torch.randn(2, 6))
