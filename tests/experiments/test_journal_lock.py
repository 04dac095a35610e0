"""One experiment at a time writes a journal. A second `lorambo experiment --resume D/runs.jsonl
--out D` started while the first still ran replaced the journal under it: every record the first
appended afterwards went to the replaced file and was lost, and both ran the same units."""

import signal
import subprocess
import sys

import pytest

from lorambo.experiments import journal

HEADER = {"kind": "header", "version": journal.VERSION, "config": {"seeds": 1}, "weights": {"source": "test"}}


def _keys(path) -> list:
    return [r.get("key") for r in journal.read(path)[0]]


def test_a_second_writer_is_refused_and_the_first_loses_nothing(tmp_path):
    first, _, _ = journal.open_journal(tmp_path, None, HEADER)
    first.append({"kind": "run", "key": "a"})
    for resume in (tmp_path / journal.FILE_NAME, None):
        with pytest.raises(ValueError, match=rf"{tmp_path}/runs.jsonl is in use by another running experiment: wait "
                                             r"for it to finish \(or stop it\) before resuming it, or choose another"):
            journal.open_journal(tmp_path, resume, HEADER)
    first.append({"kind": "run", "key": "b"})
    first.close()
    assert _keys(tmp_path / journal.FILE_NAME) == [None, "a", "b"]
    second, records, _ = journal.open_journal(tmp_path, tmp_path / journal.FILE_NAME, HEADER)  # free again
    second.append({"kind": "run", "key": "c"})
    second.close()
    assert sorted(records.units) == ["a", "b"] and _keys(tmp_path / journal.FILE_NAME) == [None, "a", "b", "c"]


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    code = ("import sys, time; from lorambo.experiments import journal; "
            f"journal.open_journal(sys.argv[1], None, {HEADER!r}); print('open', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(ValueError, match="in use by another running experiment"):
            journal.open_journal(tmp_path, tmp_path / journal.FILE_NAME, HEADER)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the system drops the lock
        holder.wait()
    resumed, records, _ = journal.open_journal(tmp_path, tmp_path / journal.FILE_NAME, HEADER)
    resumed.close()
    assert records.header == HEADER
