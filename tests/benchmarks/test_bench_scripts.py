"""The benchmark scripts run end to end at a tiny size (numbers are not checked, artefacts are)."""

import csv
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from cpu_model import cpu_device, cpu_model

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("matplotlib", [True, False])
def test_bench_sensitivity_tiny_writes_csv_and_png(tmp_path, monkeypatch, capsys, matplotlib):
    """Without matplotlib (the GPU machine's image) the CSV is written and --plot-only draws the
    PNG later where matplotlib is."""
    if matplotlib:
        pytest.importorskip("matplotlib")
    bench = _load("bench_sensitivity")
    if not matplotlib:
        real = importlib.util.find_spec
        monkeypatch.setattr(bench.importlib.util, "find_spec",
                            lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert bench.main(["--size", "tiny", "--max-probes", "8", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv")))
    metrics = {(r["provider"], r["metric"]) for r in rows}
    assert {("lorambo", "time_to_target"), ("sequential_loop", "time_to_target"),
            ("autograd", "one_hvp"), ("train_step", "with_fisher_proxy")} <= metrics
    assert all(math.isfinite(float(r["value"])) and float(r["value"]) > 0 for r in rows)
    assert all(r["device"] == cpu_device() for r in rows)
    assert all(r["threads"] == str(torch.get_num_threads()) for r in rows)
    # how each number was taken: a best-of-N timing and a single run are not the same statistic
    timing = {(r["provider"], r["metric"]): r["timing"] for r in rows}
    assert timing[("autograd", "one_hvp")] == "min of 3 after a warm-up"
    assert timing[("train_step", "with_fisher_proxy")] == "min of 5 after a warm-up"
    assert timing[("lorambo", "time_to_target")] == timing[("sequential_loop", "time_to_target")] == "one run"
    assert all(r["load"].endswith("(1-minute)") for r in rows)
    if not matplotlib:
        assert not (tmp_path / "sensitivity.png").exists() and "--plot-only" in capsys.readouterr().out
        monkeypatch.undo()
        pytest.importorskip("matplotlib")  # drawing it later needs it
        assert bench.main(["--plot-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sensitivity.png").stat().st_size > 5000


def test_peft_style_provider_computes_what_lorambo_computes():
    """The eager comparison layer the benchmarks share is a fair one: same function, same gradients."""
    import torch
    from torch import nn

    from lorambo import LoRAMBoLinear

    providers = _load("providers")
    torch.manual_seed(0)
    base = nn.Linear(12, 9)  # float32: the provider builds its A and B in the default dtype
    ours = LoRAMBoLinear(base, rank=3, capacity=8, alpha=6.0)
    with torch.no_grad():
        ours.lora_A[:3].normal_()
        ours.lora_B[:, :3].normal_()
    theirs = providers.PeftStyleLoRA(base, 3, ours.scaling, ours.lora_A[:3].detach(), ours.lora_B[:, :3].detach())
    x = torch.randn(5, 12, requires_grad=True)
    y_ours = ours(x)
    (g_ours,) = torch.autograd.grad(y_ours.square().sum(), x)
    y_theirs = theirs(x)
    (g_theirs,) = torch.autograd.grad(y_theirs.square().sum(), x)
    torch.testing.assert_close(y_theirs, y_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_theirs, g_ours, rtol=1e-5, atol=1e-5)


def test_bench_ext_adamw_section_runs_every_provider(tmp_path):
    from lorambo.ext import loader

    if loader.load() is None:
        pytest.skip("compiled extension lorambo._C not built")
    bench = _load("bench_ext")
    out = tmp_path / "ext.csv"
    assert bench.main(["--sections", "adamw", "--quick", "--budget", "0.05", "--out", str(out), "--no-plot"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {r["provider"] for r in rows} == {"ext", "foreach", "torch_whole_pool"}
    assert all(r["section"] == "adamw" and float(r["ms_median"]) > 0 for r in rows)
    assert "adamw_step_16" in (tmp_path / "ext.md").read_text()


def test_bench_ext_replot_redraws_a_csv_measured_on_another_machine(tmp_path):
    bench = _load("bench_ext")
    out = tmp_path / "ext.csv"
    row = dict(run="2026-01-01T00:00:00Z", device="Some Other CPU", threads="1", torch="2.0", section="reduce",
               case="dot_224", mode="dot", dtype="float32", M="224", K="10", N="", rank="16", ms_median="2.0",
               ms_p20="1.9", ms_p80="2.1", rounds="5")
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=bench.FIELDS)
        writer.writeheader()
        writer.writerows([dict(row, provider="python_loop", ms_median="8.0"), dict(row, provider="ext")])
    assert bench.main(["--replot", "--out", str(out)]) == 0
    md = (tmp_path / "ext.md").read_text()
    assert "Some Other CPU" in md and "| reduce | dot_224 | float32 | python_loop | 8.000 | 4.0× |" in md
    assert (tmp_path / "ext.png").stat().st_size > 0
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(bench.FIELDS) + "\n")
    with pytest.raises(SystemExit, match="holds no rows"):
        bench.main(["--replot", "--out", str(empty)])
    assert not (tmp_path / "empty.md").exists()  # nothing overwritten with an empty summary


@pytest.mark.parametrize("script, argv, named", [
    ("bench_lora_linear", ["--cpu-smoke", "--modes", "fwdbwd"], "argument --modes: 'fwdbwd': unknown 'fwdbwd'"),
    ("bench_lora_linear", ["--cpu-smoke", "--providers", "base,lorabmo"], "argument --providers: 'base,lorabmo'"),
    ("bench_lora_linear", ["--cpu-smoke", "--modes", ","], "argument --modes: ',': no name given"),
    ("bench_ext", ["--sections", "reduce,nope"], "argument --sections: 'reduce,nope': unknown 'nope'"),
    ("bench_ext", ["--modes", "fwd,bwd", "--replot"], "argument --modes: 'fwd,bwd': unknown 'bwd'"),
    ("bench_sketch", ["--tiny", "--sections", "growht"], "argument --sections: invalid choice: 'growht'"),
])
def test_a_misspelt_name_is_an_argument_error_naming_option_and_value(tmp_path, capsys, script, argv, named):
    out = tmp_path / ("results" if script == "bench_sketch" else "missing.csv")
    with pytest.raises(SystemExit) as exc:
        _load(script).main([*argv, "--out", str(out)])
    assert exc.value.code == 2 and named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def test_bench_allocate_many_records_the_cpu_model(tmp_path):
    bench = _load("bench_allocate_many")
    assert bench.main(["--layers", "12", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "allocate.csv")))
    assert rows and all(r["machine"] == cpu_device() for r in rows)


def test_bench_allocate_many_columns_are_what_its_help_and_line_say(tmp_path, monkeypatch, capsys):
    """``ms_min`` is the median over problems of each problem's fastest call and ``ms_max`` the
    slowest problem's median call, not the extremes of all calls: the help and the printed line
    say so (docs/performance.md quotes ``ms_min``)."""
    bench = _load("bench_allocate_many")
    problems, made = 3, []

    def times_ms(fn, repeats):  # problem p of every method: calls of 9+p, 1+p and 5+p ms
        p = len(made) % problems
        made.append(p)
        return [9.0 + p, 1.0 + p, 5.0 + p][:repeats]

    monkeypatch.setattr(bench, "_times_ms", times_ms)
    assert bench.main(["--shapes", "minilm", "--problems", str(problems), "--repeats", "3",
                       "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "allocate.csv")))
    assert rows and all((r["ms_median"], r["ms_min"], r["ms_max"]) == ("6.000", "2.000", "7.000") for r in rows)
    out = capsys.readouterr().out
    assert ("6.000 ms median call,    2.000 ms fastest call (median over problems),    7.000 ms median call "
            "of the slowest of 3 problem(s)") in out
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "``ms_median``: the median over problems of each problem's median call" in help_text
    assert "``ms_min``: the median over problems of each problem's fastest call (not the fastest call of all)" \
        in help_text
    assert "``ms_max``: the largest of the problems' median calls (the slowest problem, not the slowest call)" \
        in help_text


def test_bench_sensitivity_plot_cut_short_leaves_the_old_png_and_no_temporary(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    bench = _load("bench_sensitivity")
    assert bench.main(["--size", "tiny", "--max-probes", "2", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "sensitivity.png").read_bytes()

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        bench.main(["--plot-only", "--out", str(tmp_path)])
    assert (tmp_path / "sensitivity.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.csv", "sensitivity.png"]


@pytest.mark.parametrize("script, argv, named", [
    ("bench_allocate_many", ["--layers", "4", "--repeats", "0"],
     "argument --repeats: expected a positive int, got '0'"),
    ("bench_sketch", ["--tiny", "--reps", "0"], "argument --reps: expected a positive int, got '0'"),
    ("bench_ext", ["--threads", "0", "--replot"], "argument --threads: expected a positive int, got '0'"),
    ("bench_ext", ["--budget", "nan", "--replot"], "argument --budget: expected a positive float, got 'nan'"),
    ("bench_sensitivity", ["--size", "tiny", "--max-probes", "0"], "argument --max-probes: expected a positive int"),
    ("bench_sensitivity", ["--size", "tiny", "--threads", "0"], "argument --threads: expected a positive int, got '0'"),
])
def test_a_count_or_budget_below_one_is_an_argument_error(tmp_path, capsys, script, argv, named):
    """Not a traceback from deep inside, nor 0 read as 'the default' (bench_sketch --reps 0)."""
    out = tmp_path / ("missing.csv" if script == "bench_ext" else "out")
    with pytest.raises(SystemExit) as exc:
        _load(script).main([*argv, "--out", str(out)])
    assert exc.value.code == 2 and named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_sensitivity_shows_each_measurement_as_it_is_taken(tmp_path, monkeypatch, capsys):
    """A long run (the GPU size) shows its progress: a stage that fails has the earlier ones printed."""
    bench = _load("bench_sensitivity")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "sequential_loop_to_target", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--size", "tiny", "--max-probes", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "size tiny" in out and "one_hvp" in out and "time_to_target" in out and "sequential_loop" not in out


def test_bench_lora_linear_replot_of_an_empty_csv_keeps_the_summary(tmp_path):
    bench = _load("bench_lora_linear")
    out = tmp_path / "lora_linear.csv"
    out.write_text(",".join(bench.FIELDS) + "\n")
    (tmp_path / "lora_linear.md").write_text("the last real summary\n")
    with pytest.raises(SystemExit, match="holds no rows"):
        bench.main(["--replot", "--out", str(out)])
    assert (tmp_path / "lora_linear.md").read_text() == "the last real summary\n"
    with pytest.raises(SystemExit, match="does not exist"):
        bench.main(["--replot", "--out", str(tmp_path / "missing.csv")])


def test_bench_host_overhead_records_machine_and_commit_and_summarises(tmp_path, capsys):
    bench = _load("bench_host_overhead")
    out = tmp_path / "host_overhead.csv"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--sections", "model", "--label", "here", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(out)))
    assert {r["case"] for r in rows} == {"configure_model_48", "growth_nondecision_step_48"}
    assert all(r["cpu"] == cpu_model() and r["usable_cores"] == str(len(os.sched_getaffinity(0)))
               and r["label"] == "here" and r["commit"] and r["threads"] == "1" for r in rows)
    capsys.readouterr()
    bench.main(["--summary", str(out)])
    table = capsys.readouterr().out
    assert "| configure_model_48 |" in table and "| here |" in table
    with pytest.raises(SystemExit) as exc:
        bench.main(["--repeats", "6", "--no-save"])
    assert exc.value.code == 2 and "--repeats must be at least 7" in capsys.readouterr().err


def test_bench_lora_linear_report_shows_only_the_latest_runs_device(tmp_path):
    """An older fp16 run on one GPU and a newer bf16 run on another: the summary (one title, one
    device) holds the newer device's rows only."""
    bench = _load("bench_lora_linear")
    out = tmp_path / "lora_linear.csv"
    runs = [("2026-12-01T00:00:00Z", "NVIDIA H100", "float16"), ("2026-12-05T00:00:00Z", "NVIDIA H200", "bfloat16")]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=bench.FIELDS)
        writer.writeheader()
        for run, device, dtype in runs:
            writer.writerow({field: "1" for field in bench.FIELDS} | {"run": run, "device": device, "dtype": dtype})
    rows = bench.latest_runs(out)
    assert rows and {(r["device"], r["dtype"]) for r in rows} == {("NVIDIA H200", "bfloat16")}


def test_move_oscillation_counts_a_shrink_of_the_slot_grown_at_the_previous_decision():
    bench = _load("move_oscillation")
    records = [dict(step=10, event="shrink", layer="a", old_rank=2, new_rank=1, components=[0]),
               dict(step=10, event="grow", layer="b", old_rank=2, new_rank=3),        # b's slot 2 is new
               dict(step=20, event="shrink", layer="b", old_rank=3, new_rank=2, components=[2]),   # undone
               dict(step=20, event="grow", layer="a", old_rank=1, new_rank=3),        # a's slots 1, 2
               dict(step=30, event="shrink", layer="a", old_rank=3, new_rank=2, components=[0]),   # an old one
               dict(step=30, event="grow", layer="b", old_rank=2, new_rank=3),
               dict(step=40, event="shrink", layer="c", old_rank=3, new_rank=2, components=[2])]   # other layer
    assert bench.undone(records) == [True, False, False]


def test_move_oscillation_tiny_writes_one_row_per_rank_change_and_one_per_run(tmp_path, capsys):
    bench = _load("move_oscillation")
    out, runs_out = tmp_path / "moves.csv", tmp_path / "runs.csv"
    assert bench.main(["--move-thresholds", "1e-6", "--width", "8", "--steps", "25", "--interval", "5",
                       "--seeds", "0", "--planted", "2", "--out", str(out), "--runs-out", str(runs_out)]) == 0
    rows = list(csv.DictReader(open(out)))
    printed = capsys.readouterr().out
    assert rows and {r["event"] for r in rows} == {"grow", "shrink"} and "decisions after the first" in printed
    assert {r["planted"] for r in rows} == {"2"} and {r["move_threshold"] for r in rows} == {"1e-06"}
    steps = sorted({int(r["step"]) for r in rows})
    assert len(steps) >= 2 and all(s % 5 == 0 for s in steps)
    # the printed count is the shrink rows flagged as undoing the previous growth
    flagged = {int(r["step"]) for r in rows if r["undoes_last_growth"] == "True"}
    assert f"move_threshold 1e-06: {len(flagged)} of {len(steps) - 1} decisions" in printed
    runs = list(csv.DictReader(open(runs_out)))
    assert [r["method"] for r in runs] == ["none", "oracle", "moves"]
    none, oracle, moves = runs
    assert none["moves"] == oracle["moves"] == "0" and int(moves["moves"]) == sum(r["event"] == "shrink" for r in rows)
    assert oracle["final_ranks"] == "0:1 2:4 4:1" and none["final_ranks"] == "0:2 2:2 4:2"
    final = dict(kv.split(":") for kv in moves["final_ranks"].split())
    assert sum(map(int, final.values())) == 6  # moves keep the budget: every rank change is a move
    assert all(0.0 < float(r["heldout_mse"]) < 1.0 for r in runs)
