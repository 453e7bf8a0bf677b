"""Benchmark: explicit recurrent modules (and closed temporal wormholes) vs nn.LSTM / nn.GRU.

For each cell kind and sequence length, forward+backward of

* ``torch``     -- the original ``nn.LSTM`` / ``nn.GRU`` (ATen's fused CPU kernels),
* ``explicit``  -- ``ExplicitLSTM`` / ``ExplicitGRU`` (Python time loop over an eager cell),
* ``temporal``  -- the explicit module with temporal wormholes, gates closed (one FixedPoint
  solve per step, one evaluation each),
* ``compiled``  -- ``explicit.compile_step()`` (inductor; the cell is compiled once),

Timing alternates the variants in one process (median of ``--repeats`` rounds) so that machine
load drifts hit them alike. Peak memory: a fresh subprocess per (kind, T, variant) builds the model
and inputs, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs one
forward+backward and reports ``VmHWM - VmRSS_before``: the resident-set peak of that call
(allocator slack included; the compiled variant's would be the compiler's own and is not measured). Compile time is the first compiled forward+backward minus the
median compiled one.

    python bench/bench_recurrent.py [--lengths 100 300] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from fxwormhole.config import WormholeConfig
from fxwormhole.runtime.recurrent import add_temporal_wormhole, explicit_from_module

BATCH, HIDDEN, INPUT = 32, 128, 32
KINDS = {"lstm": nn.LSTM, "gru": nn.GRU}
EAGER = ("torch", "explicit", "temporal")


def build(kind: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    base = KINDS[kind](INPUT, HIDDEN)
    if variant == "torch":
        return base
    if variant == "temporal":
        return add_temporal_wormhole(base, WormholeConfig())
    mod = explicit_from_module(base)
    return mod.compile_step() if variant == "compiled" else mod


def fwd_bwd(mod: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = mod(x)[0]
    out.pow(2).mean().backward()
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(kind: str, length: int, variant: str) -> None:
    """Peak-RSS probe, run in a fresh process: prints {"peak_mib": ..., "probe": ...}.

    The high-water mark is reset after building the model and inputs, so that the import-time
    peak does not hide the forward+backward's; without /proc, ru_maxrss (which cannot be reset).
    """
    mod = build(kind, variant)
    x = torch.randn(length, BATCH, INPUT)
    if reset_peak_rss():
        before = _status_kib("VmRSS")
        fwd_bwd(mod, x)
        peak, probe = _status_kib("VmHWM") - before, "VmHWM"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fwd_bwd(mod, x)
        peak, probe = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "ru_maxrss"
    print(json.dumps({"peak_mib": peak / 1024, "probe": probe}))


def peak_memory(kind: str, length: int, variant: str, threads: int) -> float:
    cmd = [sys.executable, __file__, "--worker", kind, str(length), variant, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def bench(kind: str, length: int, repeats: int) -> dict:
    x = torch.randn(length, BATCH, INPUT)
    mods = {v: build(kind, v) for v in (*EAGER, "compiled")}
    for v in EAGER:
        fwd_bwd(mods[v], x)  # warm-up
    first_compiled = fwd_bwd(mods["compiled"], x)  # compiles the cell's forward and backward
    times: dict = {v: [] for v in mods}
    for _ in range(repeats):
        for v, mod in mods.items():
            mod.zero_grad(set_to_none=True)
            times[v].append(fwd_bwd(mod, x))
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"median_s": med, "compile_s": first_compiled - med["compiled"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "T", "VARIANT"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    print(f"batch={BATCH} hidden={HIDDEN} input={INPUT} threads={args.threads} repeats={args.repeats} "
          f"torch={torch.__version__}")
    header = f"{'kind':5} {'T':>4} {'variant':9} {'fwd+bwd ms':>11} {'x torch':>8} {'peak MiB':>9} {'compile s':>10}"
    print(header)
    print("-" * len(header))
    for kind in KINDS:
        for length in args.lengths:
            torch._dynamo.reset()
            res = bench(kind, length, args.repeats)
            base = res["median_s"]["torch"]
            for v in (*EAGER, "compiled"):
                t = res["median_s"][v]
                mem = f"{peak_memory(kind, length, v, args.threads):9.1f}" if v in EAGER else f"{'n/a':>9}"
                comp = f"{res['compile_s']:10.1f}" if v == "compiled" else f"{'':>10}"
                print(f"{kind:5} {length:4d} {v:9} {t * 1e3:11.1f} {t / base:8.2f} {mem} {comp}", flush=True)


if __name__ == "__main__":
    main()
