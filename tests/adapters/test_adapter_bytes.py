"""save_adapter writes the same bytes for the same adapter. safetensors alone writes the metadata
entries in a random order per save (a Rust HashMap: safetensors issue #584), which would give two
saves of one adapter other bytes and other checksums."""

import json
import struct

import torch
from torch import nn

import lorambo


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 3))
    lorambo.configure_model(model, {"0": 2, "2": 3}, capacity=4, modules_to_save=["3"])
    g = torch.Generator().manual_seed(1)
    for layer in lorambo.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B[:, :layer.rank].copy_(torch.randn(layer.out_features, layer.rank, generator=g))
    return model


def _header(data: bytes) -> tuple[int, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return size, data[8:8 + size]


def test_saving_an_adapter_twice_gives_the_same_bytes(tmp_path):
    model = _model()
    files = [lorambo.save_adapter(model, tmp_path / f"run{i}" / "a.safetensors").read_bytes() for i in range(4)]
    assert all(f == files[0] for f in files[1:])
    size, raw = _header(files[0])
    metadata = json.loads(raw)["__metadata__"]
    assert list(metadata) == sorted(metadata) and len(metadata) > 2
    # the tensors sit where safetensors put them and load back exactly
    loaded = lorambo.load_adapter(_model_without_adapter(), tmp_path / "run3" / "a.safetensors")
    for (name, got), (_, want) in zip(lorambo.lora_layers(loaded).items(), lorambo.lora_layers(model).items(),
                                      strict=True):
        assert got.rank == want.rank and torch.equal(got.lora_A, want.lora_A) and torch.equal(got.lora_B, want.lora_B)
    for (name, p), (_, q) in zip(loaded[3].named_parameters(), model[3].named_parameters(), strict=True):
        assert torch.equal(p, q), name  # the module to save


def _model_without_adapter():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 3))
