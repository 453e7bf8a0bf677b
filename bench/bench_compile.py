"""Compiled vs eager TRAINING step of a wormhole MLP on CPU, side by side in one run.

    python bench/bench_compile.py [--width 512] [--depth 6] [--batch 256] [--steps 20] [--threads N]

The wormhole is open (gate sigmoid(0) = 0.5, random projection), so every step solves a real fixed
point forward and an adjoint fixed point backward. A step = forward + backward (random upstream
gradient) + SGD update. Reports the median step time of eager and fxwormhole.compile (Inductor,
inplace_buffers=False), the speed-up (goal >= 1.5x), the first-call (compile) time and the mean
fixed-point iterations of each variant (Anderson eagerly; under compile the runtime falls back to
the damped iteration, so the iteration counts differ while the fixed point is the same).
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


def measure(fn, net, x, g, steps):
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    step(fn, net, opt, x, g)
    first = time.perf_counter() - t0
    step(fn, net, opt, x, g)  # warm-up
    times, iters = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(fn, net, opt, x, g)
        times.append(time.perf_counter() - t0)
        iters.append(net.fixed_point_stats()["fixed_point_0"].iterations.float().mean().item())
    return first, statistics.median(times), statistics.mean(iters)


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
    state = {k: v.clone() for k, v in net.state_dict().items()}

    eager = measure(net, net, x, g, args.steps)
    net.load_state_dict(state)  # both variants start from the same parameters
    compiled_fn = fxwormhole.compile(net)
    compiled = measure(compiled_fn, net, x, g, args.steps)

    print(f"wormhole MLP: width {args.width}, {args.depth} layers, batch {args.batch}, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU")
    print(f"{'variant':<24}{'step ms':>10}{'first call s':>14}{'fp iters':>10}")
    for name, (first, med, its) in (("eager", eager), ("fxwormhole.compile", compiled)):
        print(f"{name:<24}{med * 1e3:>10.1f}{first:>14.1f}{its:>10.1f}")
    speedup = eager[1] / compiled[1]
    print(f"speed-up compiled vs eager: {speedup:.2f}x (goal >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'}); "
          f"compile time (first compiled step minus an eager step) ~{compiled[0] - eager[1]:.1f} s")


if __name__ == "__main__":
    main()
