"""Multi-process training of a transformed model, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_train.py --out runs/digits
    torchrun --standalone --nproc_per_node=2 examples/torchrun_train.py --fsdp --out runs/digits_fsdp

An MLP on scikit-learn's 8x8 digits (bundled, no download) is rewritten with a wormhole from its
last hidden layer back to its first, plus SAL probes, then trained data-parallel: every global
batch is split across the ranks. ``--fsdp`` shards the parameters with FSDP2 (``fully_shard``)
instead of replicating them with DistributedDataParallel. gloo on CPU, NCCL when every rank has a
GPU (``LOCAL_RANK`` picks it).

Every ``--log-every`` steps rank 0 prints the fixed points' iterations and the loss
(:class:`fxwormhole.StatsLogger`); at the end every rank evaluates the test set, rank 0 saves the
model with :func:`fxwormhole.save` and writes ``results.json`` (loss curve, test accuracy, a
checksum of each rank's parameters: identical replicas have identical checksums).

Notes for your own script:

* the gate is ``"channel"`` (one logit per channel); the default ``"scalar"`` gate works under DDP and
  FSDP2 too (its logit has shape ``[1]``: FSDP2 refuses 0-d parameters);
* SAL's probe buffers follow DDP's ``broadcast_buffers=True`` (rank 0's statistics, see
  docs/reliability.md); under FSDP2 buffers are not broadcast: each rank keeps its own statistics;
* each rank's fixed points halt per sample on its own shard, so the rank with the hardest samples
  sets the pace at the gradient all-reduce (bench/bench_straggler.py measures the cost).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxwormhole
from fxwormhole import SALConfig, WormholeConfig, zoo

CONFIG = WormholeConfig(wormholes=[("layers.2", "layers.0")], gate="channel", gate_init=-1.0, proj_init="normal",
                        proj_std=0.1, solver="anderson", tol=1e-4, max_iter=30)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  torchrun --standalone --nproc_per_node=2 examples/torchrun_train.py "
                                       "--steps 60 --out runs/digits")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--batch", type=int, default=64, help="global batch, split across the ranks (default 64)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: adam 1e-2, sgd 0.1)")
    p.add_argument("--no-sal", action="store_true", help="wormholes only, no sensitivity probes")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("runs/torchrun_digits"), help="folder for the save and results.json")
    return p.parse_args(argv)


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 8x8 digits as 64 standardised features, a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build(sal: bool) -> torch.nn.Module:
    """The transformed model, identical on every rank (same seed)."""
    torch.manual_seed(0)
    model = zoo.MLP(in_features=64, hidden=32, depth=3, out_features=10)
    return fxwormhole.transform(model, (torch.randn(8, 64),), CONFIG, sal=SALConfig(eta=1e-3) if sal else None)


def global_batch(step: int, x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch (the same on every rank; each takes its slice)."""
    idx = torch.randint(0, len(x), (size,), generator=torch.Generator().manual_seed(1000 + step))
    return x[idx], y[idx]


def make_optimizer(params, name: str, lr: float | None) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1 if lr is None else lr)
    return torch.optim.Adam(params, lr=1e-2 if lr is None else lr)


def checksum(net: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes (full tensors: FSDP2 shards are gathered; a collective)."""
    digest = hashlib.sha256()
    for _, p in net.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        digest.update(full.detach().cpu().clone().numpy().tobytes())  # a copy: numpy() pins the storage FSDP frees
    return digest.hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) <= torch.cuda.device_count()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    try:
        if args.batch % world:
            raise SystemExit(f"--batch {args.batch} must be divisible by the {world} ranks")
        x_train, y_train, x_test, y_test = digits()
        net = build(not args.no_sal).to(device)
        if args.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(net, mesh=init_device_mesh(device.type, (world,)))
            model = net
        else:
            model = torch.nn.parallel.DistributedDataParallel(net)  # broadcast_buffers=True: rank 0's SAL stats
        opt = make_optimizer(model.parameters(), args.optimizer, args.lr)
        log = fxwormhole.StatsLogger(lambda m: print(_log_line(m), flush=True), every=args.log_every)
        share = args.batch // world
        losses, t0 = [], time.perf_counter()
        for step in range(args.steps):
            xb, yb = global_batch(step, x_train, y_train, args.batch)
            xb, yb = xb[rank * share:(rank + 1) * share].to(device), yb[rank * share:(rank + 1) * share].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # the global batch's loss (each shard's mean, averaged)
            losses.append(mean.item() / world)
            if rank == 0:
                log(net, step, loss=losses[-1])
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test.to(device)).argmax(-1).cpu() == y_test).float().mean().item()
        sums = [None] * world
        dist.all_gather_object(sums, checksum(net))
        if args.fsdp:
            fxwormhole.save(net, args.out)  # every rank: the shards are gathered; rank 0 writes
        elif rank == 0:
            fxwormhole.save(net, args.out, optimizer=opt)
        if rank == 0:
            result = {"world": world, "fsdp": args.fsdp, "sal": not args.no_sal, "steps": args.steps,
                      "losses": losses, "test_accuracy": accuracy, "checksums": sums, "seconds": seconds}
            (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"{'FSDP2' if args.fsdp else 'DDP'} x{world}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy "
                  f"{accuracy:.3f}, {seconds:.1f} s; saved {args.out}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _log_line(metrics: dict) -> str:
    iters = [v for k, v in metrics.items() if k.endswith("forward_iterations_mean")]
    back = [v for k, v in metrics.items() if k.endswith("backward_iterations_mean")]
    gates = [v for k, v in metrics.items() if "/gate/" in k]
    return (f"step {metrics['step']:4d}  loss {metrics['fxwormhole/loss']:.4f}  fixed-point iterations "
            f"forward {sum(iters) / max(len(iters), 1):.1f} backward {sum(back) / max(len(back), 1):.1f}  "
            f"gate {sum(gates) / max(len(gates), 1):.3f}")


if __name__ == "__main__":
    sys.exit(main())
