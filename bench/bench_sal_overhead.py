"""Training-step time: plain MLP vs the same MLP with sensitivity probes, and with probes + SAL.

A 4 x 512 tanh MLP, batch 256, SGD, one thread; eager, and compiled with ``torch.compile`` (inductor,
which fuses SAL's elementwise passes). Variants alternate inside one run (same machine state) and
the table reports, per variant, the median step time on two clocks and the ratio to the plain step
(eager variants: the eager plain step; compiled variants: the compiled plain step):

* CPU: this thread's CPU time (``time.thread_time``): what the step costs; robust to other jobs
  sharing the machine (they delay the step but do not add to its CPU time);
* wall: ``time.perf_counter``: what a user waits for on the machine as loaded as it was.

    python bench/bench_sal_overhead.py [--depth 4] [--reps 30] [--threads 1] [--no-compile]

The goal is a SAL step at most 1.2x the plain step (docs/sensitivity.md, "Overhead").
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument
from fxwormhole.runtime.sensitivity import sal_step


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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = mlp(args.depth, args.width)
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    variants = {
        "plain": net,
        "probes": instrument(net, (x,), SALConfig(enabled=False)),
        "probes+SAL": instrument(net, (x,), SALConfig(eta=0.01)),
        "probes+SAL(log)": instrument(net, (x,), SALConfig(eta=0.01, log_form=True)),
        # SAL's update kept out of .grad and applied after the optimizer (one more weight-sized
        # product per layer: the x-term is no longer folded into the task's weight gradient)
        "probes+SAL(separate)": instrument(net, (x,), SALConfig(eta=0.01, separate_step=True)),
    }
    compile_s = {}
    if not args.no_compile:
        for name in ("plain", "probes+SAL"):
            model = copy.deepcopy(variants[name]).train()
            variants[name + " (compiled)"] = torch.compile(model)
    opts = {k: torch.optim.SGD(m.train().parameters(), lr=1e-3) for k, m in variants.items()}

    def step(name):
        m, opt = variants[name], opts[name]
        w, c = time.perf_counter(), time.thread_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        sal_step(m)  # applies a separate_step update; nothing to do for the other variants
        return time.thread_time() - c, time.perf_counter() - w

    for name in variants:  # warm up (the compiled variants compile here)
        t = time.perf_counter()
        step(name)
        compile_s[name] = time.perf_counter() - t
        for _ in range(2):
            step(name)
    cpu = {k: [] for k in variants}
    wall = {k: [] for k in variants}
    load_before = os.getloadavg()[0]
    for _ in range(args.reps):
        for name in variants:  # alternate: drifts in machine load hit every variant alike
            c, w = step(name)
            cpu[name].append(c)
            wall[name].append(w)
    load = (load_before + os.getloadavg()[0]) / 2
    base = {name: "plain (compiled)" if "compiled" in name else "plain" for name in variants}
    print(f"MLP depth {args.depth} width {args.width} batch {args.batch}, {args.threads} thread(s), {args.reps} "
          f"alternating reps, load average {load:.1f} on {os.cpu_count()} cores\n")
    print("| variant | CPU ms | CPU ratio | wall ms | wall ratio | first step s |")
    print("|---|---|---|---|---|---|")
    out = {}
    for name in variants:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        bc, bw = statistics.median(cpu[base[name]]), statistics.median(wall[base[name]])
        out[name] = c / bc
        print(f"| {name} | {1000 * c:.2f} | {c / bc:.2f} | {1000 * w:.2f} | {w / bw:.2f} | {compile_s[name]:.1f} |")
    return out


if __name__ == "__main__":
    main()
