"""DistributedDataParallel on CPU (gloo, 2 processes on localhost) with open wormholes and SAL.

What is checked (docs/reliability.md, "Several processes / GPUs"):

* the averaged DDP gradients of a transformed model with SAL (open wormholes, so the fixed points
  iterate) equal the single-process gradients of the full batch split across the two ranks;
* SAL's probe buffers (``s_bar``, ``log_rms``, ``last_log_rms``, ``count``) follow DDP's default
  ``broadcast_buffers=True``: at the start of every forward each rank's buffers are overwritten by
  rank 0's, so every rank uses the same SAL gates, computed from **rank 0's shard only**. The test
  pins exactly that: the buffers every rank sees at step 2 are those of a single process that ran
  step 1 on rank 0's shard alone, and differ from what rank 1 had computed on its own shard.

The test is bounded: process-group timeout 60 s, and the spawned processes are joined with a
deadline and terminated if they overrun.
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fxwormhole as fw

WORLD = 2
BATCH = 16  # full batch; each rank gets BATCH // WORLD samples
STEPS = 3
DEADLINE_S = 150.0


def _build(eta: float = 0.05) -> nn.Module:
    """The transformed model, identical in every process (float64: the comparison is tight)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x, _ = _data()
    cfg = fw.WormholeConfig(wormholes=[("2", "0")], gate_init=0.0, proj_init="normal", proj_std=0.2,
                            solver="anderson", tol=1e-11, max_iter=200,
                            grad=fw.GradConfig(tol=1e-11, max_iter=200), on_fail="raise")
    return fw.transform(model, (x,), cfg, sal=fw.SALConfig(eta=eta, beta=0.9)).train()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _shard(rank: int) -> slice:
    n = BATCH // WORLD
    return slice(rank * n, (rank + 1) * n)


def _probe_buffers(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.named_buffers() if "sal_probe" in k}


def _grads(net: nn.Module) -> dict:
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        net = _build()
        ddp = nn.parallel.DistributedDataParallel(net)  # broadcast_buffers=True (the default)
        seen_before, seen_after = [], []
        net.register_forward_pre_hook(lambda m, a: seen_before.append(_probe_buffers(m)))
        net.register_forward_hook(lambda m, a, o: seen_after.append(_probe_buffers(m)))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = _data()
        grads, iterations = [], []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x[_shard(rank)]), y[_shard(rank)])
            loss.backward()
            grads.append(_grads(net))
            iterations.append(int(net.fixed_point_stats()["fixed_point_0"].iterations.max()))
            opt.step()
        torch.save({"grads": grads, "before": seen_before, "after": seen_after, "iterations": iterations,
                    "params": {k: p.detach().clone() for k, p in net.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir: str) -> None:
    ctx = mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def _single_process_step(x, y, eta: float = 0.05) -> tuple[dict, dict]:
    """Gradients and probe buffers of one step of a single process on ``(x, y)``."""
    net = _build(eta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the float64 solves converge: nothing to warn about
        F.cross_entropy(net(x), y).backward()
    return _grads(net), _probe_buffers(net)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_gradients_equal_single_process_full_batch_and_probe_buffers_follow_rank0(tmp_path):
    _spawn(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x, y = _data()

    # 1. gradients: averaged DDP gradients == single-process gradients of the full batch
    full, _ = _single_process_step(x, y)
    no_sal, _ = _single_process_step(x, y, eta=0.0)
    assert any(float((full[k] - no_sal[k]).abs().max()) > 1e-4 for k in full), "SAL must add to the gradients"
    assert all(max(r["iterations"]) > 1 for r in ranks), "open wormholes: the fixed points must iterate"
    worst = 0.0
    for r in ranks:
        assert set(r["grads"][0]) == set(full)
        for name, g in full.items():
            diff = float((r["grads"][0][name] - g).abs().max())
            worst = max(worst, diff)
            assert diff <= 1e-9 * max(1.0, float(g.abs().max())), f"{name}: DDP differs by {diff:.2e}"
    print(f"\nmax |DDP - single-process| gradient difference (float64): {worst:.3e}")
    # every step's gradients are identical on both ranks (DDP all-reduced them) ...
    for step in range(STEPS):
        for name in full:
            torch.testing.assert_close(ranks[0]["grads"][step][name], ranks[1]["grads"][step][name], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)

    # 2. probe buffers: rank 0's statistics are broadcast at the start of every forward
    _, shard0 = _single_process_step(x[_shard(0)], y[_shard(0)])
    _, shard1 = _single_process_step(x[_shard(1)], y[_shard(1)])
    assert shard0 and any(not torch.equal(shard0[k], shard1[k]) for k in shard0), "shards must differ"
    for r, other in zip(ranks, (shard0, shard1)):
        torch.testing.assert_close(r["after"][0], other)  # step 1: each rank measured its own shard
        torch.testing.assert_close(r["before"][1], shard0)  # step 2 starts from rank 0's statistics
    for step in range(1, STEPS):
        torch.testing.assert_close(ranks[0]["before"][step], ranks[1]["before"][step], rtol=0, atol=0)
