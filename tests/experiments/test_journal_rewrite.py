"""The journal's whole rewrite (``--resume``: the records copied, a torn last line dropped) is an
atomic write like every other file lorambo writes: a writer killed outright (``kill -9``) in the
middle leaves a temporary that the next rewrite removes, and the journal keeps the permissions of
one the run creates."""

import os
import stat
import subprocess
import sys
import textwrap

from lorambo.experiments import journal

RECORDS = [{"kind": "header", "version": 1, "config": {"steps": 3}, "weights": {"source": "package"}},
           {"kind": "session", "session": 0},
           {"kind": "run", "key": "k0", "task": "planted", "run": {"loss": 0.25}}]

KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from lorambo.experiments import journal

    def hang(fd):  # the temporary is written: stop here until killed
        print("staged", flush=True)
        time.sleep(600)

    os.fsync = hang
    journal._write_all([{"kind": "header"}], Path(sys.argv[1]))
""")


def test_a_rewrite_killed_outright_leaves_a_temporary_the_next_one_removes(tmp_path):
    path = tmp_path / journal.FILE_NAME
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "staged"
    finally:
        writer.kill()
        writer.wait()  # reaped: its pid no longer runs
        writer.stdout.close()
    assert len(list(tmp_path.iterdir())) == 1 and not path.exists()  # the temporary, not the journal

    journal._write_all(RECORDS, path)
    assert [p.name for p in tmp_path.iterdir()] == [journal.FILE_NAME]
    assert journal.read(path) == (RECORDS, 0)


def test_a_rewritten_journal_has_the_permissions_of_a_created_one(tmp_path):
    created = tmp_path / "created"
    created.mkdir()
    journal.Journal(created / journal.FILE_NAME).close()
    rewritten = tmp_path / journal.FILE_NAME
    journal._write_all(RECORDS, rewritten)
    mode = stat.S_IMODE(os.stat(rewritten).st_mode)
    assert mode == stat.S_IMODE(os.stat(created / journal.FILE_NAME).st_mode), oct(mode)
