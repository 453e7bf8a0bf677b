"""``fxwormhole bench MODEL --input SPEC``: original vs transformed (eager) vs transformed (compiled).

Each row times a training step (forward, backward under a fixed random upstream gradient) and
reports fixed-point iterations and memory: on CUDA the peak allocated memory, on CPU the bytes
autograd saves for the backward (activation memory; the CPU allocator keeps no peak statistic).
The variants alternate step by step and the table gives wall and CPU time: timed one after the
other on a shared machine, a change of load between variants decided the ratio (a tiny MLP once
read 772 ms compiled vs 88 ms eager per step at load 15 with 2 threads; 3.7 ms vs 3.3 ms CPU when
measured like this).
"""
from __future__ import annotations

import argparse
import statistics
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


def time_steps(variants: Sequence[tuple[str, Callable]], inputs: Sequence[torch.Tensor], steps: int, warmup: int
               ) -> list[tuple[float, float, float]]:
    """Per variant ``(first call seconds, median step wall seconds, median step CPU seconds)`` of
    forward+backward.

    The variants alternate step by step (the order reversed every other step), so a change in the
    machine's load falls on all of them alike; the CPU time is the process's (every torch thread),
    which a busy shared machine inflates far less than the wall time. The first call (for a compiled
    variant: the compilation) is timed on its own and is not part of the median.
    """
    upstream: list = []
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)

    def now() -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    first = []
    for _, fn in variants:
        t0, _ = now()
        _step(fn, inputs, upstream)
        first.append(now()[0] - t0)
    for _ in range(warmup):
        for _, fn in variants:
            _step(fn, inputs, upstream)
    wall: list[list[float]] = [[] for _ in variants]
    cpu: list[list[float]] = [[] for _ in variants]
    order = list(range(len(variants)))
    for k in progress(range(steps), total=steps, desc="timing"):
        for i in (order if k % 2 == 0 else order[::-1]):
            t0, c0 = now()
            _step(variants[i][1], inputs, upstream)
            t1, c1 = now()
            wall[i].append(t1 - t0)
            cpu[i].append(c1 - c0)
    return [(f, statistics.median(w), statistics.median(c)) for f, w, c in zip(first, wall, cpu)]


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
    head = ("variant", "step ms", "cpu ms", "first call s", "fp iters", rows[0]["mem_label"] if rows else "mem")
    body = [(r["name"], f"{r['step'] * 1e3:.2f}", f"{r['cpu'] * 1e3:.2f}", f"{r['first']:.2f}",
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; on a shared machine OpenMP spin-waiting makes small ops "
                        "many times slower with more; 0 keeps torch's default)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import transform
    from ..compile import compile as fx_compile
    from ..errors import ConfigError

    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: need 0 (torch's default) or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = parse_inputs(args.inputs)
    original = load_model(args.model, args.kwargs)
    config, sal = wormhole_config(args)
    net = transform(original, inputs, config, sal=sal)
    variants: list[tuple[str, Callable, nn.Module | None]] = [("original (eager)", original, None),
                                                               ("transformed (eager)", net, net)]
    if not args.no_compile:
        variants.append((f"transformed (compiled, {args.backend})", fx_compile(net, backend=args.backend), net))
    timed = time_steps([(name, fn) for name, fn, _ in variants], inputs, args.steps, args.warmup)
    rows = []
    for (name, fn, stats_of), (first, step, cpu) in zip(variants, timed):
        _step(fn, inputs, [])  # this variant's stats, from a call of its own
        iters = mean_iterations(stats_of) if stats_of is not None else None
        mem, label = memory_of(fn, inputs)
        rows.append({"name": name, "step": step, "cpu": cpu, "first": first, "iters": iters, "mem": mem,
                     "mem_label": label})
    print(f"model: {args.model}   inputs: {', '.join(args.inputs)}   steps: {args.steps} (variants alternating)   "
          f"threads: {torch.get_num_threads()}")
    print(format_table(rows))
    if len(rows) == 3:
        print(f"compiled vs eager transformed: {rows[1]['step'] / rows[2]['step']:.2f}x wall, "
              f"{rows[1]['cpu'] / rows[2]['cpu']:.2f}x CPU (first compiled call, incl. compile: {rows[2]['first']:.1f} s)")
    return 0
