"""Append rows to a benchmark's results CSV: the whole file goes to a temp name and is renamed,
so a benchmark cut short leaves the previous file or the new one, never half a row. A file whose
columns are a subset of the benchmark's is rewritten under its full header (blank in the missing
columns); a file with a column the benchmark does not write is refused."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def append_rows(path: Path, fields: list[str], rows: list[dict], extrasaction: str = "raise") -> None:
    """Append ``rows`` under the header ``fields`` (written when the file is new). A file whose
    columns are all among ``fields`` is rewritten under ``fields`` first; any other header is
    refused: its columns would not line up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # newline="": the old text is kept byte for byte (a plain read would turn its CRLF into LF
    # and leave a file of mixed line endings, rewritten wholesale by every append)
    old = ""
    if path.exists():
        with path.open(newline="") as handle:
            old = handle.read()
    # new rows end their lines as the header does (csv's CRLF in a new file)
    end = "\n" if "\n" in old and not old.split("\n", 1)[0].endswith("\r") else "\r\n"
    if old:
        header = next(csv.reader(io.StringIO(old)), [])
        if not old.endswith("\n"):  # a hand-edited file without a final newline: no row glued onto it
            old += end
        if header != list(fields):
            if not set(header) < set(fields):
                raise ValueError(f"{path}: its header {header} is not this benchmark's {list(fields)}; "
                                 "move the file aside or pass another --out")
            old = _under(old, fields, end)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as handle:
            handle.write(old)
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction=extrasaction, lineterminator=end)
            if not old:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _under(text: str, fields: list[str], end: str) -> str:
    """The CSV ``text`` rewritten under the header ``fields`` (a superset of its own)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator=end)
    writer.writeheader()
    writer.writerows(csv.DictReader(io.StringIO(text, newline="")))
    return out.getvalue()
