"""A task's result is built from the journal alone (lorambo/experiments/assemble.py): the rate
chosen on seed 0's grid is the one with the lowest validation loss, and a journal whose runs
disagree with that choice is refused rather than summarised (tiny sizes, CPU)."""

import json

import pytest

from lorambo.experiments import journal
from lorambo.experiments.assemble import task_result
from lorambo.experiments.units import run_key

pytestmark = pytest.mark.slow


@pytest.fixture
def journal_records(tiny_journal) -> list[dict]:
    """The records of the conftest's tiny experiment: one seed, uniform LoRA's grid of the rates
    1e-3 and 1e-2, then gradient at uniform's choice."""
    records, torn = journal.read(tiny_journal[1])
    assert torn == 0
    return records


def test_the_rate_chosen_is_the_grid_run_with_the_lowest_validation_loss(tiny_journal, journal_records):
    cfg = tiny_journal[0]
    tr = task_result(cfg, "planted", journal.Records(journal_records))
    grid = {r["lr"]: r["val"]["rel_loss"] for r in tr["runs"] if r["method"] == "uniform"}
    assert sorted(grid) == [1e-3, 1e-2] and grid[1e-3] != grid[1e-2]
    best = min(grid, key=grid.get)
    assert tr["lr_choice"] == {"uniform": {"1.0": best}, "gradient": {"1.0": best}}
    assert [(r["method"], r["seed"], r["lr"]) for r in tr["runs"]] == [
        ("uniform", 0, 1e-3), ("uniform", 0, 1e-2), ("gradient", 0, best)]
    assert tr["summary"]["uniform"]["1.0"]["lr"] == best == tr["summary"]["gradient"]["1.0"]["lr"]
    assert tr["run_seconds"] == pytest.approx(sum(r["seconds"] for r in tr["runs"])) and tr["run_seconds"] > 0


def test_a_journal_whose_selected_run_used_another_rate_is_refused(tiny_journal, journal_records):
    """A hand-edited or mixed-up journal: gradient's run at the selected rate says it trained at
    the rate its grid did not select. Summarising it would report a result the protocol never made."""
    cfg = tiny_journal[0]
    tr = task_result(cfg, "planted", journal.Records(journal_records))
    chosen = tr["lr_choice"]["uniform"]["1.0"]
    other = next(lr for lr in cfg.lr_grid if lr != chosen)
    key = run_key(cfg, "planted", "gradient", 0, 0, None)
    edited = [json.loads(json.dumps(r)) for r in journal_records]
    next(r for r in edited if r.get("key") == key)["run"]["lr"] = other
    with pytest.raises(RuntimeError, match=rf"^journal: planted gradient level 1 seed 0 ran at lr {other}, but its "
                                           rf"grid selects {chosen}$"):
        task_result(cfg, "planted", journal.Records(edited))


def test_sensitivities_are_listed_by_module_name_with_their_notes_apart(tiny_journal, journal_records):
    cfg = tiny_journal[0]
    edited = [json.loads(json.dumps(r)) for r in journal_records]
    sens_record = next(r for r in edited if r["kind"] == "sens")
    sens_record["sens"]["_notes"] = ["gradient: a note on the measurement"]
    tr = task_result(cfg, "planted", journal.Records(edited))
    raw = sens_record["sens"]["gradient"]
    assert raw and all(k.startswith("bert.encoder.") for k in raw)
    assert tr["sensitivities"] == {"0": {"gradient": {k[len("bert.encoder."):]: v for k, v in raw.items()}}}
    assert tr["notes"] == ["gradient: a note on the measurement"]
    assert tr["sensitivity_seconds"] == {0: sens_record["seconds"]}
    total = sum(sens_record["seconds"].values())
    assert total > 0 and tr["sensitivity_seconds_total"] == pytest.approx(total)
