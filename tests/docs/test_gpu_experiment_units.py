"""docs/gpu_experiment.md's count of the full experiment's units is what the full preset plans: a
method added to the experiment changes it."""

import re
from collections import Counter
from pathlib import Path

from lorambo.experiments import config as presets
from lorambo.experiments.units import all_units

DOC = (Path(__file__).resolve().parents[2] / "docs" / "gpu_experiment.md").read_text(encoding="utf-8")


def test_the_unit_counts_in_the_docs_are_the_full_presets():
    units = all_units(presets.full())
    kinds = Counter((u["kind"], u["task"]) for u in units)
    assert f"The experiment is {len(units)} units of work" in DOC
    planted, sentiment = kinds[("run", "planted")], kinds[("run", "sentiment")]
    assert re.search(rf"\| runs \| {planted} planted \+ {sentiment} sentiment \|", DOC)
    assert f"| sensitivities | {kinds[('sens', 'planted')]} per task |" in DOC
    assert kinds[("sens", "planted")] == kinds[("sens", "sentiment")]
    assert f"| task setup | {kinds[('task', 'planted')] + kinds[('task', 'sentiment')]} |" in DOC
