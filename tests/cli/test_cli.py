"""The ``lorambo`` command: demo on the real MiniLM (small size) and info."""

import subprocess
import sys
from pathlib import Path

import pytest

from lorambo.cli import main
from lorambo.cli.demo import run_demo


@pytest.mark.slow
def test_demo_grows_ranks_without_changing_function_or_storage(capsys):
    result = run_demo(steps=3, grow_at=1, batch_size=8)
    growth = result["growth"]
    assert growth["max_abs_diff"] <= 1e-6
    assert growth["same_objects"] and growth["same_storage"] and growth["inactive_zero"]
    assert growth["mib_before"] == growth["mib_after"]
    assert growth["ranks_after"] > growth["ranks_before"]
    assert len(result["history"]) == 3 and all(loss > 0 for _, loss in result["history"])
    out = capsys.readouterr().out
    assert "function preserved" in out and "Held-out contrastive loss" in out


def test_demo_rejects_bad_schedule():
    with pytest.raises(ValueError, match="--grow-at 5"):
        run_demo(steps=4, grow_at=5)


def test_info_and_console_entry_point(capsys):
    assert main(["info"]) == 0
    assert "backend requested" in capsys.readouterr().out
    for cmd in ([sys.executable, "-m", "lorambo.cli", "--help"], [str(Path(sys.executable).parent / "lorambo"), "-h"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0 and "demo" in proc.stdout, proc.stderr
