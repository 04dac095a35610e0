"""The ``lorambo`` command line: ``lorambo demo``, ``lorambo info``."""

from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    import platform

    import torch

    import lorambo
    from lorambo import _extension
    from lorambo.backend import get_backend

    print(f"lorambo {lorambo.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"backend requested: {get_backend()}  cuda: {torch.cuda.is_available()}  "
          f"compiled extension: {'yes' if _extension.load() is not None else 'no'}")
    return 0


def _demo(args) -> int:
    from lorambo.cli.demo import run_demo

    result = run_demo(steps=args.steps, grow_at=args.grow_at, batch_size=args.batch_size, seed=args.seed)
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorambo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train LoRA on the real all-MiniLM-L6-v2, grow ranks mid-training")
    demo.add_argument("--steps", type=int, default=24, help="optimizer steps in total")
    demo.add_argument("--grow-at", type=int, default=12, help="step at which ranks grow")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="versions and the backend in use")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
