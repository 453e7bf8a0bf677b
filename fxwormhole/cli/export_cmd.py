"""``fxwormhole export MODEL_OR_FILE --input SPEC --format pt2|onnx --out FILE``."""
from __future__ import annotations

import argparse
import time

from ._progress import Progress
from .rewrite_cmd import add_model_arguments, add_quiet_argument, add_wormhole_arguments, inference, load_for_command

__all__ = ["register", "run", "FORMATS"]

FORMATS = ("pt2", "onnx")  # fxwormhole.export.FORMATS, without importing torch to build the parser


def register(subparsers: argparse._SubParsersAction) -> None:
    from . import SUMMARIES

    p = subparsers.add_parser(
        "export", help=SUMMARIES["export"],
        description="Load or transform the model, export it with fxwormhole.export (torch.export; ONNX turns "
                    "each fixed point into a Loop), load the artifact back and compare it with eager mode on the "
                    "inputs. Exported artifacts are inference-only: train the transformed model instead.",
        epilog="examples:\n  fxwormhole export mlp_wormhole.pt --input 4x8 --format onnx --out mlp.onnx\n"
               "  fxwormhole export fxwormhole.zoo:CNN --input 2x1x12x12 --open --format pt2 --out cnn.pt2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=True)
    add_wormhole_arguments(p)
    p.add_argument("--format", "-f", choices=FORMATS, default="pt2", help="pt2 (torch.export) or onnx (default: pt2)")
    p.add_argument("--out", "-o", metavar="FILE", required=True, help="output file")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's")
    add_quiet_argument(p)
    p.set_defaults(func=run)


_ADVICE = ("if the cause is a write failure, check free disk space and write permission in {dir}; otherwise the "
           "new artifact failed when it was loaded back and run on --input: try --format pt2, or report it")


def run(args: argparse.Namespace) -> int:
    from .._atomic import atomic_write, check_target
    from ..errors import ExportError
    from ..export import load, prepare_export

    from ._quiet import quiet_onnxruntime

    what = f"the {args.format} export"
    out = check_target(args.out, what, ExportError)  # before the work, not after it
    progress = Progress(args.quiet)
    inputs, net = load_for_command(args, progress)
    if args.format == "onnx":
        quiet_onnxruntime()
    t0 = time.perf_counter()
    with progress.step("tracing with torch.export"):
        write = prepare_export(net, inputs, args.format, dynamic_batch=not args.static_batch)
    # The artifact replaces --out only once it has been written, loaded back and run.
    with atomic_write(out, what=what, error=ExportError, advice=_ADVICE) as tmp:
        with progress.step(f"writing the {args.format} file" + (" (converting to ONNX)" if args.format == "onnx" else "")):
            write(tmp)
        seconds = time.perf_counter() - t0
        with progress.step("loading the artifact back and comparing it with eager"):
            diff = _max_difference(net, load(tmp), inputs)
        size = tmp.stat().st_size
    print(f"exported:   {out} ({args.format}, {size / 1024:.0f} KiB, {seconds:.1f} s, "
          f"batch {'static' if args.static_batch else 'dynamic'}; inference-only)")
    print(f"check:      max|artifact - eager| = {diff:.2e} on the --input tensors")
    return 0


def _max_difference(net, runner, inputs: tuple) -> float:
    """Largest |artifact - eager| over all outputs, ``net`` in eval mode (its modes restored)."""
    import torch

    with inference(net):
        want, got = net(*inputs), runner(*inputs)
    flat_w = torch.utils._pytree.tree_leaves(want)
    flat_g = torch.utils._pytree.tree_leaves(got)
    return max((torch.as_tensor(a).sub(b).abs().max().item() for a, b in zip(flat_g, flat_w)), default=0.0)
