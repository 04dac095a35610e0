"""save_adapter writes the same bytes for the same adapter. safetensors alone writes the metadata
entries in a random order per save (a Rust HashMap: safetensors issue #584), which would give two
saves of one adapter other bytes and other checksums."""

import json
import struct

import torch
from safetensors.torch import load_file
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


def test_a_header_this_json_writer_would_not_reproduce_is_left_as_written(tmp_path, monkeypatch):
    """Re-serialised, a header of another writer (here with spaces) could change length and move
    the tensors: the file keeps its bytes, metadata order included."""
    import lorambo.adapters.canonical as canonical

    def spaced_writer(tensors, path, metadata):
        header = {"__metadata__": metadata}
        offset = 0
        for key, t in tensors.items():
            size = t.numel() * t.element_size()
            header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header).encode()  # ", " and ": " separators
        text += b" " * (-len(text) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text + b"".join(t.numpy().tobytes() for t in tensors.values()))

    monkeypatch.setattr(canonical, "save_file", spaced_writer)
    tensors = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(2))}
    file = tmp_path / "a.safetensors"
    spaced_writer(tensors, tmp_path / "want.safetensors", {"z": "1", "a": "2"})
    canonical.save_file_canonical(tensors, file, {"z": "1", "a": "2"})
    assert file.read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    assert torch.equal(load_file(file)["w"], tensors["w"])  # a valid file of that writer


def test_metadata_with_non_ascii_text_is_sorted_too(tmp_path):
    """safetensors writes non-ASCII as UTF-8, not as \\u escapes: a header with a layer named
    "café" must still be reproduced and sorted."""
    import lorambo.adapters.canonical as canonical

    metadata = {f"k{i}": f"café {i}" for i in (5, 2, 7, 0, 3, 6, 1, 4)}
    file = tmp_path / "a.safetensors"
    canonical.save_file_canonical({"w": torch.ones(2)}, file, metadata)
    size, header = _header(file.read_bytes())
    assert list(json.loads(header)["__metadata__"]) == sorted(metadata)
