"""The ``lorambo`` command: the growth proof on the real MiniLM (small size), demo/experiment wiring, info."""

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lorambo.cli import main
from lorambo.cli import build_parser
from lorambo.cli.growth import run_growth_demo
from pyproject_data import pyproject


@pytest.mark.slow
def test_growth_demo_grows_ranks_without_changing_function_or_storage(capsys):
    result = run_growth_demo(steps=3, grow_at=1, batch_size=8)
    growth = result["growth"]
    assert growth["max_abs_diff"] <= 1e-6
    assert growth["same_objects"] and growth["same_storage"] and growth["inactive_zero"]
    assert growth["mib_before"] == growth["mib_after"]
    assert growth["ranks_after"] > growth["ranks_before"]
    assert len(result["history"]) == 3 and all(loss > 0 for _, loss in result["history"])
    out = capsys.readouterr().out
    assert "function preserved" in out and "Held-out contrastive loss" in out


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_growth_demo_refuses_a_seed_torch_cannot_take(capsys, seed):
    """--seed 2**64 failed in torch.manual_seed with "Overflow when unpacking long long" after the
    model had loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--growth", "--seed", seed])
    assert exit_info.value.code == 2
    assert f"argument --seed: expected a whole number in [0, 2**63), got {seed}" in capsys.readouterr().err


def test_growth_demo_rejects_bad_schedule(capsys):
    with pytest.raises(ValueError, match="--grow-at 5"):
        run_growth_demo(steps=4, grow_at=5)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--growth", "--steps", "4", "--grow-at", "5"])
    assert exit_info.value.code == 2
    assert "--grow-at 5" in capsys.readouterr().err


@pytest.mark.parametrize("ok, status", [(True, 0), (False, 1)])
def test_growth_demo_exit_status_is_its_verdict(monkeypatch, ok, status):
    """1 when a check of the growth proof failed: distinct from 2, a usage error."""
    monkeypatch.setattr("lorambo.cli.deps.require", lambda *a, **k: None)
    monkeypatch.setattr("lorambo.cli.growth.run_growth_demo", lambda **sizes: {"ok": ok})
    assert main(["demo", "--growth"]) == status


def test_positive_number_options_take_fractions_below_one():
    """The planted deltas' default scale is 0.1; time limits and growth factors may be fractions too."""
    args = build_parser().parse_args(["experiment", "--planted-scale", "0.05", "--time-limit", "0.5",
                                      "--growth-factor", "1"])
    assert (args.planted_scale, args.time_limit, args.growth_factor) == (0.05, 0.5, 1.0)


def test_demo_and_experiment_options_reach_the_config(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cfg, out_dir=None, progress=None):
        seen["cfg"], seen["out"], seen["progress"] = cfg, out_dir, progress
        return {}

    monkeypatch.setattr("lorambo.experiments.runner.run_experiment", fake_run)
    # The runner is faked, so no optional package is used: without this `demo` stops at its
    # matplotlib check where matplotlib is absent (the GPU image); test_optional_deps covers it.
    monkeypatch.setattr("lorambo.cli.deps.missing_packages", lambda needs: [])
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen["cfg"].seeds == 3 and seen["cfg"].budgets == (0.5,) and len(seen["cfg"].methods) == 7
    assert seen["out"] == str(tmp_path) and seen["progress"] is False
    assert main(["demo", "--full", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].steps >= 100 and seen["cfg"].seeds >= 3
    assert main(["experiment", "--preset", "tiny", "--methods", "uniform,eva", "--budgets", "0.5,3",
                 "--lrs", "1e-3,3e-3", "--seeds", "2", "--steps", "7", "--runs-root", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert cfg.methods == ("uniform", "eva") and cfg.budgets == (0.5, 3.0) and cfg.lr_grid == (1e-3, 3e-3)
    assert cfg.seeds == 2 and cfg.steps == 7 and str(seen["out"]).startswith(str(tmp_path))
    help_text = build_parser().format_help()
    for command in ("demo", "experiment", "allocate", "info"):
        assert f"lorambo {command} " in help_text
    assert "``" not in help_text  # plain text, not reStructuredText markup


def test_info_and_console_entry_point(capsys):
    import platform

    import torch

    from lorambo.version import __version__

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lorambo {__version__}  python {platform.python_version()}  torch {torch.__version__}\n")
    assert "backend requested" in out
    cmds = [[sys.executable, "-m", "lorambo.cli", "--help"], [sys.executable, "-m", "lorambo", "--help"]]
    # The console script exists only where lorambo is pip-installed (the dev venv, CI); a checkout
    # run through PYTHONPATH (the GPU machine) has none.
    if entry_points(group="console_scripts", name="lorambo"):
        cmds.append([str(Path(sys.executable).parent / "lorambo"), "-h"])
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0 and "demo" in proc.stdout, proc.stderr


def test_interrupted_experiment_says_where_its_journal_is(monkeypatch, tmp_path, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback from deep inside training; now one line that
    names the journal and how to continue, exit status 130 (as for SIGINT)."""
    def interrupted(cfg, out_dir=None, progress=None, **options):
        from pathlib import Path

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "runs.jsonl").write_text('{"kind": "header"}\n')
        raise KeyboardInterrupt

    def run(argv):  # an escaping KeyboardInterrupt would stop the whole pytest session
        try:
            return main(argv)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped lorambo's main()")

    monkeypatch.setattr("lorambo.experiments.runner.run_experiment", interrupted)
    monkeypatch.setattr("lorambo.cli.deps.require", lambda *a, **k: None)
    out = tmp_path / "run"
    assert run(["experiment", "--preset", "tiny", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    journal = out / "runs.jsonl"
    assert err.strip() == (f"lorambo experiment: interrupted; the finished units are in {journal}: continue "
                           f"with the same options and --resume {journal}")
    monkeypatch.setattr("lorambo.cli.growth.run_growth_demo", lambda **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(["demo", "--growth"]) == 130
    assert capsys.readouterr().err.strip() == "lorambo demo: interrupted"


def test_info_says_which_backend_runs(capsys, monkeypatch):
    """``lorambo info`` printed only the requested name ("auto"), not the backend that runs."""
    from lorambo.ext import loader as ext_loader
    from lorambo.ops import backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        backend.set_backend("auto")
        assert main(["info"]) == 0
        expected = "ext" if ext_loader.load() is not None else "torch"
        assert f"backend in use on cpu (float32): {expected}\n" in capsys.readouterr().out
        backend.set_backend("triton")  # the kernels need CUDA (or TRITON_INTERPRET=1)
        assert main(["info"]) == 0
        assert "backend in use on cpu (float32): none: lorambo backend 'triton'" in capsys.readouterr().out
    finally:
        backend.set_backend(None)


def test_every_option_with_a_default_says_it_in_its_help():
    """``lorambo allocate --help`` listed --method, --batch-size, ... without their defaults."""
    import argparse

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, parser in subparsers.choices.items():
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                continue
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            if f"default: {action.default}" not in shown and "(default:" not in shown:
                missing.append(f"lorambo {command} {action.option_strings[0]} (default {action.default!r})")
    assert not missing, missing


def test_version_flag_prints_the_project_version(capsys):
    """``lorambo --version`` was refused with "the following arguments are required: command"."""
    version = pyproject()["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lorambo {version}\n"
