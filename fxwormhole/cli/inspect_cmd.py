"""``fxwormhole inspect MODEL --input SPEC ...``: capture a model and show its layers and spans."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ._progress import Progress
from .rewrite_cmd import add_model_arguments, add_quiet_argument
from .specs import load_model, parse_input_spec

if TYPE_CHECKING:  # torch is imported when the command runs, not to build its parser
    import torch.fx as fx
    from torch import nn

    from ..analysis import Layer

__all__ = ["register", "run", "inspect_model", "format_report", "after_highlights"]

SPANS_DRAWN = 3
SPANS_PRINTED = 10
FRONT_ENDS = ("auto", "symbolic_trace", "export")  # fxwormhole.capture.FRONT_ENDS


def register(subparsers: argparse._SubParsersAction) -> None:
    from . import SUMMARIES

    p = subparsers.add_parser(
        "inspect", help=SUMMARIES["inspect"],
        description="Capture MODEL with example inputs and print the front end used, the layer table "
                    "and candidate wormhole spans; optionally draw the graph. With --after, also transform it "
                    "and print and draw what the transform inserted.",
        epilog="examples:\n"
               "  fxwormhole inspect fxwormhole.zoo:CNN --input 2x1x12x12\n"
               "  fxwormhole inspect fxwormhole.zoo:TransformerStack --input 2x6x16 --picture stack.png\n"
               "  fxwormhole inspect fxwormhole.zoo:MLP --input 4x8 --picture mlp.png --after    "
               "(also mlp_after.png: the fixed point, its wormhole and projection)\n"
               "  fxwormhole inspect my_models.py:Net --kwargs '{\"width\": 7}' --input 4x3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=False)
    p.add_argument("--picture", metavar="FILE", help="draw the graph to FILE.png or FILE.svg (needs matplotlib)")
    p.add_argument("--front-end", choices=FRONT_ENDS, default="auto", help="capture front end (default: auto)")
    p.add_argument("--after", action="store_true",
                   help="also transform MODEL (default WormholeConfig), print what was inserted and, with --picture, "
                        "draw the rewritten graph to FILE_after.png: each fixed point as a frame around its body, "
                        "the wormhole from its source layer to its projection, probed layers marked")
    add_quiet_argument(p)
    p.set_defaults(func=run)


def after_highlights(gm: fx.GraphModule) -> dict[str, str]:
    """Node name -> highlight category of the rewritten graph (fixed points, wormholes, probes)."""
    marks = {}
    for n in gm.graph.nodes:
        role = n.meta.get("fxwormhole", {}).get("role", "")
        target = str(n.target) if n.op == "call_module" else ""
        if role.startswith("fixed_point") or target.startswith("fixed_point"):
            marks[n.name] = "fixed_point"
        elif "wormhole" in target or "wormhole" in role:
            marks[n.name] = "wormhole"
        elif "probe" in target or "probe" in role:
            marks[n.name] = "probe"
    return marks


def inspect_model(model: nn.Module, inputs: Sequence, front_end: str = "auto"):
    """Capture and analyse: returns ``(gm, layers, spans)``."""
    from ..analysis import candidate_spans, layer_table
    from ..capture import capture

    gm = capture(model, tuple(inputs), front_end=front_end)
    layers = layer_table(gm)
    return gm, layers, candidate_spans(gm, layers)


def format_report(gm: fx.GraphModule, layers: Sequence[Layer], spans: Sequence[tuple[str, str]], title: str) -> str:
    """The text ``inspect`` prints."""
    from ..analysis import format_layer_table, main_path

    meta = gm.meta["fxwormhole"]
    shapes = ", ".join("x".join(map(str, s)) for s in meta["input_shapes"])
    lines = [f"model:      {title}", f"front end:  {meta['front_end']}"]
    for name, why in meta["attempts"].items():
        lines.append(f"            ({name} failed: {why})")
    n_main = sum(l.on_main_path for l in layers)
    lines += [f"inputs:     {shapes}",
              f"graph:      {len(gm.graph.nodes)} nodes, {len(layers)} layer calls, "
              f"{n_main} on the main path ({len(main_path(gm))} main-path nodes)", "",
              format_layer_table(layers), ""]
    if spans:
        lines.append("candidate spans (src -> dst: the deep unit feeds back into the earlier one), best first:")
        lines += [f"  {i:2d}. {s} -> {d}" for i, (s, d) in enumerate(spans[:SPANS_PRINTED], 1)]
        if len(spans) > SPANS_PRINTED:
            lines.append(f"      ... and {len(spans) - SPANS_PRINTED} more (fxwormhole.analysis.candidate_spans)")
    else:
        lines.append("candidate spans: none (fewer than two hidden units on the main path)")
    return "\n".join(lines)


def _draw(path: Path, draw, *args, **options) -> Path:
    """``draw(*args, tmp, **options)`` into a temporary file that replaces ``path`` only once the picture
    is complete."""
    from .._atomic import atomic_write

    with atomic_write(path, what="the picture") as tmp:
        draw(*args, tmp, **options)
    return path


def run(args: argparse.Namespace) -> int:
    from .._atomic import check_target
    from ..describe import probe_line, wormhole_lines

    pictures: list[Path] = []
    if args.picture:  # check where the pictures go before the work, not after it
        from ..drawing import check_picture_suffix

        pic = Path(args.picture)
        check_picture_suffix(pic)  # here, with the user's name (the drawing gets a temporary file's)
        pictures = [check_target(pic, "the picture")]
        if args.after:
            pictures.append(check_target(pic.with_name(f"{pic.stem}_after{pic.suffix}"), "the picture"))
    progress = Progress(args.quiet)
    with progress.step(f"building {args.model}"):
        model = load_model(args.model, args.kwargs)
        inputs = [parse_input_spec(s) for s in args.inputs]
    with progress.step("capturing the model"):
        gm, layers, spans = inspect_model(model, inputs, args.front_end)
    print(format_report(gm, layers, spans, args.model))
    net = None
    if args.after:  # before any picture is written: a model that fails here leaves no file behind
        from ..api import transform

        with progress.step("transforming the model"):
            net = transform(model, tuple(inputs))
    if pictures:
        from ..drawing import draw_graph

        with progress.step("drawing the graph"):
            path = _draw(pictures[0], draw_graph, gm, spans=spans[:SPANS_DRAWN], layers=layers, title=args.model)
        print(f"\npicture:    {path}  (first {min(len(spans), SPANS_DRAWN)} spans drawn)")
    if net is not None:
        print(f"\nafter transform:\n{net.summary()}")
        print("\n".join(wormhole_lines(net)))
        print(probe_line(net))
        if pictures:
            from ..drawing import draw_transformed

            with progress.step("drawing the rewritten graph"):
                after = _draw(pictures[1], draw_transformed, net, title=f"{args.model} (after transform)")
            print(f"picture:    {after}  (rewritten graph: fixed points framed, wormholes and projections marked)")
    return 0
