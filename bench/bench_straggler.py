"""What it costs when data-parallel ranks need different fixed-point iteration counts.

Each rank's fixed points halt per sample on the rank's own shard, with no collective inside the
solver loop. DDP then all-reduces the gradients in the backward pass, so a rank whose shard needs
fewer iterations waits there for the slowest rank: its idle time is the straggler cost.

Two processes (gloo, CPU, 1 thread each) train-step (forward + backward, no optimizer step, so the
iteration counts stay put) a transformed MLP (16 -> 64 x3 -> 4, a Picard-solved wormhole from the
last hidden layer to the first, gate 0.88). The inputs set the iteration count: tanh is nearly linear
for small inputs (slow contraction, many iterations) and saturated for large ones (few). Scenarios:

* ``same shard``: both ranks see identical data (no straggler: the cost of synchronising alone);
* ``random shards``: each rank its own N(0, 1) batch (the everyday case);
* ``easy vs hard``: rank 0 gets large inputs (``--easy-scale``), rank 1 small ones (``--hard-scale``).

Per step and rank, ``compute`` is the CPU time of the same forward + backward on an unwrapped
replica with the same weights (no communication), and ``DDP`` the wall time of the step through
DistributedDataParallel, the two variants alternating; medians over ``--steps``. ``waits`` = DDP -
compute on that rank; ``idle`` = the share of the two ranks' DDP time not spent computing:
``1 - (compute_0 + compute_1) / (DDP_0 + DDP_1)``. On a loaded machine the waits include time the
scheduler took away: the ``same shard`` row (no straggler) is the baseline to subtract.
``straggler idle`` is the part of the idle share the compute imbalance alone explains, free of the
machine's load: ``1 - (compute_0 + compute_1) / (2 max(compute_0, compute_1))`` (each step lasts as
long as the slowest rank's compute).

    python bench/bench_straggler.py [--steps 30] [--batch 64]

The machine is shared: quote the load (``uptime``) next to the figures.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

SCENARIOS = ("same shard", "random shards", "easy vs hard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(proj_std: float) -> nn.Module:
    import fxwormhole
    from fxwormhole import WormholeConfig, zoo

    torch.manual_seed(0)
    cfg = WormholeConfig(wormholes=[("layers.2", "layers.0")], gate_init=2.0, proj_init="normal", proj_std=proj_std,
                         solver="picard", tol=1e-6, max_iter=300, on_fail="ignore")
    return fxwormhole.transform(zoo.MLP(in_features=16, hidden=64, depth=3), (torch.randn(8, 16),), cfg)


def _inputs(scenario: str, rank: int, batch: int, args) -> torch.Tensor:
    g = torch.Generator().manual_seed(0 if scenario == "same shard" else 1 + rank)
    x = torch.randn(batch, 16, generator=g)
    if scenario == "easy vs hard":
        x = x * (args.easy_scale if rank == 0 else args.hard_scale)
    return x


def _step(model: nn.Module, x: torch.Tensor, net: nn.Module) -> tuple[float, float, float, int]:
    """``(wall seconds, CPU seconds of this thread, mean and max forward iterations)`` of one forward +
    backward. CPU time is what the rank computes (torch runs on this one thread); wall time adds what it
    waits for (the other rank, or the scheduler of a loaded machine). The max iteration count sets the
    time: per-sample halting shrinks the batch, but the solve runs until its slowest sample converged."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.thread_time()
    model(x).square().mean().backward()
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
    stats = net.fixed_point_stats()["fixed_point_0"]
    return seconds, cpu, stats.iterations.float().mean().item(), int(stats.iterations.max())


def _worker(rank: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))
    try:
        net = _model(args.proj_std)
        alone = _model(args.proj_std)  # same weights, never wrapped: no communication
        ddp = nn.parallel.DistributedDataParallel(net)
        rows = {}
        for scenario in SCENARIOS:
            x = _inputs(scenario, rank, args.batch, args)
            times: dict[str, list[float]] = {"alone": [], "ddp": []}
            iters = []
            for i in range(args.warmup + args.steps):
                dist.barrier()  # both ranks start the DDP step together
                t_ddp, _, mean_it, max_it = _step(ddp, x, net)
                _, t_alone, _, _ = _step(alone, x, alone)
                if i >= args.warmup:
                    times["ddp"].append(t_ddp)
                    times["alone"].append(t_alone)
                    iters.append((mean_it, max_it))
            rows[scenario] = {"alone": statistics.median(times["alone"]), "ddp": statistics.median(times["ddp"]),
                              "mean": statistics.mean(m for m, _ in iters), "max": max(m for _, m in iters)}
        gathered = [None, None]
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            queue.put(gathered)
    finally:
        dist.destroy_process_group()


def _table(per_rank: list[dict]) -> str:
    from fxwormhole._text import text_table

    body = []
    for scenario in SCENARIOS:
        r0, r1 = per_rank[0][scenario], per_rank[1][scenario]
        idle = 1 - (r0["alone"] + r1["alone"]) / (r0["ddp"] + r1["ddp"])
        bound = 1 - (r0["alone"] + r1["alone"]) / (2 * max(r0["alone"], r1["alone"]))
        body.append((scenario, f"{r0['mean']:.1f} ({r0['max']}) / {r1['mean']:.1f} ({r1['max']})",
                     f"{1e3 * r0['alone']:.1f} / {1e3 * r1['alone']:.1f}", f"{1e3 * r0['ddp']:.1f} / {1e3 * r1['ddp']:.1f}",
                     f"{1e3 * (r0['ddp'] - r0['alone']):.1f} / {1e3 * (r1['ddp'] - r1['alone']):.1f}", f"{100 * idle:.0f}%",
                     f"{100 * bound:.0f}%"))
    head = ("scenario", "iterations mean (max) r0 / r1", "compute ms r0/r1", "DDP ms r0/r1", "waits ms r0/r1", "idle",
            "straggler idle")
    return text_table(head, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--proj-std", type=float, default=0.5, help="projection std: larger = slower contraction")
    p.add_argument("--easy-scale", type=float, default=8.0)
    p.add_argument("--hard-scale", type=float, default=0.05)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    workers = [ctx.Process(target=_worker, args=(r, port, args, queue)) for r in range(2)]
    for w in workers:
        w.start()
    per_rank = queue.get(timeout=1800)
    for w in workers:
        w.join(60)
    load = os.getloadavg()
    print(f"2 ranks (gloo, CPU, 1 thread each), {args.batch} samples per rank, {args.steps} steps (medians); "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(_table(per_rank))


if __name__ == "__main__":
    main()
