"""The ``lorambo`` command line (``DESCRIPTION`` is its help text)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lorambo.experiments.config import METHODS as EXPERIMENT_METHODS
from lorambo.version import __version__

DESCRIPTION = """\
Kernel-accelerated LoRA with per-layer rank allocation.

  lorambo demo         adaptive against uniform LoRA at equal parameter budgets on the real
                       all-MiniLM-L6-v2, on a task with planted low-rank deltas; --full sizes
                       it for a GPU, --growth runs the in-place rank-growth proof instead
  lorambo experiment   the same experiment with every knob on the command line; --task
                       sentiment runs the movie-review sentiment task (make data fetches its
                       data); --workers, --time-limit and --resume run it in several processes
                       and in pieces; --bundle reads the model and data from a bundle
                       (docs/gpu_experiment.md); --plots-from results.json draws the plots of a
                       finished run
  lorambo allocate     per-layer LoRA ranks for a local model: the ranks, a peft
                       adapter_config.json and a heat map
  lorambo info         versions and the backend in use

lorambo COMMAND --help lists a command's options."""


def _info(_args) -> int:
    import platform

    import torch

    from lorambo.ext import loader as ext_loader
    from lorambo.ops.backend import get_backend, resolve_backend

    print(f"lorambo {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"backend requested: {get_backend()}  cuda: {torch.cuda.is_available()}  "
          f"compiled extension: {'yes' if ext_loader.load() is not None else 'no'}")
    # "auto" names no backend: say what float32 layers run on each device present.
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device in devices:
        try:
            used = resolve_backend(device, torch.float32)
        except (RuntimeError, ImportError) as error:
            used = f"none: {error}"
        print(f"backend in use on {device} (float32): {used}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def _parse_number(text: str, convert, ok, expected: str):
    """``convert(text)`` when ``ok`` accepts it, else an argparse error naming what was expected."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _parse_number(text, int, lambda v: v >= 1, "a whole number >= 1")


def _seed(text: str) -> int:
    """A random seed torch.manual_seed takes: a whole number in [0, 2**63)."""
    return _parse_number(text, int, lambda v: 0 <= v < 2**63, "a whole number in [0, 2**63)")


def _count(text: str) -> int:
    """A whole number >= 0 (0 means 'all' for the example caps)."""
    return _parse_number(text, int, lambda v: v >= 0, "a whole number >= 0")


def _positive_float(text: str) -> float:
    return _parse_number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def _folder(text: str) -> str:
    """An output folder: an empty value (an unset shell variable, say) would write into the
    current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty folder name (use . for the current directory)")
    return text


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _run(cfg, args) -> int:
    from lorambo.experiments.runner import default_out_dir, run_experiment

    out = args.out if args.out is not None else default_out_dir(args.runs_root)
    args.resolved_out = out  # for the message of an interrupted run
    options = {name: getattr(args, name, None) for name in ("workers", "time_limit", "resume")}
    options = {name: value for name, value in options.items() if value is not None}
    if options.get("time_limit") is not None:
        options["command"] = args.argv
    run_experiment(cfg, out_dir=out, progress=False if args.no_progress else None, **options)
    return 0


def _needs(cfg, plots: bool) -> set[str]:
    """What a run of ``cfg`` needs installed: a bundle replaces the model package."""
    from lorambo.experiments import bundle

    return {"model", "experiment", *cfg.tasks} | ({"weights"} if bundle.active() is None else set()) | (
        {"plots"} if plots else set())


_GROWTH_OPTIONS = (("--steps", "steps"), ("--grow-at", "grow_at"), ("--batch-size", "batch_size"), ("--seed", "seed"))
GROWTH_DEFAULTS = {"steps": 24, "grow_at": 12, "batch_size": 16, "seed": 0}


def _demo(args) -> int:
    from lorambo.cli.deps import require

    growth_only = [flag for flag, field in _GROWTH_OPTIONS if getattr(args, field) is not None]
    if growth_only and not args.growth:  # they would be ignored by the 8-minute experiment
        args.parser.error(f"{', '.join(growth_only)} apply to --growth only; the experiment's sizes are "
                          "options of `lorambo experiment` (e.g. --steps)")
    if args.growth:
        experiment_only = [flag for flag, given in (("--full", args.full), ("--out", args.out is not None),
                                                    ("--runs-root", args.runs_root != "runs"))
                           if given]
        if experiment_only:  # the growth proof prints its result and writes no files
            args.parser.error(f"{', '.join(experiment_only)} do(es) not apply to --growth, which writes no files")
        require({"model", "weights"}, "demo --growth")
        from lorambo.cli.growth import check_growth_args, run_growth_demo

        sizes = {field: getattr(args, field) for _, field in _GROWTH_OPTIONS}
        sizes = {field: (GROWTH_DEFAULTS[field] if value is None else value) for field, value in sizes.items()}
        try:
            check_growth_args(sizes["steps"], sizes["grow_at"], sizes["batch_size"])
        except ValueError as err:
            args.parser.error(str(err))
        result = run_growth_demo(**sizes)
        return 0 if result["ok"] else 1
    from lorambo.experiments import config as presets

    cfg = presets.full() if args.full else presets.default()
    require(_needs(cfg, plots=True), "demo")
    return _run(cfg, args)


# (flag, config field, type, help)
_FIELDS = [
    ("--tasks", "tasks", _names, "comma-separated: planted,sentiment"),
    ("--methods", "methods", _names, "comma-separated: " + ",".join(EXPERIMENT_METHODS)),
    ("--budgets", "budgets", _floats, "budget levels = mean rank per adapted layer, e.g. 1,4 (P = level x sum(d+k))"),
    ("--seeds", "seeds", _positive_int, "seeds 0..N-1 per (method, budget)"),
    ("--steps", "steps", _positive_int, "optimizer steps per run"),
    ("--batch-size", "batch_size", _positive_int, "sequences per step"),
    ("--max-length", "max_length", _positive_int, "tokens per sequence"),
    ("--lrs", "lr_grid", _floats, "learning-rate grid, e.g. 1e-3,3e-3 (tried on seed 0; see --lr-search)"),
    ("--lr-search", "lr_search", str, "per_budget | first_budget | uniform (the grid on uniform LoRA, "
                                      "its choice for every method)"),
    ("--train-examples", "train_examples", _count, "training pool per task (0: all)"),
    ("--eval-examples", "eval_examples", _count, "validation examples (0: all); the test split is always whole"),
    ("--val-every", "val_every", _count, "validation loss every N steps, for the curves (0: none)"),
    ("--calib-batches", "calib_batches", _positive_int, "batches for sensitivities and EVA's SVD"),
    ("--hessian-probes", "hessian_probes", _positive_int, "Hutchinson probes for the Hessian trace"),
    ("--probe-steps", "probe_steps", _positive_int, "probe sensitivity: steps of its all-layer LoRA"),
    ("--growth-factor", "growth_factor", _positive_float, "pool size / AdaLoRA init_r / EVA rho factor"),
    ("--alora-rounds", "alora_rounds", _positive_int, "ALoRA prune-and-reallocate rounds"),
    ("--planted-scale", "planted_scale", _positive_float, "relative RMS change of each planted delta"),
    ("--planted-text", "planted_text", str, "the planted task's text: docstrings | snippets (NYT/Amazon, "
                                            "longer; the full preset's)"),
    ("--threads", "threads", _positive_int, "torch CPU threads"),
    ("--device", "device", str, "auto | cpu | cuda"),
]


def _as_option(message: str) -> str:
    """A configuration complaint that starts with a field's name (``lr_search must be ...``),
    starting with the option that sets it instead (``--lr-search must be ...``)."""
    for flag, field, _, _ in _FIELDS:
        if re.match(rf"{field}\b", message):
            return flag + message[len(field):]
    return message


def _experiment(args) -> int:
    from lorambo.cli.deps import require
    from lorambo.experiments import config as presets

    if args.plots_from is not None:
        require({"plots"}, "experiment --plots-from")
        from lorambo.experiments.runner import plots_from

        written = plots_from(args.plots_from, args.out)
        where = f"in {args.out}" if args.out else f"beside {args.plots_from}"  # --out: into that folder
        print(f"{len(written)} plots written {where}")
        return 0
    if args.bundle is not None:
        from lorambo.experiments import bundle

        bundle.use(args.bundle)

    single = getattr(args, "tasks", None)
    task_preset = presets.TASK_PRESETS.get((single[0], args.preset)) if single and len(single) == 1 else None
    cfg = (task_preset or presets.PRESETS[args.preset])()
    changes = {field: getattr(args, field) for _, field, _, _ in _FIELDS if getattr(args, field) is not None}
    try:  # the configuration checks every value against the others: its complaints are usage errors
        cfg = cfg.replace(**changes) if changes else cfg
    except ValueError as err:
        args.parser.error(_as_option(str(err)))
    require(_needs(cfg, plots=False), "experiment")
    return _run(cfg, args)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=_folder, default=None, help="output folder (default: runs/<timestamp>)")
    p.add_argument("--runs-root", type=_folder, default="runs",
                   help="parent of the timestamped output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress: by default a bar when stderr is a terminal, else a line per finished unit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorambo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorambo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="adaptive vs uniform LoRA at equal budget on the real all-MiniLM-L6-v2")
    demo.add_argument("--full", action="store_true", help="the GPU-sized experiment")
    demo.add_argument("--growth", action="store_true", help="run the in-place rank-growth proof instead")
    _output_args(demo)
    g = demo.add_argument_group("--growth options")
    g.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps in total (default: 24)")
    g.add_argument("--grow-at", type=_positive_int, default=None, help="step at which ranks grow (default: 12)")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="paragraphs per step (at least 2: the loss contrasts them; default: 16)")
    g.add_argument("--seed", type=_seed, default=None, help="default: 0")
    demo.set_defaults(func=_demo, parser=demo)

    exp = sub.add_parser("experiment", help="the experiment with every option")
    exp.add_argument("--preset", choices=("default", "tiny", "full"), default="default",
                     help="starting sizes (default: what `lorambo demo` runs; with --task sentiment alone, "
                          "its own CPU preset, and with --preset full its GPU one)")
    for flag, field, kind, text in _FIELDS:
        flags = (flag, "--task") if flag == "--tasks" else (flag,)
        exp.add_argument(*flags, dest=field, type=kind, default=None, help=text)
    _output_args(exp)
    run = exp.add_argument_group("running in pieces (docs/gpu_experiment.md)")
    run.add_argument("--workers", type=_positive_int, default=None,
                     help="processes running whole runs at once, sharing the GPU (or the CPU, --threads each)")
    run.add_argument("--time-limit", dest="time_limit", type=_positive_float, default=None, metavar="SECONDS",
                     help="start no run after this many seconds; what is done stays in <out>/runs.jsonl")
    run.add_argument("--resume", default=None, metavar="RUNS_JSONL",
                     help="a journal (runs.jsonl) whose recorded runs are kept, not run again")
    run.add_argument("--bundle", default=None, metavar="DIR",
                     help="read MiniLM and the data from this bundle (make gpu-bundle); or set LORAMBO_BUNDLE")
    run.add_argument("--plots-from", dest="plots_from", default=None, metavar="RESULTS_JSON",
                     help="only draw the plots of a finished experiment (into --out, default: beside it)")
    exp.set_defaults(func=_experiment, parser=exp)

    from lorambo.cli import allocate
    allocate.add_parser(sub)

    info = sub.add_parser("info", help="versions and the backend in use")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError, PermissionError) as err:  # a clear line, no traceback
        print(f"lorambo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a run diverged at the rates asked for: its message says what to change
        print(f"lorambo {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: say what was kept instead of a traceback
        journal = Path(getattr(args, "resolved_out", None) or ".") / "runs.jsonl"
        kept = (f"; the finished units are in {journal}: continue with the same options and --resume {journal}"
                if getattr(args, "resolved_out", None) is not None and journal.is_file() else "")
        print(f"lorambo {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
