"""Compiled vs eager TRAINING step of a wormhole MLP on CPU, side by side in one run.

    python bench/bench_compile.py [--width 512] [--depth 6] [--batch 256] [--steps 20] [--threads N]

The wormhole is open (gate sigmoid(0) = 0.5, random projection), so every step solves a real fixed
point forward and an adjoint fixed point backward. A step = forward + backward (random upstream
gradient) + SGD update. The two variants share the parameters and take turns step by step,
so machine-load drift hits both alike. Reports the median step time of eager and
fxwormhole.compile (Inductor, inplace_buffers=False), the median per-round speed-up (goal
>= 1.5x), the first-call (compile) time and the mean
fixed-point iterations of each variant (Anderson in both).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxwormhole
from fxwormhole import WormholeConfig, zoo


def step(fn, net, opt, x, g):
    opt.zero_grad(set_to_none=True)
    fn(x).backward(g)
    opt.step()


def timed(fn, net, opt, x, g):
    t0 = time.perf_counter()
    step(fn, net, opt, x, g)
    return time.perf_counter() - t0, net.fixed_point_stats()["fixed_point_0"].iterations.float().mean().item()


def measure(variants, net, x, g, steps):
    """First call of each variant, one warm-up step each, then ``steps`` rounds in which the
    variants take turns (so machine-load drift hits them alike). Returns, per variant,
    (first-call s, step times, mean iterations), and the per-round time ratios to the first."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    first = {name: timed(fn, net, opt, x, g)[0] for name, fn in variants}
    for _, fn in variants:
        step(fn, net, opt, x, g)
    times = {name: [] for name, _ in variants}
    iters = {name: [] for name, _ in variants}
    for _ in range(steps):
        for name, fn in variants:
            t, it = timed(fn, net, opt, x, g)
            times[name].append(t)
            iters[name].append(it)
    return {name: (first[name], times[name], statistics.mean(iters[name])) for name, _ in variants}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.MLP(in_features=args.width, hidden=args.width, out_features=10, depth=args.depth)
    x = torch.randn(args.batch, args.width)
    config = WormholeConfig(wormholes=[(f"layers.{args.depth - 1}", "layers.1")], gate_init=0.0,
                            proj_init="normal", proj_std=1.0 / args.width**0.5, tol=1e-5, max_iter=50)
    net = fxwormhole.transform(model, (x,), config)
    g = torch.randn(args.batch, 10)

    compiled_fn = fxwormhole.compile(net)
    results = measure([("eager", net), ("fxwormhole.compile", compiled_fn)], net, x, g, args.steps)

    print(f"wormhole MLP: width {args.width}, {args.depth} layers, batch {args.batch}, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU; {args.steps} alternating rounds")
    print(f"{'variant':<24}{'step ms':>10}{'first call s':>14}{'fp iters':>10}")
    for name, (first, times, its) in results.items():
        print(f"{name:<24}{statistics.median(times) * 1e3:>10.1f}{first:>14.1f}{its:>10.1f}")
    eager, compiled = results["eager"][1], results["fxwormhole.compile"][1]
    speedup = statistics.median(e / c for e, c in zip(eager, compiled))
    print(f"speed-up compiled vs eager (median of per-round ratios): {speedup:.2f}x "
          f"(goal >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'}); compile time (first compiled call minus "
          f"an eager step) ~{results['fxwormhole.compile'][0] - statistics.median(eager):.1f} s")


if __name__ == "__main__":
    main()
