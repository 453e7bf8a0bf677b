"""Deep tanh MLP (width 16): BP alone vs BP + SAL on a 2-D linearly separable task.

At depth 50 with small random weights (W ~ N(0, 0.25/fan_in), b = 0) the first layer's gradient
vanishes and BP stays at chance; SAL keeps every neuron's sensitivity near 1 and BP learns.

    python examples/sal_deep_mlp.py                                      # short run (depth 10, seconds)
    python examples/sal_deep_mlp.py --depth 50 --iters 1500 --eta-abs 1e-3  # the reproduction
    python examples/sal_deep_mlp.py --depth 100 --iters 3000 --lr 0.01 --eta-abs 1e-3

SAL's gradient enters .grad, so with SGD(lr) the step is lr * eta; ``--eta-abs`` is the absolute
per-iteration SAL step (eta = eta_abs / lr).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxwormhole
from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument


def make_data(n: int, gen: torch.Generator):
    x = torch.rand(n, 2, generator=gen) * 2 - 1
    return x, (x.sum(1) > 0).float().unsqueeze(1)


def build(depth: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, fan_in = [], 2
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        nn.init.normal_(lin.weight, std=0.5 / fan_in ** 0.5)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
        fan_in = width
    out = nn.Linear(width, 1)
    nn.init.normal_(out.weight, std=0.1)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def run(depth: int, width: int, iters: int, lr: float, eta_abs: float, use_sal: bool, seed: int = 0,
        batch: int = 128, report: int = 300, log=print):
    net = build(depth, width, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    xte, yte = make_data(2000, torch.Generator().manual_seed(123))
    sal_cfg = SALConfig(eta=eta_abs / lr, beta=0.99) if use_sal else SALConfig(enabled=False)
    model = instrument(net, (xte[:batch],), sal_cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    first = model.get_parameter("0.weight")
    hist = []
    t0 = time.time()
    for it in range(iters + 1):
        x, y = make_data(batch, gen)
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        if it % report == 0 or it == iters:
            model.eval()  # eval mode: no SAL term, no statistics update; same outputs
            g1 = torch.autograd.grad(F.binary_cross_entropy_with_logits(model(x), y), first)[0].norm().item()
            with torch.no_grad():
                acc = ((model(xte) > 0).float() == yte).float().mean().item()
            model.train()
            rep = fxwormhole.sensitivity_report(model)
            hist.append((it, loss.item(), acc, g1, rep.mean_log_rms()))
            log(f"  it {it:5d} loss {loss.item():.3f} test_acc {acc:.3f} |dL/dW1| {g1:.2e} "
                f"mean layer log RMS s {rep.mean_log_rms():+.3f} ({time.time() - t0:.0f}s)")
        if it < iters:
            opt.step()
    return hist


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eta-abs", type=float, default=5e-3, help="absolute SAL step per iteration")
    ap.add_argument("--report", type=int, default=None)
    ap.add_argument("--modes", default="bp,sal")
    args = ap.parse_args(argv)
    report = args.report or max(1, args.iters // 5)
    out = {}
    for mode in args.modes.split(","):
        print(f"depth {args.depth}, width {args.width}, lr {args.lr}: {'BP + SAL' if mode == 'sal' else 'BP only'}")
        out[mode] = run(args.depth, args.width, args.iters, args.lr, args.eta_abs, mode == "sal", report=report)
    return out


if __name__ == "__main__":
    main()
