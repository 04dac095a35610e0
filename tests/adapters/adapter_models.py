"""The small models the adapter-file tests save and load."""

import torch
from torch import nn

from lorambo import configure_model, lora_layers


def net(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, width), nn.GELU(), nn.Linear(width, 12), nn.GELU(), nn.Linear(12, 4))


def trained():
    """``net()`` adapted at ranks 3 and 5 in capacity-8 pools, with non-zero random adapters."""
    model = configure_model(net(), {"0": 3, "2": 5}, capacity={"0": 8, "2": 8}, alpha=4.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A[: layer.rank].normal_()
            layer.lora_B[:, : layer.rank].normal_()
    return model
