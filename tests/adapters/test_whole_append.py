"""append_whole: every byte of a record lands after the file's content, through short writes,
and fsync is called only when asked."""

import os

import pytest

from lorambo.adapters import whole_append
from lorambo.adapters.whole_append import append_whole


def test_short_writes_that_succeed_append_every_byte_in_order(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(whole_append.os, "write", lambda fd, data: real(fd, bytes(data[:3])))  # 3 bytes a call
    path = tmp_path / "log"
    path.write_bytes(b"old\n")
    record = bytes(range(40, 77)) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        append_whole(fd, record)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"old\n" + record


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_only_when_asked(tmp_path, monkeypatch, fsync):
    calls = []
    monkeypatch.setattr(whole_append.os, "fsync", calls.append)
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        if fsync:
            append_whole(fd, b"a\n", fsync=True)
        else:
            append_whole(fd, b"a\n")  # the default does not sync
        assert calls == ([fd] if fsync else [])
    finally:
        os.close(fd)
    assert (tmp_path / "log").read_bytes() == b"a\n"
