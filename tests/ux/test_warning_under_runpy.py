"""Under ``python -m lorambo`` every frame but runpy's is lorambo's: a warning was reported at
``<frozen runpy>`` (or ``runpy.py``), where no filter by module can reach it. It belongs at
lorambo's own calling line, as when every frame is lorambo's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Run as ``python -m as_lorambo``: its folder counts as lorambo's, so the stack is runpy's frames
# over lorambo's, as under ``python -m lorambo``.
MAIN = '''\
import os, warnings
import lorambo.user_warnings as uw

inner = uw._internal_prefixes
uw._internal_prefixes = lambda: inner() + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    uw.warn_user("from lorambo")  # line 8
print(record[0].filename, record[0].lineno)
'''


@pytest.mark.parametrize("frozen", ["on", "off"])  # runpy's frames: "<frozen runpy>" / runpy.py
def test_warning_under_python_m_points_at_lorambos_calling_line(frozen, tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "as_lorambo.py").write_text(MAIN)
    elsewhere = tmp_path / "cwd"  # a pseudo-name such as "<frozen runpy>" resolves against the cwd
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package), str(ROOT)] + sys.path))
    proc = subprocess.run([sys.executable, "-X", f"frozen_modules={frozen}", "-m", "as_lorambo"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    filename, line = proc.stdout.split()
    assert (Path(filename), int(line)) == (package / "as_lorambo.py", 8)
