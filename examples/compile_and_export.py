"""The whole pipeline on a small MLP: transform -> train -> compile -> export -> reload -> run.

    python examples/compile_and_export.py [--backend inductor|aot_eager] [--formats pt2,onnx] [--out DIR]

Each stage checks itself against eager mode and the script exits non-zero on a mismatch.
Exported artifacts are inference-only: training continues on the TransformedModule.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxwormhole
from fxwormhole import WormholeConfig, zoo

TOL = 1e-4


def log(stage: str, message: str) -> None:
    print(f"[{stage:>9}] {message}", flush=True)


def train(model, data, steps: int, lr: float = 0.05) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--formats", default="pt2,onnx", help="comma-separated export formats (default: pt2,onnx)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per phase (default: 5)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="fxwormhole_pipeline_"))
    ok = True

    # 1. transform: an open wormhole (gate 0.5, random projection) so the fixed point iterates
    model = zoo.MLP(in_features=8, hidden=16, out_features=2, depth=3)
    x = torch.randn(32, 8)
    target = torch.randn(32, 2)
    net = fxwormhole.transform(model, (x[:4],), WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.2,
                                                               tol=1e-6, max_iter=60))
    log("transform", net.summary().replace("\n", " | "))

    # 2. train eagerly
    losses = train(net, (x, target), args.steps)
    its = net.fixed_point_stats()["fixed_point_0"].iterations.float().mean().item()
    log("train", f"eager loss {losses[0]:.4f} -> {losses[-1]:.4f}, {its:.1f} fixed-point iterations per sample")

    # 3. compile (same parameters) and check one step against eager
    t0 = time.perf_counter()
    fast = fxwormhole.compile(net, backend=args.backend)
    y_c = fast(x)
    g = torch.randn_like(y_c)
    grads_c = torch.autograd.grad(y_c, list(net.parameters()), g)
    compile_s = time.perf_counter() - t0
    grads_e = torch.autograd.grad(net(x), list(net.parameters()), g)
    diff = max((a - b).abs().max().item() for a, b in zip(grads_c, grads_e))
    ok &= diff < TOL
    log("compile", f"{args.backend}: first step {compile_s:.1f} s, max|grad - eager| = {diff:.1e}")
    losses = train(fast, (x, target), args.steps)
    log("train", f"compiled loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    # 4. export, reload, run at a batch size the export never saw
    x_new = torch.randn(11, 8)
    net.eval()
    with torch.no_grad():
        want = net(x_new)
    net.train()
    for fmt in [f for f in args.formats.split(",") if f]:
        path = fxwormhole.export(net, (x[:4],), out / f"mlp_wormhole.{fmt}", format=fmt)
        runner = fxwormhole.export.load(path)
        with torch.no_grad():
            diff = (runner(x_new) - want).abs().max().item()
        ok &= diff < TOL
        log("export", f"{path.name}: reloaded, batch 11, max|artifact - eager| = {diff:.1e}")
        try:
            runner.train()
        except fxwormhole.ExportError as exc:
            log("export", f"training it is refused: {str(exc)[:80]}...")
    log("done", "all checks passed" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
