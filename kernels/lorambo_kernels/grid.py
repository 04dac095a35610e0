"""Launch grids within CUDA's limits.

CUDA runs at most 2**31 - 1 programs along grid axis 0 and 65535 along axes 1 and 2. Launchers
put the axis that grows with the data (token tiles, chunks of a row) on axis 0 and pass the grid
through :func:`cuda_grid`, so that a shape past the limits is a clear error naming the launcher
rather than a launch failure from the driver (the Triton interpreter has no such limits).
"""

from __future__ import annotations

__all__ = ["AXIS0_LIMIT", "AXIS12_LIMIT", "cuda_grid"]

AXIS0_LIMIT = 2**31 - 1
AXIS12_LIMIT = 65535


def cuda_grid(*dims: int, who: str) -> tuple[int, ...]:
    """``dims`` as a launch grid (1 to 3 axes); a ValueError naming ``who`` if it exceeds CUDA's limits."""
    grid = tuple(int(d) for d in dims)
    if not 1 <= len(grid) <= 3 or any(d < 0 for d in grid):
        raise ValueError(f"lorambo_kernels.{who}: grid {grid} must have 1 to 3 non-negative axes")
    limits = (AXIS0_LIMIT, AXIS12_LIMIT, AXIS12_LIMIT)
    for axis, (d, limit) in enumerate(zip(grid, limits)):
        if d > limit:
            raise ValueError(f"lorambo_kernels.{who}: {d} programs on grid axis {axis} exceed CUDA's limit of "
                             f"{limit}; the input is too large for one launch")
    return grid
