"""The run journal ``<out>/runs.jsonl``: one JSON line per finished unit of work, appended, flushed
and fsynced as it finishes, so that an experiment cut short loses at most the units in flight.

Every line is an object with a ``kind``:

- ``header`` (first line): the configuration, less the fields that may differ between the machines
  sharing one journal (device, threads, workers), and where the weights came from; a resumed journal must
  match both, so that runs of different experiments never mix;
- ``session``: one per ``run_experiment`` call: its start time and environment;
- ``task``: what a task's result needs besides its runs (metric, layer sizes, description,
  baselines, budgets);
- ``sens``: the sensitivities of one (task, seed);
- ``run``: one training run.

``task``, ``sens`` and ``run`` lines carry the ``key`` of their unit (``units.unit_key``), the
session that recorded them and its elapsed seconds. A last line without its newline (cut short
by a crash mid-write) is ignored on reading; any other unreadable line is an error naming it.

One process writes a journal at a time: the open journal holds a lock on its folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorambo.adapters.atomic import atomic_write_text
from lorambo.adapters.whole_append import append_whole

FILE_NAME = "runs.jsonl"
VERSION = 1
MACHINE_FIELDS = ("device", "threads", "workers")  # may differ between the sessions of one journal


def header(cfg, weights: dict) -> dict:
    config = json.loads(json.dumps(cfg.as_dict()))  # tuples as lists: as read back from the file
    for name in MACHINE_FIELDS:
        config.pop(name, None)
    return {"kind": "header", "version": VERSION, "config": config, "weights": weights}


def read(path) -> tuple[list[dict], int]:
    """``(records, bytes of a torn last line that was ignored)``."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the torn last line
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not a journal record ({err}); only a torn last line is "
                             "ignored, a damaged line inside the journal is an error") from None
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f"{path}:{number}: not a journal record (no 'kind')")
        if record["kind"] not in ("header", "session") and "key" not in record:
            raise ValueError(f"{path}:{number}: a {record['kind']!r} record without its unit's 'key'")
        records.append(record)
    return records, len(tail)


class Records:
    """The journal's content, indexed: the header, the sessions, and each unit's record by key."""

    def __init__(self, records=()):
        self.header: dict | None = None
        self.sessions: list[dict] = []
        self.units: dict[str, dict] = {}
        for record in records:
            self.add(record)

    def add(self, record: dict) -> None:
        kind = record["kind"]
        if kind == "header":
            self.header = record
        elif kind == "session":
            self.sessions.append(record)
        else:
            self.units[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.units

    def get(self, key: str) -> dict | None:
        return self.units.get(key)

    def of_kind(self, kind: str, task: str | None = None) -> list[dict]:
        return [r for r in self.units.values() if r["kind"] == kind and (task is None or r["task"] == task)]


def check_header(found: dict, expected: dict, path) -> None:
    """A clear error when a journal was written by another configuration or other weights."""
    if found.get("version") != expected["version"]:
        raise ValueError(f"{path}: journal version {found.get('version')!r}, this lorambo writes {expected['version']}")
    old, new = found.get("config", {}), expected["config"]
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        details = "; ".join(f"{k}: journal {old.get(k)!r}, now {new.get(k)!r}" for k in differ[:6])
        raise ValueError(f"{path} was written by another configuration ({details}): resume it with the "
                         "same preset and options, or start a new --out")
    if found.get("weights") != expected["weights"]:
        raise ValueError(f"{path}: its runs used weights {found.get('weights')!r}, this run {expected['weights']!r} "
                         "(a bundle's fp16 copy and the package's fp32 weights give different numbers): pass the "
                         "same --bundle, or none, as the runs recorded")


def _write_all(records: list[dict], path: Path) -> None:
    """The whole journal rewritten atomically (``lorambo/adapters/atomic.py``)."""
    text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    atomic_write_text(path, text, "lorambo experiment --resume")


def _lock_folder(folder: Path) -> int | None:
    """An exclusive lock on ``folder`` (its descriptor), held until closed; the system drops it when
    the process dies, so a killed run never leaves a stale lock. None where ``flock`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        # a second writer would replace the journal under the first, whose later records then
        # went to the replaced file and were lost
        raise ValueError(f"{folder / FILE_NAME} is in use by another running experiment: wait for it to "
                         "finish (or stop it) before resuming it, or choose another --out") from None
    return fd


class Journal:
    """Appends records to ``path``; :meth:`append` returns the record as it reads back.
    ``lock``: a descriptor whose lock on the folder :meth:`close` releases.

    Each record is written straight to the descriptor (no buffer that a later close would try to
    flush again) and fsynced; a write that fails part-way (a full disk) is cut back, so the
    journal keeps whole records only."""

    def __init__(self, path, lock: int | None = None):
        self.path = Path(path)
        self._lock = lock
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, record: dict) -> dict:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        append_whole(self._fd, (line + "\n").encode("utf-8"), fsync=True)
        return json.loads(line)

    def close(self) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:  # released whatever happened: a later run in this process may open the folder again
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None


def open_journal(out_dir, resume, expected_header: dict) -> tuple[Journal, Records, int]:
    """The journal of ``out_dir``, holding the records of ``resume`` (a journal file) if given.

    Returns ``(journal, records, torn bytes ignored)``. Without ``resume`` the journal must not
    exist yet: continuing one is asked for explicitly. With it, its records are copied (or, when
    it is this very file, rewritten without a torn last line) before anything is appended. The
    folder stays locked until the journal is closed: a second experiment writing into it is an error."""
    path = Path(out_dir) / FILE_NAME
    lock = _lock_folder(Path(out_dir))
    try:
        records, torn = _records_to_continue(path, resume, expected_header)
        journal = Journal(path, lock)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    index = Records(records)
    if index.header is None:
        try:
            index.add(journal.append(expected_header))
        except BaseException:
            journal.close()
            raise
    return journal, index, torn


def _records_to_continue(path: Path, resume, expected_header: dict) -> tuple[list[dict], int]:
    """The records of ``resume`` (checked, and written to ``path``) and its torn bytes; none without it."""
    records, torn = [], 0
    if resume is not None:
        source = Path(resume)
        if not source.is_file():
            raise FileNotFoundError(f"--resume {source}: no such journal file")
        if path.exists() and not path.samefile(source):
            raise ValueError(f"{path} already holds a journal: resume that one (--resume {path}) or choose "
                             f"another --out for {source}")
        records, torn = read(source)
        if records:
            if records[0]["kind"] != "header":
                raise ValueError(f"{source}: the first record is not the journal header")
            check_header(records[0], expected_header, source)
        _write_all(records, path)
    elif path.exists():
        raise ValueError(f"{path} already holds a journal: pass --resume {path} to continue it, or choose "
                         "another --out")
    return records, torn
