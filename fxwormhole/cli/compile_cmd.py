"""``fxwormhole compile MODEL_OR_FILE --input SPEC``: compile, time it, check it against eager."""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

from ._progress import Progress
from .rewrite_cmd import add_model_arguments, add_quiet_argument, add_wormhole_arguments, inference, load_for_command

__all__ = ["register", "run", "compare_training", "compare_inference", "MODES"]

#: torch.compile's modes
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _first(out: Any):
    return out[0] if isinstance(out, (tuple, list)) else out


def compare_training(net, compiled, inputs: Sequence) -> tuple[float, float, float]:
    """``(seconds of the first compiled forward+backward, max |dy|, max |dgrad|)`` under one random
    upstream gradient; the gradients are those of the parameters and floating inputs."""
    import torch

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    wrt = [t for t in leaves if t.requires_grad] + [p for p in net.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    y_c = _first(compiled(*leaves))
    upstream = torch.randn_like(y_c)
    g_c = torch.autograd.grad(y_c, wrt, upstream, allow_unused=True)
    seconds = time.perf_counter() - t0
    y_e = _first(net(*leaves))
    g_e = torch.autograd.grad(y_e, wrt, upstream, allow_unused=True)
    dy = (y_c - y_e).abs().max().item()
    dg = max(((a - b).abs().max().item() for a, b in zip(g_c, g_e) if a is not None and b is not None), default=0.0)
    return seconds, dy, dg


def compare_inference(net, compiled, inputs: Sequence) -> tuple[float, float]:
    """``(seconds of the first compiled forward, max |dy|)`` in eval mode under no_grad."""
    import torch

    with inference(net):
        t0 = time.perf_counter()
        y_c = compiled(*inputs)
        seconds = time.perf_counter() - t0
        y_e = net(*inputs)
    flat_c, flat_e = torch.utils._pytree.tree_leaves(y_c), torch.utils._pytree.tree_leaves(y_e)
    return seconds, max(((a - b).abs().max().item() for a, b in zip(flat_c, flat_e)), default=0.0)


def _mode_options(mode: str | None, backend: str) -> dict:
    """torch.compile keyword arguments for ``--mode``: Inductor's options of that mode (torch.compile takes a
    mode or options, not both, and fxwormhole.compile always passes Inductor options for its workaround)."""
    if mode is None:
        return {}
    if backend != "inductor":
        from ..errors import ConfigError

        raise ConfigError(f"--mode {mode}: compile modes are Inductor settings; use --backend inductor or drop --mode")
    from torch._inductor import list_mode_options

    return {"options": dict(list_mode_options(mode))}


def register(subparsers: argparse._SubParsersAction) -> None:
    from . import SUMMARIES

    p = subparsers.add_parser(
        "compile", help=SUMMARIES["compile"],
        description="Load or transform the model, compile it with fxwormhole.compile (Inductor with the "
                    "inplace_buffers workaround, dynamic batch), run one training step (or, with --eval, one "
                    "inference call) and report the compile time and the largest output / gradient difference "
                    "to eager mode. Exit code 1 when they differ by more than --atol.",
        epilog="examples:\n  fxwormhole compile mlp_wormhole.pt --input 16x8\n"
               "  fxwormhole compile fxwormhole.zoo:MLP --input 4x8 --open\n"
               "  fxwormhole compile fxwormhole.zoo:CNN --input 2x1x12x12 --open --sal --eval    "
               "(SAL probes compile for inference only)\n"
               "  fxwormhole compile mlp_wormhole.pt --input 16x8 --mode max-autotune --backend inductor",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=True)
    add_wormhole_arguments(p)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--mode", choices=MODES, help="torch.compile mode, with --backend inductor (default: torch's default)")
    p.add_argument("--eval", action="store_true",
                   help="compile the model in eval mode for inference and check the forward only (what a model "
                        "with SAL probes needs: its training step does not compile)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference to eager (default: 1e-4)")
    add_quiet_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compile import compile as fx_compile
    from ..errors import FxWormholeError
    from ..stats_report import report

    progress = Progress(args.quiet)
    inputs, net = load_for_command(args, progress)
    if args.eval:
        net.eval()
    kwargs = _mode_options(args.mode, args.backend)
    t0 = time.perf_counter()
    first = "first forward" if args.eval else "first forward+backward"
    try:
        with progress.step(f"preparing the compile ({args.backend})"):
            compiled = fx_compile(net, example_inputs=inputs, backend=args.backend, **kwargs)
        prepared = time.perf_counter() - t0
        with progress.step(f"compiling ({args.backend}): {first}"):
            if args.eval:
                (seconds, dy), dg = compare_inference(net, compiled, inputs), None
            else:
                seconds, dy, dg = compare_training(net, compiled, inputs)
    except FxWormholeError as exc:
        if args.eval or "eval()" not in str(exc):
            raise
        raise type(exc)(f"{exc} (on the command line: add --eval)") from exc
    rows = report(net).fixed_points
    ok = dy <= args.atol and (dg is None or dg <= args.atol)
    extra = "options inplace_buffers=False, " if args.backend == "inductor" else ""
    mode = f"mode {args.mode}, " if args.mode else ""
    print(f"backend:    {args.backend} ({extra}{mode}dynamic batch, {'eval' if args.eval else 'training'})")
    print(f"compile:    {prepared + seconds:.1f} s (prepare {prepared:.1f} s, {first} {seconds:.1f} s)")
    if rows:
        iters = sum(r.mean_iterations for r in rows) / len(rows)
        print(f"iterations: {iters:.1f} per sample (mean over fixed points, last call)")
    grads = "" if dg is None else f", max|grad - eager| = {dg:.2e}"
    print(f"check:      max|y - eager| = {dy:.2e}{grads} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
