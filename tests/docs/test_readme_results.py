"""The README's result tables equal the committed results they come from: the demo and sentiment
tables as ``lorambo.experiments.demo_report`` renders ``docs/demo_results.json`` and
``docs/sentiment_results.json`` (whose summary statistics are recomputed here from the per-seed
values), the compiled CPU LoRA op's table and the multi-tensor claims from
``benchmarks/results/ext_cpu.csv``, and the pool AdamW claims from ``ext_adamw_cpu.csv``."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lorambo.experiments import demo_report

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _json(name):
    return json.loads((ROOT / "docs" / name).read_text(encoding="utf-8"))


def _missing_lines(text):
    return [line for line in text.splitlines() if line and line not in README.splitlines()]


def test_demo_table_is_the_committed_run():
    assert _missing_lines(demo_report.table(_json("demo_results.json"))) == []


def test_sentiment_table_is_the_committed_run():
    assert _missing_lines(demo_report.accuracy_table(_json("sentiment_results.json"))) == []


def test_demo_summary_statistics_follow_from_the_per_seed_losses():
    methods = _json("demo_results.json")["methods"]
    uniform, oracle = (np.array(methods[m]["test_loss"]) for m in ("uniform", "oracle"))
    for name, row in methods.items():
        if name in ("uniform", "oracle"):
            continue
        losses = np.array(row["test_loss"])
        gap = (uniform - losses) / (uniform - oracle)
        assert row["gap_closed"] == pytest.approx(gap.tolist(), abs=1e-12), name
        assert row["gap_closed_mean"] == pytest.approx(gap.mean(), abs=1e-12), name
        assert row["gap_closed_std"] == pytest.approx(gap.std(ddof=1), abs=1e-12), name
        assert row["wins_vs_uniform"] == int((losses < uniform).sum()), name


def test_sentiment_summary_statistics_follow_from_the_per_seed_accuracies():
    methods = _json("sentiment_results.json")["methods"]
    uniform = np.array(methods["uniform"]["accuracy"])
    for name, row in methods.items():
        acc = np.array(row["accuracy"])
        assert row["mean"] == pytest.approx(acc.mean(), abs=1e-12), name
        assert row["std"] == pytest.approx(acc.std(ddof=1), abs=1e-12), name
        if name != "uniform":
            assert row["wins_vs_uniform"] == int((acc > uniform).sum()), name


def _ext_rows():
    with open(ROOT / "benchmarks" / "results" / "ext_cpu.csv", newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["section"] == "lora"]


def _ratios(threads):
    """peft-style / ext median per (mode, M, K) at this thread count."""
    ms = {(r["mode"], int(r["M"]), int(r["K"]), int(r["rank"]), r["provider"]): float(r["ms_median"])
          for r in _ext_rows() if int(r["threads"]) == threads}
    return {key[:4]: ms[(*key[:4], "peft_style")] / ms[(*key[:4], "ext")] for key in ms if key[4] == "ext"}


def _three_figures(value):
    return round(value, 2 - math.floor(math.log10(abs(value))))


def test_ext_cpu_table_rows_are_the_one_thread_medians():
    section = README.split("### Compiled CPU LoRA op", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| fwd")]
    assert rows
    ms = {(r["mode"], int(r["M"]), int(r["K"]), int(r["rank"]), r["provider"]): float(r["ms_median"])
          for r in _ext_rows() if r["threads"] == "1"}
    providers = ("base", "peft_style", "reference", "ext")
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        mode, m, k, r = cells[0].replace("+", "_"), int(cells[1]), int(cells[2]), int(cells[3])
        for provider, cell in zip(providers, cells[4:8]):
            assert float(cell) == pytest.approx(_three_figures(ms[(mode, m, k, r, provider)]), abs=1e-9), line
        ratio = ms[(mode, m, k, r, "peft_style")] / ms[(mode, m, k, r, "ext")]
        assert cells[8] == f"{ratio:.2f}×", line


def test_ext_cpu_claims_follow_from_the_csv():
    one, two = _ratios(1), _ratios(2)
    ahead = [v for v in one.values() if v > 1]
    claim = (f"ahead of peft-style eager at {len(ahead)} of {len(one)} shapes at 1 thread, by "
             f"{round((min(ahead) - 1) * 100)}–{round((max(ahead) - 1) * 100)}%")
    assert claim in re.sub(r"\s+", " ", README)
    low, high = min(two.values()), max(two.values())
    claim = f"At 2 threads on the loaded machine the ext op is {low:.1f}–{high:.1f}× faster"
    assert claim in re.sub(r"\s+", " ", README)


def _csv(name):
    with open(ROOT / "benchmarks" / "results" / name, newline="") as handle:
        return list(csv.DictReader(handle))


def test_multi_tensor_claims_follow_from_the_one_thread_float32_run():
    rows = [r for r in _csv("ext_cpu.csv") if r["threads"] == "1" and r["dtype"] == "float32"]
    ms = {(r["case"], r["provider"]): float(r["ms_median"]) for r in rows}  # the latest run wins
    dot_loop, dot_foreach = (ms[("dot_224", p)] / ms[("dot_224", "ext")] for p in ("python_loop", "foreach"))
    probes = ms[("rademacher_224", "python_loop")] / ms[("rademacher_224", "ext")]
    text = re.sub(r"\s+", " ", README)
    assert (f"the multi-tensor dot products are {dot_loop:.1f}× faster than a Python loop and "
            f"{dot_foreach:.1f}× faster than `torch._foreach_*`") in text
    assert f"Probe fill is {probes:.0f}× faster than a seeded generator per layer" in text


def test_adamw_claims_are_the_range_over_the_committed_runs():
    rows = _csv("ext_adamw_cpu.csv")
    assert len({r["run"] for r in rows}) == 2 and {r["dtype"] for r in rows} == {"float32"}

    def span(provider):
        values = sorted(float(r["ms_median"]) for r in rows if r["provider"] == provider)
        return f"{values[0]:.1f}-{values[-1]:.1f} ms"

    claim = (f"the float32 medians of two runs were {span('ext')} against {span('torch_whole_pool')} for "
             f"torch's whole-pool AdamW and {span('foreach')} for the `torch._foreach` path")
    assert claim in re.sub(r"\s+", " ", README)


def _minilm_cost(name):
    """d + k of an adapted all-MiniLM-L6-v2 layer (hidden size 384, feed-forward 1536)."""
    feed_forward = name.endswith("intermediate.dense") or (name.endswith("output.dense") and "attention" not in name)
    return 384 + (1536 if feed_forward else 384)


def test_budget_on_planted_is_the_share_of_what_each_method_spends():
    # the tables' "budget on planted" is on_planted / spent, not / P: uniform and probe spend
    # 20,352 of P = 20,736 (probe's share is 1.00, where "of P" would make it 0.98)
    result = _json("demo_results.json")
    planted, budget = result["planted_ranks"], result["budget"]
    checked = {}
    for name, row in result["methods"].items():
        ranks = row["mean_ranks"]
        if not all(float(r).is_integer() for r in ranks.values()):  # ranks that differ between seeds
            continue
        spent = sum(int(r) * _minilm_cost(n) for n, r in ranks.items())
        on_planted = sum(int(ranks[n]) * _minilm_cost(n) for n in planted)
        assert spent == row["spent"] <= budget, name
        assert row["planted_share"] == pytest.approx(on_planted / spent, abs=1e-12), name
        checked[name] = spent
    assert checked["probe"] < budget and checked["uniform"] < budget
    text = re.sub(r"\s+", " ", README)
    assert f"It spends {checked['probe']:,} of P = {budget:,}, all of it on the four planted layers" in text
    footer = demo_report.table(result).splitlines()[-1]
    assert "budget on planted: share of the spent budget Σ r (d + k) that goes to the planted layers" in footer


def test_sensitivity_claims_are_the_latest_run():
    rows = _csv("sensitivity.csv")
    latest = max(r["date"] for r in rows)
    got = {(r["provider"], r["metric"]): r for r in rows if r["date"] == latest}

    def ms(provider, metric):
        return float(got[(provider, metric)]["value"])

    plain = ms("train_step", "plain")
    exact, sketch = (100 * (ms("train_step", m) / plain - 1) for m in ("with_fisher_proxy", "with_fisher_sketch4"))
    batched = got[("lorambo", "time_to_target")]
    text = re.sub(r"\s+", " ", README)
    assert (f"{batched['probes']} Hutchinson probes took {ms('lorambo', 'time_to_target') / 1e3:.1f} s batched "
            f"(8 per pass) against {ms('sequential_loop', 'time_to_target') / 1e3:.1f} s for the sequential loop") in text
    assert f"the worst layer's relative standard error was {float(batched['max_rel_stderr']):.2f}" in text
    assert (f"One HVP took {ms('autograd', 'one_hvp'):.0f} ms against {ms('autograd', 'one_gradient'):.0f} ms "
            "for one gradient") in text
    # 25.6% exact: the README said 25% for both
    assert (f"The Fisher proxy added {exact:.0f}% to a {plain:.0f} ms training step, {sketch:.0f}% sketched "
            "with k=4") in text


def test_setup_and_run_times_are_the_committed_runs():
    """The demo's setup and timing, in the README's summary and docs/demo.md (which holds the full
    setup), are the committed runs': wall and CPU time, the machine's load, the split sizes."""
    page = re.sub(r"\s+", " ", (ROOT / "docs" / "demo.md").read_text(encoding="utf-8"))
    text = re.sub(r"\s+", " ", README)
    demo, sentiment = _json("demo_results.json"), _json("sentiment_results.json")
    assert f"(`docs/demo_results.json`, {demo['wall_s']:.0f} s on the 2-core CPU machine" in text
    assert f"(`docs/sentiment_results.json`, {sentiment['wall_s']:.0f} s on the 2-core CPU machine)" in text
    assert f"The committed run took **{demo['wall_s']:.0f} s** ({demo['wall_s'] / 60:.1f} minutes)" in page
    assert (f"The committed run took **{sentiment['wall_s']:.0f} s** of wall time" in page
            and f"{sentiment['cpu_s']:.0f} s of CPU time over its two workers" in page)
    for run in (demo, sentiment):
        start, end = re.search(r"load average ([\d.]+) at start, ([\d.]+) at end", run["machine"]).groups()
        assert re.search(rf"1-minute load {re.escape(start)} at the start[^.]*?{re.escape(end)} at the end", page)
    sizes = demo["split_sizes"]
    assert f"({sizes['train']} training, {sizes['val']} validation and {sizes['test']} test windows;" in page
    sizes, test = sentiment["split_sizes"], sentiment["class_counts"]["test"]
    assert (f"the {sizes['test']:,} test sentences scored whole: {test['positive']} positive, "
            f"{test['negative']} negative") in page
    assert f"{sizes['train']:,} training and {sizes['val']} validation sentences" in page
    assert f"P = {sentiment['budget']:,}" in page and f"P = {sentiment['budget']:,}" in text
