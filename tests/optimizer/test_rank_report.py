"""Visibility: rank table, layer x module-type heat map, JSON-lines decision log."""

import importlib.util
import json
import threading

import numpy as np
import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.report import DecisionLog, rank_grid, rank_table, read_decisions, save_heatmap, split_name
from pyplot_state import pyplot_left_alone


def _ranks():
    r = torch.randint(0, 9, (3, 2)).tolist()
    return {f"encoder.layer.{i}.attention.{kind}": r[i][j]
            for i in range(3) for j, kind in enumerate(("query", "value"))}


def test_split_and_grid():
    assert split_name("transformer.h.11.attn.c_attn") == ("transformer.h.11", "attn.c_attn")
    assert split_name("lm_proj") == ("", "lm_proj")
    ranks = _ranks()
    rows, cols, grid = rank_grid(ranks)
    assert rows == [f"encoder.layer.{i}" for i in range(3)]
    assert cols == ["attention.query", "attention.value"]
    for name, r in ranks.items():
        block, kind = split_name(name)
        assert grid[rows.index(block), cols.index(kind)] == r
    rows, cols, grid = rank_grid({"a.0.q": 1, "a.1.k": 2})
    assert np.isnan(grid[0, 1]) and np.isnan(grid[1, 0])


def test_heatmap_png(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image", reason="save_heatmap's optional dependency")

    path = save_heatmap(_ranks(), tmp_path / "sub" / "ranks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib_image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    with pytest.raises(ValueError, match="no ranks"):
        save_heatmap({}, tmp_path / "x.png")


def test_heatmap_leaves_the_callers_pyplot_alone(tmp_path):
    """save_heatmap switched the process's matplotlib backend to Agg: in a notebook, figures
    stopped displaying after opt.save_heatmap(...)."""
    matplotlib_image = pytest.importorskip("matplotlib.image", reason="save_heatmap's optional dependency")

    with pyplot_left_alone():
        path = save_heatmap(_ranks(), tmp_path / "ranks.png")
    assert matplotlib_image.imread(path).shape[0] > 50


def test_rank_table_from_model_and_dict():
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), {"0": 3, "1": 2},
                                    capacity={"0": 4, "1": 4})
    table = rank_table(model)
    assert "0" in table and "capacity" in table
    assert table.splitlines()[-1].split() == ["total", "5", str(3 * 14 + 2 * 12)]
    assert rank_table({"x": 4}).splitlines()[-1].split() == ["total", "4"]


def test_rank_table_of_a_model_not_configured_yet_says_so(tmp_path):
    # before: a header, no rows and "total 0", as if every rank were 0
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=100, sensitivity_method="frobenius")
    for table in (lambda: rank_table(model), opt.rank_table):
        with pytest.raises(ValueError, match=r"^rank_table: Sequential has no LoRAMBoLinear layers: configure the "
                                             r"model first \(configure_model, or LoRAMBoOptimizer.configure\)"):
            table()
    with pytest.raises(ValueError, match=r"^save_heatmap: Sequential has no LoRAMBoLinear layers"):
        save_heatmap(model, tmp_path / "ranks.png")
    assert not (tmp_path / "ranks.png").exists()
    opt.compute_optimal_ranks()
    opt.configure()
    assert opt.rank_table().splitlines()[-1].split()[:2] == ["total", str(sum(opt.ranks.values()))]


def test_decision_log_appends_whole_lines_from_many_threads(tmp_path):
    path = tmp_path / "log" / "decisions.jsonl"
    logs = [DecisionLog(path)] * 4
    payload = "x" * int(torch.randint(50, 500, ()))

    def write(log, w):
        for i in range(50):
            log.append({"step": i, "writer": w, "benefit": np.float64(i) / 3, "pad": payload})

    threads = [threading.Thread(target=write, args=(log, w)) for w, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    records = [json.loads(line) for line in lines]
    assert sorted((r["writer"], r["step"]) for r in records) == [(w, i) for w in range(4) for i in range(50)]
    assert all(isinstance(r["benefit"], float) for r in records)
    with open(path, "a") as f:  # a crash mid-line loses only that line
        f.write('{"step": 3, "lay')
    assert len(read_decisions(path)) == 200
    assert logs[0].records == records


def test_disabled_log_writes_nothing(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl", enabled=False)
    log.append({"step": 1})
    assert log.records == [{"step": 1}] and not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("bad", [2.7, -1, True, "3", float("nan")])
def test_rank_table_refuses_a_rank_that_is_not_a_whole_number(bad, tmp_path):
    # int() showed a rank of 2.7 as 2 in the table and the heat map
    ranks = {"h.0.attn": 4, "h.0.mlp": bad}
    with pytest.raises(ValueError, match=r"rank of layer 'h.0.mlp' is .*must be a whole number >= 0"):
        rank_table(ranks)
    if importlib.util.find_spec("matplotlib") is not None:  # else save_heatmap stops at its import
        with pytest.raises(ValueError, match=r"rank of layer 'h.0.mlp'"):
            save_heatmap(ranks, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
    assert "3" in rank_table({"h.0.attn": 4, "h.0.mlp": np.int64(3)})


def _column(table, name, col):
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return int(cells[col])
    raise AssertionError(f"no row {name!r} in\n{table}")


def test_rank_table_of_an_allocation_with_non_string_names():
    # allocate takes any hashable layer names; the table of its result must still find their
    # (d, k) and capacities: the params column was 0 and the capacities blank for int names
    dims = {0: (10, 10), 1: (20, 5), (2, "mlp"): (7, 3)}
    ranks = lorambo.allocate(dims, {0: 1.0, 1: 2.0, (2, "mlp"): 0.5}, budget=300)
    table = rank_table(ranks, capacities={0: 8, 1: 6, (2, "mlp"): 3}, dims=dims)
    assert _column(table, "0", 2) == 8 and _column(table, "1", 2) == 6
    assert _column(table, "0", 3) == ranks[0] * 20 and _column(table, "1", 3) == ranks[1] * 25
    assert _column(table, "total", 2) == sum(r * sum(dims[n]) for n, r in ranks.items()) > 0


def test_rank_table_refuses_a_layer_missing_from_dims():
    with pytest.raises(ValueError, match=r"dims has no \(d, k\) for layer\(s\) \['b'\]"):
        rank_table({"a": 2, "b": 3}, dims={"a": (4, 4)})


def test_a_new_run_replaces_the_log_of_an_earlier_one(tmp_path):
    """Each run appended to the file, so read_decisions returned two runs' steps mixed."""
    path = tmp_path / "decisions.jsonl"
    first = DecisionLog(path)
    first.extend([{"step": 2, "run": 1}, {"step": 5, "run": 1}])
    second = DecisionLog(path)
    assert read_decisions(path) == first.records  # nothing is lost before the new run decides
    second.extend([{"step": 2, "run": 2}, {"step": 5, "run": 2}])
    assert read_decisions(path) == second.records == [{"step": 2, "run": 2}, {"step": 5, "run": 2}]


def test_restore_cuts_the_log_back_and_appends_after_it(tmp_path):
    path = tmp_path / "decisions.jsonl"
    crashed = DecisionLog(path)
    crashed.extend([{"step": s} for s in (2, 5, 8)])
    with open(path, "a") as f:
        f.write('{"step": 11, "la')                   # torn by the crash
    resumed = DecisionLog(path)
    resumed.restore([{"step": 2}, {"step": 5}])        # the checkpoint was taken at step 6
    resumed.append({"step": 8, "again": True})
    assert read_decisions(path) == resumed.records == [{"step": 2}, {"step": 5}, {"step": 8, "again": True}]


def test_read_decisions_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "decisions.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "la\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"decisions.jsonl, line 2: not a JSON record"):
        read_decisions(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: a JSON list, not a record"):
        read_decisions(path)
    path.write_text('{"step": 1}\n{"step": 2, "la')
    assert read_decisions(path) == [{"step": 1}]


def test_read_decisions_names_itself_and_the_path_for_what_is_no_decision_log(tmp_path, monkeypatch):
    """A missing file, a folder, an empty path (the current folder) and a binary file gave bare OS
    or codec errors ("[Errno 21] Is a directory: '.'", "'utf-8' codec can't decode byte")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "adapter.safetensors").write_bytes(bytes(range(256)))
    for path, error, message in [("missing.jsonl", FileNotFoundError, r"no decision log at missing\.jsonl"),
                                 ("runs", IsADirectoryError, r"runs is a folder, not a decision log"),
                                 ("", ValueError, r"empty path"),
                                 ("adapter.safetensors", ValueError, r"adapter\.safetensors is not a decision log "
                                                                     r"\(not text")]:
        with pytest.raises(error, match=rf"^read_decisions: {message}"):
            read_decisions(path)


def test_a_log_path_that_cannot_be_written_is_refused_when_the_allocator_is_built(tmp_path):
    # before: a folder at log_path failed at the first online decision (IsADirectoryError about a
    # temporary name), and a file above it with mkdir's bare "[Errno 17] File exists"
    (tmp_path / "decisions.jsonl").mkdir()
    (tmp_path / "notes").write_text("keep me\n")
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), 1, capacity=4)
    with pytest.raises(IsADirectoryError, match=r"^log_path: cannot write the file .*decisions.jsonl: a folder of "
                                                r"that name exists$"):
        lorambo.LoRAMBoOptimizer(model, 1000, interval=1, log_path=tmp_path / "decisions.jsonl")
    with pytest.raises(NotADirectoryError, match=r"^log_path: cannot write .*notes.run.d.jsonl: .*notes is a file, "
                                                 r"not a folder$"):
        lorambo.LoRAMBoOptimizer(model, 1000, interval=1, log_path=tmp_path / "notes" / "run" / "d.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions.jsonl", "notes"]
    assert not any((tmp_path / "decisions.jsonl").iterdir())
