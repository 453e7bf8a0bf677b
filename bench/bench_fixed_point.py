"""Fixed-point runtime benchmarks: (a) training memory vs iteration count, (b) adaptive compute.

(a) Memory of one training step (forward + backward) at max_iter = 5 and 100, for the implicit
    gradient and for backprop through the iterations (unrolled). Measured as the bytes of tensors
    autograd saves for backward, counted with torch.autograd.graph.saved_tensors_hooks (exact and
    deterministic on CPU, unlike RSS deltas). The residual tolerance is set to 0 so that every
    configuration really runs max_iter iterations.
(b) Adaptive compute: a batch of 90% easy samples (contraction 0.3) and 10% hard ones
    (contraction 0.97, near critical). Wall time of the eager forward with per-sample halting
    (converged samples are indexed out of the active set) vs halting="batch" (the whole batch
    iterates until the slowest sample converged), same tolerance; worst final residuals printed.

    python bench/bench_fixed_point.py [--threads 1] [--batch 1024] [--width 512]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from fxwormhole.config import GradConfig, SolverConfig
from fxwormhole.runtime.fixed_point import FixedPoint


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d))
        self.W = nn.Parameter(q)  # orthogonal: the per-sample factor s sets the contraction
        self.U = nn.Linear(d, d)

    def forward(self, z, x, s):
        return s * torch.tanh(z @ self.W.T) + self.U(x)


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def memory_table(d=256, batch=64):
    torch.manual_seed(0)
    layer = Layer(d)
    x = torch.randn(batch, d)
    s = torch.full((batch, 1), 0.9)
    rows = []
    for mode in ("implicit", "phantom", "jfb", "unrolled"):
        per = {}
        for it in (5, 100):
            node = FixedPoint(layer, solver=SolverConfig(name="picard", tol=1e-30, max_iter=it),
                              grad=GradConfig(mode=mode, tol=1e-30, max_iter=it), on_fail="ignore")

            def step():
                node(x, s).square().sum().backward()

            per[it] = saved_bytes(step)
        rows.append((mode, per[5], per[100], per[100] / per[5]))
    print("(a) bytes saved for backward in one training step (saved_tensors_hooks), width 256, batch 64")
    print(f"{'grad mode':10s} {'max_iter=5':>12s} {'max_iter=100':>13s} {'ratio':>7s}")
    for mode, a, b, r in rows:
        print(f"{mode:10s} {a:12,d} {b:13,d} {r:7.2f}")


def adaptive_table(d=512, batch=1024, reps=7):
    torch.manual_seed(0)
    layer = Layer(d)
    x = torch.randn(batch, d)
    s = torch.full((batch, 1), 0.3)
    s[torch.randperm(batch)[: batch // 10]] = 0.97
    tol = 1e-5
    res = {}
    with torch.no_grad():
        for halting in ("sample", "batch"):
            node = FixedPoint(layer, solver=SolverConfig(name="picard", tol=tol, max_iter=2000, halting=halting))
            node(x, s)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                node(x, s)
                ts.append(time.perf_counter() - t)
            st = node.stats
            res[halting] = (sorted(ts)[reps // 2], st.worst_residual, st.mean_iterations,
                            int(st.iterations.max()), st.summary()["forward"]["status"])
    print(f"\n(b) adaptive compute: batch {batch}, 90% easy (s=0.3) / 10% hard (s=0.97), picard, tol {tol}")
    print(f"{'halting':8s} {'s/forward':>10s} {'worst resid':>12s} {'mean iters':>11s} {'max iters':>10s}  status")
    for h, (t, w, m, mx, stc) in res.items():
        print(f"{h:8s} {t:10.4f} {w:12.2e} {m:11.1f} {mx:10d}  {stc}")
    print(f"time ratio sample/batch = {res['sample'][0] / res['batch'][0]:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024, help="batch of the adaptive-compute table")
    ap.add_argument("--width", type=int, default=512, help="width of the adaptive-compute table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    memory_table()
    adaptive_table(d=args.width, batch=args.batch)


if __name__ == "__main__":
    main()
