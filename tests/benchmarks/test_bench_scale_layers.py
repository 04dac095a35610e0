"""benchmarks/bench_scale_layers.py runs end to end at a tiny size: every case of every section
gets a row with the machine, the commit and the layer count (numbers are not checked)."""

import csv
import os

import torch
from cpu_model import cpu_model

from bench_scripts import load_bench


def test_every_case_gets_a_row_per_layer_count(tmp_path, capsys):
    bench = load_bench("bench_scale_layers")
    out = tmp_path / "scale_layers.csv"
    threads = torch.get_num_threads()
    assert bench.main(["--layers", "6", "13", "--repeats", "1", "--label", "here", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the one-thread setting is put back
    rows = list(csv.DictReader(open(out)))
    cases = {(r["section"], r["case"]) for r in rows}
    assert {("model", "configure_model_alpha_pattern"), ("adapters", "import_peft"), ("train", "growth_decision_step"),
            ("allocate", "allocate_knapsack")} <= cases
    assert len(rows) == 2 * len(cases) and {r["layers"] for r in rows} == {"6", "12"}  # 13 rounds down to 12
    assert all(float(r["ms"]) > 0 and r["label"] == "here" and r["commit"] and r["threads"] == "1"
               and r["cpu"] == cpu_model() and r["usable_cores"] == str(len(os.sched_getaffinity(0))) for r in rows)
    assert "import_peft" in capsys.readouterr().out
    assert bench.main(["--summary", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| case (ms) | here, 6 | here, 12 |")
    assert any(line.startswith("| import_peft | ") for line in table) and table[-1].startswith("| load average")
