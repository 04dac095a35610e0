"""An experiment folder holds every artefact of one finish or, without results.json, no finished
experiment: a finish stopped part-way (Ctrl-C while writing) publishes nothing, a finish again
from the same journal replaces the set whole, and a new run into a folder holding another
experiment's results.json is refused before anything runs (tiny sizes, CPU)."""

import importlib.util
import json
import re
import shutil

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import plots
from lorambo.experiments import results as res
from lorambo.experiments.runner import plots_from, run_experiment

pytestmark = pytest.mark.slow

CFG = presets.tiny(methods=("uniform", "gradient")).replace(tasks=("planted",), budgets=(1.0,), seeds=1,
                                                            lr_grid=(1e-3,), lr_search="uniform")
QUIET = {"progress": False, "echo": lambda *a: None}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished experiment's folder (its journal and its artefacts)."""
    out = tmp_path_factory.mktemp("finished")
    run_experiment(CFG, out_dir=out, **QUIET)
    return out


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stop_at_results_json(monkeypatch):
    real = res.write_json_atomic

    def write(obj, path):
        if path.name == "results.json":
            raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(res, "write_json_atomic", write)


def _no_model(monkeypatch):
    def load(*a, **k):
        raise AssertionError("nothing may run")

    monkeypatch.setattr("lorambo.experiments.minilm.load_minilm", load)


def test_a_first_finish_stopped_part_way_publishes_nothing(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(finished / "runs.jsonl", out / "runs.jsonl")  # every unit recorded: only the finish is left
    _no_model(monkeypatch)
    with monkeypatch.context() as m:
        _stop_at_results_json(m)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(CFG, out_dir=out, resume=out / "runs.jsonl", **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["runs.jsonl"]  # no results.txt, PNG or stage folder
    result = run_experiment(CFG, out_dir=out, resume=out / "runs.jsonl", **QUIET)  # the next try finishes
    names = set(_files(out))
    assert {"results.json", "results.txt", *result["plots"]} | {"runs.jsonl"} == names
    assert json.loads((out / "results.json").read_text())["sessions"] == 3


def test_a_finish_again_stopped_part_way_leaves_the_old_set_and_a_whole_one_replaces_it(finished, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _files(out)
    _no_model(monkeypatch)
    with monkeypatch.context() as m:
        _stop_at_results_json(m)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(CFG, out_dir=out, resume=out / "runs.jsonl", **QUIET)
    after = _files(out)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k != "runs.jsonl"} == {k: v for k, v in before.items()
                                                                      if k != "runs.jsonl"}

    run_experiment(CFG, out_dir=out, resume=out / "runs.jsonl", **QUIET)
    result = json.loads((out / "results.json").read_text())
    wall = re.search(r"wall time (\d+) s", (out / "results.txt").read_text()).group(1)
    assert int(wall) == round(result["seconds"])  # the text and the numbers of one finish
    assert result["sessions"] == 3 and set(_files(out)) == set(before)


def test_a_new_run_into_another_experiments_results_is_refused_before_anything_runs(finished, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "runs.jsonl").unlink()  # its journal removed: results.json would pass for the new run's
    before = _files(out)
    _no_model(monkeypatch)
    for resume in (None, finished / "runs.jsonl"):
        with pytest.raises(ValueError, match=r"holds the results of another experiment .*results\.json.* but no "
                                             r"journal \(runs\.jsonl\)"):
            run_experiment(CFG, out_dir=out, resume=resume, **QUIET)
        assert _files(out) == before


def test_plots_drawn_elsewhere_do_not_block_a_rebuild_from_the_journal(finished, tmp_path, monkeypatch):
    """docs/gpu_experiment.md: draw the plots into runs/full, or rebuild every artefact there."""
    out = tmp_path / "full"
    if importlib.util.find_spec("matplotlib") is not None:
        plots_from(finished / "results.json", out)
    _no_model(monkeypatch)
    result = run_experiment(CFG, out_dir=out, resume=finished / "runs.jsonl", **QUIET)
    assert (out / "results.json").is_file() and all((out / p).is_file() for p in result["plots"])


def test_plots_from_stopped_part_way_publishes_no_plot(finished, tmp_path, monkeypatch):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("drawing plots needs matplotlib (not on the GPU image)")
    real, calls = plots.rank_heatmap, []

    def heatmap(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "rank_heatmap", heatmap)
    out = tmp_path / "plots"
    with pytest.raises(KeyboardInterrupt):
        plots_from(finished / "results.json", out)
    assert list(out.iterdir()) == []


def test_publish_moves_results_json_last_and_the_rest_in_their_order(tmp_path, monkeypatch):
    """results.json marks a finished experiment: a finish stopped between two renames must never
    leave a new results.json beside old artefacts; the others keep the order they were written in."""
    from lorambo.experiments import outputs

    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir(), out.mkdir()
    names = ["results.txt", outputs.RESULTS, "a.png", "b.png"]
    for name in names:
        (stage / name).write_text(name)
    moved = []
    real = outputs.atomic_write_many
    monkeypatch.setattr(outputs, "atomic_write_many",
                        lambda writes, caller: (moved.extend(p.name for p in writes), real(writes, caller))[1])
    outputs.publish(stage, out, names + ["a.png"], "test")
    assert moved == ["results.txt", "a.png", "b.png", outputs.RESULTS]
    assert {p.name: p.read_text() for p in out.iterdir()} == {name: name for name in names}
