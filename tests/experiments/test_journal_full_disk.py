"""The experiment journal on a full disk: whole records only, and the folder's lock released.

A full disk is played by RLIMIT_FSIZE (Python ignores SIGXFSZ, so a write past the limit writes
what fits and then fails with EFBIG, as one on a full disk does with ENOSPC)."""

import contextlib
import errno

import pytest

from lorambo.experiments import journal

resource = pytest.importorskip("resource")  # POSIX

HEADER = {"kind": "header", "version": journal.VERSION, "config": {"seeds": 1}, "weights": {"source": "test"}}


@contextlib.contextmanager
def _disk_full_at(size: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_does_not_keep_the_folder_locked(tmp_path):
    """A header that does not fit fails once: close() does not flush it again and releases the
    folder's lock, so resuming in the same process (a notebook, after freeing space) is not
    refused as 'in use by another running experiment'."""
    path = tmp_path / journal.FILE_NAME
    with _disk_full_at(10), pytest.raises(OSError) as err:
        journal.open_journal(tmp_path, None, HEADER)
    assert err.value.errno == errno.EFBIG
    again, records, torn = journal.open_journal(tmp_path, path, HEADER)  # space freed: resume
    again.append({"kind": "run", "key": "a"})
    again.close()
    assert torn == 0 and records.header == HEADER  # no torn header was left either
    assert [r.get("key") for r in journal.read(path)[0]] == [None, "a"]


def test_a_record_cut_short_by_a_full_disk_is_taken_back(tmp_path):
    """The part of the record that fit is cut off again after the error, so no torn line is left
    for the next record (or a flush at close) to be appended to."""
    jr, _, _ = journal.open_journal(tmp_path, None, HEADER)
    jr.append({"kind": "run", "key": "a"})
    path = tmp_path / journal.FILE_NAME
    whole = path.read_bytes()
    with _disk_full_at(len(whole) + 7), pytest.raises(OSError) as err:
        jr.append({"kind": "run", "key": "b", "loss": 0.25})
    assert err.value.errno == errno.EFBIG
    assert path.read_bytes() == whole
    jr.append({"kind": "run", "key": "c"})  # space freed: the run goes on
    jr.close()
    records, torn = journal.read(path)
    assert [r.get("key") for r in records] == [None, "a", "c"] and torn == 0
