"""Making allocations visible: a rank table, a layer x module-type heat map, a decision log.

- :func:`rank_table` formats ``{name: rank}`` (optionally with capacity and cost) as text.
- :func:`save_heatmap` draws ranks as a grid, one row per block (``...h.3``) and one column per
  module type (``attn.c_attn``), because that is how people read a transformer's allocation.
  matplotlib is imported only here, and only its Figure (no pyplot, no backend: the
  process's plotting setup is left as it is).
- :class:`DecisionLog` writes one JSON object per online decision to a ``.jsonl`` file that
  belongs to one run: the run's first record replaces whatever the file held (atomically), so
  :func:`read_decisions` never mixes runs; a resumed run rewrites it with the decisions of its
  checkpoint (:meth:`DecisionLog.restore`, dropping what an interrupted run logged after the
  checkpoint) and appends after them. Each append is a single ``write`` of whole lines on a
  descriptor opened with ``O_APPEND``, so a crash can leave at most a torn last line, which
  :func:`read_decisions` skips; a write that fails (a full disk) is cut back to whole lines.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lorambo.adapters.atomic import atomic_save_figure, atomic_write_text, check_target
from lorambo.adapters.whole_append import append_whole
from lorambo.nn.finite_numbers import is_finite_number, shown_number

__all__ = ["rank_table", "split_name", "rank_grid", "save_heatmap", "DecisionLog", "read_decisions"]

_INDEX = re.compile(r"^(.*?\.\d+)\.(.+)$")  # first ".<int>." splits block from module type


def _ranks_of(source, who: str) -> dict[str, int]:
    if isinstance(source, Mapping):
        for k, v in source.items():  # int() would show a rank of 2.7 as 2
            if not (is_finite_number(v) and v >= 0 and float(v).is_integer()):  # the grid holds floats
                raise ValueError(f"rank of layer {k!r} is {shown_number(v)}: must be a whole number >= 0")
        return {k: int(v) for k, v in source.items()}  # keys as given: they index dims too
    from lorambo.model import lora_layers  # a model: read its LoRA layers

    layers = lora_layers(source)
    if not layers:  # an empty table with total 0 would read as "every rank is 0"
        raise ValueError(f"{who}: {type(source).__name__} has no LoRAMBoLinear layers: configure the model first "
                         "(configure_model, or LoRAMBoOptimizer.configure), or pass the ranks as {name: rank}")
    return {n: layer.rank for n, layer in layers.items()}


def rank_table(source, capacities: Mapping[str, int] | None = None,
               dims: Mapping[str, tuple[int, int]] | None = None) -> str:
    """Text table of ranks; ``source`` is ``{name: rank}`` or a model with LoRAMBoLinear layers.

    With a model, capacities and (d, k) are read from the layers unless given. With ``dims``, every
    layer of ``source`` must be in it (the params column sums to ``sum r (d + k)``).
    """
    ranks = _ranks_of(source, "rank_table")
    if not isinstance(source, Mapping):
        from lorambo.model import lora_layers

        layers = lora_layers(source)
        capacities = capacities or {n: m.capacity for n, m in layers.items()}
        dims = dims or {n: (m.out_features, m.in_features) for n, m in layers.items()}
    if dims:
        missing = [n for n in ranks if n not in dims]
        if missing:
            raise ValueError(f"rank_table: dims has no (d, k) for layer(s) {missing[:5]!r}")
    width = max([len("module")] + [len(str(n)) for n in ranks])
    head = f"{'module':<{width}}  {'rank':>5}"
    head += f"  {'capacity':>8}" if capacities else ""
    head += f"  {'params':>10}" if dims else ""
    lines = [head, "-" * len(head)]
    total_params = 0
    for name, r in ranks.items():
        line = f"{str(name):<{width}}  {r:>5}"
        if capacities:
            line += f"  {capacities.get(name, ''):>8}"
        if dims:
            params = r * sum(dims[name])
            total_params += params
            line += f"  {params:>10}"
        lines.append(line)
    lines.append("-" * len(head))
    total = f"{'total':<{width}}  {sum(ranks.values()):>5}"
    total += f"  {'':>8}" if capacities else ""
    total += f"  {total_params:>10}" if dims else ""
    lines.append(total)
    return "\n".join(lines)


def split_name(name: str) -> tuple[str, str]:
    """``"encoder.layer.3.attention.self.query"`` -> ``("encoder.layer.3", "attention.self.query")``;
    a name without a numeric block index is its own type in block ``""``."""
    m = _INDEX.match(name)
    return (m.group(1), m.group(2)) if m else ("", name)


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """(rows = blocks in first-seen order, columns = module types, grid with NaN where absent)."""
    rows, cols, cells = {}, {}, {}  # name -> position, first-seen order
    for name, r in ranks.items():
        block, kind = split_name(str(name))
        rows.setdefault(block, len(rows))
        cols.setdefault(kind, len(cols))
        cells[(block, kind)] = r
    grid = np.full((len(rows), len(cols)), np.nan)
    for (block, kind), r in cells.items():
        grid[rows[block], cols[kind]] = r
    return list(rows), list(cols), grid


def save_heatmap(source, path, title: str = "LoRA rank per layer") -> Path:
    """Write a PNG heat map of ranks (rows: blocks, columns: module types) and return its path."""
    return atomic_save_figure(heatmap_figure(source, title), path, "save_heatmap", dpi=100)


def heatmap_figure(source, title: str = "LoRA rank per layer"):
    """The matplotlib Figure :func:`save_heatmap` writes."""
    ranks = _ranks_of(source, "save_heatmap")  # bad ranks are a ValueError with or without matplotlib
    if not ranks:
        raise ValueError("save_heatmap: no ranks to draw")
    rows, cols, grid = rank_grid(ranks)
    try:
        # a Figure of its own, not pyplot's: pyplot would need a backend, and switching the
        # process's backend to Agg broke the caller's figures (a notebook's inline display)
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is optional
        raise ImportError("save_heatmap needs matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=(1.2 + 1.1 * len(cols), 1.0 + 0.35 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r or "-" for r in rows], fontsize=8)
    if grid.size <= 400:  # numbers stay readable up to ~20 x 20 cells
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(j, i, str(int(v)), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title)
    fig.tight_layout()
    return fig


class DecisionLog:
    """In-memory list of decision records, mirrored to a JSON-lines file when ``path`` is set.

    The file holds this run's records only: the first :meth:`append` (or :meth:`restore`)
    replaces an existing file, later ones append. ``enabled=False`` keeps the list but writes
    nothing (non-main DDP processes).
    """

    def __init__(self, path=None, enabled: bool = True):
        self.path = None if path is None else Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        self._file_started = False  # whether this run has written the file yet
        self._lock = threading.Lock()
        if self.path is not None and enabled:
            check_target(self.path, "log_path")  # now, not at the first decision hours later
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __getstate__(self) -> dict:  # a lock does not pickle (deepcopy of an allocator)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def _writes(self) -> bool:
        return self.path is not None and self.enabled

    def append(self, record: Mapping) -> None:
        self.extend([record])

    def extend(self, records) -> None:
        records = [{k: _plain(v) for k, v in record.items()} for record in records]
        with self._lock:  # threads sharing this log: the file keeps the order of the list
            self.records.extend(records)
            if not self._writes or not records:
                return
            if not self._file_started:  # a run's first record: a file left by another run goes
                self._rewrite(self.records)
                return
            self._append_lines("".join(_line(r) for r in records), len(records))

    def _append_lines(self, text: str, count: int) -> None:
        """Append ``text`` (whole lines). A full disk writes part of it and then
        fails: the file is cut back to its last whole record, and the next append rewrites it
        from :attr:`records`, so no record is lost or torn in the middle of the file."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                append_whole(fd, text.encode())
            except BaseException as err:  # a full disk, or Ctrl-C between two writes
                self._file_started = False
                if not isinstance(err, OSError):
                    raise
                raise OSError(err.errno, f"log_path {self.path}: could not append {count} decision record(s) "
                                         f"({err.strerror}); the decisions were taken and are in the decision "
                                         "list (opt.decisions), the file was cut back to the records before "
                                         "them and is rewritten whole at the next decision") from err
        finally:
            os.close(fd)

    def restore(self, records) -> None:
        """Resume with ``records`` (a checkpoint's decisions): they become :attr:`records` and
        the whole file, atomically; later records are appended after them."""
        records = [{k: _plain(v) for k, v in r.items()} for r in records]
        with self._lock:
            if self._writes:  # the file first: a failed write (a full disk) leaves both as they were
                self._rewrite(records)
            self.records = records

    def _rewrite(self, records) -> None:
        atomic_write_text(self.path, "".join(_line(r) for r in records), "log_path")
        self._file_started = True


def _line(record: Mapping) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def _plain(value):
    """JSON-safe scalars (numpy / torch numbers become Python numbers; NaN stays NaN)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def read_decisions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a decision log. A last line without its newline that is not valid JSON
    (a crash cut it short) is skipped; any other line that is not a JSON object is a ValueError
    naming the file and line. A missing file is a ``FileNotFoundError``, a folder an
    ``IsADirectoryError``, an empty path or a file that is no text a ValueError."""
    if not str(path):  # Path("") is the current folder
        raise ValueError("read_decisions: empty path; pass the log_path of the decision log")
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"read_decisions: {path} is a folder, not a decision log (the log_path file)")
    try:
        text = file.read_bytes().decode("utf-8")  # the log is written as UTF-8 (JSON, ASCII)
    except FileNotFoundError:
        raise FileNotFoundError(f"read_decisions: no decision log at {path}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"read_decisions: {path} is not a decision log (not text: {err})") from None
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # torn by a crash mid-write: the record was never complete
                continue
            raise ValueError(f"decision log {path}, line {number}: not a JSON record ({err}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"decision log {path}, line {number}: a JSON {type(record).__name__}, not a record")
        out.append(record)
    return out
