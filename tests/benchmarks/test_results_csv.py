"""benchmarks/results_csv.py: appends under one header, refuses a file with another header, and
never leaves a half-written file or a temp file behind."""

import csv
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("results_csv", Path(__file__).resolve().parents[2] / "benchmarks" / "results_csv.py")
results_csv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_csv)

FIELDS = ["case", "ms"]


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_appends_under_one_header(tmp_path):
    path = tmp_path / "deeper" / "bench.csv"
    results_csv.append_rows(path, FIELDS, [{"case": "a", "ms": 1.5}])
    results_csv.append_rows(path, FIELDS, [{"case": "b", "ms": 2}, {"case": "c", "ms": 3}])
    assert _rows(path) == [{"case": "a", "ms": "1.5"}, {"case": "b", "ms": "2"}, {"case": "c", "ms": "3"}]
    assert path.read_text().count("case,ms") == 1
    assert [p.name for p in path.parent.iterdir()] == ["bench.csv"]


def test_refuses_a_file_with_another_header(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text("case,seconds\nx,1\n")
    with pytest.raises(ValueError, match=r"bench.csv: its header \['case', 'seconds'\] is not this benchmark's"):
        results_csv.append_rows(path, FIELDS, [{"case": "a", "ms": 1}])
    assert path.read_text() == "case,seconds\nx,1\n"


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "bench.csv"
    results_csv.append_rows(path, FIELDS, [{"case": "a", "ms": 1}])
    before = path.read_text()
    with pytest.raises(ValueError, match="unknown"):  # DictWriter refuses a field outside the header
        results_csv.append_rows(path, FIELDS, [{"case": "b", "ms": 2}, {"case": "c", "unknown": 3}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.csv"]
    results_csv.append_rows(path, FIELDS, [{"case": "b", "ms": 2, "extra": 9}], extrasaction="ignore")
    assert _rows(path)[-1] == {"case": "b", "ms": "2"}


def test_every_line_keeps_the_files_own_line_ending(tmp_path):
    path = tmp_path / "bench.csv"
    for case in "abc":
        results_csv.append_rows(path, FIELDS, [{"case": case, "ms": 1}])
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") == 4  # csv's CRLF throughout, not only the newest row
    hand_edited = tmp_path / "edited.csv"
    hand_edited.write_bytes(b"case,ms\nx,1")  # LF, no final newline
    results_csv.append_rows(hand_edited, FIELDS, [{"case": "a", "ms": 2}])
    assert hand_edited.read_bytes() == b"case,ms\nx,1\na,2\n"
    assert _rows(hand_edited) == [{"case": "x", "ms": "1"}, {"case": "a", "ms": "2"}]


def test_a_file_from_before_new_columns_is_migrated_not_misaligned(tmp_path):
    path = tmp_path / "bench.csv"
    results_csv.append_rows(path, FIELDS, [{"case": "a", "ms": 1}])
    results_csv.append_rows(path, ["case", "threads", "ms"], [{"case": "b", "threads": 2, "ms": 3}])
    assert _rows(path) == [{"case": "a", "threads": "", "ms": "1"}, {"case": "b", "threads": "2", "ms": "3"}]
    assert path.read_bytes().count(b"\r\n") == path.read_bytes().count(b"\n") == 3
    with pytest.raises(ValueError, match="is not this benchmark's"):  # a column dropped: refused
        results_csv.append_rows(path, FIELDS, [{"case": "c", "ms": 4}])
