"""Long-run memory check: train a small transformed model (open wormholes + SAL) for many steps and
fit the resident-set size against the step number.

    python bench/bench_long_run.py                 # 10,000 steps, RSS every 100 steps
    python bench/bench_long_run.py --steps 2000 --every 50

RSS is read from /proc/self/statm (Linux; no psutil). The slope is a least-squares line through the
samples after ``--warmup`` steps (allocator and autograd caches settle first), in bytes per 1000
steps. Also printed: live tensors (gc), tensors held by the fixed-point stats, the size of the
warnings, solver iterations and the time per step. See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxwormhole as fw

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``, second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def stats_tensors(net: nn.Module) -> int:
    """Tensors referenced by every fixed-point node's last stats (a leak would make this grow)."""
    n = 0
    for st in net.fixed_point_stats().values():
        if st is None:
            continue
        for value in vars(st).values():
            n += isinstance(value, torch.Tensor)
            if isinstance(value, dict):
                n += sum(isinstance(v, torch.Tensor) for v in value.values())
    return n


def slope_per_1000(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``steps``, per 1000 steps."""
    n = len(steps)
    if n < 2:
        return float("nan")
    mx, my = sum(steps) / n, sum(values) / n
    sxx = sum((s - mx) ** 2 for s in steps)
    sxy = sum((s - mx) * (v - my) for s, v in zip(steps, values))
    return 1000.0 * sxy / sxx


def build(seed: int = 0, width: int = 32, batch: int = 32) -> tuple[nn.Module, Callable[[int], tuple]]:
    """A transformed tanh MLP with an open wormhole and SAL, and a deterministic data stream."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))
    x0 = torch.randn(batch, 16)
    cfg = fw.WormholeConfig(wormholes=[("2", "0")], gate_init=0.0, proj_init="normal", proj_std=0.1,
                            solver="anderson", tol=1e-4, max_iter=40, grad=fw.GradConfig(tol=1e-4, max_iter=40))
    net = fw.transform(model, (x0,), cfg, sal=fw.SALConfig(eta=1e-3))
    teacher = torch.randn(16, 4)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(batch, 16, generator=g)
        return x, (x @ teacher).argmax(1)

    return net, data


def run(steps: int, every: int, warmup: int, log: Callable[[str], None] = print) -> dict:
    """Train ``steps`` steps; sample RSS every ``every`` steps. Returns the measured figures."""
    net, data = build()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    samples: list[tuple[int, int]] = []
    tensors: list[tuple[int, int]] = []
    held: set[int] = set()
    iters, warned = 0.0, 0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = data(step)
        opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = F.cross_entropy(net(x), y)
            loss.backward()
        warned += len(caught)
        opt.step()
        iters += net.fixed_point_stats()["fixed_point_0"].mean_iterations
        if step % every == 0:
            samples.append((step, rss_bytes()))
            held.add(stats_tensors(net))
        if step % (every * 10) == 0 or step == steps:
            del loss
            gc.collect()
            tensors.append((step, live_tensors()))
            log(f"step {step:6d}  rss {samples[-1][1] / 2**20:8.2f} MiB  live tensors {tensors[-1][1]}  "
                f"mean iterations {iters / step:5.2f}")
    elapsed = time.perf_counter() - t0
    after = [(s, r) for s, r in samples if s > warmup]
    half = [(s, r) for s, r in samples if s > steps // 2]
    return {
        "steps": steps,
        "seconds_per_step": elapsed / steps,
        "rss_slope_bytes_per_1000": slope_per_1000([s for s, _ in after], [r for _, r in after]),
        "rss_slope_second_half": slope_per_1000([s for s, _ in half], [r for _, r in half]),
        "rss_first_mib": samples[0][1] / 2**20,
        "rss_last_mib": samples[-1][1] / 2**20,
        "live_tensors": tensors,
        "stats_tensors": sorted(held),
        "mean_iterations": iters / steps,
        "warnings": warned,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--every", type=int, default=100, help="sample RSS every N steps")
    p.add_argument("--warmup", type=int, default=1000, help="steps left out of the fit")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args.steps, args.every, min(args.warmup, args.steps // 2))
    print(f"\n{r['steps']} steps, {1e3 * r['seconds_per_step']:.2f} ms/step, mean solver iterations "
          f"{r['mean_iterations']:.2f}, warnings {r['warnings']}")
    print(f"RSS {r['rss_first_mib']:.1f} MiB -> {r['rss_last_mib']:.1f} MiB; slope after warm-up: "
          f"{r['rss_slope_bytes_per_1000']:+.0f} bytes per 1000 steps (second half: "
          f"{r['rss_slope_second_half']:+.0f})")
    print(f"live tensors (gc) at samples: {[n for _, n in r['live_tensors']]}")
    print(f"tensors held by fixed-point stats: {r['stats_tensors']}")


if __name__ == "__main__":
    main()
