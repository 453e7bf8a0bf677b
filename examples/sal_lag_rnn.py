"""Long-lag memory task for an Elman tanh RNN: BPTT vs BPTT + SAL vs spectral-radius initialisation.

The sign of the first input (channel 0 at t = 0) must be reported after ``--lag`` steps; channel 1
carries an optional uniform distractor during the lag. Modes:

* ``bptt``: small random recurrent weights (gain 0.5), BPTT only;
* ``sal``: the same start, BPTT + one-sided SAL, ``||w_j||`` over input and recurrent weights;
* ``sal_rec``: as ``sal`` with ``SALConfig.recurrent_only`` (recurrent weights only);
* ``spectral``: recurrent weights rescaled to spectral radius ``--rho`` before learning, BPTT only.

    python examples/sal_lag_rnn.py                                  # short run (lag 100, seconds)
    python examples/sal_lag_rnn.py --lag 100 --iters 1500           # longer
    python examples/sal_lag_rnn.py --lag 300 --iters 1500 --noise 1

``--eta-abs`` is SAL's step per time step (summed over the lag), as in a per-step online rule.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument


class LagNet(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.rnn = nn.RNN(2, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[-1]).squeeze(1)


def batch(lag: int, b: int, noise: float, gen: torch.Generator):
    sign = torch.randint(0, 2, (b,), generator=gen).float() * 2 - 1
    x = torch.zeros(lag, b, 2)
    x[0, :, 0] = sign
    x[1:, :, 1] = noise * (torch.rand(lag - 1, b, generator=gen) * 2 - 1)
    return x, (sign > 0).float()


def run(mode: str, lag: int, iters: int, hidden: int = 32, b: int = 32, lr: float = 0.05, eta_abs: float = 1e-4,
        noise: float = 0.0, g0: float = 0.5, rho: float = 1.0, seed: int = 0, report: int = 100, log=print):
    torch.manual_seed(seed)
    net = LagNet(hidden)
    with torch.no_grad():
        net.rnn.weight_ih_l0.normal_(0, 1.0)
        W = torch.randn(hidden, hidden) / math.sqrt(hidden)
        if mode == "spectral":
            W = W * rho / torch.linalg.eigvals(W).abs().max()
        else:
            W = W * g0
        net.rnn.weight_hh_l0.copy_(W)
        net.rnn.bias_ih_l0.zero_()
        net.rnn.bias_hh_l0.zero_()
    gen = torch.Generator().manual_seed(seed + 1)
    x0, _ = batch(lag, b, noise, gen)
    if mode.startswith("sal"):
        cfg = SALConfig(eta=eta_abs * lag / lr, recurrent_only=mode == "sal_rec")
    else:
        cfg = SALConfig(enabled=False)
    model = instrument(net, (x0,), cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = next(m for n, m in model.named_modules() if n == "sal_probe_rnn")
    accs, rows, t0 = [], [], time.time()
    for it in range(iters):
        x, y = batch(lag, b, noise, gen)
        opt.zero_grad()
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        opt.step()
        accs.append(((logits > 0).float() == y).float().mean().item())
        if (it + 1) % report == 0 or it == iters - 1:
            W = model.get_parameter("rnn.weight_hh_l0").detach()
            rho_now = torch.linalg.eigvals(W).abs().max().item()
            acc = sum(accs[-report:]) / len(accs[-report:])
            rows.append((it + 1, loss.item(), acc, float(probe.s_bar.mean()), rho_now))
            log(f"  [{mode}] it {it + 1:5d} loss {loss.item():.3f} acc(last {report}) {acc:.2f} "
                f"s_bar {float(probe.s_bar.mean()):.2f} rho(W) {rho_now:.2f} ({time.time() - t0:.0f}s)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lag", type=int, default=100)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--eta-abs", type=float, default=1e-4, help="SAL step per time step (1e-3 runs away at lag 100, caveat C1)")
    ap.add_argument("--rho", type=float, default=1.0)
    ap.add_argument("--modes", default="bptt,sal,sal_rec,spectral")
    ap.add_argument("--report", type=int, default=None)
    args = ap.parse_args(argv)
    report = args.report or max(1, args.iters // 3)
    out = {}
    for mode in args.modes.split(","):
        print(f"lag {args.lag}, noise {args.noise}, mode {mode}")
        out[mode] = run(mode, args.lag, args.iters, eta_abs=args.eta_abs, noise=args.noise, rho=args.rho,
                        report=report)
    return out


if __name__ == "__main__":
    main()
