"""``fxwormhole compile MODEL_OR_FILE --input SPEC``: compile, time it, check it against eager."""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import torch
from torch import nn

from .rewrite_cmd import add_model_arguments, add_wormhole_arguments, load_for_command

__all__ = ["register", "run", "compare_training"]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def compare_training(net: nn.Module, compiled: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """``(seconds of the first compiled forward+backward, max |dy|, max |dgrad|)`` under one random
    upstream gradient; the gradients are those of the parameters and floating inputs."""
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile", help="torch.compile a transformed model and check it against eager",
        description="Load or transform the model, compile it with fxwormhole.compile (Inductor with the "
                    "inplace_buffers workaround, dynamic batch), run one training step and report the compile "
                    "time and the largest output / gradient difference to eager mode. Exit code 1 when they "
                    "differ by more than --atol.",
        epilog="examples:\n  fxwormhole compile mlp_wormhole.pt --input 16x8\n"
               "  fxwormhole compile fxwormhole.zoo:MLP --input 4x8 --gate-init 0 --proj-init normal",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=True)
    add_wormhole_arguments(p)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference to eager (default: 1e-4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compile import compile as fx_compile
    from .bench_cmd import mean_iterations
    from .progress import progress

    inputs, net = load_for_command(args)
    t0 = time.perf_counter()
    compiled = fx_compile(net, example_inputs=inputs, backend=args.backend)
    prepared = time.perf_counter() - t0
    for _ in progress(range(1), total=1, desc=f"compiling ({args.backend})"):
        seconds, dy, dg = compare_training(net, compiled, inputs)
    iters = mean_iterations(net)
    ok = dy <= args.atol and dg <= args.atol
    extra = "options inplace_buffers=False, " if args.backend == "inductor" else ""
    print(f"backend:    {args.backend} ({extra}dynamic batch)")
    print(f"compile:    {prepared + seconds:.1f} s (prepare {prepared:.1f} s, first forward+backward {seconds:.1f} s)")
    if iters is not None:
        print(f"iterations: {iters:.1f} per sample (summed over fixed points, last compiled call)")
    print(f"check:      max|y - eager| = {dy:.2e}, max|grad - eager| = {dg:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
