"""``fxwormhole bench MODEL --input SPEC``: original vs transformed (eager) vs transformed (compiled).

Each row times a training step (forward, backward under a fixed random upstream gradient) and
reports fixed-point iterations and memory: on CUDA the peak allocated memory, on CPU the bytes
autograd saves for the backward (activation memory; the CPU allocator keeps no peak statistic).
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._text import text_table
from ..transformed import per_sample_iterations
from .progress import progress
from .rewrite_cmd import add_model_arguments, add_wormhole_arguments, parse_inputs, wormhole_config
from .specs import load_model

__all__ = ["register", "run", "time_steps", "memory_of", "mean_iterations", "format_table"]


def _step(fn: Callable, inputs: Sequence[torch.Tensor], upstream: list) -> Any:
    out = fn(*inputs)
    y = out[0] if isinstance(out, (tuple, list)) else out
    if not upstream:
        upstream.append(torch.randn_like(y))
    y.backward(upstream[0])
    return y


def time_steps(fn: Callable, inputs: Sequence[torch.Tensor], steps: int, warmup: int, desc: str) -> tuple[float, float]:
    """``(first call seconds, median step seconds)`` of forward+backward."""
    upstream: list = []
    t0 = time.perf_counter()
    _step(fn, inputs, upstream)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        _step(fn, inputs, upstream)
    times = []
    for _ in progress(range(steps), total=steps, desc=desc):
        t0 = time.perf_counter()
        _step(fn, inputs, upstream)
        times.append(time.perf_counter() - t0)
    times.sort()
    return first, times[len(times) // 2]


def memory_of(fn: Callable, inputs: Sequence[torch.Tensor]) -> tuple[float, str]:
    """``(MiB, what)``: CUDA peak allocated, else bytes saved for backward."""
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _step(fn, inputs, [])
        return torch.cuda.max_memory_allocated(device) / 2**20, "peak MiB"
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, sparse)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(fn, inputs, [])
    return sum(seen.values()) / 2**20, "saved MiB"


def mean_iterations(model: nn.Module) -> float | None:
    """Forward fixed-point iterations of the last call, per sample (summed over the model's fixed
    points, averaged over time steps and samples); None without a fixed point."""
    fwd, _ = per_sample_iterations(model)
    return None if fwd is None else float(fwd.mean())


def format_table(rows: Sequence[dict]) -> str:
    head = ("variant", "step ms", "first call s", "fp iters", rows[0]["mem_label"] if rows else "mem")
    body = [(r["name"], f"{r['step'] * 1e3:.2f}", f"{r['first']:.2f}",
             "-" if r["iters"] is None else f"{r['iters']:.1f}", f"{r['mem']:.2f}") for r in rows]
    return text_table(head, body)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time original vs transformed (eager) vs transformed (compiled) training steps",
        description="Build MODEL, transform it with the wormhole options, and print a table of the median "
                    "training-step time (forward+backward), fixed-point iterations and memory for the original "
                    "model, the transformed model in eager mode and the compiled transformed model.",
        epilog="example:\n  fxwormhole bench fxwormhole.zoo:MLP --kwargs '{\"hidden\": 64}' --input 32x8 "
               "--gate-init 0 --proj-init normal --steps 20",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=False)
    add_wormhole_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call (default: 2)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import transform
    from ..compile import compile as fx_compile
    from ..errors import ConfigError

    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    inputs = parse_inputs(args.inputs)
    original = load_model(args.model, args.kwargs)
    config, sal = wormhole_config(args)
    net = transform(original, inputs, config, sal=sal)
    variants: list[tuple[str, Callable, nn.Module | None]] = [("original (eager)", original, None),
                                                               ("transformed (eager)", net, net)]
    if not args.no_compile:
        variants.append((f"transformed (compiled, {args.backend})", fx_compile(net, backend=args.backend), net))
    rows = []
    for name, fn, stats_of in variants:
        first, step = time_steps(fn, inputs, args.steps, args.warmup, name)
        iters = mean_iterations(stats_of) if stats_of is not None else None
        mem, label = memory_of(fn, inputs)
        rows.append({"name": name, "step": step, "first": first, "iters": iters, "mem": mem, "mem_label": label})
    print(f"model: {args.model}   inputs: {', '.join(args.inputs)}   steps: {args.steps}   threads: {torch.get_num_threads()}")
    print(format_table(rows))
    if len(rows) == 3:
        print(f"compiled vs eager transformed: {rows[1]['step'] / rows[2]['step']:.2f}x "
              f"(first compiled call, incl. compile: {rows[2]['first']:.1f} s)")
    return 0
