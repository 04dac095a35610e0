"""docs/demo.md's table of rank moves on the planted task is the committed run
(docs/moves_results.json, rendered by ``lorambo.experiments.demo_report``), and the README's
numbers for it are that run's."""

import json
from pathlib import Path

import numpy as np

from lorambo.experiments import demo_report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = json.loads((ROOT / "docs" / "moves_results.json").read_text(encoding="utf-8"))


def test_the_moves_table_in_docs_is_the_committed_run():
    doc = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in demo_report.table(RESULTS).splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4 and all(row in doc for row in rows)


def test_the_readme_quotes_the_moves_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    losses = {m: np.array(RESULTS["methods"][m]["test_loss"]) for m in ("moves", "uniform")}
    moves, uniform = (f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" for v in (losses["moves"], losses["uniform"]))
    assert f"({moves} against uniform's {uniform};" in readme.replace("\n  ", " ")


def test_the_docs_name_the_command_and_time_of_the_committed_run():
    doc = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8").replace("\n", " ")
    args = RESULTS["command"].split(" --workers")[0]  # where it wrote and how it showed progress aside
    assert f"`{args}`" in doc and f"{RESULTS['wall_s']:.0f} s beside other jobs" in doc
