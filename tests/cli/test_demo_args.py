"""Bad `lorambo demo` / `lorambo experiment` arguments are usage errors (exit 2, the option named),
caught before any model is loaded."""

import pytest

from lorambo.cli import main
from lorambo.cli.growth import check_growth_args


@pytest.mark.parametrize("argv, message", [
    (["demo", "--growth", "--batch-size", "0"], "--batch-size: expected a whole number >= 1, got 0"),
    (["demo", "--growth", "--batch-size", "1000"], "--batch-size 1000 must be between 2 and"),
    (["demo", "--growth", "--batch-size", "1"], "--batch-size 1 must be between 2 and"),
    (["demo", "--growth", "--steps", "-3"], "--steps: expected a whole number >= 1, got -3"),
    (["demo", "--growth", "--steps", "4", "--grow-at", "5"], "--grow-at 5 must be inside (0, --steps 4)"),
    (["demo", "--growth", "--batch-size", "x"], "--batch-size: expected a whole number >= 1, got 'x'"),
    # growth-only sizes without --growth were ignored: `lorambo demo --steps 5` ran the 8-minute demo
    (["demo", "--steps", "5"], "--steps apply to --growth only"),
    (["demo", "--batch-size", "4", "--seed", "1"], "--batch-size, --seed apply to --growth only"),
    # --growth writes no files and has no GPU size: --out and --full were silently ignored
    (["demo", "--growth", "--out", "somewhere"], "--out do(es) not apply to --growth"),
    (["demo", "--growth", "--full"], "--full do(es) not apply to --growth"),
    # an empty --out (an unset shell variable) wrote the results into the current directory
    (["experiment", "--out", ""], "--out: empty folder name (use . for the current directory)"),
    (["experiment", "--runs-root", " "], "--runs-root: empty folder name"),
    (["demo", "--out", ""], "--out: empty folder name"),
    (["allocate", "--model", "m", "--budget", "1000", "--out", ""], "--out: empty folder name"),
    (["experiment", "--seeds", "0"], "--seeds: expected a whole number >= 1, got 0"),
    (["experiment", "--budgets", "0,1"], "--budgets: expected comma-separated positive numbers"),
    (["experiment", "--lrs", "1e-3,nan"], "--lrs: expected comma-separated positive numbers"),
    (["experiment", "--lrs", "1e-3,0.001"], "--lrs repeats: [0.001, 0.001]"),
    (["experiment", "--eval-examples", "-1"], "--eval-examples: expected a whole number >= 0, got -1"),
    (["experiment", "--methods", "uniform,lora_magic"], "unknown method(s) ['lora_magic']"),
    (["experiment", "--lr-search", "best"], "--lr-search must be one of per_budget, first_budget, uniform"),
    (["experiment", "--steps", "10", "--probe-steps", "60"], "--probe-steps (60) must not exceed steps (10)"),
    # the configuration's complaints named its fields (lr_search, growth_factor), not the options
    (["experiment", "--steps", "4"], "--steps must be >= 5"),
    (["experiment", "--growth-factor", "0.5"], "--growth-factor must be a number >= 1, got 0.5"),
    (["experiment", "--budgets", "1,1"], "--budgets repeat: [1.0, 1.0]"),
    (["experiment", "--device", "tpu"], "--device must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
    (["experiment", "--task", "sentiment", "--methods", "oracle"], "['sentiment'] would run no method"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("ran despite bad arguments")

    monkeypatch.setattr("lorambo.cli.growth.run_growth_demo", must_not_run)
    monkeypatch.setattr("lorambo.experiments.runner.run_experiment", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"lorambo {argv[0]}: error:" in err and message in err, err
    assert "usage:" in err and "Traceback" not in err


def test_short_runs_without_the_probe_need_no_probe_steps(monkeypatch, tmp_path):
    # before: `--steps 20 --methods uniform,oracle` was refused for the probe's default 60 steps
    seen = []
    monkeypatch.setattr("lorambo.experiments.runner.run_experiment",
                        lambda cfg, out_dir=None, progress=None: seen.append(cfg) or {})
    assert main(["experiment", "--steps", "20", "--methods", "uniform,oracle", "--out", str(tmp_path)]) == 0
    assert seen[0].steps == 20 and seen[0].probe_steps > 20 and seen[0].methods == ("uniform", "oracle")


def test_growth_batch_size_bounds_follow_the_corpus():
    check_growth_args(4, 2, 2, paragraphs=66)                 # 66 - 64 held out = 2: just fits
    with pytest.raises(ValueError, match="--batch-size 3 must be between 2 and 2"):
        check_growth_args(4, 2, 3, paragraphs=66)


def test_task_sentiment_picks_its_presets(monkeypatch, tmp_path):
    from lorambo.experiments import config as presets

    seen = []
    monkeypatch.setattr("lorambo.experiments.runner.run_experiment",
                        lambda cfg, out_dir=None, progress=None: seen.append(cfg) or {})
    assert main(["experiment", "--task", "sentiment", "--out", str(tmp_path)]) == 0
    assert main(["experiment", "--task", "sentiment", "--preset", "full", "--out", str(tmp_path)]) == 0
    assert main(["experiment", "--task", "sentiment", "--steps", "30", "--out", str(tmp_path)]) == 0
    assert seen[0] == presets.sentiment() and seen[0].tasks == ("sentiment",) and seen[0].threads == 1
    assert seen[1] == presets.sentiment_full() and "oracle" not in seen[1].methods
    assert seen[2] == presets.sentiment().replace(steps=30)


def test_growth_demo_gets_its_documented_defaults_and_the_given_sizes(monkeypatch):
    import inspect

    from lorambo.cli import GROWTH_DEFAULTS
    from lorambo.cli.growth import run_growth_demo

    defaults = {n: p.default for n, p in inspect.signature(run_growth_demo).parameters.items()}
    assert {n: defaults[n] for n in GROWTH_DEFAULTS} == GROWTH_DEFAULTS
    seen = []
    monkeypatch.setattr("lorambo.cli.growth.run_growth_demo", lambda **kw: seen.append(kw) or {"ok": True})
    assert main(["demo", "--growth"]) == 0
    assert main(["demo", "--growth", "--steps", "6", "--grow-at", "3", "--no-progress"]) == 0
    assert seen == [GROWTH_DEFAULTS, {**GROWTH_DEFAULTS, "steps": 6, "grow_at": 3}]
