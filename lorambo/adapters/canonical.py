"""Byte-reproducible safetensors files: the same tensors and metadata give the same bytes.

safetensors writes the ``__metadata__`` entries in the order of a Rust ``HashMap`` with a random
state per map (safetensors issue #584), so the same adapter saved twice would give files with
other bytes and other checksums. :func:`save_file_canonical` writes the file, then rewrites its header
in place with those entries sorted by key. The header keeps its length (the same JSON text in
another order), so no tensor byte moves.
"""

from __future__ import annotations

import json
import struct

from safetensors.torch import save_file

__all__ = ["save_file_canonical"]


def _dumps(header: dict) -> bytes:
    """JSON as safetensors writes it: compact, UTF-8, the escapes serde_json uses."""
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def save_file_canonical(tensors: dict, path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)`` with the metadata sorted by key."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)  # dicts keep the file's order
        if _dumps(header) != raw.rstrip(b" "):
            # a header this JSON writer would not reproduce byte for byte (another safetensors
            # writer): sorting could change its length and move the tensors, so it stays as written
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = _dumps(header)
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # the padding safetensors wrote after it
