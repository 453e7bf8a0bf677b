"""Training-step time: plain MLP vs the same MLP with sensitivity probes, and with probes + SAL.

MLP width 512, batch 256, tanh, SGD. Variants alternate inside one run (same machine state), and
the table reports the median step time of each and its ratio to the plain step.

    python bench/bench_sal_overhead.py [--depth 4] [--reps 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument


def mlp(depth: int, width: int) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (less sensitive to other jobs on a shared machine)")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = mlp(args.depth, args.width)
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    variants = {
        "plain": net,
        "probes": instrument(net, (x,), SALConfig(enabled=False)),
        "probes+SAL": instrument(net, (x,), SALConfig(eta=0.01)),
        "probes+SAL(log)": instrument(net, (x,), SALConfig(eta=0.01, log_form=True)),
    }
    opts = {k: torch.optim.SGD(m.train().parameters(), lr=1e-3) for k, m in variants.items()}

    def step(name):
        m, opt = variants[name], opts[name]
        t = clock()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        return clock() - t

    for name in variants:  # warm up
        for _ in range(3):
            step(name)
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name in variants:  # alternate: drifts in machine load hit every variant alike
            times[name].append(step(name))
    base = statistics.median(times["plain"])
    print(f"MLP depth {args.depth} width {args.width} batch {args.batch}, {args.threads} threads, {args.reps} reps")
    print(f"{'variant':<16} {'median ms':>10} {'ratio':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<16} {1000 * med:10.2f} {med / base:7.2f}")
    return {k: statistics.median(v) / base for k, v in times.items()}


if __name__ == "__main__":
    main()
