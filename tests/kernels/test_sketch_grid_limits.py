"""Sketch launches keep within CUDA's grid limits (2**31 - 1 programs on axis 0, 65535 on axes 1
and 2) for the shapes that grow with the data: rows of ~2**30 elements (a large LM head's
gradient), examples of more than 16k tokens, captured calls of more than 4M tokens. The Triton
interpreter has no such limits, so the launched grid is recorded instead of run; the kernels'
results for the reordered grids are checked against float64 in test_sketch_kernels.py."""

import pytest
import torch

from lorambo_kernels import sketch
from lorambo_kernels.grid import AXIS12_LIMIT, cuda_grid


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` records the grid and does nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def _fits(grid):
    return all(d <= AXIS12_LIMIT for d in grid[1:])


def test_row_dots_puts_the_chunks_of_a_long_row_on_axis_0(monkeypatch):
    span = sketch.sketch_config("dots", torch.device("cpu"))
    span = span["BLOCK"] * span["CHUNK"]
    n = span * (AXIS12_LIMIT + 5)  # more chunks than axes 1 and 2 may hold
    recorder = _Recorder()
    monkeypatch.setattr(sketch, "_row_dots_kernel", recorder)
    sketch.row_dots([torch.empty(2, n, dtype=torch.bfloat16)])
    (grid,) = recorder.grids
    assert _fits(grid) and grid[0] == AXIS12_LIMIT + 5 and grid[1:] == (1, 2)


def test_gram_puts_the_token_tiles_of_a_long_example_on_axis_0(monkeypatch):
    block_t = sketch.sketch_config("gram", torch.device("cpu"))["BLOCK_T"]
    t = block_t * 257  # 257**2 = 66049 tiles
    recorder = _Recorder()
    monkeypatch.setattr(sketch, "_gram_kernel", recorder)
    sketch.gram_sq_norms([torch.randn(3, t, 2)], [torch.randn(3, t, 1)])
    (grid,) = recorder.grids
    assert _fits(grid) and grid == (257 * 257, 1, 3)


def test_sketch_projection_puts_the_token_tiles_of_a_long_call_on_axis_0(monkeypatch):
    block_t = sketch.sketch_config("project", torch.device("cpu"))["BLOCK_T"]
    t = block_t * (AXIS12_LIMIT + 2)
    recorder, reduce = _Recorder(), _Recorder()
    monkeypatch.setattr(sketch, "_sketch_project_kernel", recorder)
    monkeypatch.setattr(sketch, "_sketch_reduce_kernel", reduce)
    group = sketch.SketchGroup([torch.empty(t, 1)], [torch.empty(t, 1)], [0], [1], [1], 2)
    group.apply()
    assert recorder.grids == [(AXIS12_LIMIT + 2, 1)] and all(_fits(g) for g in reduce.grids)


@pytest.mark.parametrize("dims, axis", [((1, AXIS12_LIMIT + 1), 1), ((1, 1, AXIS12_LIMIT + 1), 2), ((2**31,), 0)])
def test_a_grid_past_the_limits_is_refused_naming_the_launcher_and_axis(dims, axis):
    with pytest.raises(ValueError, match=rf"lorambo_kernels.row_dots: {dims[axis]} programs on grid axis {axis} "
                                         r"exceed CUDA's limit"):
        cuda_grid(*dims, who="row_dots")
    assert cuda_grid(*(min(d, AXIS12_LIMIT) for d in dims), who="row_dots")


def test_a_grid_has_one_to_three_non_negative_axes():
    # an empty axis launches nothing and is allowed; a negative one, or 0 or 4 axes, is refused
    assert cuda_grid(0, 2, AXIS12_LIMIT, who="row_dots") == (0, 2, AXIS12_LIMIT)
    for dims in ((), (1, 1, 1, 1), (3, -1)):
        with pytest.raises(ValueError, match=r"lorambo_kernels.row_dots: grid .* must have 1 to 3 non-negative axes"):
            cuda_grid(*dims, who="row_dots")
