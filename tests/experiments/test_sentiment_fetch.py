"""`make data` (sentiment_data.fetch) with a damaged cache or download, offline: pip is replaced by
a stand-in that serves a synthetic sdist laid out like vaderSentiment 3.3.2's, and the pinned
sha256 by that sdist's.

A cached sdist cut short used to fail with EOFError from gzip on every call, since it was never
downloaded again; a download that is not PyPI's file was extracted (or failed to) unchecked."""

import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest

from lorambo.experiments import sentiment_data as sd

CONTENT = {name: f"{name}: synthetic rows\n".encode() for name in sd.FILES.values()}
LICENCE = b"MIT licence (synthetic)\n"


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _sdist() -> bytes:
    inner = _tar_gz({member: CONTENT[name] for member, name in sd.FILES.items()})
    return _tar_gz({"vaderSentiment-3.3.2/LICENSE.txt": LICENCE, sd.INNER: inner})


def _fake_pip(tmp_path: Path, serves: bytes | None) -> tuple[Path, Path]:
    """A 'python' whose `-m pip download ... -d DIR` writes ``serves`` as the sdist into DIR (None:
    fails as pip does offline); each call is logged."""
    served, log = tmp_path / "served.tar.gz", tmp_path / "pip-calls.log"
    if serves is not None:
        served.write_bytes(serves)
    script = tmp_path / "fake-python"
    script.write_text(f"""#!{sys.executable}
import shutil, sys
from pathlib import Path
open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
if {serves is None!r}:
    sys.exit("ERROR: Could not find a version that satisfies the requirement vaderSentiment==3.3.2")
shutil.copyfile({str(served)!r}, Path(sys.argv[sys.argv.index("-d") + 1]) / {sd.SDIST!r})
""")
    script.chmod(0o755)
    return script, log


@pytest.fixture
def sdist(monkeypatch) -> bytes:
    data = _sdist()
    monkeypatch.setattr(sd, "SDIST_SHA256", hashlib.sha256(data).hexdigest(), raising=False)
    return data


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.rglob("*") if p.name.startswith("."))


def test_a_cached_sdist_cut_short_is_downloaded_again(tmp_path, sdist):
    target = tmp_path / "vader"
    (target / "sdist").mkdir(parents=True)
    (target / "sdist" / sd.SDIST).write_bytes(sdist[: len(sdist) // 2])  # a download cut short
    python, log = _fake_pip(tmp_path, sdist)
    assert sd.fetch(target, python=str(python)) == target / sd.DATA_FILE
    for name, data in CONTENT.items():
        assert (target / name).read_bytes() == data
    assert (target / sd.LICENSE_FILE).read_bytes() == LICENCE
    assert (target / "sdist" / sd.SDIST).read_bytes() == sdist
    assert len(log.read_text().splitlines()) == 1 and _leftovers(target) == []
    assert sd.fetch(target, python=str(python)) == target / sd.DATA_FILE  # complete: nothing fetched again
    assert len(log.read_text().splitlines()) == 1


def test_a_download_that_is_not_pypis_file_is_refused_and_not_kept(tmp_path, sdist):
    target = tmp_path / "vader"
    python, _ = _fake_pip(tmp_path, sdist[:-100])
    with pytest.raises(RuntimeError, match=rf"pip downloaded a {sd.SDIST} with sha256 [0-9a-f]{{64}}, expected "
                                           rf"{sd.SDIST_SHA256} \(PyPI's\); nothing was kept"):
        sd.fetch(target, python=str(python))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sdist"]


def test_make_data_offline_is_one_error_line(tmp_path, sdist, monkeypatch, capsys):
    python, _ = _fake_pip(tmp_path, None)
    real_fetch = sd.fetch
    monkeypatch.setattr(sd, "fetch", lambda: real_fetch(tmp_path / "vader", python=str(python)))
    assert sd.main() == 1
    err = capsys.readouterr().err
    assert err.startswith("lorambo.experiments.sentiment_data: error: sentiment data: `") and err.count("\n") == 1
    assert "Could not find a version that satisfies the requirement vaderSentiment==3.3.2" in err
    assert not (tmp_path / "vader" / sd.DATA_FILE).exists()
    assert not os.listdir(tmp_path / "vader" / "sdist")  # no temporary download folder left


def test_a_folder_missing_one_file_is_extracted_again_from_the_cached_sdist(tmp_path, sdist, monkeypatch, capsys):
    target = tmp_path / "vader"
    python, log = _fake_pip(tmp_path, sdist)
    real_fetch = sd.fetch
    monkeypatch.setattr(sd, "fetch", lambda: real_fetch(target, python=str(python)))
    assert sd.main() == 0 and capsys.readouterr().out == f"{target / sd.DATA_FILE}\n"
    snippets = target / "nytEditorialSnippets_GroundTruth.txt"
    snippets.unlink()
    (target / sd.DATA_FILE).write_bytes(b"an older copy\n")
    assert real_fetch(target, python=str(python)) == target / sd.DATA_FILE
    assert snippets.read_bytes() == CONTENT[snippets.name]
    assert (target / sd.DATA_FILE).read_bytes() == CONTENT[sd.DATA_FILE]  # all of it extracted again
    assert len(log.read_text().splitlines()) == 1  # from the cached sdist: pip ran once
    assert _leftovers(target) == []


def test_pip_that_succeeds_without_the_sdist_is_an_error(tmp_path, sdist):
    python, _ = _fake_pip(tmp_path, sdist)
    python.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(0)\n")  # exit 0, nothing written
    with pytest.raises(RuntimeError, match=r"sentiment data: `.* download --no-binary :all: --no-deps --quiet "
                                           r"vaderSentiment==3.3.2 -d .*` failed \(exit 0\)"):
        sd.fetch(tmp_path / "vader", python=str(python))
    assert not os.listdir(tmp_path / "vader" / "sdist")


def test_require_names_make_data_for_each_missing_file(tmp_path, monkeypatch):
    from lorambo.experiments import bundle

    monkeypatch.delenv(bundle.ENV, raising=False)
    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path))
    (tmp_path / "vader").mkdir()
    (tmp_path / "vader" / sd.DATA_FILE).write_text("rows\n")
    sd.require([sd.DATA_FILE])
    missing = tmp_path / "vader" / "amazonReviewSnippets_GroundTruth.txt"
    with pytest.raises(FileNotFoundError, match=f"sentiment data not found at {missing}: run `make data`"):
        sd.require([sd.DATA_FILE, missing.name])


def test_an_sdist_without_one_of_the_files_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    missing = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
    inner = _tar_gz({member: CONTENT[name] for member, name in sd.FILES.items() if member != missing})
    data = _tar_gz({"vaderSentiment-3.3.2/LICENSE.txt": LICENCE, sd.INNER: inner})
    monkeypatch.setattr(sd, "SDIST_SHA256", hashlib.sha256(data).hexdigest())
    python, _ = _fake_pip(tmp_path, data)
    target = tmp_path / "vader"
    with pytest.raises(RuntimeError, match=rf"sentiment data: \['{missing}'\] not found in {sd.INNER} of "):
        sd.fetch(target, python=str(python))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sdist", f"sdist/{sd.SDIST}"]


def test_the_default_folder_is_under_lorambo_data_dir_and_a_complete_one_is_not_touched(tmp_path, sdist, monkeypatch):
    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path / "cache"))
    python, log = _fake_pip(tmp_path, sdist)
    target = tmp_path / "cache" / "vader"
    assert sd.fetch(python=str(python)) == target / sd.DATA_FILE
    assert (target / sd.DATA_FILE).read_bytes() == CONTENT[sd.DATA_FILE]
    (target / "sdist" / sd.SDIST).unlink()  # not needed once every file is there
    python.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('pip must not run')\n")
    assert sd.fetch(python=str(python)) == target / sd.DATA_FILE
    assert sorted(p.name for p in target.iterdir()) == sorted([*sd.FILES.values(), sd.LICENSE_FILE, "sdist"])
    assert len(log.read_text().splitlines()) == 1
