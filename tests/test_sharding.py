"""lorambo.sharding.local_region: the index region of a DTensor this process holds, against
torch.chunk's layout (FSDP2's rule) on every length, mesh size and coordinate up to 7, on 1-D
and 2-D meshes, without a process group: the DTensor is a stand-in with real placements."""

import types

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from lorambo import sharding


def stand_in(shape, placements, sizes, coords):
    """What local_region reads of a DTensor: its shape, placements and mesh."""
    mesh = types.SimpleNamespace(size=lambda d: sizes[d], get_local_rank=lambda d: coords[d])
    return types.SimpleNamespace(shape=torch.Size(shape), placements=tuple(placements), device_mesh=mesh)


@pytest.fixture
def every_stand_in_sharded(monkeypatch):
    monkeypatch.setattr(sharding, "is_sharded", lambda t: isinstance(t, types.SimpleNamespace))


def chunk_of(n, parts, coord):
    """torch.chunk's piece ``coord`` of ``n`` elements, as a range (empty past the last piece)."""
    pieces = torch.arange(n).chunk(parts) if n else ()
    held = pieces[coord].tolist() if coord < len(pieces) else []
    return (held[0], held[-1] + 1) if held else None


def as_range(s: slice):
    return (s.start, s.stop) if s.stop > s.start else None


@pytest.mark.parametrize("n", range(8))
def test_one_sharded_dim_is_torch_chunks_piece(every_stand_in_sharded, n):
    for parts in range(1, 8):
        for coord in range(parts):
            for dim in (0, 1):
                shape = (n, 3) if dim == 0 else (3, n)
                region = sharding.local_region(stand_in(shape, [Shard(dim)], [parts], [coord]))
                assert as_range(region[dim]) == chunk_of(n, parts, coord), (n, parts, coord, dim)
                assert region[1 - dim] == slice(0, 3)


def test_hsdp_replicated_mesh_dim_holds_everything_along_it(every_stand_in_sharded):
    """HSDP's 2-D mesh: (Replicate, Shard(0)); the replicated coordinate does not move the region."""
    for replicas, coord in ((3, 2), (2, 0)):
        region = sharding.local_region(stand_in((5, 4), [Replicate(), Shard(0)], [replicas, 2], [coord, 1]))
        assert region == (slice(3, 5), slice(0, 4))


def test_two_dims_sharded_on_a_2d_mesh(every_stand_in_sharded):
    region = sharding.local_region(stand_in((5, 7), [Shard(1), Shard(0)], [3, 2], [2, 0]))
    assert region == (slice(0, 3), slice(6, 7))


@pytest.mark.parametrize("placements", [[Shard(0), Shard(0)], [Replicate(), object()]])
def test_unsupported_placements_are_refused(every_stand_in_sharded, placements):
    with pytest.raises(NotImplementedError, match="Shard/Replicate placements with one shard per tensor dim"):
        sharding.local_region(stand_in((4, 4), placements, [2, 2], [0, 1]))


def test_a_plain_tensor_is_held_whole():
    t = torch.zeros(3, 0, 2)
    assert sharding.local_region(t) == (slice(0, 3), slice(0, 0), slice(0, 2))
    assert sharding.local_tensor(t) is t and not sharding.is_sharded(t)
