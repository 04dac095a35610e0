"""The decision log on a full disk: a write that stops part-way leaves whole lines only."""

import errno
import os

import pytest

from lorambo.allocation import report
from lorambo.allocation.report import DecisionLog, read_decisions


def _disk_full_after(monkeypatch, room: int):
    """os.write as on a disk with ``room`` bytes left: a short write, then ENOSPC."""
    real = os.write
    left = [room]

    def write(fd, data):
        if left[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data[:left[0]]))
        left[0] -= n
        return n

    monkeypatch.setattr(report.os, "write", write)


def test_a_full_disk_mid_record_leaves_no_torn_line_and_loses_no_record(tmp_path, monkeypatch):
    """os.write returns a short count on a full disk: the append raises instead of leaving half a
    record in the file for the next record to be appended to (read_decisions would refuse the
    file: "line 2: not a JSON record"), and the record stays in the decision list."""
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    first = {"step": 3, "event": "grow", "layer": "a", "new_rank": 2}
    log.append(first)  # the run's first record: the file is (re)written whole
    whole = path.read_bytes()
    second = {"step": 6, "event": "grow", "layer": "b", "new_rank": 4}
    _disk_full_after(monkeypatch, 9)
    with pytest.raises(OSError, match=rf"log_path {path}: could not append 1 decision record.*No space left") as err:
        log.append(second)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == whole  # cut back to the last whole record
    assert log.records == [first, second]  # the decision was taken: the list says so
    monkeypatch.undo()  # space freed
    third = {"step": 9, "event": "grow", "layer": "a", "new_rank": 3}
    log.append(third)
    assert read_decisions(path) == [first, second, third]
