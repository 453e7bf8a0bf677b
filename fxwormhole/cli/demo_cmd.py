"""``fxwormhole demo [--out DIR] [--quick]``: the end-to-end demo (see :mod:`fxwormhole.cli.demo`)."""
from __future__ import annotations

import argparse

from .specs import output_dir

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="train an LSTM with temporal wormholes + SAL on digit rows; write plots and a report",
        description="Train a small LSTM classifier on scikit-learn's 8x8 digits (one row per step), as it is "
                    "and rewritten with temporal wormholes and SAL; print a results table and write plots "
                    "and DIR/report.md.")
    p.add_argument("--out", metavar="DIR", default="demo_out", type=output_dir, help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run (tiny model, few steps)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 300; --quick 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo import DemoConfig, run_demo
    from ..errors import ConfigError

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: expected an int >= 1")
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    cfg = replace(cfg, seed=args.seed)
    run_demo(args.out, cfg, show_progress=not args.no_progress)
    return 0
