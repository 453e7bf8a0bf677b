"""``fxwormhole demo [--out DIR]``: inspect a bundled zoo model and draw it (temporary demo)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import zoo
from .inspect_cmd import SPANS_DRAWN, format_report, inspect_model

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="inspect a bundled model and write DIR/graph.png",
                              description="Capture a small bundled model, print its layer table and "
                                          "candidate spans, and draw DIR/graph.png.")
    p.add_argument("--out", metavar="DIR", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--model", choices=sorted(n for n in zoo.ZOO if n != "DataDependentBreak"),
                   default="ResidualMLP", help="zoo model to show (default: ResidualMLP)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..drawing import draw_graph

    model = zoo.build(args.model).eval()
    gm, layers, spans = inspect_model(model, model.example_inputs(batch=4))
    title = f"fxwormhole.zoo:{args.model}"
    print(format_report(gm, layers, spans, title))
    out = Path(args.out)
    path = draw_graph(gm, out / "graph.png", spans=spans[:SPANS_DRAWN], layers=layers, title=title)
    print(f"\npicture:    {path}")
    return 0
